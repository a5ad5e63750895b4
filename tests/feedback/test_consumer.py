import json

from feedback.broker import free_port
from feedback.consumer import FeedbackConsumer, latest_ratings
from feedback.events import UntrainableEvent
from feedback.kafka import Publisher
from feedback.ledger import Ledger
from tests.feedback.helpers import drain


def test_batches_hold_at_most_max_messages(kafka_settings, make_event, publish):
    settings = kafka_settings()
    events = [make_event(completion_id=f"c{n}") for n in range(7)]
    publish(settings, events)
    with FeedbackConsumer(settings) as consumer:
        first = consumer.next_batch(max_messages=5, max_wait_s=30)
        rest = consumer.next_batch(max_messages=5, max_wait_s=1)
        empty = consumer.next_batch(max_messages=5, max_wait_s=0.2)
    assert (len(first.events), len(rest.events), len(empty.events)) == (5, 2, 0)
    assert sorted(e.event_id for e in first.events + rest.events) == sorted(e.event_id for e in events)
    assert empty.offsets == {}


def test_repeated_event_ids_are_handed_over_once(kafka_settings, make_event, publish):
    settings = kafka_settings()
    a, b = make_event(completion_id="a"), make_event(completion_id="b")
    publish(settings, [a, b, a])
    with FeedbackConsumer(settings) as consumer:
        batches = drain(consumer, 3)
        publish(settings, [b])  # published again later (at-least-once delivery)
        batches += drain(consumer, 1)
    assert sorted(e.event_id for batch in batches for e in batch.events) == sorted([a.event_id, b.event_id])
    assert sum(batch.duplicates for batch in batches) == 2


def test_seen_event_ids_from_before_a_restart_are_dropped(kafka_settings, make_event, publish):
    settings = kafka_settings()
    old, new = make_event(completion_id="a"), make_event(completion_id="b")
    publish(settings, [old, new])
    with FeedbackConsumer(settings, seen_event_ids=[old.event_id]) as consumer:
        batches = drain(consumer, 2)
    assert [e.event_id for batch in batches for e in batch.events] == [new.event_id]


def test_change_of_mind_in_a_batch_keeps_only_the_latest_rating(kafka_settings, make_event, publish):
    settings = kafka_settings()
    first = make_event(completion_id="c1", revision=1, rating="up")
    second = make_event(completion_id="c1", revision=2, rating="down", supersedes=first.feedback_id)
    other = make_event(completion_id="c2")
    publish(settings, [first, other, second])
    with FeedbackConsumer(settings) as consumer:
        batch = consumer.next_batch(max_messages=3, max_wait_s=30)
    assert sorted(e.event_id for e in batch.events) == sorted([second.event_id, other.event_id])
    assert [e.event_id for e in batch.superseded] == [first.event_id]


def test_latest_rating_wins_whatever_the_arrival_order(make_event):
    first, second = make_event(revision=1), make_event(revision=2)
    assert latest_ratings([second, first]) == ([second], [first])


def test_a_newer_ranking_of_a_request_replaces_the_older_in_a_batch(kafka_settings, make_event, make_comparison,
                                                                    publish):
    settings = kafka_settings()
    first = make_comparison(request_id="r1", ranking=("a", "b"))
    rating = make_event(completion_id="a")  # of one of its answers: another subject, kept
    second = make_comparison(request_id="r1", revision=2, ranking=("b", "a"), supersedes=first.feedback_id)
    other = make_comparison(request_id="r2", ranking=("c", "d"))
    publish(settings, [second, rating, first, other])
    with FeedbackConsumer(settings) as consumer:
        batch = consumer.next_batch(max_messages=4, max_wait_s=30)
    assert sorted(e.event_id for e in batch.events) == sorted([second.event_id, rating.event_id, other.event_id])
    assert [e.event_id for e in batch.superseded] == [first.event_id]
    assert {type(e).__name__ for e in batch.events} == {"ComparisonEvent", "FeedbackEvent"}


def test_unreadable_messages_go_to_the_dead_letter_topic_with_the_reason(kafka_settings, make_event, publish,
                                                                         read_topic):
    settings = kafka_settings()
    good = make_event()
    future = json.dumps(good.model_dump(mode="json") | {"schema_version": 2}).encode()
    publish(settings, [b"{not json", future, good])
    with FeedbackConsumer(settings) as consumer:
        batches = drain(consumer, 3)
        consumer.commit(*batches)
    assert [e.event_id for batch in batches for e in batch.events] == [good.event_id]
    assert sum(batch.dead_lettered for batch in batches) == 2
    dead = {r.value: dict(r.headers) for r in read_topic(settings, settings.feedback_dlq_topic, 2)}
    assert set(dead) == {b"{not json", future}
    assert dead[b"{not json"]["dlq.error"] == b"MalformedEvent"
    assert dead[future]["dlq.reason"].startswith(b"unknown schema_version 2")
    assert dead[future]["dlq.topic"] == settings.feedback_topic.encode()
    sentinel = make_event()
    publish(settings, [sentinel])
    with FeedbackConsumer(settings) as again:  # the committed offsets covered the dead letters too
        assert [e.event_id for batch in drain(again, 1) for e in batch.events] == [sentinel.event_id]


def test_events_the_callers_check_refuses_go_to_the_dead_letter_topic(kafka_settings, make_event, publish,
                                                                      read_topic):
    settings = kafka_settings(feedback_partitions=1)
    refused, good = make_event(sampling_params={"temperature": -1.0}), make_event()

    def check(event):
        if event.sampling_params["temperature"] < 0:
            raise UntrainableEvent("negative temperature")

    publish(settings, [refused, good])
    with FeedbackConsumer(settings) as consumer:
        batch = consumer.next_batch(max_messages=2, max_wait_s=30, check=check)
    assert [e.event_id for e in batch.events] == [good.event_id]
    assert [e.event_id for e in batch.rejected] == [refused.event_id] and batch.dead_lettered == 1
    assert list(batch.offsets.values()) == [2]  # the batch covers it
    [dead] = read_topic(settings, settings.feedback_dlq_topic, 1)
    assert (dict(dead.headers)["dlq.reason"], dict(dead.headers)["dlq.error"]) == (b"negative temperature",
                                                                                   b"UntrainableEvent")


def test_consumer_restarted_mid_stream_resumes_from_committed_offsets(kafka_settings, make_event, publish):
    settings = kafka_settings()
    events = [make_event(completion_id=f"c{n}") for n in range(30)]
    publish(settings, events)
    with FeedbackConsumer(settings) as consumer:
        committed = consumer.next_batch(max_messages=10, max_wait_s=30)
        consumer.commit(committed)
        lost_in_crash = consumer.next_batch(max_messages=10, max_wait_s=5)  # never committed
    assert len(committed.events) == len(lost_in_crash.events) == 10
    with FeedbackConsumer(settings) as restarted:
        resumed = drain(restarted, 20)
        restarted.commit(*resumed)
    handed_over = [e.event_id for batch in [committed, *resumed] for e in batch.events]
    assert len(handed_over) == len(set(handed_over)) == 30
    assert set(handed_over) == {e.event_id for e in events}


def test_a_dead_letter_kafka_did_not_take_is_retried_not_skipped(kafka_settings, make_event, publish):
    settings = kafka_settings(feedback_partitions=1)
    good, after = make_event(), make_event()
    publish(settings, [good, b"junk", after])
    nowhere = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}",
                                          "kafka_request_timeout_ms": 1_000, "kafka_delivery_timeout_ms": 1_500})
    with FeedbackConsumer(settings, dead_letters=Publisher(nowhere, "dlq")) as consumer:
        batches = [consumer.next_batch(max_messages=3, max_wait_s=30)]
        batches += [consumer.next_batch(max_messages=3, max_wait_s=0.5) for _ in range(2)]
        consumer.commit(*batches)
    assert [e.event_id for batch in batches for e in batch.events] == [good.event_id]
    assert all(offset == 1 for batch in batches for offset in batch.offsets.values())  # stops before the junk
    assert sum(batch.dead_lettered for batch in batches) == 0
    with FeedbackConsumer(settings) as fixed:
        resumed = drain(fixed, 2)
    assert [e.event_id for batch in resumed for e in batch.events] == [after.event_id]
    assert sum(batch.dead_lettered for batch in resumed) == 1


def test_a_consumer_with_a_ledger_starts_at_the_offsets_stored_in_the_database_not_kafkas(
        kafka_settings, make_event, publish, sessions):
    settings = kafka_settings()
    events = [make_event(completion_id=f"c{n}") for n in range(6)]
    publish(settings, events)
    with FeedbackConsumer(settings) as consumer:  # Kafka's committed offsets cover every message ...
        consumer.commit(*drain(consumer, 6))
    ledger = Ledger(sessions, settings.feedback_consumer_group)
    with FeedbackConsumer(settings, ledger=ledger) as consumer:  # ... the database, none: all come again
        batches = drain(consumer, 6)
        ledger.save(offsets=consumer.offsets_of(*batches), consumed=[])
    assert sorted(e.event_id for batch in batches for e in batch.events) == sorted(e.event_id for e in events)
    later = make_event(completion_id="c-later")
    publish(settings, [later])
    with FeedbackConsumer(settings, ledger=ledger) as consumer:  # now from the stored offsets on
        assert [e.event_id for batch in drain(consumer, 1) for e in batch.events] == [later.event_id]
