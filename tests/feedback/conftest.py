"""Fixtures of the feedback tests: one real Tansu broker per module, migrated databases, stored completions."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from feedback.events import ComparedCompletion, ComparisonEvent, FeedbackEvent
from feedback.kafka import Message, Publisher
from feedback.ledger import subject
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.settings import Settings
from liveloop.tables import Completion, utcnow
from tests.feedback import helpers


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated database (SQLite and PostgreSQL, see ``database_url``)."""
    migrate(database_url)
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def add_completion(sessions: sessionmaker[Session]):
    """Store a served completion the way the serving layer does; returns its id. Keyword arguments override
    columns."""

    def add(user_id: str | None = None, adapter_version: str | None = "policy-0001", **fields) -> str:
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        with sessions.begin() as session:
            session.add(Completion(**dict(
                id=completion_id, created_at=utcnow(), finished_at=utcnow(), user_id=user_id, end_user=None,
                requested_model="liveloop", adapter_version=adapter_version,
                messages=[{"role": "user", "content": "Say hi."}], prompt_token_ids=[1, 2, 3],
                response_token_ids=[7, 8], response_text="Hi!", behaviour_logprobs=[-0.5, -1.25],
                sampling_params={"temperature": 0.7, "top_p": 1.0, "max_tokens": 16, "seed": None, "stop": []},
                dtype="float32", finish_reason="stop", prompt_tokens=3, completion_tokens=2, latency_ms=12.5,
            ) | fields))
        return completion_id

    return add


@pytest.fixture
def read_topic():
    """``read_topic(settings, topic, expected)`` (``tests.feedback.helpers``)."""
    return helpers.read_topic


@pytest.fixture
def make_event():
    """A valid feedback event; keyword arguments override fields."""

    def make(completion_id: str = "chatcmpl-1", revision: int = 1, rating: str = "up", **overrides) -> FeedbackEvent:
        fields = dict(
            event_id=uuid.uuid4().hex, feedback_id=f"fb-{uuid.uuid4().hex}", completion_id=completion_id,
            revision=revision, rating=rating, reward=1.0 if rating == "up" else -1.0, supersedes=None,
            rated_at=utcnow(), messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1, 2],
            response_token_ids=[3, 4], behaviour_logprobs=[-0.1, -0.2], adapter_version=None,
            sampling_params={"temperature": 0.7}, dtype="float32", completion_created_at=utcnow(),
        )
        return FeedbackEvent(**fields | overrides)

    return make


@pytest.fixture
def make_comparison():
    """A valid comparison event of the completions ``ranking`` (best first); keyword arguments override fields."""

    def make(request_id: str = "chatcmpl-r", revision: int = 1, ranking: tuple[str, ...] = ("chatcmpl-a", "chatcmpl-b"),
             **overrides) -> ComparisonEvent:
        answers = [ComparedCompletion(
            completion_id=completion_id, messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1, 2],
            response_token_ids=[3, 4 + i], behaviour_logprobs=[-0.1, -0.2], adapter_version=None,
            sampling_params={"temperature": 0.7}, dtype="float32", completion_created_at=utcnow(),
        ) for i, completion_id in enumerate(ranking)]
        fields = dict(event_id=uuid.uuid4().hex, feedback_id=f"cmp-{uuid.uuid4().hex}", request_id=request_id,
                      revision=revision, supersedes=None, rated_at=utcnow(), ranking=answers)
        return ComparisonEvent(**fields | overrides)

    return make


@pytest.fixture
def publish():
    """``publish(settings, [event or bytes, ...])`` straight onto the feedback topic, keyed by completion (request)."""

    def send(settings: Settings, items: list[FeedbackEvent | ComparisonEvent | bytes]) -> None:
        publisher = Publisher(settings, "test-producer")
        messages = [Message(settings.feedback_topic, "junk", item) if isinstance(item, bytes)
                    else Message(settings.feedback_topic, subject(item), item.to_bytes()) for item in items]
        try:
            assert publisher.publish(messages) == [None] * len(messages)
        finally:
            publisher.close()

    return send
