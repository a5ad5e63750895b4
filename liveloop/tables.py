"""Every table of the system of record. Alembic migrations in ``liveloop/migrations`` create them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict: JSON, list: JSON}


class Completion(Base):
    """One chat completion as served: everything PPO needs to use it as a logged sample."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None]
    user_id: Mapped[str | None] = mapped_column(String(200), index=True)  # identity of the API key
    end_user: Mapped[str | None] = mapped_column(String(256))  # the request's OpenAI `user` field
    requested_model: Mapped[str] = mapped_column(String(200))
    adapter_version: Mapped[str | None] = mapped_column(String(200), index=True)  # None: the base model
    messages: Mapped[list]
    prompt_token_ids: Mapped[list]
    response_token_ids: Mapped[list]
    response_text: Mapped[str] = mapped_column(Text)
    behaviour_logprobs: Mapped[list]
    sampling_params: Mapped[dict]
    dtype: Mapped[str] = mapped_column(String(20))
    finish_reason: Mapped[str] = mapped_column(String(20))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
