import socket

import pytest
from kafka import KafkaAdminClient

from feedback.broker import BrokerError, EmbeddedBroker, resolved_kafka
from feedback.kafka import KafkaNotConfigured, Message, Publisher, ensure_topics


def test_embedded_broker_serves_kafka_and_forgets_everything_on_restart(kafka_settings, broker, read_topic):
    settings = kafka_settings(feedback_partitions=4, kafka_request_timeout_ms=1_000, kafka_delivery_timeout_ms=1_500)
    assert sorted(ensure_topics(settings)) == sorted(
        [settings.feedback_topic, settings.feedback_dlq_topic, settings.adapter_events_topic])
    assert ensure_topics(settings) == []  # idempotent
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([settings.feedback_topic])}
    admin.close()
    assert described == {settings.feedback_topic: 4}

    publisher = Publisher(settings, "test")
    assert publisher.publish([Message(settings.feedback_topic, "k", b"v", (("h", b"1"),))]) == [None]
    [record] = read_topic(settings, settings.feedback_topic, 1)
    assert (record.key, record.value, record.headers) == (b"k", b"v", [("h", b"1")])

    broker.stop()
    assert not broker.running
    assert all(publisher.publish([Message(settings.feedback_topic, "k", b"lost")]))  # refused, not raised
    broker.start()
    # a fresh producer after the failure; the restarted broker has no topics until they are ensured again
    assert publisher.publish([Message(settings.feedback_topic, "k", b"again")]) == [None]
    assert [r.value for r in read_topic(settings, settings.feedback_topic, 1)] == [b"again"]
    publisher.close()


def test_broker_that_cannot_start_says_why(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = EmbeddedBroker(port=taken.getsockname()[1], log_path=tmp_path / "tansu.log", startup_timeout_s=5)
        with pytest.raises(BrokerError, match="Tansu"):
            broker.start()
    assert not broker.running


def test_configured_kafka_is_used_as_is_and_missing_kafka_is_a_clear_error(make_settings):
    settings = make_settings(kafka_bootstrap="kafka-1:9092,kafka-2:9092")
    with resolved_kafka(settings) as resolved:
        assert resolved is settings
    with pytest.raises(KafkaNotConfigured, match="LIVELOOP_KAFKA_BOOTSTRAP"):
        ensure_topics(make_settings())


def test_resolved_kafka_starts_an_embedded_broker_when_none_is_configured(make_settings):
    with resolved_kafka(make_settings()) as settings:
        assert settings.kafka_bootstrap.startswith("127.0.0.1:")
        assert ensure_topics(settings)
