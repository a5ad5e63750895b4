from __future__ import annotations

from fastapi import APIRouter, Request

from feedback.service import (
    FeedbackError,
    FeedbackIdConflict,
    FeedbackUnavailable,
    FeedbackWriter,
    InvalidFeedback,
    NotCompletionOwner,
    RecordedComparison,
    UnknownCompletion,
    UnusableCompletion,
)
from liveloop.logs import bind_log_context
from serving import metrics
from serving.deps import UserDep
from serving.errors import APIError, Forbidden, NotFound, Unavailable
from serving.protocol import ErrorResponse
from serving.schemas_feedback import ComparisonPublic, FeedbackCreate, FeedbackPublic

router = APIRouter(prefix="/v1", tags=["feedback"])


class Conflict(APIError):
    status, code = 409, "conflict"


class Unprocessable(APIError):
    status = 422


_STATUS = {UnknownCompletion: NotFound, NotCompletionOwner: Forbidden, FeedbackIdConflict: Conflict,
           InvalidFeedback: Unprocessable, UnusableCompletion: Unprocessable, FeedbackUnavailable: Unavailable}
_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 413, 422, 503)}


@router.post("/feedback", status_code=202, response_model=FeedbackPublic | ComparisonPublic, responses=_ERRORS)
async def create_feedback(body: FeedbackCreate, user: UserDep, http_request: Request):
    """Rate a completion, or rank the choices of one chat request. Accepted once the rating or comparison and its
    event are committed; Kafka gets the event from the outbox relay, so this answers 202 even while Kafka is down."""
    bind_log_context(completion_id=body.completion_id or ",".join(body.ranking), user=user)
    try:
        # app.state, not an injected dependency: on the busiest endpoint each dependency solved cost ~10% of its time
        writer: FeedbackWriter = http_request.app.state.feedback.writer
        recorded = await writer.record(body.request(user))
    except FeedbackError as exc:
        raise _STATUS.get(type(exc), Conflict)(str(exc)) from exc
    if isinstance(recorded, RecordedComparison):
        if recorded.created:
            metrics.COMPARISONS.inc()
        return ComparisonPublic.of(recorded)
    if recorded.created:
        metrics.RATINGS.labels(recorded.rating).inc()
    return FeedbackPublic.of(recorded)
