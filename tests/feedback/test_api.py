"""POST /v1/feedback over real HTTP on the real app (tiny model), to Kafka and through the consumer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import select

from feedback.consumer import FeedbackConsumer
from feedback.relay import Relay
from feedback.replay import replay
from liveloop.tables import Completion, utcnow
from tests.feedback.helpers import drain, wait_until
from tests.serving.conftest import running_server

KEYS = "alice:key-alice,bob:key-bob"


@pytest.fixture
def api(kafka_settings, tiny_model_dir, database_url):
    """``with api(**overrides) as (client, settings)``: the app over HTTP on the shared broker, with its
    group-commit writer and its outbox relay thread, as ``liveloop serve`` runs it."""

    @contextmanager
    def start(**overrides) -> Iterator[tuple[httpx.Client, object]]:
        settings = kafka_settings(base_model=tiny_model_dir, database_url=database_url, **overrides)
        with running_server(settings) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield client, settings

    return start


def complete(client: httpx.Client, key: str = "none") -> str:
    response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "liveloop", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def rate(client: httpx.Client, key: str = "none", **body) -> httpx.Response:
    return client.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"})


def consume_all(settings, expected: int) -> list:
    with FeedbackConsumer(settings) as consumer:
        batches = drain(consumer, expected)
        consumer.commit(*batches)
    return batches


def test_feedback_flows_from_the_api_through_kafka_to_the_consumer(api, sessions):
    with api() as (client, settings):
        first, second = complete(client), complete(client)
        body = {"completion_id": first, "rating": "up", "feedback_id": "client-1", "comment": "nice"}
        up = rate(client, **body)
        assert up.status_code == 202, up.text
        assert rate(client, **body).json() == up.json()  # a retried request: same answer, no second event
        changed = rate(client, completion_id=first, rating="down")
        other = rate(client, completion_id=second, rating="up")
    assert {"id", "created", "completion_id", "rating", "supersedes"} <= set(up.json())
    assert changed.status_code == 202 and changed.json()["supersedes"] == up.json()["id"]
    with FeedbackConsumer(settings) as consumer:  # the API's relay publishes them
        batch = consumer.next_batch(max_messages=3, max_wait_s=30)
    assert sorted(e.feedback_id for e in batch.events) == sorted([changed.json()["id"], other.json()["id"]])
    assert [e.feedback_id for e in batch.superseded] == [up.json()["id"]]
    event = next(e for e in batch.events if e.completion_id == first)
    with sessions() as session:
        stored = session.scalar(select(Completion).where(Completion.id == first))
    assert (event.rating, event.reward, event.revision, event.supersedes) == ("down", -1.0, 2, up.json()["id"])
    assert event.prompt_token_ids == stored.prompt_token_ids
    assert event.response_token_ids == stored.response_token_ids
    assert event.behaviour_logprobs == stored.behaviour_logprobs
    assert event.sampling_params == stored.sampling_params and event.adapter_version == stored.adapter_version


def test_every_rating_arrives_when_the_broker_restarts_while_feedback_flows(api, sessions, broker):
    with api(kafka_request_timeout_ms=1_000, kafka_delivery_timeout_ms=1_500) as (client, settings):
        started = utcnow()
        outbox = Relay(sessions, settings)  # not started: only to read the outbox depth; the API's relay runs
        ids = [rate(client, completion_id=complete(client), rating="up").json()["id"] for _ in range(3)]
        wait_until(lambda: outbox.depth() == 0)
        broker.stop()
        try:
            for _ in range(3):
                response = rate(client, completion_id=complete(client), rating="down")
                assert response.status_code == 202  # Kafka down does not reach the API
                ids.append(response.json()["id"])
            assert outbox.depth() == 3
        finally:
            broker.start()
        wait_until(lambda: outbox.depth() == 0)
    assert replay(sessions, settings, since=started) == 6  # the broker's log died with it
    handed_over = [e.feedback_id for batch in consume_all(settings, 9) for e in batch.events]
    assert sorted(handed_over) == sorted(ids)


def test_feedback_errors(api):
    with api(api_keys=KEYS) as (client, _):
        alices = complete(client, "key-alice")
        assert rate(client, "key-bob", completion_id=alices, rating="up").status_code == 403
        assert rate(client, "key-nobody", completion_id=alices, rating="up").status_code == 401
        missing = rate(client, "key-alice", completion_id="chatcmpl-nope", rating="up")
        assert missing.status_code == 404 and "chatcmpl-nope" in missing.json()["error"]["message"]
        bad_rating = rate(client, "key-alice", completion_id=alices, rating="meh")
        assert bad_rating.status_code == 422 and bad_rating.json()["error"]["param"] == "rating"
        assert rate(client, "key-alice", completion_id=alices, rating="up", ratng="x").status_code == 422
        assert rate(client, "key-alice", rating="up").status_code == 422
        long_comment = rate(client, "key-alice", completion_id=alices, rating="up", comment="x" * 2_001)
        assert long_comment.status_code == 422 and "at most 2000" in long_comment.json()["error"]["message"]
        assert rate(client, "key-alice", completion_id=alices, rating="up", feedback_id="k").status_code == 202
        reused = rate(client, "key-alice", completion_id=alices, rating="down", feedback_id="k")
        assert reused.status_code == 409 and reused.json()["error"]["code"] == "conflict"
