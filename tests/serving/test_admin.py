from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

from liveloop.artifacts import open_artifact_store
from liveloop.db import make_engine, make_sessionmaker
from liveloop.registry import Registry

ADMIN, USER_KEY = "admin-secret-of-32-characters-ok", "user-key"


@dataclass
class Admin:
    client: httpx.Client
    registry: Registry


@pytest.fixture
def admin(serve, make_settings, tiny_model_dir):
    overrides = {"admin_token": ADMIN, "api_keys": [f"alice:{USER_KEY}"]}
    with serve(**overrides) as url:
        settings = make_settings(base_model=tiny_model_dir, **overrides)
        engine = make_engine(settings.resolved_database_url)
        registry = Registry(make_sessionmaker(engine), open_artifact_store(settings))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as client:
            yield Admin(client, registry)
        engine.dispose()


def approved(registry: Registry, make_adapter_dir, name: str, seed: int = 0) -> None:
    registry.register(name, make_adapter_dir(name, seed=seed))
    registry.judge(name, report={"passed": True, "gates": [{"name": "kl", "value": 0.01, "threshold": 0.5,
                                                             "passed": True, "details": {}}]}, failed=[])


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": f"Bearer {USER_KEY}"}, 403),
    ({"Authorization": "Bearer not-the-token"}, 401),
])
def test_admin_api_needs_the_admin_token(admin, headers, status):
    for method, path in [("GET", "/admin/adapters"), ("POST", "/admin/adapters/v1/promote"),
                         ("POST", "/admin/adapters/rollback")]:
        response = httpx.request(method, f"{admin.client.base_url}{path}", headers=headers,
                                 json={"reason": "x"})
        assert response.status_code == status, (path, response.text)
        assert response.json()["error"]["type"] in {"authentication_error", "permission_error"}


def test_admin_api_is_closed_without_an_admin_token(serve):
    with serve() as url:
        response = httpx.get(f"{url}/admin/adapters", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403 and "LIVELOOP_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_list_show_promote_reject_rollback_and_diff(admin, make_adapter_dir):
    registry, client = admin.registry, admin.client
    approved(registry, make_adapter_dir, "v1")
    approved(registry, make_adapter_dir, "v2", seed=1)
    registry.register("v3", make_adapter_dir("v3", seed=2))

    promoted = client.post("/admin/adapters/v1/promote", json={"reason": "first", "actor": "alice"})
    assert promoted.status_code == 200 and promoted.json()["state"] == "promoted"
    assert promoted.json()["audit"][0] == {**promoted.json()["audit"][0], "actor": "alice", "reason": "first",
                                           "from_state": "approved", "to_state": "promoted"}
    client.post("/admin/adapters/v2/promote", json={"reason": "better"}).raise_for_status()
    listing = client.get("/admin/adapters").json()
    assert (listing["live"], [v["name"] for v in listing["data"]]) == ("v2", ["v3", "v2", "v1"])
    assert [v["state"] for v in listing["data"]] == ["candidate", "promoted", "retired"]
    assert [v["name"] for v in client.get("/admin/adapters", params={"limit": 1}).json()["data"]] == ["v3"]

    shown = client.get("/admin/adapters/v2").json()
    assert shown["gate_report"][0]["name"] == "kl" and shown["predecessor"] == "v1"
    assert shown["thumbs"] == {"up": 0, "down": 0, "rate": None}

    rolled = client.post("/admin/adapters/rollback", json={"reason": "complaints"})
    assert rolled.json() == {"rolled_back": "v2", "live": "v1"}
    assert client.post("/admin/adapters/v3/reject", json={"reason": "no"}).json()["state"] == "rejected"

    diff = client.get("/admin/adapters/v1/diff/v2").json()
    rows = {row["field"]: row for row in diff["rows"]}
    assert (rows["state"]["a"], rows["state"]["b"], rows["state"]["differs"]) == ("promoted", "rolled_back", True)


def test_admin_errors_are_404_409_and_422(admin, make_adapter_dir):
    registry, client = admin.registry, admin.client
    registry.register("cand", make_adapter_dir("cand"))
    assert client.get("/admin/adapters/nope").status_code == 404
    illegal = client.post("/admin/adapters/cand/promote", json={"reason": "skip the gates"})
    assert illegal.status_code == 409 and "candidate → promoted" in illegal.json()["error"]["message"]
    assert client.post("/admin/adapters/rollback", json={"reason": "x"}).status_code == 409  # the base is live
    assert client.post("/admin/adapters/cand/reject", json={}).status_code == 422  # a reason is required
    assert registry.get("cand").state == "candidate"


def test_end_user_routes_cannot_change_adapters(admin):
    app_routes = httpx.get(f"{admin.client.base_url}/openapi.json").json()["paths"]
    changing = [path for path, ops in app_routes.items() if "adapters" in path and set(ops) - {"get"}]
    assert changing and all(path.startswith("/admin/") for path in changing)
