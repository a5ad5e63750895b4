from __future__ import annotations

from fastapi import APIRouter

from feedback.service import (
    FeedbackConfig,
    FeedbackError,
    FeedbackIdConflict,
    InvalidFeedback,
    NotCompletionOwner,
    UnknownCompletion,
    record_feedback,
)
from serving.deps import SessionsDep, SettingsDep, UserDep
from serving.errors import APIError, Forbidden, NotFound
from serving.protocol import ErrorResponse
from serving.schemas_feedback import FeedbackCreate, FeedbackPublic

router = APIRouter(prefix="/v1", tags=["feedback"])


class Conflict(APIError):
    status, code = 409, "conflict"


class Unprocessable(APIError):
    status = 422


_STATUS = {UnknownCompletion: NotFound, NotCompletionOwner: Forbidden, FeedbackIdConflict: Conflict,
           InvalidFeedback: Unprocessable}
_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422)}


@router.post("/feedback", status_code=202, response_model=FeedbackPublic, responses=_ERRORS)
def create_feedback(body: FeedbackCreate, sessions: SessionsDep, settings: SettingsDep, user: UserDep):
    """Rate a completion. Accepted once the rating and its event are stored; Kafka gets the event from the outbox
    relay, so this answers 202 even while Kafka is down. A sync handler: FastAPI runs it in its thread pool."""
    try:
        recorded = record_feedback(sessions, completion_id=body.completion_id, rating=body.rating,
                                   feedback_id=body.feedback_id, comment=body.comment, user_id=user,
                                   config=FeedbackConfig.from_settings(settings))
    except FeedbackError as exc:
        raise _STATUS.get(type(exc), Conflict)(str(exc)) from exc
    return FeedbackPublic.of(recorded)
