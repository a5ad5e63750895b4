"""API schemas of ``POST /v1/feedback`` (liveloop's own resource, so unknown fields are refused).

One body carries either a rating (``completion_id`` and ``rating``) or a comparison (``ranking``), so that both
share the endpoint, the idempotency key and the comment.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from feedback.service import ComparisonRequest, FeedbackRequest, RecordedComparison, RecordedFeedback
from serving.protocol import Text

CompletionId = Annotated[Text, Field(min_length=1, max_length=64)]


class FeedbackCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: CompletionId | None = Field(None, description="The `id` of the chat completion rated.")
    rating: Literal["up", "down"] | None = None
    ranking: list[CompletionId] | None = Field(None, min_length=2, description=(
        "Instead of a rating, a comparison: the `completion_id`s of choices of one chat request (n = 2), best first "
        "(the preferred one and the other). Ranking the same request again replaces the earlier ranking."))
    feedback_id: Text | None = Field(
        None, min_length=1, max_length=200,
        description="Client idempotency key: sending it again returns the first answer and records nothing new.",
    )
    comment: Text | None = Field(None, description="Free text, at most LIVELOOP_FEEDBACK_COMMENT_MAX_CHARS characters.")

    @model_validator(mode="after")
    def _a_rating_or_a_ranking(self) -> FeedbackCreate:
        as_rating = self.completion_id is not None and self.rating is not None and self.ranking is None
        as_ranking = self.ranking is not None and self.completion_id is None and self.rating is None
        if not (as_rating or as_ranking):
            raise ValueError("send either completion_id and rating, or ranking")
        return self

    def request(self, user_id: str | None) -> FeedbackRequest | ComparisonRequest:
        """What the feedback log records for ``user_id`` (the API key's identity; None on an open API)."""
        if self.ranking is not None:
            return ComparisonRequest(tuple(self.ranking), self.feedback_id, self.comment, user_id)
        return FeedbackRequest(self.completion_id, self.rating, self.feedback_id, self.comment, user_id)


class FeedbackPublic(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created: int = Field(description="Unix time (s) the rating was recorded.")
    completion_id: str
    rating: Literal["up", "down"]
    feedback_id: str | None = Field(description="The client's idempotency key, when it sent one.")
    supersedes: str | None = Field(description="The id of the earlier rating of this completion that this replaces.")

    @classmethod
    def of(cls, recorded: RecordedFeedback) -> FeedbackPublic:
        return cls(id=recorded.id, created=int(recorded.created_at.timestamp()), completion_id=recorded.completion_id,
                   rating=recorded.rating, feedback_id=recorded.feedback_id, supersedes=recorded.supersedes)


class ComparisonPublic(BaseModel):
    id: str
    object: Literal["feedback.comparison"] = "feedback.comparison"
    created: int = Field(description="Unix time (s) the comparison was recorded.")
    ranking: list[str] = Field(description="The completion ids, best first.")
    feedback_id: str | None = Field(description="The client's idempotency key, when it sent one.")
    supersedes: str | None = Field(description="The id of the earlier comparison of this request that this replaces.")

    @classmethod
    def of(cls, recorded: RecordedComparison) -> ComparisonPublic:
        return cls(id=recorded.id, created=int(recorded.created_at.timestamp()), ranking=list(recorded.ranking),
                   feedback_id=recorded.feedback_id, supersedes=recorded.supersedes)
