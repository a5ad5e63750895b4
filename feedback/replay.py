"""Republishing stored feedback events from the database, the system of record.

For backfills and disaster recovery: the embedded broker keeps nothing across restarts, and a Kafka cluster can
lose a topic. Events go out again exactly as first published (same event ids, same keys, original order), so a
consumer that already has some drops those as repeats. ``republish_unconsumed`` is what the trainer's consumer
calls when it finds that the broker lost records: every rating sent but not recorded as consumed goes out again.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Select, exists
from sqlalchemy.orm import Session, sessionmaker

from feedback.events import as_utc
from feedback.kafka import Publisher
from feedback.relay import OUTBOX_MESSAGES, outbox_message
from liveloop.settings import Settings
from liveloop.tables import ConsumedFeedback, OutboxMessage

log = logging.getLogger(__name__)


class ReplayError(RuntimeError):
    pass


def replay(session_factory: sessionmaker[Session], settings: Settings, *, since: datetime,
           until: datetime | None = None, batch_size: int = 500) -> int:
    """Republish the feedback events recorded in [since, until) (naive times are UTC), parked ones not; returns
    how many Kafka acknowledged. Raises ReplayError at the first batch Kafka did not fully acknowledge; running it
    again is safe."""
    outbox = OutboxMessage.__table__
    query = OUTBOX_MESSAGES.where(outbox.c.topic == settings.feedback_topic, outbox.c.created_at >= as_utc(since),
                                  outbox.c.parked_at.is_(None))
    if until is not None:
        query = query.where(outbox.c.created_at < as_utc(until))
    return _republish(session_factory, settings, query, batch_size)


def republish_unconsumed(session_factory: sessionmaker[Session], settings: Settings, *, batch_size: int = 500) -> int:
    """Republish the feedback events the relay sent that are not in ``consumed_feedback`` (no version trained on
    them, nor were they otherwise consumed); returns how many Kafka acknowledged. Raises ReplayError as
    ``replay`` does; running it again is safe."""
    outbox = OutboxMessage.__table__
    consumed = exists().where(ConsumedFeedback.event_id == outbox.c.event_id)
    query = OUTBOX_MESSAGES.where(outbox.c.topic == settings.feedback_topic, outbox.c.sent_at.is_not(None), ~consumed)
    return _republish(session_factory, settings, query, batch_size)


def _republish(session_factory: sessionmaker[Session], settings: Settings, query: Select, batch_size: int) -> int:
    outbox = OutboxMessage.__table__
    publisher = Publisher(settings, "liveloop-replay")
    republished, after_id = 0, 0
    try:
        while True:
            with session_factory() as session:
                page = query.where(outbox.c.id > after_id).order_by(outbox.c.id).limit(batch_size)
                rows = session.execute(page).all()
            if not rows:
                log.info("replayed %d feedback events", republished)
                return republished
            errors = [error for error in publisher.publish([outbox_message(row) for row in rows]) if error]
            if errors:
                raise ReplayError(f"Kafka did not acknowledge {len(errors)} of {len(rows)} events ({errors[0]}); "
                                  f"{republished} were republished before them")
            republished, after_id = republished + len(rows), rows[-1].id
    finally:
        publisher.close()
