"""Kafka clients configured from settings, topic creation, and a publisher that reports each message's ack.

Only standard Kafka APIs are used, so the same code runs against the embedded Tansu broker and Apache Kafka.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from liveloop.settings import Settings

log = logging.getLogger(__name__)


class KafkaNotConfigured(RuntimeError):
    pass


@dataclass(frozen=True)
class Message:
    topic: str
    key: str
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def _client_config(settings: Settings, client_id: str) -> dict:
    if not settings.kafka_bootstrap:
        raise KafkaNotConfigured("LIVELOOP_KAFKA_BOOTSTRAP is empty and no embedded broker was started")
    return {
        "bootstrap_servers": [server.strip() for server in settings.kafka_bootstrap.split(",")],
        "client_id": client_id,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "bootstrap_timeout_ms": settings.kafka_request_timeout_ms,
    }


def topic_specs(settings: Settings) -> list[NewTopic]:
    replication = settings.kafka_replication_factor
    return [
        NewTopic(settings.feedback_topic, settings.feedback_partitions, replication),
        NewTopic(settings.feedback_dlq_topic, settings.feedback_dlq_partitions, replication),
        NewTopic(settings.adapter_events_topic, settings.adapter_events_partitions, replication),
    ]


def ensure_topics(settings: Settings) -> list[str]:
    """Create the configured topics that do not exist yet; returns the names created. Existing topics are left
    as they are (their partition counts are not changed)."""
    admin = KafkaAdminClient(**_client_config(settings, "liveloop-admin"))
    try:
        existing = set(admin.list_topics())
        created = []
        for topic in topic_specs(settings):
            if topic.name in existing:
                continue
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:  # another process created it in between
                pass
    finally:
        admin.close()
    if created:
        log.info("created Kafka topics %s", ", ".join(created))
    return created


def make_producer(settings: Settings, client_id: str) -> KafkaProducer:
    idempotent = settings.kafka_idempotence
    return KafkaProducer(
        **_client_config(settings, client_id),
        acks="all",  # every in-sync replica has the message before it counts as sent
        enable_idempotence=idempotent,  # broker drops duplicates the producer's own retries would create
        retries=2**31 - 1,  # bounded by delivery_timeout_ms, as in the Java client
        # ordering per partition survives retries: idempotence guarantees it up to 5 in flight, otherwise only 1
        max_in_flight_requests_per_connection=5 if idempotent else 1,
        linger_ms=5,
        # fewer, larger record batches: each batch costs the producer a sender wake-up, a CRC and a request
        batch_size=256 * 1024,
        delivery_timeout_ms=settings.kafka_delivery_timeout_ms,
        max_block_ms=settings.kafka_request_timeout_ms,  # how long send() waits for metadata when Kafka is down
        allow_auto_create_topics=False,  # a misspelt topic is an error, not a new topic
    )


def make_consumer(settings: Settings, group_id: str | None, client_id: str = "liveloop-consumer",
                  fetch_max_wait_ms: int = 500) -> KafkaConsumer:
    """``fetch_max_wait_ms`` bounds how long the broker holds a fetch that has no data yet. Apache Kafka answers
    as soon as data arrives; the embedded Tansu broker may answer only when the wait ends, so a listener that
    must react quickly asks for a shorter wait (at the cost of more idle fetches)."""
    return KafkaConsumer(
        **_client_config(settings, client_id),
        group_id=group_id,
        enable_auto_commit=False,  # offsets move only when the caller says what it has durably consumed
        auto_offset_reset="earliest",  # a new group (or a broker that lost its offsets) starts from the beginning
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        allow_auto_create_topics=False,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )


class Publisher:
    """Sends messages and says, message by message, whether the broker acknowledged it.

    The producer is created on first use and thrown away after any failure: an idempotent producer whose broker
    restarted keeps failing with UnknownProducerId (seen with Tansu), and a fresh one recovers. Topics are
    ensured each time a producer is created, since a restarted embedded broker has forgotten them.
    """

    def __init__(self, settings: Settings, client_id: str):
        self.settings, self.client_id = settings, client_id
        self._producer: KafkaProducer | None = None

    def publish(self, messages: Sequence[Message]) -> list[KafkaError | None]:
        """One entry per message: None once acknowledged, else the error. Never raises for Kafka errors."""
        try:
            producer = self._connect()
        except KafkaError as exc:
            return [exc] * len(messages)
        futures, errors = [], [None] * len(messages)
        for index, message in enumerate(messages):
            try:
                futures.append((index, producer.send(message.topic, key=message.key.encode(), value=message.value,
                                                     headers=list(message.headers))))
            except KafkaError as exc:
                if exc.retriable:  # no metadata within max_block_ms, say: the rest would wait as long again
                    errors[index:] = [exc] * (len(messages) - index)
                    break
                errors[index] = exc  # this message's own fault (too large, say): the others may go
        self._await_acks(producer, futures, errors)
        if any(errors):
            self.close()
        return errors

    def _await_acks(self, producer: KafkaProducer, futures: list, errors: list[KafkaError | None]) -> None:
        try:
            producer.flush(timeout=self.settings.kafka_delivery_timeout_ms / 1000 + 5)
        except KafkaTimeoutError:
            pass  # the futures still pending are reported as failed below
        for index, future in futures:
            if not future.is_done:
                errors[index] = KafkaTimeoutError("no acknowledgement before the delivery timeout")
            elif future.failed():
                errors[index] = future.exception

    def _connect(self) -> KafkaProducer:
        if self._producer is None:
            ensure_topics(self.settings)
            self._producer = make_producer(self.settings, self.client_id)
        return self._producer

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=1)
