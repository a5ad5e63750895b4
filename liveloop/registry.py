"""The adapter registry: every adapter version, its state, lineage and gate report, and an audit log of changes.

The state machine (both kinds, ``policy`` and ``reward``)::

    candidate ──▶ approved ──▶ canary ──▶ promoted ──▶ retired ──▶ promoted   (a rollback or re-promotion)
        │             │  └──────────────────▲   │
        └──▶ rejected ◀──────────┘ (from any      └──▶ rolled_back
                         of the first three)

``approved → promoted`` skips the canary (canary off, or an engineer's decision). ``rejected`` and
``rolled_back`` are final. At most one version of a kind is ``promoted`` (live; none means the base model
serves) and at most one is in ``canary``. Promoting retires the live version; a rollback marks the live version
``rolled_back`` and re-promotes the one it replaced (its ``predecessor``) or a named retired one.

Names are immutable: the name is the primary key and rows are never deleted, so a name always means the
weights whose sha256 it recorded.

Concurrency: a transition first bumps its kind's row in ``adapter_heads`` and only then reads. On PostgreSQL
that UPDATE holds a row lock until commit; on SQLite it is the transaction's first statement and a write, so it
takes the database write lock (waiting out the busy timeout) before any snapshot is read. Transitions of a kind
are therefore serialised and each decides on the latest state. The revision it leaves behind tells pollers
that routing may have changed; partial unique indexes back the one-live and one-canary rules in the schema.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from sqlalchemy import ColumnElement, and_, exists, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from liveloop.adapter_artifacts import AdapterArtifactError, verify_adapter
from liveloop.artifacts import ArtifactStore, open_artifact_store
from liveloop.settings import Settings
from liveloop.tables import (
    AdapterHead,
    AdapterTransition,
    AdapterVersion,
    Comparison,
    Completion,
    Feedback,
    OutboxMessage,
    utcnow,
)


class State(StrEnum):
    CANDIDATE = "candidate"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANARY = "canary"
    PROMOTED = "promoted"
    RETIRED = "retired"
    ROLLED_BACK = "rolled_back"


class Kind(StrEnum):
    POLICY = "policy"
    REWARD = "reward"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CANDIDATE: frozenset({State.APPROVED, State.REJECTED}),
    State.APPROVED: frozenset({State.CANARY, State.PROMOTED, State.REJECTED}),
    State.CANARY: frozenset({State.PROMOTED, State.REJECTED}),
    State.PROMOTED: frozenset({State.RETIRED, State.ROLLED_BACK}),
    State.RETIRED: frozenset({State.PROMOTED}),
    State.REJECTED: frozenset(),
    State.ROLLED_BACK: frozenset(),
}


class RegistryError(Exception):
    """Base of the registry's typed errors."""


class UnknownVersion(RegistryError, LookupError):
    """No adapter version has this name."""


class NameTaken(RegistryError):
    """The name is already used by other weights; names are never reused."""


class IllegalTransition(RegistryError):
    """The state machine does not allow this change now."""


@dataclass(frozen=True)
class Lineage:
    """Where a version came from; the trainer fills it when it registers a candidate."""

    parent: str | None = None  # the version whose weights training started from
    reward_source: str | None = None  # 'direct' or 'reward_model:<version>'
    event_ids: tuple[str, ...] = ()  # feedback events consumed, each once
    kafka_offsets: Mapping[str, int] = field(default_factory=dict)  # '<topic>:<partition>' -> next offset


@dataclass(frozen=True)
class Thumbs:
    """Ratings of one version's completions."""

    up: int = 0
    down: int = 0

    @property
    def n(self) -> int:
        return self.up + self.down

    @property
    def rate(self) -> float | None:
        """The thumbs-up rate; None before any rating."""
        return self.up / self.n if self.n else None


@dataclass(frozen=True)
class Votes:
    """Paired votes of a canary against live: comparisons that rank an answer of each to the same request."""

    won: int = 0  # the canary's answer ranked above live's
    n: int = 0
    compared: int = 0  # comparisons of answers of the two versions only, votes or not, before any per-user cap


@dataclass(frozen=True)
class DiffRow:
    field: str
    a: object
    b: object

    @property
    def differs(self) -> bool:
        return self.a != self.b


@dataclass(frozen=True)
class Routing:
    """What serving routes by: the kind's live and canary versions (None: the base model / no canary)."""

    revision: int  # grows with every transition of the kind
    live: str | None
    canary: str | None
    standby: str | None = None  # the newest approved version: what is most likely promoted next


class Registry:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, *, events_topic: str | None = None):
        """``events_topic``: when set, every transition also writes an outbox message for that Kafka topic in
        the same transaction, which the feedback relay publishes (serving replicas listen to it)."""
        self._sessions = sessions
        self.store = store
        self.events_topic = events_topic
        self._listeners: list[Callable[[], None]] = []

    def on_transition(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each transition this object commits (in the committing thread): a part of the
        same process reacts at once, not at its next poll or when the adapter-events message comes round."""
        self._listeners.append(listener)

    # --- reads ----------------------------------------------------------------------------------------

    def get(self, name: str) -> AdapterVersion:
        with self._sessions() as session:
            return _get(session, name)

    def versions(self, *, kind: Kind | None = None, states: Iterable[State] | None = None,
                 limit: int | None = None) -> list[AdapterVersion]:
        """Versions, newest first (the ``limit`` newest when given)."""
        query = select(AdapterVersion).order_by(AdapterVersion.created_at.desc(), AdapterVersion.name.desc())
        query = query.limit(limit)
        if kind is not None:
            query = query.where(AdapterVersion.kind == kind)
        if states is not None:
            query = query.where(AdapterVersion.state.in_(list(states)))
        with self._sessions() as session:
            return list(session.scalars(query))

    def routing(self, kind: Kind = Kind.POLICY) -> Routing:
        # one statement, so the revision and the versions come from the same snapshot
        standby = (select(AdapterVersion.name)
                   .where(AdapterVersion.kind == kind, AdapterVersion.state == State.APPROVED)
                   .order_by(AdapterVersion.created_at.desc()).limit(1).scalar_subquery())
        query = (
            select(AdapterHead.revision, AdapterVersion.name, AdapterVersion.state, standby)
            .outerjoin(AdapterVersion, and_(AdapterVersion.kind == AdapterHead.kind,
                                            AdapterVersion.state.in_([State.PROMOTED, State.CANARY])))
            .where(AdapterHead.kind == kind)
        )
        with self._sessions() as session:
            rows = session.execute(query).all()
        by_state = {state: name for _, name, state, _ in rows}
        return Routing(revision=rows[0].revision, live=by_state.get(State.PROMOTED),
                       canary=by_state.get(State.CANARY), standby=rows[0][3])

    def live(self, kind: Kind = Kind.POLICY) -> AdapterVersion | None:
        name = self.routing(kind).live
        return None if name is None else self.get(name)

    def audit(self, name: str | None = None, *, limit: int = 200) -> list[AdapterTransition]:
        """Transitions, newest first; of one version when ``name`` is given."""
        query = select(AdapterTransition).order_by(AdapterTransition.id.desc()).limit(limit)
        if name is not None:
            query = query.where(AdapterTransition.version == name)
        with self._sessions() as session:
            return list(session.scalars(query))

    def artifact(self, name: str, *, base_model_id: str | None = None) -> Path:
        """The local directory of a version's weights, after checking them against the recorded sha256."""
        version = self.get(name)
        self.store.verify(version.uri, sha256=version.sha256, base_model_id=base_model_id)
        return self.store.path(version.uri)

    def thumbs(self, versions: Iterable[str | None] | None = None, *, since: datetime | None = None,
               until: datetime | None = None, requested_model: str | None = None,
               max_per_user: int | None = None) -> dict[str | None, Thumbs]:
        """Live ratings of the completions each version served (None: the base model), all versions when
        ``versions`` is None, counting completions created in [since, until). A completion counts once, as its
        latest rating: a change of mind replaces the earlier one.

        ``requested_model``: only completions asked for by this name (the alias: not pinned to a version).
        ``max_per_user``: only completions of an identified user (``user_identity``), at most this many per user
        and version, the earliest ones, so that no one user outweighs the rest.
        """
        rated = (
            select(Completion.adapter_version.label("version"), Feedback.rating.label("rating"))
            .join(Feedback, and_(Feedback.completion_id == Completion.id, current_rating()))
        )
        if versions is not None:
            names = list(versions)
            named = Completion.adapter_version.in_([n for n in names if n is not None])
            rated = rated.where(or_(named, Completion.adapter_version.is_(None)) if None in names else named)
        if since is not None:
            rated = rated.where(Completion.created_at >= since)
        if until is not None:
            rated = rated.where(Completion.created_at < until)
        if requested_model is not None:
            rated = rated.where(Completion.requested_model == requested_model)
        if max_per_user is not None:
            nth = func.row_number().over(partition_by=(Completion.adapter_version, user_identity()),
                                         order_by=(Completion.created_at, Completion.id))
            rated = rated.add_columns(nth.label("nth")).where(user_identity().is_not(None))
        rows = rated.subquery()
        query = select(rows.c.version, rows.c.rating, func.count()).group_by(rows.c.version, rows.c.rating)
        if max_per_user is not None:
            query = query.where(rows.c.nth <= max_per_user)
        counts: dict[str | None, dict[str, int]] = {}
        with self._sessions() as session:
            for version, rating, n in session.execute(query):
                counts.setdefault(version, {})[rating] = n
        return {version: Thumbs(up=c.get("up", 0), down=c.get("down", 0)) for version, c in counts.items()}

    def votes(self, canary: str, live: str | None, *, since: datetime, until: datetime,
              requested_model: str | None = None, max_per_user: int | None = None) -> Votes:
        """The paired votes of ``canary`` against ``live`` (None: the base model): the latest comparison of each
        request whose answers were created in [since, until) and which ranks an answer of each. ``requested_model``
        and ``max_per_user`` as in ``thumbs`` (the earliest votes of each identified user count)."""
        newer = aliased(Comparison)
        latest = ~exists().where(newer.request_id == Comparison.request_id, newer.revision > Comparison.revision)
        query = (select(Comparison.request_id, Comparison.ranking, Completion.id, Completion.adapter_version,
                        Completion.created_at, user_identity().label("user"))
                 .join(Completion, Completion.request_id == Comparison.request_id)
                 .where(latest, Completion.created_at >= since, Completion.created_at < until))
        if requested_model is not None:
            query = query.where(Completion.requested_model == requested_model)
        requests: dict[str, dict] = {}
        with self._sessions() as session:
            for row in session.execute(query):
                request = requests.setdefault(row.request_id, {"ranking": row.ranking, "versions": {},
                                                               "at": row.created_at, "user": row.user})
                request["versions"][row.id] = row.adapter_version
        won, n, compared, per_user = 0, 0, 0, {}
        for request in sorted(requests.values(), key=lambda r: r["at"]):
            ranked = [request["versions"][c] for c in request["ranking"] if c in request["versions"]]
            if len(ranked) < len(request["ranking"]) or not set(ranked) <= {canary, live}:
                continue  # an answer outside the window, pinned elsewhere, or of a third version
            compared += 1
            if {canary, live} != set(ranked):
                continue  # two answers of one version: no vote
            if max_per_user is not None:
                user = request["user"]
                per_user[user] = per_user.get(user, 0) + 1
                if user is None or per_user[user] > max_per_user:
                    continue
            n += 1
            won += ranked.index(canary) < ranked.index(live)
        return Votes(won=won, n=n, compared=compared)

    def ancestry(self, name: str) -> list[AdapterVersion]:
        """``name`` and its parents, newest first, back to the version trained from the base model."""
        chain = select(AdapterVersion.name, AdapterVersion.parent, literal(0).label("depth")) \
            .where(AdapterVersion.name == name).cte("chain", recursive=True)
        chain = chain.union_all(
            select(AdapterVersion.name, AdapterVersion.parent, (chain.c.depth + 1).label("depth"))
            .join(chain, AdapterVersion.name == chain.c.parent)
        )
        query = select(AdapterVersion).join(chain, AdapterVersion.name == chain.c.name).order_by(chain.c.depth)
        with self._sessions() as session:
            versions = list(session.scalars(query))
        if not versions:
            raise UnknownVersion(f"no adapter version named {name!r}")
        return versions

    def diff(self, a: str, b: str) -> list[DiffRow]:
        """Two versions side by side: identity, lineage (including what each trained on since their common
        ancestor), training metrics, gate values and live thumbs."""
        lines = {name: self.ancestry(name) for name in (a, b)}
        common = next((v.name for v in lines[a] if v.name in {w.name for w in lines[b]}), None)
        va, vb = lines[a][0], lines[b][0]
        thumbs = self.thumbs([a, b])
        ta, tb = thumbs.get(a, Thumbs()), thumbs.get(b, Thumbs())
        rows = [DiffRow(field, getattr(va, field), getattr(vb, field))
                for field in ("kind", "state", "sha256", "base_model_id", "created_at", "parent", "reward_source")]
        rows += [DiffRow("common ancestor", common, common),
                 DiffRow("events since common ancestor", *(_events_since(lines[n], common) for n in (a, b))),
                 DiffRow("kafka offsets", va.kafka_offsets, vb.kafka_offsets)]
        rows += [DiffRow(f"metric {k}", va.training_metrics.get(k), vb.training_metrics.get(k))
                 for k in sorted(va.training_metrics.keys() | vb.training_metrics.keys())]
        gates = [_gate_values(v.gate_report) for v in (va, vb)]
        rows += [DiffRow(f"gate {g}", gates[0].get(g), gates[1].get(g)) for g in dict.fromkeys([*gates[0], *gates[1]])]
        rows += [DiffRow("thumbs up / rated", f"{ta.up} / {ta.n}", f"{tb.up} / {tb.n}"),
                 DiffRow("thumbs-up rate", ta.rate, tb.rate)]
        return rows

    # --- registration ---------------------------------------------------------------------------------

    def register(self, name: str, src: Path, *, kind: Kind = Kind.POLICY, lineage: Lineage = Lineage(),
                 training_metrics: Mapping[str, float] | None = None, actor: str = "trainer",
                 also: Callable[[Session], None] | None = None) -> AdapterVersion:
        """Store an adapter directory and record it as a ``candidate``.

        Registering the same name with the same weights again returns the existing version (a retry after a
        crash); the same name with other weights raises NameTaken. ``also``: more writes to commit in the
        registering transaction, after the version row (the trainer's consumed offsets and ratings).
        """
        manifest = verify_adapter(src)
        if (existing := self._existing(name, manifest["sha256"])) is not None:
            return existing
        try:
            uri = self.store.put(src, name=name)
        except AdapterArtifactError as exc:
            raise NameTaken(str(exc)) from exc
        version = AdapterVersion(
            name=name, kind=kind, state=State.CANDIDATE, sha256=manifest["sha256"], uri=uri,
            base_model_id=manifest["base_model_id"], parent=lineage.parent, reward_source=lineage.reward_source,
            consumed_event_ids=list(lineage.event_ids), kafka_offsets=dict(lineage.kafka_offsets),
            training_metrics=dict(training_metrics or {}), gate_report=None,
        )
        try:
            with self._sessions.begin() as session:
                session.add(version)
                session.flush()
                session.add(_audit(name, None, State.CANDIDATE, actor, "registered", {"sha256": version.sha256}))
                if also is not None:
                    also(session)
        except IntegrityError:  # registered concurrently, or a parent that does not exist
            if (existing := self._existing(name, manifest["sha256"])) is not None:
                return existing
            raise
        return version

    def _existing(self, name: str, sha256: str) -> AdapterVersion | None:
        try:
            version = self.get(name)
        except UnknownVersion:
            return None
        if version.sha256 != sha256:
            raise NameTaken(f"{name} already names other weights (sha256 {version.sha256[:12]}…)")
        return version

    # --- transitions ----------------------------------------------------------------------------------

    def judge(self, name: str, *, report: dict, failed: list[str], actor: str = "gate") -> AdapterVersion:
        """Store a candidate's gate report and approve it, or reject it when any gate failed."""
        with self._locked(name) as (session, version):
            version.gate_report = report
            if failed:
                _move(session, version, State.REJECTED, actor, f"failed gates: {', '.join(failed)}",
                      {"failed": failed})
            else:
                _move(session, version, State.APPROVED, actor, "all gates passed", {})
            return version

    def start_canary(self, name: str, *, actor: str, reason: str, details: dict | None = None) -> AdapterVersion:
        with self._locked(name) as (session, version):
            running = _in_state(session, version.kind, State.CANARY)
            if running is not None:
                raise IllegalTransition(f"{name}: {running.name} is already in canary")
            _move(session, version, State.CANARY, actor, reason, details)
            return version

    def promote(self, name: str, *, actor: str, reason: str, details: dict | None = None,
                expect: State | None = None) -> AdapterVersion:
        """Make ``name`` the live version of its kind; the version it replaces is retired.

        ``expect``: refuse unless the version is still in that state (a decision taken on what was read before
        the lock, e.g. a canary verdict, must not apply to a version someone else has moved meanwhile).
        """
        with self._locked(name, expect) as (session, version):
            _check(version, State.PROMOTED)
            live = _in_state(session, version.kind, State.PROMOTED)
            if live is not None:
                _move(session, live, State.RETIRED, actor, f"superseded by {name}", {})
            version.predecessor = live.name if live is not None else None
            _move(session, version, State.PROMOTED, actor, reason, details)
            return version

    def reject(self, name: str, *, actor: str, reason: str, details: dict | None = None,
               expect: State | None = None) -> AdapterVersion:
        with self._locked(name, expect) as (session, version):
            _move(session, version, State.REJECTED, actor, reason, details)
            return version

    def rollback(self, kind: Kind = Kind.POLICY, *, to: str | None = None, actor: str, reason: str,
                 details: dict | None = None, expect_live: str | None = None) -> AdapterVersion | None:
        """Mark the live version rolled back and re-promote ``to`` or, by default, the version it replaced.

        ``expect_live``: refuse unless that version is still the live one, so two monitors that both saw it
        fail cannot roll back twice. Returns the new live version; None when the base model serves again.
        """
        with self._locked_kind(kind) as session:
            live = _in_state(session, kind, State.PROMOTED)
            if live is None:
                raise IllegalTransition("nothing to roll back: the base model is live")
            if expect_live is not None and live.name != expect_live:
                raise IllegalTransition(f"{expect_live} is no longer live ({live.name} is)")
            target = _get(session, to) if to is not None else _get_optional(session, live.predecessor)
            if target is not None and (target.kind != kind or target.state != State.RETIRED):
                raise IllegalTransition(
                    f"rollback returns to a previously live (retired) {kind} version; {target.name} is "
                    f"{target.state} {target.kind}: promote it instead, or pass another version"
                )
            _move(session, live, State.ROLLED_BACK, actor, reason, details)
            if target is not None:
                _move(session, target, State.PROMOTED, actor, f"rollback from {live.name}", {})
            return target

    @contextmanager
    def _locked(self, name: str, expect: State | None = None) -> Iterator[tuple[Session, AdapterVersion]]:
        with self._sessions() as session:
            kind = session.scalar(select(AdapterVersion.kind).where(AdapterVersion.name == name))
        if kind is None:
            raise UnknownVersion(f"no adapter version named {name!r}")
        with self._locked_kind(kind) as session:
            version = _get(session, name)
            if expect is not None and version.state != expect:
                raise IllegalTransition(f"{name} is {version.state}, no longer {expect}")
            yield session, version

    @contextmanager
    def _locked_kind(self, kind: str) -> Iterator[Session]:
        """A transaction that holds the kind's lock from its first statement (see the module docstring)."""
        with self._sessions.begin() as session:
            revision = session.scalar(
                update(AdapterHead).where(AdapterHead.kind == kind)
                .values(revision=AdapterHead.revision + 1).returning(AdapterHead.revision)
            )
            if revision is None:
                raise RegistryError(f"unknown adapter kind {kind!r}")
            yield session
            if self.events_topic is not None:
                session.add(_routing_event(session, self.events_topic, kind, revision))
        for listener in self._listeners:
            listener()


def open_registry(sessions: sessionmaker[Session], settings: Settings) -> Registry:
    """The registry as configured: the settings' artifact store, announcing transitions on adapter-events."""
    return Registry(sessions, open_artifact_store(settings), events_topic=settings.adapter_events_topic)


def current_rating() -> ColumnElement[bool]:
    """SQL condition on ``Feedback``: the row is its completion's latest rating (a change of mind replaces it)."""
    newer = aliased(Feedback)
    return ~exists().where(newer.completion_id == Feedback.completion_id, newer.revision > Feedback.revision)


def user_identity() -> ColumnElement[str | None]:
    """Who a completion counts for: the API key's identity; the request's ``user`` field only when no keys are
    configured (then ``user_id`` is empty). The same identity picks the canary slice (``serving.chat``)."""
    return func.coalesce(Completion.user_id, Completion.end_user)


def _events_since(line: list[AdapterVersion], ancestor: str | None) -> int:
    """Feedback events trained on along ``line`` (newest first) after ``ancestor`` (None: since the base)."""
    names = [v.name for v in line]
    newer = line[: names.index(ancestor)] if ancestor in names else line
    return sum(len(v.consumed_event_ids) for v in newer)


def _gate_values(report: dict | None) -> dict[str, object]:
    return {g["name"]: g["value"] for g in (report or {}).get("gates", [])}


def _get(session: Session, name: str) -> AdapterVersion:
    version = session.get(AdapterVersion, name)
    if version is None:
        raise UnknownVersion(f"no adapter version named {name!r}")
    return version


def _get_optional(session: Session, name: str | None) -> AdapterVersion | None:
    return None if name is None else _get(session, name)


def _in_state(session: Session, kind: str, state: State) -> AdapterVersion | None:
    return session.scalar(select(AdapterVersion).where(AdapterVersion.kind == kind, AdapterVersion.state == state))


def _check(version: AdapterVersion, to: State) -> None:
    if to not in TRANSITIONS[State(version.state)]:
        raise IllegalTransition(f"{version.name}: {version.state} → {to} is not allowed")


def _move(session: Session, version: AdapterVersion, to: State, actor: str, reason: str,
          details: dict | None) -> None:
    _check(version, to)
    session.add(_audit(version.name, version.state, to, actor, reason, details or {}))
    version.state, version.state_changed_at = to, utcnow()
    session.flush()  # the partial unique indexes are checked row by row: write each move before the next


def _audit(name: str, from_state: str | None, to: State, actor: str, reason: str,
           details: dict) -> AdapterTransition:
    return AdapterTransition(version=name, from_state=from_state, to_state=to, actor=actor, at=utcnow(),
                             reason=reason, details=details)


def _routing_event(session: Session, topic: str, kind: str, revision: int) -> OutboxMessage:
    """The adapter-events message announcing a kind's routing after a transition. Replicas treat it as a hint
    to re-read the registry, and ignore one whose revision is not newer than what they have."""
    live, canary = (_in_state(session, kind, state) for state in (State.PROMOTED, State.CANARY))
    payload = {"schema": 1, "kind": kind, "revision": revision, "live": live.name if live else None,
               "canary": canary.name if canary else None, "at": utcnow().isoformat()}
    return OutboxMessage(event_id=uuid.uuid4().hex, topic=topic, key=kind, payload=payload)
