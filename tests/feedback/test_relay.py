import threading
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from feedback.events import parse_event
from feedback.relay import Relay
from feedback.replay import replay
from liveloop.tables import OutboxMessage
from tests.feedback.helpers import rate_each, wait_until


def outbox(sessions):
    with sessions() as session:
        return session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()


def test_relay_publishes_in_order_and_marks_rows_sent_after_the_ack(sessions, add_completion, kafka_settings,
                                                                    read_topic):
    settings = kafka_settings()
    completion = add_completion()
    results = rate_each(sessions, settings, [completion] * 3) + rate_each(sessions, settings, [add_completion()])
    relay = Relay(sessions, settings)
    assert relay.relay_once() == (4, 0)
    assert relay.relay_once() == (0, 0)
    assert all(row.sent_at is not None and row.attempts == 0 for row in outbox(sessions))
    records = read_topic(settings, settings.feedback_topic, 4)
    events = [parse_event(r.value) for r in records]
    assert sorted(e.feedback_id for e in events) == sorted(r.id for r in results)
    assert {r.key.decode() for r in records} == {e.completion_id for e in events}
    assert all(dict(r.headers)["event_id"] == parse_event(r.value).event_id.encode() for r in records)
    same_completion = [e.revision for e in events if e.completion_id == completion]
    assert same_completion == [1, 2, 3]  # keyed by completion: one partition, in order
    relay.stop()


def test_outbox_grows_while_kafka_is_down_and_drains_when_it_is_back(sessions, add_completion, kafka_settings,
                                                                     broker, read_topic):
    settings = kafka_settings(kafka_request_timeout_ms=1_000, kafka_delivery_timeout_ms=1_500, relay_max_attempts=1)
    relay = Relay(sessions, settings).start()
    published = REGISTRY.get_sample_value("liveloop_outbox_published_total")
    broker.stop()
    try:
        rate_each(sessions, settings, [add_completion() for _ in range(5)])  # the API side keeps working
        wait_until(lambda: all(row.last_error is not None for row in outbox(sessions)))
        assert all(row.sent_at is None and row.parked_at is None for row in outbox(sessions))
        assert all(row.attempts == 0 for row in outbox(sessions))  # an outage is not the rows' fault: none parks
        assert "KafkaTimeoutError" in outbox(sessions)[0].last_error
        assert relay.depth() == 5
    finally:
        broker.start()
    rate_each(sessions, settings, [add_completion() for _ in range(2)])
    wait_until(lambda: relay.depth() == 0)
    relay.stop()
    assert len({parse_event(r.value).event_id for r in read_topic(settings, settings.feedback_topic, 7)}) == 7
    assert REGISTRY.get_sample_value("liveloop_outbox_published_total") - published >= 7
    assert REGISTRY.get_sample_value("liveloop_outbox_depth") == 0


def test_a_row_kafka_keeps_refusing_is_parked_and_the_rest_flow_on(sessions, add_completion, kafka_settings,
                                                                    read_topic):
    """An event over the producer's 1 MB request limit (a long conversation) is refused on its own: the rows
    around it are sent, and after ``relay_max_attempts`` refusals it is parked with its error."""
    settings = kafka_settings(relay_max_attempts=3)
    huge = add_completion(messages=[{"role": "user", "content": "x" * 1_100_000}])
    rated = rate_each(sessions, settings, [add_completion(), huge, add_completion()])
    relay = Relay(sessions, settings).start()
    try:
        wait_until(lambda: relay.backlog() == (0, 1))
        wait_until(lambda: REGISTRY.get_sample_value("liveloop_outbox_parked_rows") == 1)
        rate_each(sessions, settings, [add_completion()])  # the relay goes on after parking
        wait_until(lambda: relay.depth() == 0)
    finally:
        relay.stop()
    parked = next(row for row in outbox(sessions) if row.key == huge)
    assert (parked.sent_at, parked.attempts) == (None, 3) and parked.parked_at is not None
    assert "MessageSizeTooLargeError" in parked.last_error
    records = read_topic(settings, settings.feedback_topic, 3)
    assert sorted(parse_event(r.value).feedback_id for r in records) == sorted(
        [rated[0].id, rated[2].id] + [row.payload["feedback_id"] for row in outbox(sessions)[-1:]])
    assert replay(sessions, settings, since=parked.created_at - timedelta(minutes=1)) == 3  # the parked row stays


def test_concurrent_relays_never_publish_the_same_row(database_url, sessions, add_completion, kafka_settings,
                                                      read_topic):
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has a single writer: one relay per database")
    settings = kafka_settings(relay_batch_size=10)
    rate_each(sessions, settings, [add_completion() for _ in range(120)])
    relays = [Relay(sessions, settings, client_id=f"relay-{n}") for n in range(3)]
    counts = [0] * len(relays)
    together = threading.Barrier(len(relays))

    def drain(n):
        together.wait()
        while (sent := relays[n].relay_once()[0]) > 0:
            counts[n] += sent

    threads = [threading.Thread(target=drain, args=(n,)) for n in range(len(relays))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for relay in relays:
        relay.stop()
    assert sum(counts) == 120
    records = read_topic(settings, settings.feedback_topic, 120)
    assert len(records) == len({parse_event(r.value).event_id for r in records}) == 120
