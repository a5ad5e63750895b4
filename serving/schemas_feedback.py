"""API schemas of ``POST /v1/feedback`` (liveloop's own resource, so unknown fields are refused)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from feedback.service import RecordedFeedback
from serving.protocol import Text


class FeedbackCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: Text = Field(min_length=1, max_length=64, description="The `id` of the chat completion rated.")
    rating: Literal["up", "down"]
    feedback_id: Text | None = Field(
        None, min_length=1, max_length=200,
        description="Client idempotency key: sending it again returns the first answer and records nothing new.",
    )
    comment: Text | None = Field(None, description="Free text, at most LIVELOOP_FEEDBACK_COMMENT_MAX_CHARS characters.")


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
