"""API schemas of ``/admin/adapters``: adapter versions with their gate reports, live thumbs, lineage and audit."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from liveloop.registry import DiffRow, Kind, Routing, State, Thumbs
from liveloop.tables import AdapterTransition, AdapterVersion


class ThumbsPublic(BaseModel):
    up: int
    down: int
    rate: float | None = Field(description="Thumbs-up rate of the completions this version served; null: unrated.")

    @classmethod
    def of(cls, thumbs: Thumbs) -> ThumbsPublic:
        return cls(up=thumbs.up, down=thumbs.down, rate=thumbs.rate)


class GateResultPublic(BaseModel):
    name: str
    value: float | None
    threshold: float | None
    passed: bool
    details: dict[str, Any]


class LineagePublic(BaseModel):
    parent: str | None = Field(description="The version whose weights training started from; null: the base.")
    reward_source: str | None
    events: int = Field(description="Feedback events this version was trained on.")
    kafka_offsets: dict[str, int] = Field(description="'<topic>:<partition>' → next offset after its batch.")


class TransitionPublic(BaseModel):
    from_state: State | None
    to_state: State
    actor: str
    at: datetime
    reason: str
    details: dict[str, Any]

    @classmethod
    def of(cls, row: AdapterTransition) -> TransitionPublic:
        return cls(from_state=row.from_state, to_state=row.to_state, actor=row.actor, at=row.at, reason=row.reason,
                   details=row.details)


class AdapterVersionPublic(BaseModel):
    name: str
    object: Literal["adapter_version"] = "adapter_version"
    kind: Kind
    state: State
    sha256: str
    base_model_id: str
    created_at: datetime
    state_changed_at: datetime
    gates_passed: bool | None = Field(description="The gate report's verdict; null: not gated.")
    lineage: LineagePublic
    thumbs: ThumbsPublic

    @classmethod
    def fields_of(cls, version: AdapterVersion, thumbs: Thumbs) -> dict:
        lineage = LineagePublic(parent=version.parent, reward_source=version.reward_source,
                                events=len(version.consumed_event_ids), kafka_offsets=version.kafka_offsets)
        return dict(name=version.name, kind=version.kind, state=version.state, sha256=version.sha256,
                    base_model_id=version.base_model_id, created_at=version.created_at,
                    state_changed_at=version.state_changed_at, lineage=lineage, thumbs=ThumbsPublic.of(thumbs),
                    gates_passed=None if version.gate_report is None else version.gate_report.get("passed"))

    @classmethod
    def of(cls, version: AdapterVersion, thumbs: Thumbs) -> AdapterVersionPublic:
        return cls(**cls.fields_of(version, thumbs))


class AdapterDetail(AdapterVersionPublic):
    predecessor: str | None = Field(description="The version this one replaced when it was last promoted.")
    training_metrics: dict[str, Any]
    gate_report: list[GateResultPublic] | None
    audit: list[TransitionPublic] = Field(description="Every transition of this version, newest first.")

    @classmethod
    def of_version(cls, version: AdapterVersion, thumbs: Thumbs, audit: list[AdapterTransition]) -> AdapterDetail:
        report = version.gate_report
        return cls(**cls.fields_of(version, thumbs), predecessor=version.predecessor,
                   training_metrics=version.training_metrics,
                   gate_report=None if report is None else [GateResultPublic(**g) for g in report.get("gates", [])],
                   audit=[TransitionPublic.of(row) for row in audit])


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    live: str | None = Field(description="The live version; null: the base model serves.")
    canary: str | None
    data: list[AdapterVersionPublic]

    @classmethod
    def of(cls, routing: Routing, versions: list[AdapterVersion], thumbs: dict[str | None, Thumbs]) -> AdapterList:
        return cls(live=routing.live, canary=routing.canary,
                   data=[AdapterVersionPublic.of(v, thumbs.get(v.name, Thumbs())) for v in versions])


class AdapterAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2_000, description="Why; kept in the audit log.")
    actor: str = Field("admin", min_length=1, max_length=200, description="Who decided (the engineer's name).")


class RollbackRequest(AdapterAction):
    to: str | None = Field(None, description="A retired version to return to; default: the one the live replaced.")
    kind: Kind = Kind.POLICY


class RollbackResult(BaseModel):
    rolled_back: str
    live: str | None = Field(description="The live version now; null: the base model.")


class DiffRowPublic(BaseModel):
    field: str
    a: Any
    b: Any
    differs: bool

    @classmethod
    def of(cls, row: DiffRow) -> DiffRowPublic:
        return cls(field=row.field, a=row.a, b=row.b, differs=row.differs)


class AdapterDiff(BaseModel):
    a: str
    b: str
    rows: list[DiffRowPublic]
