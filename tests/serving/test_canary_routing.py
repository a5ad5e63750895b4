"""Who is served the canary, over real HTTP: the API key's identity when keys are configured, the request's
``user`` field only on an open API; a request that names a version is pinned to it and recorded as such."""

from __future__ import annotations

import time

import httpx
import pytest
import sqlalchemy as sa

from liveloop.artifacts import open_artifact_store
from liveloop.db import make_engine, make_sessionmaker
from liveloop.promotion import in_canary
from liveloop.registry import Registry
from liveloop.tables import Completion

MESSAGES = [{"role": "user", "content": "Hello"}]


def names(inside: bool, count: int = 2) -> list[str]:
    """``count`` user names that fall inside (or outside) the canary slice of 'cand' at fraction 0.5."""
    return [n for n in (f"user{i}" for i in range(100)) if in_canary(n, "cand", 0.5) == inside][:count]


@pytest.mark.parametrize("keys", [True, False], ids=["api-keys", "open"])
def test_the_canary_slice_is_chosen_by_the_authenticated_identity(serve, make_settings, make_adapter_dir,
                                                                  tiny_model_dir, keys):
    (key_in, field_in), (key_out, field_out) = names(True), names(False)
    overrides = {"canary_fraction": 0.5, "adapter_poll_s": 0.1,
                 "api_keys": [f"{key_in}:k-in", f"{key_out}:k-out"] if keys else []}
    settings = make_settings(base_model=tiny_model_dir, **overrides)
    engine = make_engine(settings.resolved_database_url)
    with serve(**overrides) as url:
        registry = Registry(make_sessionmaker(engine), open_artifact_store(settings))
        for seed, name in enumerate(("live", "cand")):
            registry.register(name, make_adapter_dir(name, scale=0.05, seed=seed))
            registry.judge(name, report={"passed": True, "gates": []}, failed=[])
        registry.promote("live", actor="test", reason="x")
        registry.start_canary("cand", actor="test", reason="x")

        def served(key: str, user: str, model: str = "liveloop") -> httpx.Response:
            response = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"model": model, "messages": MESSAGES, "max_tokens": 2, "user": user})
            response.raise_for_status()
            return response

        deadline = time.monotonic() + 60
        while served("k-in", field_in).headers["x-liveloop-model-version"] != "cand":  # both loaded and routed
            assert time.monotonic() < deadline, "the replica never routed the canary"
            time.sleep(0.1)
        by_key = {(k, f): served(k, f).headers["x-liveloop-model-version"]
                  for k, f in [("k-in", field_out), ("k-out", field_in)]}
        pinned = served("k-out", field_out, model="cand").json()["id"]
    if keys:  # the key decides; the `user` field cannot move a caller into or out of the canary
        assert by_key == {("k-in", field_out): "cand", ("k-out", field_in): "live"}
    else:  # no keys: the `user` field is the only identity there is
        assert by_key == {("k-in", field_out): "live", ("k-out", field_in): "cand"}
    with engine.connect() as conn:
        stored = conn.execute(sa.select(Completion.requested_model, Completion.adapter_version)
                              .where(Completion.id == pinned)).one()
    engine.dispose()
    assert tuple(stored) == ("cand", "cand")  # pinned by name: the decisions leave it out (requested_model)
