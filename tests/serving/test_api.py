"""The chat API over real HTTP, through the official openai client where a client would use it."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
import sqlalchemy as sa

from liveloop.db import make_engine
from liveloop.tables import Completion
from serving.engine import Engine
from tests.feedback.helpers import wait_until

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def _stored(database_url: str, completion_id: str) -> Completion:
    engine = make_engine(database_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(Completion).where(Completion.id == completion_id)).one()
    engine.dispose()
    return row


def test_openai_client_completion_is_stored_with_behaviour_logprobs(serve, database_url):
    with serve(database_url=database_url) as url:
        completion = _client(url).chat.completions.create(model="liveloop", messages=MESSAGES, max_tokens=12,
                                                          temperature=0.8, top_p=0.9, seed=7, user="u-1")
    row = _stored(database_url, completion.id)
    assert completion.id.startswith("chatcmpl-") and len(completion.id) > 30
    assert completion.choices[0].message.content == row.response_text
    assert completion.usage.completion_tokens == len(row.response_token_ids) == len(row.behaviour_logprobs)
    assert completion.usage.prompt_tokens == len(row.prompt_token_ids)
    assert all(lp <= 0 for lp in row.behaviour_logprobs)
    assert row.sampling_params["temperature"] == 0.8 and row.sampling_params["top_p"] == 0.9
    assert row.end_user == "u-1" and row.adapter_version is None and row.dtype == "float32"
    assert completion.model == row.requested_model or completion.model  # served model is named


def test_streaming_chunks_add_up_to_the_stored_completion(serve, make_settings):
    settings = make_settings()
    with serve() as url:
        stream = _client(url).chat.completions.create(model="liveloop", messages=MESSAGES, max_tokens=16,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    row = _stored(settings.resolved_database_url, chunks[0].id)
    assert row.response_text == text
    assert chunks[-1].usage.completion_tokens == len(row.response_token_ids)


def test_same_seed_gives_same_completion_and_logprobs_are_returned(serve):
    with serve() as url:
        client = _client(url)
        first, second = (client.chat.completions.create(model="liveloop", messages=MESSAGES, max_tokens=10,
                                                         seed=123, logprobs=True) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content
    first_lps = [t.logprob for t in first.choices[0].logprobs.content]
    assert first_lps == [t.logprob for t in second.choices[0].logprobs.content]
    assert len(first_lps) == first.usage.completion_tokens


def test_models_lists_the_live_alias_first_and_the_base_model(serve):
    with serve() as url:
        models = _client(url).models.list().data
        served = _client(url).chat.completions.with_raw_response.create(model=models[1].id, messages=MESSAGES,
                                                                        max_tokens=2)
    assert models[0].id == "liveloop"
    assert served.headers["x-liveloop-model-version"] == models[1].id


def test_concurrent_requests_all_complete(serve):
    with serve(max_batch_size=8) as url:
        client = _client(url)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: client.chat.completions.create(
                model="liveloop", messages=[{"role": "user", "content": f"Count to {i}"}], max_tokens=8), range(8)))
    assert len({r.id for r in results}) == 8
    assert all(r.usage.completion_tokens >= 1 for r in results)


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"model": "liveloop", "messages": []}, 422, "messages"),
    ({"model": "liveloop", "messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    ({"model": "liveloop", "messages": [{"role": "user", "content": "   "}]}, 422, "no text"),
    ({"model": "liveloop", "messages": MESSAGES, "temperature": 3}, 422, "temperature"),
    ({"model": "liveloop", "messages": MESSAGES, "top_p": 0}, 422, "top_p"),
    ({"model": "liveloop", "messages": MESSAGES, "max_tokens": 0}, 422, "max_tokens"),
    ({"model": "liveloop", "messages": MESSAGES, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "liveloop", "messages": MESSAGES, "max_tokens": 500}, 400, "context length"),
    ({"model": "liveloop", "messages": [{"role": "user", "content": "sea " * 600}]}, 400, "context length"),
    ({"model": "liveloop", "messages": MESSAGES, "n": 3}, 422, "n must be 1 or 2"),
    ({"model": "no-such-model", "messages": MESSAGES}, 404, "no-such-model"),
    ({"messages": MESSAGES}, 422, "model"),
])
def test_bad_requests_get_a_clear_openai_error(serve, body, status, fragment):
    with serve() as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_invalid_json_and_oversized_bodies_are_refused(serve):
    with serve(max_body_bytes=2048) as url:
        broken = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30,
                            headers={"content-type": "application/json"})
        huge = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          json={"model": "liveloop", "messages": [{"role": "user", "content": "x" * 5000}]})
        chunked = httpx.post(f"{url}/v1/chat/completions", timeout=30, content=iter([b"[" + b" " * 5000 + b"]"]))
        still_serving = httpx.get(f"{url}/readyz", timeout=30)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    assert huge.status_code == 413 and "2048" in huge.json()["error"]["message"]
    assert chunked.status_code == 413 and chunked.json()["error"]["message"]
    assert still_serving.status_code == 200


def test_openai_client_sees_unknown_model_as_not_found(serve):
    with serve() as url, pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(url).chat.completions.create(model="gpt-17", messages=MESSAGES)


def test_full_queue_answers_429_with_retry_after(serve):
    with serve(max_batch_size=1, max_queue=1) as url:
        def post(_):
            return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": "liveloop", "messages": MESSAGES, "max_tokens": 200, "temperature": 0})
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.headers["retry-after"] == "1" for r in refused)
    assert all(r.status_code in (200, 429) for r in responses)


def test_api_keys_are_required_and_identify_the_user(serve, make_settings):
    settings = make_settings()
    with serve(api_keys=["alice:sk-alice-123"]) as url:
        with pytest.raises(openai.AuthenticationError):
            _client(url).chat.completions.create(model="liveloop", messages=MESSAGES, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            _client(url, "sk-wrong").chat.completions.create(model="liveloop", messages=MESSAGES, max_tokens=2)
        completion = _client(url, "sk-alice-123").chat.completions.create(model="liveloop", messages=MESSAGES,
                                                                          max_tokens=2)
    assert _stored(settings.resolved_database_url, completion.id).user_id == "alice"


def test_keys_without_a_user_are_users_of_their_own_named_by_no_key_characters(serve, make_settings):
    settings = make_settings()
    keys = ["sk-team-shared-prefix-1", "sk-team-shared-prefix-2"]
    with serve(api_keys=keys) as url:
        ids = [_client(url, key).chat.completions.create(model="liveloop", messages=MESSAGES, max_tokens=2).id
               for key in keys]
        with pytest.raises(openai.AuthenticationError):  # the key's prefix is not the key
            _client(url, keys[0][:-1]).chat.completions.create(model="liveloop", messages=MESSAGES, max_tokens=2)
    users = [_stored(settings.resolved_database_url, completion_id).user_id for completion_id in ids]
    assert users[0] != users[1]
    assert not [user for user in users for key in keys for i in range(len(key) - 5) if key[i:i + 6] in user]


def test_healthz_fails_once_the_engine_thread_died(serve, monkeypatch):
    with serve() as url:
        assert httpx.get(f"{url}/healthz").status_code == 200

        def crash(engine) -> None:
            raise RuntimeError("a bug in the engine loop")

        monkeypatch.setattr(Engine, "step", crash)
        httpx.post(f"{url}/v1/chat/completions", timeout=30,  # wakes the engine thread, which dies
                   json={"model": "liveloop", "messages": MESSAGES, "max_tokens": 2})
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 503, timeout_s=10)
        assert "engine" in httpx.get(f"{url}/healthz").json()["error"]["message"]


def test_health_and_readiness(serve):
    with serve() as url:
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{url}/readyz").json()
        metrics = httpx.get(f"{url}/metrics").text
    assert ready["status"] == "ready" and ready["live_version"] is None
    assert "python_info" in metrics
