"""Fixtures shared by every test package: models, settings, databases."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from feedback.broker import EmbeddedBroker
from liveloop.artifacts import LocalArtifactStore
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.model import prepare_base_model
from liveloop.registry import Registry
from liveloop.settings import Settings
from liveloop.tables import Comparison, Completion, Feedback, utcnow

REPO = Path(__file__).resolve().parent.parent
# Converted once per checkout and kept between runs: the GGUF conversion takes ~40 s.
MODEL_CACHE = REPO / "var" / "test-models"
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def packaged_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the packaged GGUF."""
    _, path = prepare_base_model(Settings(model_cache_dir=MODEL_CACHE))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(packaged_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the real tokenizer and chat template: fast, and a real HF directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _postgres_database() -> str:
    """A fresh database on the local PostgreSQL, dropped at exit; skips when the server is not there."""
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"liveloop_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    finally:
        admin.dispose()
    return name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path):
    """Each store test runs on both SQLite and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'liveloop.db'}"
        return
    name = _postgres_database()
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def make_settings(tmp_path: Path):
    """Settings rooted in the test's temporary directory; keyword arguments override fields."""

    def make(**overrides) -> Settings:
        return Settings(_env_file=None, data_dir=tmp_path / "var", model_cache_dir=MODEL_CACHE, **overrides)

    return make


@pytest.fixture
def make_adapter_dir(tiny_model_dir: Path, tmp_path: Path):
    """Write a LoRA adapter for the tiny model: ``make(name, scale=0.0, seed=0) -> directory``.

    ``scale`` is the standard deviation of the B matrices: 0 is a freshly initialised LoRA (the base model's
    function exactly); each seed gives other weights.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from liveloop.adapter_artifacts import default_lora_config, save_adapter

    def make(name: str, scale: float = 0.0, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = get_peft_model(base, default_lora_config(r=4, alpha=8), adapter_name="policy")
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, scale)
        dest = tmp_path / "written-adapters" / name
        save_adapter(model, "policy", dest, base_model_id=tiny_model_dir.name)
        return dest

    return make


# --- adapter registry -----------------------------------------------------------------------------

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
    ``rate(version, up=, down=, at=datetime, changed_mind=0, user=…, end_user=None, requested_model="liveloop")``;
    ``changed_mind`` of the downs were first ups. Each completion has a user of its own (``user-<i>``) unless
    ``user`` names one for all (None: no API-key identity)."""

    def add(version: str | None, *, up: int = 0, down: int = 0, at: datetime | None = None,
            changed_mind: int = 0, user: str | None = "", end_user: str | None = None,
            requested_model: str = "liveloop") -> None:
        at = at or utcnow()
        with registry_db.sessions.begin() as session:
            for i, rating in enumerate(["up"] * up + ["down"] * down):
                completion = _completion(version, at=at, user_id=f"user-{i}" if user == "" else user,
                                         end_user=end_user, requested_model=requested_model)
                session.add(completion)
                session.flush()
                history = ["up", rating] if rating == "down" and i - up < changed_mind else [rating]
                for revision, value in enumerate(history, start=1):
                    session.add(Feedback(id=uuid.uuid4().hex, completion_id=completion.id, revision=revision,
                                         rating=value, reward=1.0 if value == "up" else -1.0, created_at=at))
                    session.flush()

    return add


@pytest.fixture
def compare(registry_db: RegistryDB):
    """Add requests answered once by ``first`` and once by ``second`` (None: the base model) and the latest
    comparison of each: ``compare(first, second, first_wins=, second_wins=, at=datetime, changed_mind=0, user=…,
    requested_model="liveloop")``; ``changed_mind`` of the first's wins were first ranked the other way. Each
    request has a user of its own (``user-<i>``) unless ``user`` names one (None: no API-key identity)."""

    def add(first: str | None, second: str | None, *, first_wins: int = 0, second_wins: int = 0,
            at: datetime | None = None, changed_mind: int = 0, user: str | None = "",
            requested_model: str = "liveloop") -> None:
        at = at or utcnow()
        with registry_db.sessions.begin() as session:
            for i, first_won in enumerate([True] * first_wins + [False] * second_wins):
                request_id, user_id = uuid.uuid4().hex, f"user-{i}" if user == "" else user
                answers = [_completion(version, at=at, user_id=user_id, requested_model=requested_model,
                                       request_id=request_id, choice_index=index)
                           for index, version in enumerate((first, second))]
                session.add_all(answers)
                session.flush()
                ranking = [a.id for a in (answers if first_won else answers[::-1])]
                history = [ranking[::-1], ranking] if first_won and i < changed_mind else [ranking]
                for revision, ranked in enumerate(history, start=1):
                    session.add(Comparison(id=uuid.uuid4().hex, request_id=request_id, revision=revision,
                                           ranking=ranked, user_id=user_id, created_at=at))
                    session.flush()

    return add


def _completion(version: str | None, *, at: datetime, user_id: str | None, requested_model: str,
                **fields) -> Completion:
    """A stored completion served by ``version`` (None: the base model) to ``user_id``."""
    return Completion(id=uuid.uuid4().hex, created_at=at, user_id=user_id, requested_model=requested_model,
                      adapter_version=version, messages=[{"role": "user", "content": "hi"}], prompt_token_ids=[1],
                      response_token_ids=[2], response_text="hello", behaviour_logprobs=[-0.5], sampling_params={},
                      dtype="float32", finish_reason="stop", prompt_tokens=1, completion_tokens=1, latency_ms=1.0,
                      **fields)


# --- Kafka ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """Shared by a module's tests; each test uses topics of its own (see ``kafka_settings``)."""
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log") as running:
        yield running


@pytest.fixture
def kafka_settings(make_settings, broker: EmbeddedBroker):
    """Settings on the shared broker with topic names and a consumer group unique to the test."""

    def make(**overrides) -> Settings:
        suffix = uuid.uuid4().hex[:8]
        names = {"feedback_topic": f"feedback-{suffix}", "feedback_dlq_topic": f"feedback-dlq-{suffix}",
                 "adapter_events_topic": f"adapter-events-{suffix}", "feedback_consumer_group": f"trainer-{suffix}"}
        # a group join takes about half the session timeout
        quick = {"relay_poll_interval_s": 0.05, "relay_max_backoff_s": 0.5, "kafka_request_timeout_ms": 2_000,
                 "kafka_delivery_timeout_ms": 4_000, "kafka_session_timeout_ms": 3_000,
                 "kafka_heartbeat_interval_ms": 500}
        return make_settings(**{"kafka_bootstrap": broker.bootstrap} | quick | names | overrides)

    return make
