"""What the trainer consumed, kept in the database beside what it became.

Kafka's committed offsets live on the broker, which can lose them (the embedded broker keeps nothing across a
restart, retention expires, clusters are rebuilt) and which commits apart from the database. So, as Kafka's
documentation recommends for exactly-once with an external store, the consumed offsets are written in the same
transaction as the result of the messages (the candidate version, or the record of ratings consumed without
one):

- ``consumer_offsets``: per consumer group and partition, where the next batch starts; the consumer seeks there;
- ``consumed_feedback``: each event consumed and its outcome. Ratings the relay sent but that are not here are
  what a broker that lost its data is refilled with (``feedback.replay.republish_unconsumed``), and a
  completion's revision is never trained after a newer one was consumed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from kafka import TopicPartition
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from feedback.events import FeedbackEvent
from liveloop.tables import ConsumedFeedback, ConsumerOffset, Feedback, utcnow


class Outcome(StrEnum):
    TRAINED = "trained"  # in the lineage of the candidate registered in the same transaction
    HELDOUT = "heldout"  # the gates' held-out split: never trained on
    SUPERSEDED = "superseded"  # a newer rating of the same completion exists: never trained on
    DISCARDED = "discarded"  # trainable, but the update produced no candidate (no samples, or not applied)
    DEAD_LETTERED = "dead_lettered"  # a valid event the trainer cannot use: on the dead-letter topic, with why


@dataclass(frozen=True)
class StoredOffset:
    offset: int
    lost: bool  # the broker was found without the records before it; republishing is still to be done


class Ledger:
    """The consumption records of one consumer group (``group_id``), in the database of ``sessions``."""

    def __init__(self, sessions: sessionmaker[Session], group_id: str):
        self.sessions, self.group_id = sessions, group_id

    def offsets(self, topic: str) -> dict[int, StoredOffset]:
        """Partition → the stored offset: where the group's next batch of ``topic`` starts."""
        query = select(ConsumerOffset).where(ConsumerOffset.group_id == self.group_id, ConsumerOffset.topic == topic)
        with self.sessions() as session:
            return {row.partition: StoredOffset(row.offset, row.lost_at is not None) for row in session.scalars(query)}

    def settle(self, events: list[FeedbackEvent]) -> tuple[list[FeedbackEvent], list[FeedbackEvent]]:
        """(fresh, superseded) of ``events``, dropping those already consumed. Superseded: a newer or equal
        revision of the completion was consumed before, or a newer rating of it is in the ``feedback`` table
        (it will arrive, or has, and is trained instead)."""
        if not events:
            return [], []
        ids, completions = [e.event_id for e in events], {e.completion_id for e in events}
        with self.sessions() as session:
            consumed = set(session.scalars(select(ConsumedFeedback.event_id).where(ConsumedFeedback.event_id.in_(ids))))
            done = dict(session.execute(
                select(ConsumedFeedback.completion_id, func.max(ConsumedFeedback.revision))
                .where(ConsumedFeedback.completion_id.in_(completions)).group_by(ConsumedFeedback.completion_id)).all())
            rated = dict(session.execute(
                select(Feedback.completion_id, func.max(Feedback.revision))
                .where(Feedback.completion_id.in_(completions)).group_by(Feedback.completion_id)).all())
        fresh, superseded = [], []
        for event in events:
            if event.event_id in consumed:
                continue
            newer = event.revision <= done.get(event.completion_id, 0) or event.revision < rated.get(
                event.completion_id, 0)
            (superseded if newer else fresh).append(event)
        return fresh, superseded

    def record(self, session: Session, *, offsets: dict[TopicPartition, int],
               consumed: Iterable[tuple[FeedbackEvent, Outcome]], version: str | None = None) -> None:
        """Store, in the caller's transaction, the batch's next offsets and what became of its events
        (``TRAINED`` ones are in ``version``'s lineage). Events recorded before are left as they were."""
        consumed = list(consumed)
        known = set(session.scalars(select(ConsumedFeedback.event_id).where(
            ConsumedFeedback.event_id.in_([event.event_id for event, _ in consumed]))))
        now = utcnow()
        for event, outcome in consumed:
            if event.event_id not in known:
                known.add(event.event_id)
                session.add(ConsumedFeedback(
                    event_id=event.event_id, completion_id=event.completion_id, revision=event.revision,
                    outcome=outcome, version=version if outcome == Outcome.TRAINED else None, consumed_at=now))
        for tp, offset in offsets.items():
            self._put(session, tp, offset, lost=False)

    def save(self, *, offsets: dict[TopicPartition, int], consumed: Iterable[tuple[FeedbackEvent, Outcome]]) -> None:
        """``record`` in a transaction of its own: ratings consumed without a candidate."""
        with self.sessions.begin() as session:
            self.record(session, offsets=offsets, consumed=consumed)

    def mark_lost(self, restart_at: dict[TopicPartition, int]) -> None:
        """The broker no longer holds these partitions' consumed records: reading goes on from ``restart_at`` and
        the partitions stay marked until ``republished``, so a crash in between republishes again."""
        with self.sessions.begin() as session:
            for tp, offset in restart_at.items():
                self._put(session, tp, offset, lost=True)

    def republished(self, topic: str) -> None:
        with self.sessions.begin() as session:
            session.execute(update(ConsumerOffset).where(
                ConsumerOffset.group_id == self.group_id, ConsumerOffset.topic == topic).values(lost_at=None))

    def _put(self, session: Session, tp: TopicPartition, offset: int, *, lost: bool) -> None:
        row = session.get(ConsumerOffset, (self.group_id, tp.topic, tp.partition))
        if row is None:
            row = ConsumerOffset(group_id=self.group_id, topic=tp.topic, partition=tp.partition)
            session.add(row)
        row.offset, row.updated_at = offset, utcnow()
        if lost:  # only ``republished`` clears it
            row.lost_at = row.updated_at
