"""Small helpers shared by the feedback tests."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from feedback.consumer import Batch, FeedbackConsumer
from feedback.service import FeedbackConfig, RecordedFeedback, record_feedback
from liveloop.settings import Settings


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def rate_each(sessions, settings, completion_ids, rating: str = "up") -> list[RecordedFeedback]:
    config = FeedbackConfig.from_settings(settings)
    return [record_feedback(sessions, completion_id=c, rating=rating, config=config) for c in completion_ids]


def covered(batches: list[Batch]) -> int:
    """Messages the batches account for: handed over, replaced by a later rating, repeated or dead-lettered."""
    return sum(len(b.events) + len(b.superseded) + b.duplicates + b.dead_lettered for b in batches)


def drain(consumer: FeedbackConsumer, expected: int, max_batches: int = 30) -> list[Batch]:
    """Batches until ``expected`` messages are accounted for."""
    batches: list[Batch] = []
    while covered(batches) < expected and len(batches) < max_batches:
        batches.append(consumer.next_batch(max_messages=500, max_wait_s=1.0))
    return batches


def read_topic(settings: Settings, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    """Every record on the topic, read without a consumer group, waiting until at least ``expected`` are there (or
    ``timeout_s`` passed)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(partitions)
    records = []
    try:
        for _ in range(int(timeout_s / 0.5)):
            records.extend(r for batch in consumer.poll(timeout_ms=500).values() for r in batch)
            if len(records) >= expected:
                records.extend(r for batch in consumer.poll(timeout_ms=200).values() for r in batch)
                break
    finally:
        consumer.close()
    return records
