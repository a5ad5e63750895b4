"""POST /v1/feedback over real HTTP on the real app (tiny model), to Kafka and through the consumer."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import select

from feedback.consumer import FeedbackConsumer
from feedback.events import ComparisonEvent, parse_event
from feedback.relay import Relay
from feedback.replay import replay
from liveloop.tables import Completion, Feedback, utcnow
from tests.conftest import POSTGRES_ADMIN_URL
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


def complete_pair(client: httpx.Client, key: str = "none") -> tuple[str, str, str]:
    """A chat request for two choices: its id and the choices' completion ids."""
    response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={
        "model": "liveloop", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2})
    assert response.status_code == 200, response.text
    first, second = (choice["completion_id"] for choice in response.json()["choices"])
    return response.json()["id"], first, second


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


def test_one_bad_rating_among_concurrent_ones_fails_alone(api, add_completion):
    """Concurrent ratings share group commits. A completion whose behaviour log-probs are not finite (a tiny
    temperature's NaNs, stored as null) and a comment no database can store get a 4xx; every other one a 202."""
    with api(relay_in_api=False) as (client, _):
        good = [complete(client) for _ in range(8)]
        broken = add_completion(behaviour_logprobs=[None, -1.25])
        bodies = [{"completion_id": c, "rating": "up"} for c in good] + [
            {"completion_id": broken, "rating": "up"},
            {"completion_id": good[0], "rating": "down", "comment": "\ud800"}]
        with ThreadPoolExecutor(len(bodies)) as pool:  # JSON's \\u escape carries the lone surrogate
            *fine, unusable, unstorable = pool.map(lambda body: client.post(
                "/v1/feedback", content=json.dumps(body), headers={"Content-Type": "application/json"}), bodies)
    assert [r.status_code for r in fine] == [202] * len(good)
    assert unusable.status_code == 422 and "behaviour_logprobs" in unusable.json()["error"]["message"]
    assert 400 <= unstorable.status_code < 500


@contextmanager
def database_down(database_url: str) -> Iterator[None]:
    """The database stops taking writes: SQLite is locked by another writer, PostgreSQL refuses connections."""
    if database_url.startswith("sqlite"):
        lock = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        return
    name = database_url.rsplit("/", 1)[1]
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                     {"name": name})
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def test_a_database_that_is_down_gets_503_not_a_hang(api, database_url, sessions):
    with api(relay_in_api=False, feedback_write_timeout_s=1.0, feedback_max_waiting=1) as (client, _):
        completion = complete(client)
        answers = []
        with database_down(database_url):
            for n in range(3):
                started = time.monotonic()
                response = rate(client, completion_id=completion, rating="up", feedback_id=f"down-{n}")
                answers.append((response.status_code, time.monotonic() - started, response.json()["error"]))
        assert [(status, error["code"]) for status, _, error in answers] == [(503, "not_ready")] * 3
        assert all(took < 3 for _, took, _ in answers)  # the write timeout (1 s) bounds every wait
        if database_url.startswith("sqlite"):  # the writer waits for the lock with the first; one more fits
            _, took, error = answers[2]
            assert took < 0.5 and "wait for the database" in error["message"]
        # back at once: the writer finishes its batch and drops the requests already answered
        wait_until(lambda: rate(client, completion_id=completion, rating="down", feedback_id="after").status_code
                   == 202, timeout_s=5)
    with sessions() as session:
        recorded = set(session.scalars(select(Feedback.client_feedback_id)))
    assert "after" in recorded and not {"down-1", "down-2"} & recorded  # answered 503 before a write: never written


def test_a_comparison_flows_from_the_api_through_the_outbox_to_the_topic(api, read_topic):
    with api() as (client, settings):
        request_id, first, second = complete_pair(client)
        body = {"ranking": [second, first], "feedback_id": "client-1", "comment": "shorter"}
        ranked = rate(client, **body)
        assert ranked.status_code == 202, ranked.text
        assert rate(client, **body).json() == ranked.json()  # a retried request: same answer, no second event
        changed = rate(client, ranking=[first, second])
        records = read_topic(settings, settings.feedback_topic, 2)
    answer = ranked.json()
    assert {k: answer[k] for k in ("object", "ranking", "feedback_id", "supersedes")} == {
        "object": "feedback.comparison", "ranking": [second, first], "feedback_id": "client-1", "supersedes": None}
    assert changed.status_code == 202 and changed.json()["supersedes"] == answer["id"]
    events = [parse_event(record.value) for record in records]
    assert all(isinstance(e, ComparisonEvent) for e in events) and len(events) == 2
    assert {record.key.decode() for record in records} == {request_id}
    assert [(e.feedback_id, e.revision, [c.completion_id for c in e.ranking]) for e in events] == [
        (answer["id"], 1, [second, first]), (changed.json()["id"], 2, [first, second])]
    assert events[0].comment == "shorter" and all(len(c.behaviour_logprobs) >= 1 for c in events[0].ranking)


def test_comparison_errors_are_openai_errors(api):
    with api(api_keys=KEYS) as (client, _):
        _, first, second = complete_pair(client, "key-alice")
        _, other, _ = complete_pair(client, "key-alice")
        alone, also_alone = complete(client, "key-alice"), complete(client, "key-alice")
        _, bobs, _ = complete_pair(client, "key-bob")
        cases = {
            "another key's": (rate(client, "key-bob", ranking=[first, second]), 403, "not served to this API key"),
            "no key": (rate(client, "key-nobody", ranking=[first, second]), 401, "API key"),
            "unknown": (rate(client, "key-alice", ranking=[first, "chatcmpl-nope"]), 404, "chatcmpl-nope"),
            "other prompt": (rate(client, "key-alice", ranking=[first, other]), 422, "not choices of one chat"),
            "other user": (rate(client, "key-alice", ranking=[first, bobs]), 403, "not served to this API key"),
            "served alone": (rate(client, "key-alice", ranking=[alone, also_alone]), 422, "not choices of one chat"),
            "twice": (rate(client, "key-alice", ranking=[first, first]), 422, "twice"),
            "one": (rate(client, "key-alice", ranking=[first]), 422, "at least 2"),
            "and a rating": (rate(client, "key-alice", ranking=[first, second], completion_id=first, rating="up"),
                             422, "either completion_id and rating, or ranking"),
            "neither": (rate(client, "key-alice", comment="hm"), 422, "either completion_id and rating, or ranking"),
        }
        assert rate(client, "key-alice", ranking=[first, second], feedback_id="k").status_code == 202
        cases["key reused"] = (rate(client, "key-alice", ranking=[second, first], feedback_id="k"), 409, "feedback_id")
    for case, (response, status, fragment) in cases.items():
        assert response.status_code == status, (case, response.text)
        error = response.json()["error"]
        assert fragment in error["message"] and error["type"], (case, error)
