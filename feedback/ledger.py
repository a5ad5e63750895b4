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

Comparisons are consumed on the same terms as ratings, their request in place of a completion: what a revision
revises (``subject``) is a rating's completion and a comparison's request, whose id ``consumed_feedback`` keeps
in its ``completion_id`` column.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from kafka import TopicPartition
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from feedback.events import ComparisonEvent, FeedbackEvent
from liveloop.tables import Comparison, ConsumedFeedback, ConsumerOffset, Feedback, utcnow

Event = FeedbackEvent | ComparisonEvent


class Outcome(StrEnum):
    TRAINED = "trained"  # in the lineage of the candidate registered in the same transaction
    HELDOUT = "heldout"  # the gates' held-out split: never trained on
    SUPERSEDED = "superseded"  # a newer rating of the same completion (ranking of the request) exists: never trained
    DISCARDED = "discarded"  # trainable, but the update produced no candidate (no samples, or not applied)
    DEAD_LETTERED = "dead_lettered"  # a valid event the trainer cannot use: on the dead-letter topic, with why


@dataclass(frozen=True)
class StoredOffset:
    offset: int
    lost: bool  # the broker was found without the records before it; republishing is still to be done


def subject(event: Event) -> str:
    """What an event's revision revises: a rating's completion, a comparison's request."""
    return event.request_id if isinstance(event, ComparisonEvent) else event.completion_id


class Ledger:
    """The consumption records of one consumer group (``group_id``), in the database of ``sessions``."""

    def __init__(self, sessions: sessionmaker[Session], group_id: str):
        self.sessions, self.group_id = sessions, group_id

    def offsets(self, topic: str) -> dict[int, StoredOffset]:
        """Partition → the stored offset: where the group's next batch of ``topic`` starts."""
        query = select(ConsumerOffset).where(ConsumerOffset.group_id == self.group_id, ConsumerOffset.topic == topic)
        with self.sessions() as session:
            return {row.partition: StoredOffset(row.offset, row.lost_at is not None) for row in session.scalars(query)}

    def settle(self, events: list[Event]) -> tuple[list[Event], list[Event]]:
        """(fresh, superseded) of ``events``, dropping those already consumed. Superseded: a newer or equal
        revision of its ``subject`` was consumed before, or a newer one is in the ``feedback`` table (the
        ``comparisons`` table for a comparison): it will arrive, or has, and is trained instead."""
        if not events:
            return [], []
        ids, subjects = [e.event_id for e in events], {subject(e) for e in events}
        completions = {e.completion_id for e in events if isinstance(e, FeedbackEvent)}
        requests = {e.request_id for e in events if isinstance(e, ComparisonEvent)}
        with self.sessions() as session:
            consumed = set(session.scalars(select(ConsumedFeedback.event_id).where(ConsumedFeedback.event_id.in_(ids))))
            done = dict(session.execute(
                select(ConsumedFeedback.completion_id, func.max(ConsumedFeedback.revision))
                .where(ConsumedFeedback.completion_id.in_(subjects)).group_by(ConsumedFeedback.completion_id)).all())
            rated = dict(session.execute(
                select(Feedback.completion_id, func.max(Feedback.revision))
                .where(Feedback.completion_id.in_(completions)).group_by(Feedback.completion_id)).all())
            ranked = dict(session.execute(
                select(Comparison.request_id, func.max(Comparison.revision))
                .where(Comparison.request_id.in_(requests)).group_by(Comparison.request_id)).all())
        fresh, superseded = [], []
        for event in events:
            if event.event_id in consumed:
                continue
            latest = (ranked if isinstance(event, ComparisonEvent) else rated).get(subject(event), 0)
            newer = event.revision <= done.get(subject(event), 0) or event.revision < latest
            (superseded if newer else fresh).append(event)
        return fresh, superseded

    def record(self, session: Session, *, offsets: dict[TopicPartition, int],
               consumed: Iterable[tuple[Event, Outcome]], version: str | None = None) -> None:
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
                    event_id=event.event_id, completion_id=subject(event), revision=event.revision,
                    outcome=outcome, version=version if outcome == Outcome.TRAINED else None, consumed_at=now))
        for tp, offset in offsets.items():
            self._put(session, tp, offset, lost=False)

    def save(self, *, offsets: dict[TopicPartition, int], consumed: Iterable[tuple[Event, Outcome]]) -> None:
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
