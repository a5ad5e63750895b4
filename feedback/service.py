"""Recording ratings and comparisons: each row and its outbox event in the same transaction (no HTTP here).

A rating judges one completion; a comparison ranks the choices of one chat request. Both go the same way through
the same checks (the completions exist and were served to the caller, the feedback_id is new or repeats the same
request, a change of mind chains to the previous revision); each request type says only what is its own.

Race safety comes from unique constraints, not from locks, so it holds on SQLite and PostgreSQL alike and
across API replicas: ``client_feedback_id`` makes a repeated request read back the first one's answer, and
``(completion_id, revision)`` of ratings and ``(request_id, revision)`` of comparisons make two concurrent changes
of mind form a chain, not a fork.
A transaction that loses such a race rolls back and runs again on what the winner wrote.

The API records through ``FeedbackWriter``, which commits whatever requests are waiting together (group commit):
one commit and a handful of statements then carry many ratings. One rating the database refuses fails alone (the
batch is written again one rating at a time), and a database that is down or slow is a 503, not a hang.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from pydantic import ValidationError
from sqlalchemy import Insert, Select, Table, bindparam, insert, select
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from feedback.events import ComparedCompletion, ComparisonEvent, FeedbackEvent, as_utc, describe
from feedback.relay import Relay
from liveloop.settings import Settings
from liveloop.tables import Comparison, Completion, Feedback, OutboxMessage, utcnow

log = logging.getLogger(__name__)

RATINGS = ("up", "down")
# Core statements built once, values bound per call: ORM units of work and per-call statement construction
# were most of the CPU time of a rating.
_COMPLETIONS, _FEEDBACK, _COMPARISONS = Completion.__table__, Feedback.__table__, Comparison.__table__
_OUTBOX = OutboxMessage.__table__
_COMPLETIONS_BY_ID = select(_COMPLETIONS).where(_COMPLETIONS.c.id.in_(bindparam("keys", expanding=True)))
_ADD_OUTBOX = insert(_OUTBOX)


class FeedbackError(Exception):
    pass


class InvalidFeedback(FeedbackError):
    """The rating, ranking or comment is not acceptable (→ 422)."""


class UnknownCompletion(FeedbackError):
    """No completion has this id (→ 404)."""


class NotCompletionOwner(FeedbackError):
    """The completion was served to another API key (→ 403)."""


class FeedbackIdConflict(FeedbackError):
    """The client's feedback_id was already used for a different rating or comparison (→ 409)."""


class UnusableCompletion(InvalidFeedback):
    """The completion as stored cannot make a feedback event, e.g. its behaviour log-probs are not finite (→ 422)."""


class FeedbackUnavailable(FeedbackError):
    """The database is unreachable, or too slow to take the rating in time (→ 503)."""


@dataclass(frozen=True)
class FeedbackConfig:
    topic: str = "feedback"
    reward_up: float = 1.0
    reward_down: float = -1.0
    comment_max_chars: int = 2_000

    @classmethod
    def from_settings(cls, settings: Settings) -> FeedbackConfig:
        return cls(topic=settings.feedback_topic, reward_up=settings.feedback_reward_up,
                   reward_down=settings.feedback_reward_down, comment_max_chars=settings.feedback_comment_max_chars)

    def reward(self, rating: str) -> float:
        return self.reward_up if rating == "up" else self.reward_down


@dataclass(frozen=True)
class RecordedFeedback:
    id: str
    completion_id: str
    rating: str
    reward: float
    revision: int
    supersedes: str | None
    feedback_id: str | None  # the client's idempotency key, when it sent one
    comment: str | None
    user_id: str | None
    created_at: datetime
    created: bool  # False when this answers a repeated feedback_id

    @classmethod
    def of(cls, row: Mapping, *, created: bool) -> RecordedFeedback:
        """From a feedback row (a mapping of its columns)."""
        return cls(id=row["id"], completion_id=row["completion_id"], rating=row["rating"], reward=row["reward"],
                   revision=row["revision"], supersedes=row["supersedes_id"], feedback_id=row["client_feedback_id"],
                   comment=row["comment"], user_id=row["user_id"], created_at=as_utc(row["created_at"]),
                   created=created)


@dataclass(frozen=True)
class RecordedComparison:
    id: str
    request_id: str
    ranking: tuple[str, ...]  # completion ids, best first
    revision: int
    supersedes: str | None
    feedback_id: str | None  # the client's idempotency key, when it sent one
    comment: str | None
    user_id: str | None
    created_at: datetime
    created: bool  # False when this answers a repeated feedback_id

    @classmethod
    def of(cls, row: Mapping, *, created: bool) -> RecordedComparison:
        """From a comparisons row (a mapping of its columns)."""
        return cls(id=row["id"], request_id=row["request_id"], ranking=tuple(row["ranking"]), revision=row["revision"],
                   supersedes=row["supersedes_id"], feedback_id=row["client_feedback_id"], comment=row["comment"],
                   user_id=row["user_id"], created_at=as_utc(row["created_at"]), created=created)


@dataclass(frozen=True, eq=False)
class _Chain:
    """Where the judgements of one kind are stored, and what their revision chains hang on: a rating's
    completion, a comparison's chat request."""

    key: str  # the column a chain of revisions shares
    id_prefix: str
    by_client_id: Select
    revisions_of: Select
    add: Insert

    @classmethod
    def of(cls, table: Table, key: str, id_prefix: str) -> _Chain:
        return cls(key, id_prefix,
                   select(table).where(table.c.client_feedback_id.in_(bindparam("keys", expanding=True))),
                   select(table.c.id, table.c[key], table.c.revision).where(
                       table.c[key].in_(bindparam("keys", expanding=True))),
                   insert(table))


_RATING_CHAIN = _Chain.of(_FEEDBACK, "completion_id", "fb-")
_COMPARISON_CHAIN = _Chain.of(_COMPARISONS, "request_id", "cmp-")


@dataclass(frozen=True)
class FeedbackRequest:
    """A rating of one completion."""

    completion_id: str
    rating: str
    feedback_id: str | None = None  # the client's idempotency key
    comment: str | None = None
    user_id: str | None = None  # the caller's identity when API keys are configured; None when the API is open

    chain: ClassVar[_Chain] = _RATING_CHAIN

    @property
    def completion_ids(self) -> tuple[str, ...]:
        return (self.completion_id,)

    def check(self) -> None:
        if self.rating not in RATINGS:
            raise InvalidFeedback(f"rating must be one of {', '.join(RATINGS)}, not {self.rating!r}")

    def chain_key(self, completions: list[Mapping]) -> str:
        return self.completion_id

    def body(self) -> dict:
        """The columns that make this rating the same request as a stored one."""
        return {"completion_id": self.completion_id, "rating": self.rating, "comment": self.comment,
                "user_id": self.user_id}

    def row(self, config: FeedbackConfig) -> dict:
        return self.body() | {"reward": config.reward(self.rating)}

    def event(self, row: Mapping, completions: list[Mapping]) -> FeedbackEvent:
        [completion] = completions
        return FeedbackEvent(
            event_id=uuid.uuid4().hex, feedback_id=row["id"], completion_id=completion["id"], revision=row["revision"],
            rating=row["rating"], reward=row["reward"], supersedes=row["supersedes_id"], comment=row["comment"],
            user_id=row["user_id"], rated_at=row["created_at"], **_logged_sample(completion))

    def recorded(self, row: Mapping, *, created: bool) -> RecordedFeedback:
        return RecordedFeedback.of(row, created=created)


@dataclass(frozen=True)
class ComparisonRequest:
    """A ranking, best first, of choices of one chat request (the preferred one and the other: a ranking of two)."""

    ranking: tuple[str, ...]  # completion ids
    feedback_id: str | None = None  # the client's idempotency key
    comment: str | None = None
    user_id: str | None = None  # the caller's identity when API keys are configured; None when the API is open

    chain: ClassVar[_Chain] = _COMPARISON_CHAIN

    @property
    def completion_ids(self) -> tuple[str, ...]:
        return self.ranking

    def check(self) -> None:
        if len(self.ranking) < 2:
            raise InvalidFeedback(f"a ranking names at least 2 completions, not {len(self.ranking)}")
        twice = sorted({c for c in self.ranking if self.ranking.count(c) > 1})
        if twice:
            raise InvalidFeedback(f"a ranking names each completion once; {', '.join(map(repr, twice))} twice")

    def chain_key(self, completions: list[Mapping]) -> str:
        """The chat request whose choices these are; InvalidFeedback when they are not choices of one request
        (another prompt, another user)."""
        request_ids = {completion["request_id"] for completion in completions}
        if len(request_ids) != 1 or None in request_ids:
            raise InvalidFeedback("the ranked completions are not choices of one chat request (ask for them with "
                                  "n = 2 and rank its choices)")
        return request_ids.pop()

    def body(self) -> dict:
        """The columns that make this ranking the same request as a stored one."""
        return {"ranking": list(self.ranking), "comment": self.comment, "user_id": self.user_id}

    def row(self, config: FeedbackConfig) -> dict:
        return self.body()

    def event(self, row: Mapping, completions: list[Mapping]) -> ComparisonEvent:
        return ComparisonEvent(
            event_id=uuid.uuid4().hex, feedback_id=row["id"], request_id=row["request_id"], revision=row["revision"],
            supersedes=row["supersedes_id"], comment=row["comment"], user_id=row["user_id"],
            rated_at=row["created_at"], ranking=[ComparedCompletion(completion_id=c["id"], **_logged_sample(c))
                                                 for c in completions])

    def recorded(self, row: Mapping, *, created: bool) -> RecordedComparison:
        return RecordedComparison.of(row, created=created)


Judgement = FeedbackRequest | ComparisonRequest
Recorded = RecordedFeedback | RecordedComparison


def record_feedback(session_factory: sessionmaker[Session], *, completion_id: str, rating: str,
                    feedback_id: str | None = None, comment: str | None = None, user_id: str | None = None,
                    config: FeedbackConfig = FeedbackConfig(), max_attempts: int = 5) -> RecordedFeedback:
    """Store one rating and its event. With a ``user_id`` the completion must have been served to that user."""
    request = FeedbackRequest(completion_id, rating, feedback_id, comment, user_id)
    [result] = record_batch(session_factory, [request], config=config, max_attempts=max_attempts)
    if isinstance(result, Exception):
        raise result
    return result


def record_batch(session_factory: sessionmaker[Session], requests: Sequence[Judgement], *,
                 config: FeedbackConfig = FeedbackConfig(), max_attempts: int = 5) -> list[Recorded | Exception]:
    """Store many ratings and comparisons in one transaction; each request gets its answer or its error, in order
    (a typed FeedbackError, or the unexpected exception of a request that failed on its own)."""
    try:
        return _record_together(session_factory, requests, config, max_attempts)
    except (OperationalError, InterfaceError) as exc:  # unreachable, connection lost, SQLite's lock wait ran out
        log.error("the database did not take %d ratings: %s", len(requests), exc)
        return [FeedbackUnavailable("the feedback store is unavailable; retry later")] * len(requests)
    except Exception as exc:
        if len(requests) > 1:  # some rating the database refuses: each alone, so only that one fails
            log.warning("a batch of %d ratings failed (%s); writing them one at a time", len(requests), exc)
            return [result for request in requests
                    for result in record_batch(session_factory, [request], config=config, max_attempts=max_attempts)]
        if isinstance(exc, DataError | UnicodeError) or isinstance(exc, StatementError) and isinstance(
                exc.orig, UnicodeError):
            log.warning("the database refused a rating of %s: %s", requests[0].completion_ids, exc)
            return [InvalidFeedback("the rating contains data the database cannot store")]
        log.exception("recording a rating of %s failed", requests[0].completion_ids)
        return [exc]


def _record_together(session_factory: sessionmaker[Session], requests: Sequence[Judgement],
                     config: FeedbackConfig, max_attempts: int) -> list[Recorded | FeedbackError]:
    for _ in range(max_attempts):
        try:
            with session_factory.begin() as session:
                return _record_batch(session, requests, config)
        except IntegrityError:  # another writer took a feedback_id or a revision first: redo on its rows
            log.debug("feedback batch of %d lost a race; retrying", len(requests))
    error = FeedbackError(f"ratings are being written concurrently; {max_attempts} attempts failed")
    return [error] * len(requests)


def _record_batch(session: Session, requests: Sequence[Judgement],
                  config: FeedbackConfig) -> list[Recorded | FeedbackError]:
    completions = _rows_by(session, _COMPLETIONS_BY_ID, "id", {c for r in requests for c in r.completion_ids})
    client_ids = {r.feedback_id for r in requests}
    # one namespace of feedback_ids for ratings and comparisons: a key reused across them is a conflict
    earlier = {**_rows_by(session, _RATING_CHAIN.by_client_id, "client_feedback_id", set(client_ids)),
               **_rows_by(session, _COMPARISON_CHAIN.by_client_id, "client_feedback_id", set(client_ids))}
    rated = {r.completion_id for r in requests if isinstance(r, FeedbackRequest)}
    compared = {completions[c]["request_id"] for r in requests if isinstance(r, ComparisonRequest)
                for c in r.ranking if c in completions}
    latest = {**_latest(session, _RATING_CHAIN, rated), **_latest(session, _COMPARISON_CHAIN, compared)}
    results: list[Recorded | FeedbackError] = []
    new_rows: dict[_Chain, list[tuple[dict, dict]]] = {}
    for request in requests:
        try:
            result, rows = _decide(request, completions, earlier, latest, config)
        except FeedbackError as exc:
            result, rows = exc, None
        results.append(result)
        if rows is not None:
            new_rows.setdefault(request.chain, []).append(rows)
    for chain, rows in new_rows.items():
        session.execute(chain.add, [row for row, _ in rows])
        session.execute(_ADD_OUTBOX, [outbox for _, outbox in rows])
    return results


def _rows(session: Session, statement, keys: set) -> list[Mapping]:
    keys.discard(None)
    return session.execute(statement, {"keys": list(keys)}).mappings().all() if keys else []


def _rows_by(session: Session, statement, column: str, keys: set) -> dict[str, Mapping]:
    return {row[column]: row for row in _rows(session, statement, keys)}


def _latest(session: Session, chain: _Chain, keys: set) -> dict[tuple[_Chain, str], Mapping]:
    """The latest revision of each chain named in ``keys``, so that changes of mind chain."""
    latest: dict[tuple[_Chain, str], Mapping] = {}
    for row in _rows(session, chain.revisions_of, keys):
        key = (chain, row[chain.key])
        if key not in latest or row["revision"] > latest[key]["revision"]:
            latest[key] = row
    return latest


def _decide(request: Judgement, completions: Mapping[str, Mapping], earlier: dict[str, Mapping],
            latest: dict[tuple[_Chain, str], Mapping],
            config: FeedbackConfig) -> tuple[Recorded, tuple[dict, dict] | None]:
    """The answer to one request, and the row and outbox row to insert if it is new. Updates ``earlier`` and
    ``latest`` so that later requests of the same batch see it."""
    request.check()
    if request.comment is not None and len(request.comment) > config.comment_max_chars:
        raise InvalidFeedback(f"comment is {len(request.comment)} characters; at most {config.comment_max_chars}")
    named = [completions.get(completion_id) for completion_id in request.completion_ids]
    for completion_id, completion in zip(request.completion_ids, named, strict=True):
        if completion is None:
            raise UnknownCompletion(f"no completion with id {completion_id!r}")
        if request.user_id is not None and completion["user_id"] != request.user_id:
            raise NotCompletionOwner(f"completion {completion_id!r} was not served to this API key")
    if request.feedback_id in earlier:
        return _repeat(earlier[request.feedback_id], request), None
    chain_key = request.chain_key(named)
    previous = latest.get((request.chain, chain_key))
    row = request.row(config) | {
        "id": request.chain.id_prefix + uuid.uuid4().hex, request.chain.key: chain_key,
        "revision": previous["revision"] + 1 if previous else 1, "supersedes_id": previous["id"] if previous else None,
        "client_feedback_id": request.feedback_id, "created_at": utcnow()}
    outbox = _outbox_row(request, row, named, chain_key, config)
    latest[(request.chain, chain_key)] = row
    if request.feedback_id is not None:
        earlier[request.feedback_id] = row
    return request.recorded(row, created=True), (row, outbox)


def _repeat(earlier: Mapping, request: Judgement) -> Recorded:
    """The first answer again if this is the same request; a conflict if the key was reused for another."""
    if any(earlier.get(column) != value for column, value in request.body().items()):
        raise FeedbackIdConflict(f"feedback_id {request.feedback_id!r} was already used for a different rating "
                                 "or comparison")
    return request.recorded(earlier, created=False)


def _outbox_row(request: Judgement, row: Mapping, completions: list[Mapping], key: str, config: FeedbackConfig) -> dict:
    """The outbox row of a new rating or comparison; UnusableCompletion when a stored completion cannot make an
    event."""
    try:
        event = request.event(row, completions)
    except ValidationError as exc:
        named = ", ".join(repr(c["id"]) for c in completions)
        raise UnusableCompletion(f"cannot rate {named}: the stored data do not make a valid feedback event "
                                 f"({describe(exc)})") from None
    return {"event_id": event.event_id, "topic": config.topic, "key": key, "payload": event.model_dump(mode="json"),
            "created_at": row["created_at"], "attempts": 0, "sent_at": None, "last_error": None}


def _logged_sample(completion: Mapping) -> dict:
    """The fields of ``feedback.events.LoggedSample`` from a stored completion."""
    return {"messages": completion["messages"], "prompt_token_ids": completion["prompt_token_ids"],
            "response_token_ids": completion["response_token_ids"],
            "behaviour_logprobs": completion["behaviour_logprobs"], "adapter_version": completion["adapter_version"],
            "sampling_params": completion["sampling_params"], "dtype": completion["dtype"],
            "completion_created_at": completion["created_at"]}


class FeedbackWriter:
    """Group commit for the API: requests from any event loop queue up, and one thread writes whatever is waiting
    (up to ``max_batch``) in one transaction. A commit then carries many ratings, and the process's requests never
    contend with each other for the database (for SQLite's single write lock in particular). The answers of a
    batch go back to each event loop in one hand-over, not one thread wake-up per rating.

    While the database is slow or down, a request waits at most ``timeout_s``, and while ``max_waiting`` wait, new
    ones are answered FeedbackUnavailable at once. A request whose wait ran out is not written afterwards."""

    def __init__(self, session_factory: sessionmaker[Session], config: FeedbackConfig = FeedbackConfig(),
                 max_batch: int = 256, max_waiting: int = 4096, timeout_s: float = 10.0):
        self._sessions, self._config, self._max_batch = session_factory, config, max_batch
        self._max_waiting, self._timeout_s = max_waiting, timeout_s
        # request, its future, and the monotonic time its wait ends
        self._queue: queue.Queue[tuple[Judgement, asyncio.Future, float] | None] = queue.Queue(max_waiting)
        self._thread: threading.Thread | None = None

    def start(self) -> FeedbackWriter:
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()
        return self

    async def record(self, request: Judgement) -> Recorded:
        """The recorded rating or comparison once it is committed; raises the request's FeedbackError
        (FeedbackUnavailable when the database did not take it in time)."""
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((request, future, time.monotonic() + self._timeout_s))
        except queue.Full:
            raise FeedbackUnavailable(f"{self._max_waiting} ratings wait for the database; retry later") from None
        try:
            return await asyncio.wait_for(future, self._timeout_s)
        except TimeoutError:
            raise FeedbackUnavailable(f"the database did not take the rating within {self._timeout_s:g} s; it may "
                                      "have been recorded meanwhile: retry with the same feedback_id") from None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write what was submitted before, then end the thread."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("the feedback writer is stuck on the database; leaving it")
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while True:
            waiting = [self._queue.get()]
            while len(waiting) < self._max_batch and not self._queue.empty():
                waiting.append(self._queue.get())
            now = time.monotonic()
            batch = [(request, future) for request, future, deadline in filter(None, waiting) if deadline > now]
            if batch:
                self._write(batch)
            if None in waiting:
                return

    def _write(self, batch: list[tuple[Judgement, asyncio.Future]]) -> None:
        try:
            results = record_batch(self._sessions, [request for request, _ in batch], config=self._config)
        except Exception as exc:  # the database is unreachable, say: every waiting request learns it
            log.exception("writing %d ratings failed", len(batch))
            results = [exc] * len(batch)
        answers: dict[asyncio.AbstractEventLoop, list] = {}
        for (_, future), result in zip(batch, results, strict=True):
            answers.setdefault(future.get_loop(), []).append((future, result))
        for loop, settled in answers.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop has closed: nobody waits for these answers any more
                log.warning("%d ratings were recorded for an event loop that has closed", len(settled))


def _settle(settled: list[tuple[asyncio.Future, Recorded | Exception]]) -> None:
    for future, result in settled:
        if future.cancelled():  # the client went away; its rating is recorded all the same
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


@dataclass(frozen=True)
class FeedbackLog:
    """The feedback log's part of an API process: the group-commit writer, and the outbox relay unless it runs
    apart (``LIVELOOP_RELAY_IN_API=false`` with ``liveloop relay``)."""

    writer: FeedbackWriter
    relay: Relay | None

    @classmethod
    def start(cls, session_factory: sessionmaker[Session], settings: Settings) -> FeedbackLog:
        relay = None
        if settings.relay_in_api and settings.kafka_bootstrap:
            relay = Relay(session_factory, settings).start()
        elif settings.relay_in_api:
            log.warning("LIVELOOP_KAFKA_BOOTSTRAP is empty: ratings wait in the outbox until a relay runs")
        writer = FeedbackWriter(session_factory, FeedbackConfig.from_settings(settings),
                                max_waiting=settings.feedback_max_waiting, timeout_s=settings.feedback_write_timeout_s)
        return cls(writer.start(), relay)

    def stop(self) -> None:
        self.writer.stop()
        if self.relay is not None:
            self.relay.stop()
