"""No client input yields a 5xx: hand-picked hostile requests and a schemathesis run over the real app's schema.

One app (tiny model, SQLite) serves the whole module over HTTP; each case states the status it gets.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from liveloop.settings import Settings
from serving.app import create_app
from serving.engine_errors import EngineFull, EngineStopped, InvalidRequest, UnknownAdapter
from serving.errors import engine_error
from tests.conftest import MODEL_CACHE
from tests.serving.conftest import running_server

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]
BODY_LIMIT = 100_000
MAX_TOKENS_LIMIT = 32  # every request the fuzzer gets through generates a few tokens only


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("client-input")
    with running_server(Settings(_env_file=None, data_dir=data_dir, model_cache_dir=MODEL_CACHE,
                                 base_model=tiny_model_dir, max_body_bytes=BODY_LIMIT, default_max_tokens=8,
                                 max_tokens_limit=MAX_TOKENS_LIMIT)) as base_url:
        yield base_url


def chat(**fields) -> bytes:
    """A chat request body with ``fields`` changed (json.dumps writes NaN, Infinity and \\u escapes of
    lone surrogates, as a hostile client would)."""
    return json.dumps({"model": "liveloop", "messages": MESSAGES, "max_tokens": 4} | fields).encode()


def nested(depth: int) -> bytes:
    return b'{"model": "liveloop", "messages": ' + b"[" * depth + b"]" * depth + b"}"


# (request body, status, the `param` of the error (or a piece of its message); None: a success)
CHAT_CASES = {
    "seed 2**70": (chat(seed=2**70), 422, "seed"),
    "seed -2**63": (chat(seed=-(2**63)), 200, None),
    "seed 2**63 - 1": (chat(seed=2**63 - 1), 200, None),
    "model lone surrogate": (chat(model="\ud800"), 422, "model"),
    "model NUL": (chat(model="liveloop\x00"), 422, "model"),
    "unknown non-ASCII model": (chat(model="modèle-🙂"), 404, "model"),
    "temperature 1e-40": (chat(temperature=1e-40, logprobs=True), 200, None),
    "temperature NaN": (chat(temperature=math.nan), 422, "temperature"),
    "temperature Infinity": (chat(temperature=math.inf), 422, "temperature"),
    "temperature 1e308": (chat(temperature=1e308), 422, "temperature"),
    "temperature -0.0": (chat(temperature=-0.0), 200, None),
    "top_p 1e-40": (chat(top_p=1e-40), 200, None),
    "top_p NaN": (chat(top_p=math.nan), 422, "top_p"),
    "top_p 0": (chat(top_p=0), 422, "top_p"),
    "deep JSON nesting": (nested(100_000 // 2 - 40), 400, "parsing the body"),
    "integer of 5,000 digits": (b'{"model": "liveloop", "messages": [], "seed": ' + b"9" * 5000 + b"}", 400,
                                "parsing the body"),
    "max_tokens 10**30": (chat(max_tokens=10**30), 400, "max_tokens"),
    "max_tokens 1e300": (chat(max_tokens=1e300), 422, "max_tokens"),
    "max_tokens 0": (chat(max_tokens=0), 422, "max_tokens"),
    "max_completion_tokens 0": (chat(max_completion_tokens=0), 422, "max_completion_tokens"),
    "max_tokens at the limit": (chat(max_tokens=MAX_TOKENS_LIMIT), 200, None),
    "max_tokens over the limit": (chat(max_tokens=MAX_TOKENS_LIMIT + 1), 400, "max_tokens"),
    "max_tokens over the context": (chat(messages=[{"role": "user", "content": "sea " * 470}],  # 501 of 512
                                         max_tokens=MAX_TOKENS_LIMIT), 400, "max_tokens"),
    "prompt over the context": (chat(messages=[{"role": "user", "content": "sea " * 600}]), 400, "messages"),
    "content lone surrogate": (chat(messages=[{"role": "user", "content": "a\ud800b"}]), 422,
                               "messages.0.content"),
    "content NUL": (chat(messages=[{"role": "user", "content": "a\x00b"}]), 422, "messages.0.content"),
    "text part lone surrogate": (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
                                 422, "messages.0.content.0.text"),
    "name NUL": (chat(messages=[{"role": "user", "content": "hi", "name": "\x00"}]), 422, "messages.0.name"),
    "user lone surrogate": (chat(user="\ud83d"), 422, "user"),
    "surrogate pair (an emoji) is text": (json.dumps({"model": "liveloop", "max_tokens": 2, "messages": [
        {"role": "user", "content": "\ud83d\ude00"}]}, ensure_ascii=True).encode(), 200, None),
    "stop lone surrogate": (chat(stop=["ok", "\ud800"]), 422, "stop"),
    "stop of 256 characters": (chat(stop="x" * 256), 200, None),
    "stop of 257 characters": (chat(stop="x" * 257), 400, "stop"),
    "stop of 8,000 characters": (chat(stop="x" * 8000), 400, "stop"),
    "4 stops": (chat(stop=["a1", "b2", "c3", "d4"]), 200, None),
    "5 stops": (chat(stop=["a1", "b2", "c3", "d4", "e5"]), 422, "stop"),
    "empty stop": (chat(stop=""), 422, "stop"),
    "stream with a tiny temperature": (chat(stream=True, temperature=1e-30), 200, None),
}


@pytest.mark.parametrize(("body", "status", "param"), CHAT_CASES.values(), ids=CHAT_CASES.keys())
def test_chat_input_gets_its_documented_status(url, body, status, param):
    response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    if param is None:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert '"error"' not in response.text and response.text.endswith("data: [DONE]\n\n")
        else:
            logprobs = (response.json()["choices"][0].get("logprobs") or {}).get("content", [])
            assert all(math.isfinite(token["logprob"]) for token in logprobs)
        return
    error = response.json()["error"]
    assert error["type"] in ("invalid_request_error", "not_found_error") and error["message"]
    assert error["param"] == param or param in error["message"], error


FEEDBACK_CASES = {
    "completion_id lone surrogate": ({"completion_id": "chatcmpl-\ud800", "rating": "up"}, 422, "completion_id"),
    "completion_id NUL": ({"completion_id": "chatcmpl-\x00", "rating": "up"}, 422, "completion_id"),
    "comment NUL": ({"completion_id": "chatcmpl-x", "rating": "up", "comment": "bad\x00"}, 422, "comment"),
    "feedback_id lone surrogate": ({"completion_id": "chatcmpl-x", "rating": "up", "feedback_id": "\udc00"}, 422,
                                   "feedback_id"),
    "unknown completion": ({"completion_id": "chatcmpl-nope", "rating": "up"}, 404, None),
    "rating NaN": ({"completion_id": "chatcmpl-x", "rating": math.nan}, 422, "rating"),
}


@pytest.mark.parametrize(("body", "status", "param"), FEEDBACK_CASES.values(), ids=FEEDBACK_CASES.keys())
def test_feedback_input_gets_its_documented_status(url, body, status, param):
    response = httpx.post(f"{url}/v1/feedback", content=json.dumps(body), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert param is None or response.json()["error"]["param"] == param


def test_a_tiny_temperature_is_raised_to_the_minimum_and_its_rating_accepted(url):
    completion = httpx.post(f"{url}/v1/chat/completions", content=chat(temperature=1e-40, max_tokens=6),
                            timeout=60, headers={"content-type": "application/json"}).json()
    rating = httpx.post(f"{url}/v1/feedback", json={"completion_id": completion["id"], "rating": "down"}, timeout=60)
    greedy = httpx.post(f"{url}/v1/chat/completions", content=chat(temperature=0, max_tokens=6), timeout=60,
                        headers={"content-type": "application/json"}).json()
    assert rating.status_code == 202, rating.text
    # T = 0.01 on this model is as good as greedy; T = 1e-40 as given would have produced NaN and garbage
    assert completion["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


@pytest.mark.parametrize("size", [BODY_LIMIT + 1, 10 * BODY_LIMIT])
def test_an_oversized_body_gets_a_readable_413_even_on_a_closing_connection(url, size):
    # with "Connection: close" the server closes once it has answered; unread bytes would reset the connection
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b" " * size)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "payload_too_large"


# --- schemathesis over the real app's schema --------------------------------------------------------------------

# The document the app serves at /openapi.json (checked below); building the app loads nothing.
OPENAPI = create_app(Settings(_env_file=None)).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


def test_the_fuzzed_schema_is_the_one_served(url):
    assert httpx.get(f"{url}/openapi.json", timeout=60).json() == OPENAPI


@schema.parametrize()
@settings(max_examples=25, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_server_error(url, case):
    response = case.call(base_url=url, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.text}"


# --- engine errors and disconnects ---------------------------------------------------------------------------------

def test_engine_errors_get_their_status_at_submission_and_mid_stream(make_settings, tiny_model_dir):
    settings = make_settings(base_model=tiny_model_dir)
    app = create_app(settings)
    with running_server(settings, app) as base_url:
        app.state.adapters.add_version("ghost")  # routed to but not in the engine, as if unloaded meanwhile
        ghost = httpx.post(f"{base_url}/v1/chat/completions", content=chat(model="ghost"), timeout=60,
                           headers={"content-type": "application/json"})
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", timeout=60,
                          content=chat(stream=True, max_tokens=450, temperature=0),
                          headers={"content-type": "application/json"}) as streaming:
            events = (line.removeprefix("data: ") for line in streaming.iter_lines() if line)
            assert "chat.completion.chunk" in next(events)
            app.state.engine.shutdown()
            rest = list(events)
        stopped = httpx.post(f"{base_url}/v1/chat/completions", content=chat(), timeout=60,
                             headers={"content-type": "application/json"})
    assert ghost.status_code == 404 and ghost.json()["error"]["code"] == "model_not_found", ghost.text
    assert json.loads(rest[-2])["error"]["type"] == "service_unavailable" and rest[-1] == "[DONE]", rest[-2:]
    assert stopped.status_code == 503 and stopped.json()["error"]["type"] == "service_unavailable", stopped.text


@pytest.mark.parametrize(("error", "status"), [
    (EngineFull("full"), 429), (UnknownAdapter("gone"), 404), (InvalidRequest("bad"), 400),
    (EngineStopped("stopped"), 503),
])
def test_each_engine_error_has_its_status(error, status):
    assert engine_error(error).status == status


def test_a_client_that_disconnects_is_an_info_line_not_an_error(serve, caplog):
    caplog.set_level(logging.INFO, logger="serving")
    uvicorn_errors = logging.getLogger("uvicorn.error")  # where "Exception in ASGI application" goes
    uvicorn_errors.addHandler(caplog.handler)
    try:
        with serve() as url:
            with pytest.raises(httpx.ReadTimeout):  # gives up while its completion is generated
                httpx.post(f"{url}/v1/chat/completions", content=chat(max_tokens=450, temperature=0), timeout=0.3,
                           headers={"content-type": "application/json"})
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                              content=chat(stream=True, max_tokens=450, temperature=0),
                              headers={"content-type": "application/json"}) as streaming:
                next(streaming.iter_lines())  # leaves after the first chunk
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(_disconnects(caplog)) < 2:
                time.sleep(0.05)
    finally:
        uvicorn_errors.removeHandler(caplog.handler)
    assert [r.levelno for r in _disconnects(caplog)] == [logging.INFO] * 2, caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _disconnects(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "disconnected" in r.getMessage()]
