"""What operators see of the API: /metrics over real HTTP, and the JSON log lines of a real `liveloop serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from feedback.broker import free_port
from liveloop.db import migrate
from tests.conftest import MODEL_CACHE


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_answer_200_and_count_requests_by_route_template_and_status(serve):
    with serve() as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/metrics").status_code == 200  # directly, not a 307 to /metrics/
        before = _samples(client.get("/metrics").text)
        reply = client.post("/v1/chat/completions", headers={"X-Request-ID": "req-1"}, json={
            "model": "liveloop", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert reply.status_code == 200 and reply.headers["x-request-id"] == "req-1"
        admin = client.get("/admin/adapters/policy-1").status_code  # /admin is closed without a token
        assert client.get("/no/such/path").status_code == 404
        rated = client.post("/v1/feedback", json={"completion_id": reply.json()["id"], "rating": "up"})
        assert rated.status_code == 202 and len(rated.headers["x-request-id"]) == 16  # made up when not sent
        after = _samples(client.get("/metrics").text)

    def grew(name: str, **labels) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("liveloop_http_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert grew("liveloop_http_requests_total", route="/admin/adapters/{name}", method="GET", status=str(admin)) == 1
    assert grew("liveloop_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert grew("liveloop_http_request_duration_seconds_count", route="/v1/chat/completions", method="POST") == 1
    assert grew("liveloop_feedback_ratings_total", rating="up") == 1
    assert grew("liveloop_feedback_ratings_total", rating="down") == 0
    assert grew("liveloop_time_to_first_token_seconds_count") == 1
    assert grew("liveloop_e2e_request_latency_seconds_count") == 1


def test_json_logs_carry_the_request_completion_version_and_user(make_settings, tiny_model_dir, tmp_path):
    settings = make_settings(base_model=tiny_model_dir)
    migrate(settings.resolved_database_url)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELOOP_")} | {
        "LIVELOOP_DATA_DIR": str(settings.data_dir), "LIVELOOP_BASE_MODEL": str(tiny_model_dir),
        "LIVELOOP_MODEL_CACHE_DIR": str(MODEL_CACHE), "LIVELOOP_LOG_FORMAT": "json",
        "LIVELOOP_API_KEYS": "alice:key-a", "LIVELOOP_ACCESS_LOG": "true"}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "liveloop", "serve", "--port", str(port)], env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": "Bearer key-a"})
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        reply = client.post("/v1/chat/completions", headers={"X-Request-ID": "trace-42"}, json={
            "model": "liveloop", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True})
        assert reply.status_code == 200
        completion_id = json.loads(reply.text.split("\n\n")[0].removeprefix("data: "))["id"]
    finally:
        server.terminate()
        server.wait(30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"asctime", "level", "logger", "message"} <= line.keys() for line in lines)
    [access] = [line for line in lines if line.get("request_id") == "trace-42"]  # uvicorn's access line
    assert access["logger"] == "uvicorn.access" and "/v1/chat/completions" in access["message"]
    assert (access["completion_id"], access["version"], access["user"]) == (completion_id, tiny_model_dir.name,
                                                                            "alice")
