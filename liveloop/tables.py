"""Every table of the system of record. Alembic migrations in ``liveloop/migrations`` create them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
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
    # A request for n > 1 choices stores one completion per choice; they share the request's id, which is what
    # a comparison of them refers to. Completions served before comparisons existed have neither.
    request_id: Mapped[str | None] = mapped_column(String(64), index=True)
    choice_index: Mapped[int | None] = mapped_column(Integer)


# --- adapter registry (liveloop.registry) ------------------------------------------------------------


class AdapterHead(Base):
    """One row per adapter kind ('policy', 'reward'): the lock each transition of that kind takes first, and a
    revision counter it bumps, so a replica polling for routing changes reads one integer."""

    __tablename__ = "adapter_heads"

    kind: Mapped[str] = mapped_column(String(20), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)


class AdapterVersion(Base):
    """One immutable adapter artifact and where it is in its life. Rows are never deleted: a name, once used,
    always means these weights (sha256)."""

    __tablename__ = "adapter_versions"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(ForeignKey("adapter_heads.kind"))
    state: Mapped[str] = mapped_column(String(20), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(String(1000))  # where the artifact store keeps it
    base_model_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    # lineage
    parent: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.name"))  # the weights it started from
    reward_source: Mapped[str | None] = mapped_column(String(200))  # 'direct' or 'reward_model:<version>'
    consumed_event_ids: Mapped[list]
    kafka_offsets: Mapped[dict]  # '<topic>:<partition>' -> next offset after the consumed batch
    training_metrics: Mapped[dict]
    gate_report: Mapped[dict | None]
    # the version that was live when this one was last promoted (None: the base model); rollback returns to it
    predecessor: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.name"))

    __table_args__ = tuple(
        Index(f"uq_adapter_versions_one_{state}", "kind", unique=True,
              sqlite_where=text(f"state = '{state}'"), postgresql_where=text(f"state = '{state}'"))
        for state in ("promoted", "canary")
    )


class AdapterTransition(Base):
    """The audit log: every state change of every adapter version, who made it and why."""

    __tablename__ = "adapter_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(ForeignKey("adapter_versions.name"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(20))  # None: registration
    to_state: Mapped[str] = mapped_column(String(20))
    actor: Mapped[str] = mapped_column(String(200))  # 'trainer', 'gate', 'canary', 'rollback-monitor' or a person
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict]  # the statistics or report behind the decision


# --- feedback (feedback/) ------------------------------------------------------------------------------------


class Feedback(Base):
    """One rating of a completion. A change of mind is a new row with the next revision that supersedes the
    previous one; rows are never updated, so the history of every completion's ratings stays readable."""

    __tablename__ = "feedback"
    # One linear chain of revisions per completion: two concurrent changes of mind collide here and one retries.
    __table_args__ = (UniqueConstraint("completion_id", "revision", name="uq_feedback_completion_revision"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    completion_id: Mapped[str] = mapped_column(ForeignKey("completions.id"))
    revision: Mapped[int] = mapped_column(Integer)  # 1 for a completion's first rating, +1 per change of mind
    rating: Mapped[str] = mapped_column(String(8))  # 'up' or 'down'
    reward: Mapped[float] = mapped_column(Float)  # the rating's value under the reward mapping of its day
    comment: Mapped[str | None] = mapped_column(Text)
    client_feedback_id: Mapped[str | None] = mapped_column(String(200), unique=True)  # the client's idempotency key
    supersedes_id: Mapped[str | None] = mapped_column(ForeignKey("feedback.id"))
    user_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Comparison(Base):
    """One ranking of the choices of one chat request, best first. Like a rating, a change of mind is a new row
    with the next revision that supersedes the previous one."""

    __tablename__ = "comparisons"
    # One linear chain of revisions per request: two concurrent changes of mind collide here and one retries.
    __table_args__ = (UniqueConstraint("request_id", "revision", name="uq_comparisons_request_revision"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)  # Completion.request_id of every ranked one
    revision: Mapped[int] = mapped_column(Integer)  # 1 for a request's first comparison, +1 per change of mind
    ranking: Mapped[list]  # completion ids, best first
    comment: Mapped[str | None] = mapped_column(Text)
    client_feedback_id: Mapped[str | None] = mapped_column(String(200), unique=True)  # the client's idempotency key
    supersedes_id: Mapped[str | None] = mapped_column(ForeignKey("comparisons.id"))
    user_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class OutboxMessage(Base):
    """A Kafka message written in the same transaction as the row it announces; the relay publishes it and sets
    ``sent_at`` only once the broker has acknowledged it. Sent rows stay: ``liveloop replay`` republishes them.
    A row Kafka keeps refusing is parked (``parked_at``): kept with its error, not sent again."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_unsent", "id", sqlite_where=text("sent_at IS NULL"), postgresql_where=text("sent_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # publish order
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    topic: Mapped[str] = mapped_column(String(249))  # Kafka's longest topic name
    key: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    sent_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # failed sends of its own (not while Kafka was down)
    last_error: Mapped[str | None] = mapped_column(Text)
    parked_at: Mapped[datetime | None]  # set after LIVELOOP_RELAY_MAX_ATTEMPTS attempts; the relay skips it


# --- what the trainer consumed (feedback/ledger.py) ----------------------------------------------------------


class ConsumerOffset(Base):
    """Per consumer group and partition, the offset after the last message the group durably consumed. Written
    in the transaction that stores what the messages became (a candidate version, or the record of ratings
    consumed without one); the consumer seeks here, and Kafka's own committed offsets are only a courtesy for
    lag monitoring."""

    __tablename__ = "consumer_offsets"

    group_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    topic: Mapped[str] = mapped_column(String(249), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger)
    # set when the broker was found without the records this offset counts (restarted, retention, new
    # cluster); cleared once the ratings nobody consumed have been republished
    lost_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsumedFeedback(Base):
    """Each feedback event the trainer consumed and what became of it: the record that a broker which lost its
    data is refilled from (events not here are republished) and that keeps a completion's older revision from
    being trained after a newer one."""

    __tablename__ = "consumed_feedback"
    __table_args__ = (Index("ix_consumed_feedback_completion", "completion_id", "revision"),)

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    completion_id: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))  # feedback.ledger.Outcome: 'trained', 'heldout', ...
    version: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.name"))  # whose lineage holds it
    consumed_at: Mapped[datetime] = mapped_column(default=utcnow)
