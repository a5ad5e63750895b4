"""Small helpers shared by the feedback tests."""

from __future__ import annotations

import time

from feedback.consumer import Batch, FeedbackConsumer
from feedback.service import FeedbackConfig, RecordedFeedback, record_feedback


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
