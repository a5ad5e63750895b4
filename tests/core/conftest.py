"""Registry fixtures: a migrated database (SQLite and PostgreSQL) with a registry over a local artifact store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from liveloop.artifacts import LocalArtifactStore
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.registry import Registry
from liveloop.tables import Completion, Feedback, utcnow

EVENTS_TOPIC = "adapter-events"


@dataclass
class RegistryDB:
    engine: Engine
    sessions: sessionmaker[Session]
    registry: Registry


@pytest.fixture
def registry_db(database_url: str, tmp_path: Path) -> Iterator[RegistryDB]:
    migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    yield RegistryDB(engine, sessions, Registry(sessions, LocalArtifactStore(tmp_path / "store"),
                                                events_topic=EVENTS_TOPIC))
    engine.dispose()


@pytest.fixture
def registry(registry_db: RegistryDB) -> Registry:
    return registry_db.registry


@pytest.fixture
def rate(registry_db: RegistryDB):
    """Add completions served by ``version`` (None: the base model) with ``up`` and ``down`` current ratings:
    ``rate(version, up=, down=, at=datetime, changed_mind=0)``; ``changed_mind`` of the downs were first ups."""

    def add(version: str | None, *, up: int = 0, down: int = 0, at: datetime | None = None,
            changed_mind: int = 0) -> None:
        at = at or utcnow()
        with registry_db.sessions.begin() as session:
            for i, rating in enumerate(["up"] * up + ["down"] * down):
                completion = Completion(
                    id=uuid.uuid4().hex, created_at=at, user_id=f"user-{i}", requested_model="liveloop",
                    adapter_version=version, messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1],
                    response_token_ids=[2], response_text="hello", behaviour_logprobs=[-0.5],
                    sampling_params={}, dtype="float32", finish_reason="stop", prompt_tokens=1,
                    completion_tokens=1, latency_ms=1.0,
                )
                session.add(completion)
                session.flush()
                history = ["up", rating] if rating == "down" and i - up < changed_mind else [rating]
                for revision, value in enumerate(history, start=1):
                    session.add(Feedback(id=uuid.uuid4().hex, completion_id=completion.id, revision=revision,
                                         rating=value, reward=1.0 if value == "up" else -1.0, created_at=at))
                    session.flush()

    return add
