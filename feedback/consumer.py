"""The consumer library the trainer uses: batches of feedback events, committed only when the caller says so.

Guarantees, given at-least-once delivery upstream:
- every message of a batch (a rating or a comparison) is accounted for: handed over, dropped as a repeat of an
  event id, dropped because a later rating of the same completion (ranking of the same request) in the batch
  replaced it, or sent to the dead-letter topic with a reason
  (it is not a valid event, or the caller's ``check`` refused it);
- offsets move only through ``commit``, with exactly the offsets of the batches the caller durably consumed,
  so a consumer restarted mid-stream resumes after the last committed batch: nothing lost, nothing handed
  over twice.

With a ``Ledger`` (the trainer's), the offsets the caller stored in the database are the truth instead: each
partition this member is assigned is sought to its stored offset before anything is handed over (Kafka's
committed offsets are never read), and a stored offset the partition no longer covers (beyond its high
watermark, before its start, or a partition that is gone) means the broker lost records: the ratings no one
consumed are republished from the database and reading goes on from where the partition ends.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from feedback import metrics
from feedback.events import InvalidEvent, parse_event
from feedback.kafka import Message, Publisher, make_consumer
from feedback.ledger import Event, Ledger, subject
from feedback.replay import ReplayError, republish_unconsumed
from liveloop.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    # what to train on: new event ids, the latest rating of each completion and ranking of each request
    events: list[Event]
    offsets: dict[TopicPartition, int]  # per partition, the offset after the last message this batch covers
    superseded: list[Event] = field(default_factory=list)  # replaced by a later revision in this batch
    duplicates: int = 0
    dead_lettered: int = 0
    generation: int = 0  # how many times the consumer had (re)positioned its partitions when it read the batch
    rejected: list[Event] = field(default_factory=list)  # valid, dead-lettered by the caller's check


class FeedbackConsumer:
    """One member of a consumer group on the feedback topic. Not thread-safe (neither is KafkaConsumer)."""

    def __init__(self, settings: Settings, group_id: str | None = None, *, seen_event_ids: Iterable[str] = (),
                 dedup_window: int = 1_000_000, dead_letters: Publisher | None = None, ledger: Ledger | None = None):
        """``seen_event_ids``: events consumed before (e.g. read back from the caller's own records), so repeats
        published after a restart are dropped too. ``dedup_window``: how many recent event ids are remembered.
        ``dead_letters``: the publisher for the dead-letter topic; by default one on the same Kafka.
        ``ledger``: where the caller stores its offsets (see the module docstring); None: Kafka's commits."""
        self.settings, self.ledger = settings, ledger
        self._assigned: set[TopicPartition] = set()  # assigned, not yet sought to the ledger's offsets
        self._unverified: dict[TopicPartition, int] = {}  # sought to a stored offset the broker may no longer have
        self._republish_pending = False
        self._generation = 0
        self._consumer = make_consumer(settings, group_id or settings.feedback_consumer_group)
        self._consumer.subscribe([settings.feedback_topic], listener=_DropRevoked(self))
        self._dead_letters = dead_letters or Publisher(settings, "liveloop-dead-letters")
        self._buffer: list[ConsumerRecord] = []
        self._dedup_window = dedup_window
        self._seen: OrderedDict[str, None] = OrderedDict()
        for event_id in seen_event_ids:
            self._remember(event_id)

    def next_batch(self, max_messages: int = 256, max_wait_s: float = 5.0,
                   check: Callable[[Event], None] | None = None) -> Batch:
        """Up to ``max_messages`` messages, returning as soon as there are that many or ``max_wait_s`` passed.
        The first call also waits for the group join (about 3 s with the default timeouts). ``check``: the
        caller's test of each valid event; one it raises InvalidEvent for goes to the dead-letter topic with that
        reason (and into ``Batch.rejected``), covered by the batch's offsets like any other."""
        records = self._collect(max_messages, max_wait_s)
        messages = self._dead_letter_invalid([_Parsed.of(record, check) for record in records])
        offsets: dict[TopicPartition, int] = {}
        for message in messages:
            offsets[message.partition] = max(offsets.get(message.partition, 0), message.record.offset + 1)
        fresh, duplicates = self._drop_repeats([m.event for m in messages if m.event and m.invalid is None])
        events, superseded = latest_ratings(fresh)
        metrics.CONSUMED.inc(len(events))
        metrics.DUPLICATES.inc(duplicates)
        metrics.SUPERSEDED.inc(len(superseded))
        dead = [message for message in messages if message.invalid is not None]
        self._export_lag()
        return Batch(events, offsets, superseded, duplicates, len(dead), self._generation,
                     rejected=[message.event for message in dead if message.event])

    def offsets_of(self, *batches: Batch) -> dict[TopicPartition, int]:
        """Per partition, the offset after the last message of these batches: what to store once they are
        durably consumed. Batches read before the partitions were last repositioned count for nothing (their
        offsets belong to positions the consumer has left, possibly on a broker that lost them)."""
        offsets: dict[TopicPartition, int] = {}
        for batch in batches:
            if batch.generation != self._generation:
                continue
            for partition, offset in batch.offsets.items():
                offsets[partition] = max(offsets.get(partition, 0), offset)
        return offsets

    def commit(self, *batches: Batch) -> None:
        """Commit the offsets of these batches to Kafka (call once their events are durably consumed). Raises
        kafka.errors.CommitFailedError if the group rebalanced since: their messages will come again. With a
        ledger this is only a courtesy to lag monitoring."""
        offsets = self.offsets_of(*batches)
        if offsets:
            self._consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})

    def close(self) -> None:
        # kafka-python 3.0 cancels an in-flight metadata refresh on close and logs it as an ERROR with the
        # closed socket's traceback: on a close of our own that is expected, and would read as a crash
        kafka_log = logging.getLogger("kafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)  # setLevel, not .level: children cache what they may log
        try:
            self._consumer.close(autocommit=False)
            self._dead_letters.close()
        finally:
            kafka_log.setLevel(level)

    def __enter__(self) -> FeedbackConsumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _export_lag(self) -> None:
        """The lag of each assigned partition whose high watermark a fetch has told (no request of its own)."""
        for partition in self._consumer.assignment():
            highwater = self._consumer.highwater(partition)
            if highwater is not None:
                lag = max(0, highwater - self._consumer.position(partition))
                metrics.CONSUMER_LAG.labels(str(partition.partition)).set(lag)

    def _collect(self, max_messages: int, max_wait_s: float) -> list[ConsumerRecord]:
        deadline = time.monotonic() + max_wait_s
        while len(self._buffer) < max_messages:
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_messages - len(self._buffer))
            if self._assigned:
                polled = {tp: records for tp, records in polled.items() if tp not in self._assigned}
                self._position()
            if self._unverified or self._republish_pending:
                self._verify()
            for records in polled.values():
                self._buffer.extend(records)
            if timeout_ms == 0:
                break
        records, self._buffer = self._buffer[:max_messages], self._buffer[max_messages:]
        return records

    def _position(self) -> None:
        """Seek newly assigned partitions to the ledger's offsets (module docstring). Records fetched from
        elsewhere before this are dropped by the caller. Whether the broker still has the records before a stored
        offset is known at the partition's first fetch answer (``_verify``): Tansu's ListOffsets answers the last
        record batch's base offset + 1 for the end, while the high watermark of a fetch is right on both brokers."""
        topic, assigned, self._assigned = self.settings.feedback_topic, sorted(self._assigned), set()
        self._forget_partitions(set(assigned))
        self._generation += 1
        stored = self.ledger.offsets(topic)
        begin = self._consumer.beginning_offsets(assigned)
        existing = self._consumer.partitions_for_topic(topic) or set()
        lost = {TopicPartition(topic, p): 0 for p in stored if p not in existing}  # a topic with fewer partitions
        lost |= {tp: begin[tp] for tp in assigned if tp.partition in stored and stored[tp.partition].offset < begin[tp]}
        for tp in assigned:
            position = lost.get(tp, stored[tp.partition].offset if tp.partition in stored else begin[tp])
            self._consumer.seek(tp, position)
            if position > 0 and tp not in lost:
                self._unverified[tp] = position
        self._republish_pending |= any(s.lost for s in stored.values())
        self._lost(lost)

    def _verify(self) -> None:
        """A stored offset beyond the partition's high watermark: the broker lost records (restarted empty, a new
        cluster); reading goes on from the high watermark, after the republished ratings are sent."""
        lost = {}
        for tp, position in list(self._unverified.items()):
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                del self._unverified[tp]
                if position > highwater:
                    self._consumer.seek(tp, highwater)
                    lost[tp] = highwater
        self._lost(lost)

    def _lost(self, restart_at: dict[TopicPartition, int]) -> None:
        if restart_at:
            log.warning("the broker lost consumed records of %s; the ratings not consumed yet are republished",
                        ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(restart_at)))
            self.ledger.mark_lost(restart_at)
            self._republish_pending = True
        if self._republish_pending:
            self._republish()

    def _republish(self) -> None:
        try:
            count = republish_unconsumed(self.ledger.sessions, self.settings)
        except ReplayError as exc:
            log.warning("republishing unconsumed ratings failed, will retry: %s", exc)
            return
        self.ledger.republished(self.settings.feedback_topic)
        self._republish_pending = False
        log.info("republished %d ratings that no version had consumed", count)

    def _dead_letter_invalid(self, messages: list[_Parsed]) -> list[_Parsed]:
        """Send the invalid messages to the dead-letter topic. A partition whose dead letter was not acknowledged
        is cut at that message and rewound to it, so it is tried again rather than covered by this batch."""
        invalid = [message for message in messages if message.invalid is not None]
        if not invalid:
            return messages
        errors = self._dead_letters.publish([self._dead_letter(message) for message in invalid])
        retry_from: dict[TopicPartition, int] = {}
        for message, error in zip(invalid, errors, strict=True):
            offset = message.record.offset
            if error is None:
                metrics.DEAD_LETTERED.labels(type(message.invalid).__name__).inc()
                log.warning("dead-lettered %s@%d: %s", message.partition, offset, message.invalid.reason)
            else:
                retry_from[message.partition] = min(retry_from.get(message.partition, offset), offset)
        for partition, offset in retry_from.items():
            log.warning("dead-letter topic unavailable; %s rewinds to %d", partition, offset)
            self._consumer.seek(partition, offset)
        self._forget_partitions(set(retry_from))
        return [m for m in messages if m.partition not in retry_from or m.record.offset < retry_from[m.partition]]

    def _dead_letter(self, message: _Parsed) -> Message:
        record, reason = message.record, message.invalid
        headers = (*((k, v) for k, v in record.headers if not k.startswith("dlq.")),
                   ("dlq.reason", reason.reason.encode()), ("dlq.error", type(reason).__name__.encode()),
                   ("dlq.topic", record.topic.encode()), ("dlq.partition", str(record.partition).encode()),
                   ("dlq.offset", str(record.offset).encode()))
        key = record.key.decode(errors="replace") if record.key is not None else ""
        return Message(self.settings.feedback_dlq_topic, key, record.value or b"", headers)

    def _drop_repeats(self, events: list[Event]) -> tuple[list[Event], int]:
        fresh = []
        for event in events:
            if event.event_id not in self._seen:
                self._remember(event.event_id)
                fresh.append(event)
        return fresh, len(events) - len(fresh)

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)

    def _forget_partitions(self, revoked: set[TopicPartition]) -> None:
        self._buffer = [r for r in self._buffer if TopicPartition(r.topic, r.partition) not in revoked]


@dataclass(frozen=True)
class _Parsed:
    record: ConsumerRecord
    partition: TopicPartition
    event: Event | None = None  # also with ``invalid``, when the caller's check refused a valid event
    invalid: InvalidEvent | None = None

    @classmethod
    def of(cls, record: ConsumerRecord, check: Callable[[Event], None] | None = None) -> _Parsed:
        partition = TopicPartition(record.topic, record.partition)
        try:
            event = parse_event(record.value)
        except InvalidEvent as exc:
            return cls(record, partition, invalid=exc)
        try:
            if check is not None:
                check(event)
        except InvalidEvent as exc:
            return cls(record, partition, event=event, invalid=exc)
        return cls(record, partition, event=event)


class _DropRevoked(ConsumerRebalanceListener):
    """Messages already fetched from a partition this member lost belong to its new owner now."""

    def __init__(self, owner: FeedbackConsumer):
        self._owner = owner

    def on_partitions_revoked(self, revoked):
        self._owner._forget_partitions(set(revoked))
        for tp in revoked:
            self._owner._unverified.pop(tp, None)

    def on_partitions_assigned(self, assigned):
        # positioned by the owner after the poll returns: the listener runs on the client's network loop, where a
        # blocking Kafka call (end offsets) would wait for itself
        if self._owner.ledger is not None:
            self._owner._assigned |= set(assigned)


def latest_ratings(events: list[Event]) -> tuple[list[Event], list[Event]]:
    """Change of mind inside a batch: per completion (rating) or request (comparison) only the highest revision
    counts. Returns (kept, replaced), kept in arrival order."""
    latest: dict[str, Event] = {}
    for event in events:
        if subject(event) not in latest or event.revision > latest[subject(event)].revision:
            latest[subject(event)] = event
    kept = [event for event in events if latest[subject(event)] is event]
    return kept, [event for event in events if latest[subject(event)] is not event]
