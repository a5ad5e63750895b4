"""Promotion: how an approved version reaches every user, and how it is taken back when live thumbs say so.

Policy (``promotion_policy``):
- ``auto``: a version that passes the gates starts a canary, or is promoted at once when ``canary_fraction`` is
  0. While a canary runs, later approved versions wait; when it ends, the newest one newer than the live
  version goes next.
- ``manual``: approved versions wait for an engineer (``liveloop adapters promote V``).

Canary: users for whom ``in_canary(user, canary, fraction)`` holds are served the canary, everyone else the live
version. Once each side has ``canary_min_ratings`` ratings on completions served since the canary started, a
one-sided two-proportion z-test of H1 "canary's thumbs-up rate < live's" decides: p < ``canary_alpha`` rejects
the canary, otherwise it is promoted. Both sides are rated over the same period, so a drift in traffic over the
day does not masquerade as a difference between versions.

Rollback: for ``rollback_window_s`` after a promotion, the new version's thumbs-up rate since its promotion is
tested against its predecessor's over the same length of time just before it (H1 "new < predecessor",
``rollback_alpha``), once both have ``rollback_min_ratings`` ratings; a significant drop rolls back.

Every decision is a registry transition whose audit details carry its statistics. Decisions are guarded
(``expect``): when several processes run the monitor, one acts and the others' identical verdicts are refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from statistics import NormalDist

from liveloop.registry import IllegalTransition, Kind, Registry, State, Thumbs
from liveloop.settings import Settings
from liveloop.tables import AdapterVersion, utcnow

log = logging.getLogger(__name__)

POLICY_ACTOR, CANARY_ACTOR, ROLLBACK_ACTOR = "promotion-policy", "canary", "rollback-monitor"


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def in_canary(user: str | None, canary: str, fraction: float) -> bool:
    """Whether ``user`` is served the canary. The canary's name salts the hash, so each canary is tried on a
    different slice of users; a user stays in or out for the whole of one canary. Anonymous requests never are."""
    return user is not None and stable_fraction(f"{canary}\0{user}") < fraction


@dataclass(frozen=True)
class Comparison:
    """One-sided two-proportion z-test of H1: thumbs-up rate(new) < rate(reference), pooled standard error."""

    new_up: int
    new_n: int
    reference_up: int
    reference_n: int
    z: float
    p_value: float  # P(Z ≤ z) under H0 (equal rates): small when ``new`` is clearly worse

    def to_dict(self) -> dict:
        return asdict(self)


def compare(new: Thumbs, reference: Thumbs) -> Comparison:
    if not new.n or not reference.n:
        raise ValueError("both sides need at least one rating")
    pooled = (new.up + reference.up) / (new.n + reference.n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / new.n + 1 / reference.n))
    z = (new.up / new.n - reference.up / reference.n) / se if se > 0 else 0.0  # se 0: both all-up or all-down
    return Comparison(new.up, new.n, reference.up, reference.n, z, NormalDist().cdf(z))


class Promoter:
    """Applies the promotion policy to one adapter kind: after the gates, and periodically (``tick``)."""

    def __init__(self, registry: Registry, settings: Settings, kind: Kind = Kind.POLICY):
        self.registry, self.settings, self.kind = registry, settings, kind

    def after_gates(self, name: str) -> None:
        """Called when the gates have approved ``name``: the auto policy moves it on at once."""
        if self.settings.promotion_policy == "auto":
            self._advance(name)

    def tick(self, now: datetime | None = None) -> None:
        """Decide a canary that has enough ratings, roll back a failing new version, start the next canary."""
        now = now or utcnow()
        for step in (self._decide_canary, self._watch_rollback, self._start_next):
            try:
                step(now)
            except IllegalTransition as exc:  # another process decided first; its verdict stands
                log.info("promotion monitor: %s", exc)

    def run(self, stop: threading.Event) -> None:
        """``tick`` every ``promotion_interval_s`` until ``stop`` is set; errors are logged, never fatal."""
        while not stop.wait(self.settings.promotion_interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("promotion monitor tick failed; retrying in %.0f s", self.settings.promotion_interval_s)

    def _advance(self, name: str) -> None:
        fraction = self.settings.canary_fraction
        if fraction > 0:
            try:
                self.registry.start_canary(name, actor=POLICY_ACTOR, reason="gates passed",
                                           details={"fraction": fraction})
            except IllegalTransition as exc:
                log.info("%s stays approved for now: %s", name, exc)
        else:
            self.registry.promote(name, actor=POLICY_ACTOR, reason="gates passed; canary off",
                                  expect=State.APPROVED)

    def _decide_canary(self, now: datetime) -> None:
        routing = self.registry.routing(self.kind)
        if routing.canary is None:
            return
        canary = self.registry.get(routing.canary)
        counts = self.registry.thumbs([canary.name, routing.live], since=canary.state_changed_at, until=now)
        new, live = counts.get(canary.name, Thumbs()), counts.get(routing.live, Thumbs())
        if min(new.n, live.n) < self.settings.canary_min_ratings:
            return
        test = compare(new, live)
        alpha = self.settings.canary_alpha
        details = {**test.to_dict(), "alpha": alpha, "live": routing.live}
        verdict = _verdict(new, live, test, alpha, "live")
        if test.p_value < alpha:
            self.registry.reject(canary.name, actor=CANARY_ACTOR, reason=verdict, details=details,
                                 expect=State.CANARY)
        else:
            self.registry.promote(canary.name, actor=CANARY_ACTOR, reason=verdict, details=details,
                                  expect=State.CANARY)
        log.info("canary %s: %s", canary.name, verdict)

    def _watch_rollback(self, now: datetime) -> None:
        live = self.registry.live(self.kind)
        if live is None or not self._newly_promoted(live, now):
            return
        promoted_at = _utc(live.state_changed_at)
        window = timedelta(seconds=self.settings.rollback_window_s)
        new = self.registry.thumbs([live.name], since=promoted_at, until=now).get(live.name, Thumbs())
        before = self.registry.thumbs([live.predecessor], since=promoted_at - (now - promoted_at),
                                      until=promoted_at).get(live.predecessor, Thumbs())
        if min(new.n, before.n) < self.settings.rollback_min_ratings:
            return
        test = compare(new, before)
        alpha = self.settings.rollback_alpha
        if test.p_value < alpha:
            verdict = _verdict(new, before, test, alpha, "its predecessor")
            self.registry.rollback(self.kind, actor=ROLLBACK_ACTOR, reason=verdict, expect_live=live.name,
                                   details={**test.to_dict(), "alpha": alpha, "predecessor": live.predecessor,
                                            "window_s": window.total_seconds()})
            log.warning("rolled back %s: %s", live.name, verdict)

    def _newly_promoted(self, live: AdapterVersion, now: datetime) -> bool:
        """Within the rollback window of a real promotion (not of a rollback's return to a retired version)."""
        if now - _utc(live.state_changed_at) > timedelta(seconds=self.settings.rollback_window_s):
            return False
        last = self.registry.audit(live.name, limit=1)
        return bool(last) and last[0].from_state != State.RETIRED

    def _start_next(self, now: datetime) -> None:
        if self.settings.promotion_policy != "auto" or self.registry.routing(self.kind).canary is not None:
            return
        live = self.registry.live(self.kind)
        waiting = [v for v in self.registry.versions(kind=self.kind, states=[State.APPROVED])
                   if live is None or _utc(v.created_at) > _utc(live.created_at)]
        if waiting:  # newest first
            self._advance(waiting[0].name)


def _verdict(new: Thumbs, reference: Thumbs, test: Comparison, alpha: float, what: str) -> str:
    relation = "significantly below" if test.p_value < alpha else "not significantly below"
    return (f"thumbs-up {new.rate:.3f} (n={new.n}) {relation} {what}'s {reference.rate:.3f} (n={reference.n}): "
            f"z={test.z:.2f}, one-sided p={test.p_value:.3g}, alpha={alpha}")


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every timestamp liveloop writes is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
