"""Prometheus metrics of the loop's state, read from the database at each scrape.

The registry, the ratings and the outbox are the system of record, so what they say is computed when Prometheus
asks rather than kept in counters of one process: a value survives restarts, is the same whichever process
exports it, and keeps moving while the process that should change it is stuck (the age of an outbox row nobody
relays grows). One process per policy exports them, the trainer (``liveloop train``), next to the promotion
monitor whose view of the thumbs they show. docs/metrics.md lists them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from liveloop.promotion import Promoter
from liveloop.registry import Kind, Registry, State, Thumbs
from liveloop.settings import Settings
from liveloop.tables import AdapterTransition, AdapterVersion, OutboxMessage, utcnow

log = logging.getLogger(__name__)

BASE = "base"  # the version label of the base model (no adapter)
Z_95 = 1.959964  # two-sided 95 % normal quantile of the Wilson interval
_GATE_VERDICTS = 50  # the newest gate verdicts looked at for a run of rejections


def wilson_interval(up: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a thumbs-up rate: unlike the normal one, it stays in [0, 1] with few ratings."""
    if n == 0:
        return 0.0, 1.0
    p = up / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class StateCollector(Collector):
    """The loop's state for one policy, computed from the database each time Prometheus scrapes."""

    def __init__(self, registry: Registry, sessions: sessionmaker[Session], settings: Settings):
        self.registry, self.sessions = registry, sessions
        self.promoter = Promoter(registry, settings)

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect(utcnow())
        except Exception:  # a scrape must answer even while the database does not: these series go missing
            log.exception("state metrics: the database did not answer")

    def _collect(self, now: datetime) -> Iterator[Metric]:
        routing = self.registry.routing(Kind.POLICY)
        roles = {"live": routing.live} | ({"canary": routing.canary} if routing.canary else {})
        info = GaugeMetricFamily("liveloop_version_info", "The policy versions serving users (live, canary) and "
                                 "the next in line (approved); 1 for each.", labels=["version", "state"])
        for state, name in ((State.PROMOTED, routing.live), (State.CANARY, routing.canary),
                            (State.APPROVED, routing.standby)):
            if name is not None or state is State.PROMOTED:
                info.add_metric([_label(name), state.value], 1)
        yield info
        yield self._rated_completions(list(roles.values()))
        yield from self._decision_thumbs(roles, now)
        yield from self._transitions()
        yield from self._outbox(now)
        yield self._rating_to_version()

    def _rated_completions(self, versions: list[str | None]) -> Metric:
        family = GaugeMetricFamily(
            "liveloop_version_rated_completions", "Rated completions each serving version served, all requests "
            "and all time, by their latest rating (a change of mind moves one from a thumb to the other).",
            labels=["version", "rating"])
        for name, thumbs in self._thumbs_of(versions, self.registry.thumbs(versions)):
            family.add_metric([_label(name), "up"], thumbs.up)
            family.add_metric([_label(name), "down"], thumbs.down)
        return family

    def _decision_thumbs(self, roles: dict[str, str | None], now: datetime) -> Iterator[Metric]:
        """What the promotion monitor decides on: during a canary both sides since it started, otherwise the live
        version since its promotion (alias requests of identified users, capped per user)."""
        names = list(roles.values())
        since = self._since(roles.get("canary") or roles["live"])
        counted = dict(self._thumbs_of(names, self.promoter.deciding_thumbs(names, since=since, until=now)))
        labels = ["role", "version"]
        n = GaugeMetricFamily("liveloop_decision_rated_completions",
                              "Rated completions the promotion monitor counts, by role and thumb.",
                              labels=[*labels, "rating"])
        rate = GaugeMetricFamily("liveloop_decision_thumbs_up_ratio",
                                 "Thumbs-up rate the promotion monitor counts (NaN before any rating).", labels=labels)
        low = GaugeMetricFamily("liveloop_decision_thumbs_up_ratio_lower",
                                "Lower end of the thumbs-up rate's 95 % Wilson interval.", labels=labels)
        high = GaugeMetricFamily("liveloop_decision_thumbs_up_ratio_upper",
                                 "Upper end of the thumbs-up rate's 95 % Wilson interval.", labels=labels)
        for role, name in roles.items():
            thumbs, key = counted[name], [role, _label(name)]
            n.add_metric([*key, "up"], thumbs.up)
            n.add_metric([*key, "down"], thumbs.down)
            rate.add_metric(key, math.nan if thumbs.rate is None else thumbs.rate)
            bounds = wilson_interval(thumbs.up, thumbs.n)
            low.add_metric(key, bounds[0])
            high.add_metric(key, bounds[1])
        yield from (n, rate, low, high)
        if "canary" in roles:
            votes = self.promoter.deciding_votes(roles["canary"], roles["live"], since=since, until=now)
            family = GaugeMetricFamily("liveloop_decision_paired_votes", "Paired votes (a canary and a live answer "
                                       "to one request compared) the promotion monitor counts, by the version "
                                       "preferred.", labels=["role", "version"])
            family.add_metric(["canary", _label(roles["canary"])], votes.won)
            family.add_metric(["live", _label(roles["live"])], votes.n - votes.won)
            yield family

    def _since(self, name: str | None) -> datetime:
        """When ``name`` took its place in the routing; the epoch for the base model."""
        return datetime(1970, 1, 1, tzinfo=UTC) if name is None else _utc(self.registry.get(name).state_changed_at)

    @staticmethod
    def _thumbs_of(names: list[str | None], thumbs: dict[str | None, Thumbs]) -> Iterator[tuple[str | None, Thumbs]]:
        for name in dict.fromkeys(names):
            yield name, thumbs.get(name, Thumbs())

    def _transitions(self) -> Iterator[Metric]:
        policy = select(AdapterVersion.name).where(AdapterVersion.kind == Kind.POLICY)
        counts = (select(AdapterTransition.to_state, func.count())
                  .where(AdapterTransition.version.in_(policy)).group_by(AdapterTransition.to_state))
        verdicts = (select(AdapterTransition.to_state)
                    .where(AdapterTransition.version.in_(policy), AdapterTransition.from_state == State.CANDIDATE,
                           AdapterTransition.actor == "gate")  # not the candidates superseded unjudged
                    .order_by(AdapterTransition.id.desc()).limit(_GATE_VERDICTS))
        with self.sessions() as session:
            by_state = dict(session.execute(counts).all())
            newest = list(session.scalars(verdicts))
        family = CounterMetricFamily("liveloop_registry_transitions", "Transitions of policy versions in the audit "
                                     "log, by the state entered ('candidate': registered).", labels=["to_state"])
        for state in State:
            family.add_metric([state.value], by_state.get(state.value, 0))
        yield family
        run = next((i for i, state in enumerate(newest) if state != State.REJECTED), len(newest))
        yield GaugeMetricFamily("liveloop_gate_rejections_in_a_row",
                                "The newest gate verdicts that were all rejections (0: the last one approved).",
                                value=run)

    def _outbox(self, now: datetime) -> Iterator[Metric]:
        with self.sessions() as session:
            oldest = session.scalar(select(func.min(OutboxMessage.created_at)).where(OutboxMessage.sent_at.is_(None)))
        age = 0.0 if oldest is None else max(0.0, (now - _utc(oldest)).total_seconds())
        yield GaugeMetricFamily("liveloop_outbox_oldest_unsent_age_seconds",
                                "Age of the oldest outbox row Kafka has not acknowledged (0: none).", value=age)

    def _rating_to_version(self) -> Metric:
        """For the newest policy version to reach each stage: from the first rating of its own training batch to
        its registration (candidate), the start of its canary, its promotion (live)."""
        family = GaugeMetricFamily(
            "liveloop_rating_to_version_seconds", "From the first rating a version trained on to the moment it "
            "became a candidate, a canary, live; for the newest version to reach each stage.", labels=["stage"])
        entered = (select(AdapterTransition.version, AdapterTransition.at)
                   .join(AdapterVersion, AdapterVersion.name == AdapterTransition.version)
                   .where(AdapterVersion.kind == Kind.POLICY).order_by(AdapterTransition.id.desc()).limit(1))
        with self.sessions() as session:
            for stage, state in (("candidate", State.CANDIDATE), ("canary", State.CANARY), ("live", State.PROMOTED)):
                row = session.execute(entered.where(AdapterTransition.to_state == state)).first()
                if row is None:
                    continue
                event_ids = session.get(AdapterVersion, row.version).consumed_event_ids
                first = session.scalar(select(func.min(OutboxMessage.created_at))
                                       .where(OutboxMessage.event_id.in_(event_ids))) if event_ids else None
                if first is not None:
                    family.add_metric([stage], (_utc(row.at) - _utc(first)).total_seconds())
        return family


def _label(name: str | None) -> str:
    return BASE if name is None else name


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every timestamp liveloop writes is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
