"""The completion store: every served completion, with what PPO needs to use it as a logged sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from liveloop.tables import Completion


@dataclass(frozen=True)
class CompletionRecord:
    id: str
    created_at: datetime
    finished_at: datetime
    user_id: str | None
    end_user: str | None
    requested_model: str
    adapter_version: str | None
    messages: list[dict]
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_text: str
    behaviour_logprobs: list[float]
    sampling_params: dict
    dtype: str
    finish_reason: str
    latency_ms: float
    request_id: str  # the chat response's id, shared by the choices of one request
    choice_index: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.response_token_ids)


class CompletionStore:
    def __init__(self, session_factory: sessionmaker[Session]):
        self._sessions = session_factory

    def add(self, *records: CompletionRecord) -> None:
        rows = [Completion(**asdict(record), prompt_tokens=record.prompt_tokens,
                           completion_tokens=record.completion_tokens) for record in records]
        with self._sessions.begin() as session:
            session.add_all(rows)

    def get(self, completion_id: str) -> Completion | None:
        with self._sessions() as session:
            return session.scalar(select(Completion).where(Completion.id == completion_id))
