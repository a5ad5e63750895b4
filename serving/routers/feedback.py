from __future__ import annotations

from fastapi import APIRouter, Request

from feedback.service import (
    FeedbackError,
    FeedbackIdConflict,
    FeedbackRequest,
    FeedbackUnavailable,
    FeedbackWriter,
    InvalidFeedback,
    NotCompletionOwner,
    UnknownCompletion,
    UnusableCompletion,
)
from liveloop.logs import bind_log_context
from serving import metrics
from serving.deps import UserDep
from serving.errors import APIError, Forbidden, NotFound, Unavailable
from serving.protocol import ErrorResponse
from serving.schemas_feedback import FeedbackCreate, FeedbackPublic

router = APIRouter(prefix="/v1", tags=["feedback"])


class Conflict(APIError):
    status, code = 409, "conflict"


class Unprocessable(APIError):
    status = 422


_STATUS = {UnknownCompletion: NotFound, NotCompletionOwner: Forbidden, FeedbackIdConflict: Conflict,
           InvalidFeedback: Unprocessable, UnusableCompletion: Unprocessable, FeedbackUnavailable: Unavailable}
_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 503)}


@router.post("/feedback", status_code=202, response_model=FeedbackPublic, responses=_ERRORS)
async def create_feedback(body: FeedbackCreate, user: UserDep, http_request: Request):
    """Rate a completion. Accepted once the rating and its event are committed; Kafka gets the event from the
    outbox relay, so this answers 202 even while Kafka is down."""
    bind_log_context(completion_id=body.completion_id, user=user)
    request = FeedbackRequest(completion_id=body.completion_id, rating=body.rating, feedback_id=body.feedback_id,
                              comment=body.comment, user_id=user)
    try:
        # app.state, not an injected dependency: on the busiest endpoint each dependency solved cost ~10% of its time
        writer: FeedbackWriter = http_request.app.state.feedback.writer
        recorded = await writer.record(request)
    except FeedbackError as exc:
        raise _STATUS.get(type(exc), Conflict)(str(exc)) from exc
    if recorded.created:
        metrics.RATINGS.labels(recorded.rating).inc()
    return FeedbackPublic.of(recorded)
