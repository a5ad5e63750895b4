"""Recording a rating: the feedback row and its outbox event in one transaction (no HTTP here).

Race safety comes from two unique constraints, not from locks, so it holds on SQLite and PostgreSQL alike:
``client_feedback_id`` makes a repeated request read back the first one's answer, and ``(completion_id,
revision)`` makes two concurrent changes of mind on one completion form a chain instead of a fork.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import RowMapping, bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from feedback.events import FeedbackEvent, as_utc
from liveloop.settings import Settings
from liveloop.tables import Completion, Feedback, OutboxMessage, utcnow

log = logging.getLogger(__name__)

RATINGS = ("up", "down")
# Core statements built once, values bound per call: this runs on every rating, and ORM units of work and
# per-call statement construction were most of its CPU time.
_COMPLETIONS, _FEEDBACK, _OUTBOX = Completion.__table__, Feedback.__table__, OutboxMessage.__table__
_COMPLETION = select(_COMPLETIONS).where(_COMPLETIONS.c.id == bindparam("completion_id"))
_BY_FEEDBACK_ID = select(_FEEDBACK).where(_FEEDBACK.c.client_feedback_id == bindparam("feedback_id"))
_LATEST = (select(_FEEDBACK.c.id, _FEEDBACK.c.revision).where(_FEEDBACK.c.completion_id == bindparam("completion_id"))
           .order_by(_FEEDBACK.c.revision.desc()).limit(1))
_ADD_FEEDBACK, _ADD_OUTBOX = insert(_FEEDBACK), insert(_OUTBOX)


class FeedbackError(Exception):
    pass


class InvalidFeedback(FeedbackError):
    """The rating or comment is not acceptable (→ 422)."""


class UnknownCompletion(FeedbackError):
    """No completion has this id (→ 404)."""


class NotCompletionOwner(FeedbackError):
    """The completion was served to another API key (→ 403)."""


class FeedbackIdConflict(FeedbackError):
    """The client's feedback_id was already used for a different rating (→ 409)."""


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
class _Request:
    completion_id: str
    rating: str
    feedback_id: str | None
    comment: str | None
    user_id: str | None


def record_feedback(session_factory: sessionmaker[Session], *, completion_id: str, rating: str,
                    feedback_id: str | None = None, comment: str | None = None, user_id: str | None = None,
                    config: FeedbackConfig = FeedbackConfig(), max_attempts: int = 5) -> RecordedFeedback:
    """Store a rating and its event. ``user_id`` is the caller's identity when API keys are configured (then it
    must be the one the completion was served to), None when the API is open."""
    request = _Request(completion_id, rating, feedback_id, comment, user_id)
    _validate(request, config)
    for _ in range(max_attempts):
        try:
            with session_factory.begin() as session:
                return _record_once(session, request, config)
        except IntegrityError:
            if feedback_id is not None:  # a concurrent request with the same feedback_id won: answer as it did
                with session_factory() as session:
                    earlier = _by_feedback_id(session, feedback_id)
                if earlier is not None:
                    return _repeat(earlier, request)
            log.debug("revision of completion %s taken concurrently; retrying", completion_id)
    raise FeedbackError(f"completion {completion_id} is being rated concurrently; {max_attempts} attempts failed")


def _validate(request: _Request, config: FeedbackConfig) -> None:
    if request.rating not in RATINGS:
        raise InvalidFeedback(f"rating must be one of {', '.join(RATINGS)}, not {request.rating!r}")
    if request.comment is not None and len(request.comment) > config.comment_max_chars:
        raise InvalidFeedback(f"comment is {len(request.comment)} characters; at most {config.comment_max_chars}")


def _record_once(session: Session, request: _Request, config: FeedbackConfig) -> RecordedFeedback:
    completion = session.execute(_COMPLETION, {"completion_id": request.completion_id}).mappings().first()
    if completion is None:
        raise UnknownCompletion(f"no completion with id {request.completion_id!r}")
    if request.user_id is not None and completion["user_id"] != request.user_id:
        raise NotCompletionOwner(f"completion {request.completion_id!r} was not served to this API key")
    if request.feedback_id is not None and (earlier := _by_feedback_id(session, request.feedback_id)) is not None:
        return _repeat(earlier, request)
    previous = session.execute(_LATEST, {"completion_id": request.completion_id}).first()
    row = {"id": f"fb-{uuid.uuid4().hex}", "completion_id": request.completion_id,
           "revision": previous.revision + 1 if previous else 1, "rating": request.rating,
           "reward": config.reward(request.rating), "comment": request.comment,
           "client_feedback_id": request.feedback_id, "supersedes_id": previous.id if previous else None,
           "user_id": request.user_id, "created_at": utcnow()}
    event = _event(row, completion)
    session.execute(_ADD_FEEDBACK, row)
    session.execute(_ADD_OUTBOX, {"event_id": event.event_id, "topic": config.topic, "key": request.completion_id,
                                  "payload": event.model_dump(mode="json"), "created_at": row["created_at"],
                                  "attempts": 0, "sent_at": None, "last_error": None})
    return RecordedFeedback.of(row, created=True)


def _by_feedback_id(session: Session, feedback_id: str) -> RowMapping | None:
    return session.execute(_BY_FEEDBACK_ID, {"feedback_id": feedback_id}).mappings().first()


def _repeat(earlier: Mapping, request: _Request) -> RecordedFeedback:
    """The first answer again if this is the same request; a conflict if the key was reused for another."""
    same = (earlier["completion_id"], earlier["rating"], earlier["comment"], earlier["user_id"]) == (
        request.completion_id, request.rating, request.comment, request.user_id)
    if not same:
        raise FeedbackIdConflict(f"feedback_id {request.feedback_id!r} was already used for a different rating")
    return RecordedFeedback.of(earlier, created=False)


def _event(row: Mapping, completion: Mapping) -> FeedbackEvent:
    return FeedbackEvent(
        event_id=uuid.uuid4().hex, feedback_id=row["id"], completion_id=completion["id"], revision=row["revision"],
        rating=row["rating"], reward=row["reward"], supersedes=row["supersedes_id"], comment=row["comment"],
        user_id=row["user_id"], rated_at=row["created_at"], messages=completion["messages"],
        prompt_token_ids=completion["prompt_token_ids"], response_token_ids=completion["response_token_ids"],
        behaviour_logprobs=completion["behaviour_logprobs"], adapter_version=completion["adapter_version"],
        sampling_params=completion["sampling_params"], dtype=completion["dtype"],
        completion_created_at=completion["created_at"],
    )
