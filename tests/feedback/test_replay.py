from feedback.consumer import FeedbackConsumer
from feedback.events import parse_event
from feedback.relay import Relay
from feedback.replay import replay
from liveloop.tables import utcnow
from tests.feedback.helpers import drain, rate_each, wait_until


def test_replay_republishes_a_time_window_exactly_as_first_published(sessions, add_completion, kafka_settings,
                                                                     read_topic):
    settings = kafka_settings()
    rate_each(sessions, settings, [add_completion()])
    since = utcnow()
    inside = [r.id for r in rate_each(sessions, settings, [add_completion() for _ in range(3)])]
    until = utcnow()
    rate_each(sessions, settings, [add_completion()])
    relay = Relay(sessions, settings)
    assert relay.relay_once() == (5, 0)
    relay.stop()
    assert replay(sessions, settings, since=since.replace(tzinfo=None), until=until) == 3  # naive means UTC
    records = read_topic(settings, settings.feedback_topic, 8)
    by_feedback = {}
    for record in records:
        by_feedback.setdefault(parse_event(record.value).feedback_id, []).append((record.key, record.value))
    assert sorted(fid for fid, copies in by_feedback.items() if len(copies) == 2) == sorted(inside)
    assert all(copies[0] == copies[-1] for copies in by_feedback.values())  # same key, same bytes, same event id


def test_every_rating_arrives_across_a_broker_restart(sessions, add_completion, kafka_settings, broker):
    """Ratings relayed before the restart die with the broker's log; ratings made while it is down wait in the
    outbox; replay brings back the lost ones and the consumer hands each rating over once."""
    settings = kafka_settings(kafka_request_timeout_ms=1_000, kafka_delivery_timeout_ms=1_500)
    started = utcnow()
    relay = Relay(sessions, settings).start()
    try:
        delivered = [r.id for r in rate_each(sessions, settings, [add_completion() for _ in range(4)])]
        wait_until(lambda: relay.depth() == 0)
        broker.stop()
        try:
            while_down = [r.id for r in rate_each(sessions, settings, [add_completion() for _ in range(4)])]
            assert relay.depth() == 4
        finally:
            broker.start()
        wait_until(lambda: relay.depth() == 0)
    finally:
        relay.stop()
    assert replay(sessions, settings, since=started) == 8
    with FeedbackConsumer(settings) as consumer:
        batches = drain(consumer, 12)
    handed_over = [e.feedback_id for batch in batches for e in batch.events]
    assert sorted(handed_over) == sorted(delivered + while_down)
    assert sum(batch.duplicates for batch in batches) == 4  # the while-down ratings came twice
