"""The outbox relay: publishes unsent outbox rows to Kafka and marks each sent once the broker acknowledged it.

Delivery is at least once (a crash between the ack and the commit republishes a batch; consumers drop repeats
by event id). While Kafka is down the rows simply wait, the API keeps accepting feedback, and the relay retries
with exponential backoff. A row that fails on its own (Kafka refuses it outright, or acknowledges others of its
round) counts an attempt; after ``relay_max_attempts`` it is parked with its error, so it no longer holds up the
rows behind it (``liveloop_outbox_parked_rows``; clearing ``parked_at`` sends it again). Several relays can run
against PostgreSQL: each locks its batch with ``FOR UPDATE SKIP LOCKED`` so they never publish the same rows.
SQLite has a single writer; run one relay there.
"""

from __future__ import annotations

import logging
import threading

from kafka.errors import KafkaError
from sqlalchemy import Row, Text, bindparam, cast, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from feedback import metrics
from feedback.kafka import Message, Publisher
from liveloop.settings import Settings
from liveloop.tables import OutboxMessage, utcnow

log = logging.getLogger(__name__)


_OUTBOX = OutboxMessage.__table__
# The payload as the database stores it (JSON text): no parse and dump per message on the way to Kafka.
OUTBOX_MESSAGES = select(_OUTBOX.c.id, _OUTBOX.c.event_id, _OUTBOX.c.topic, _OUTBOX.c.key,
                         cast(_OUTBOX.c.payload, Text).label("value"))
_UNSENT = (OUTBOX_MESSAGES.add_columns(_OUTBOX.c.attempts)
           .where(_OUTBOX.c.sent_at.is_(None), _OUTBOX.c.parked_at.is_(None))
           .order_by(_OUTBOX.c.id).limit(bindparam("limit")).with_for_update(skip_locked=True))
_MARK_SENT = update(_OUTBOX).where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True))).values(sent_at=bindparam("now"))
_MARK_FAILED = (update(_OUTBOX).where(_OUTBOX.c.id == bindparam("row_id"))
                .values(attempts=bindparam("tries"), last_error=bindparam("error"), parked_at=bindparam("parked")))
# rows not sent, and of those the parked ones (both on the partial index of unsent rows)
_BACKLOG = select(func.count(), func.count(_OUTBOX.c.parked_at)).where(_OUTBOX.c.sent_at.is_(None))


def outbox_message(row: Row) -> Message:
    """The Kafka message of a row of ``OUTBOX_MESSAGES``."""
    return Message(row.topic, row.key, row.value.encode(), headers=(("event_id", row.event_id.encode()),))


class Relay:
    def __init__(self, session_factory: sessionmaker[Session], settings: Settings, client_id: str = "liveloop-relay"):
        self._sessions = session_factory
        self._publisher = Publisher(settings, client_id)
        self._batch_size = settings.relay_batch_size
        self._poll_interval_s, self._max_backoff_s = settings.relay_poll_interval_s, settings.relay_max_backoff_s
        self._max_attempts = settings.relay_max_attempts
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def relay_once(self) -> tuple[int, int]:
        """Publish one batch of unsent rows, oldest first; returns (acknowledged, failed)."""
        with self._sessions.begin() as session:
            rows = session.execute(_UNSENT, {"limit": self._batch_size}).all()
            if not rows:
                return 0, 0
            errors = self._publisher.publish([outbox_message(row) for row in rows])
            sent = [row.id for row, error in zip(rows, errors, strict=True) if error is None]
            if sent:
                session.execute(_MARK_SENT, {"ids": sent, "now": utcnow()})
            failures = [self._failure(row, error, others_sent=bool(sent))
                        for row, error in zip(rows, errors, strict=True) if error is not None]
            if failures:
                session.execute(_MARK_FAILED, failures)
        failed = len(failures)
        metrics.PUBLISHED.inc(len(rows) - failed)
        metrics.PUBLISH_ERRORS.inc(failed)
        if failed:
            log.warning("Kafka did not acknowledge %d of %d outbox messages: %s", failed, len(rows),
                        next(error for error in errors if error is not None))
        return len(rows) - failed, failed

    def _failure(self, row: Row, error: KafkaError, *, others_sent: bool) -> dict:
        """The row's new attempts, error and parking. A retriable error while nothing went through is Kafka's
        outage, not the row's fault: it counts no attempt, so an outage never parks rows."""
        own = others_sent or not getattr(error, "retriable", False)  # an error from outside kafka: its own
        tries = row.attempts + own
        parked = utcnow() if own and tries >= self._max_attempts else None
        description = f"{type(error).__name__}: {error}"[:2_000]
        if parked:
            log.error("outbox row %d (event %s) parked after %d failed attempts: %s", row.id, row.event_id, tries,
                      description)
        return {"row_id": row.id, "tries": tries, "error": description, "parked": parked}

    def depth(self) -> int:
        """Rows waiting to be sent (parked ones not)."""
        return self.backlog()[0]

    def backlog(self) -> tuple[int, int]:
        """(rows waiting to be sent, parked rows)."""
        with self._sessions() as session:
            unsent, parked = session.execute(_BACKLOG).one()
        return unsent - parked, parked

    def run(self) -> None:
        """Relay until ``stop``: at once while there is a backlog, every poll interval when idle, with doubling
        waits (up to the maximum backoff) while Kafka or the database fails."""
        backoff_s = 0.0
        while not self._stopping.is_set():
            try:
                sent, failed = self.relay_once()
                waiting, parked = self.backlog()
                metrics.OUTBOX_DEPTH.set(waiting)
                metrics.OUTBOX_PARKED.set(parked)
            except Exception:  # the database is unreachable, say: keep the thread alive and retry
                log.exception("outbox relay round failed")
                sent, failed = 0, 1
            if failed and not sent:  # Kafka is down, or only failing rows are left: wait longer each time
                backoff_s = min(self._max_backoff_s, max(self._poll_interval_s, 2 * backoff_s))
                self._stopping.wait(backoff_s)
            else:
                backoff_s = 0.0
                if sent < self._batch_size:
                    self._stopping.wait(self._poll_interval_s)

    def start(self) -> Relay:
        self._stopping.clear()
        self._thread = threading.Thread(target=self.run, name="outbox-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._publisher.close()
