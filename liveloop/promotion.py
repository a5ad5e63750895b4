"""Promotion: how an approved version reaches every user, and how it is taken back when live thumbs say so.

Policy (``promotion_policy``):
- ``auto``: a version that passes the gates starts a canary, or is promoted at once when ``canary_fraction`` is
  0. A canary waits until the version's lineage has trained on ``canary_min_trained_ratings``. While a canary
  runs, later approved versions wait; when it ends, the newest one newer than the live version goes next. A
  canary still undecided after ``canary_supersede_ratings`` gives way to a newer approved version trained from it.
- ``manual``: approved versions wait for an engineer (``liveloop adapters promote V``).

Canary: users for whom ``in_canary(user, canary, fraction)`` holds are served the canary, everyone else the live
version, over the same period; a request of theirs for two answers gets one of each. At every look (each
``tick``) a sequential probability ratio test (Wald's SPRT) weighs H1 "the canary is better" against H0 "it is
as good as live" and promotes, rejects, or keeps collecting (``canary_outcome``). Its evidence is of two kinds,
independent observations whose log-likelihood ratios add up to the one of all the data:
- thumbs: the difference of thumbs-up rates (Gaussian approximation), H1 "canary = live + ``canary_effect``";
- paired votes: a comparison of a live and a canary answer to the same request, H1 "P(canary preferred) =
  ½ + ``canary_vote_effect``". A vote compares the two versions on the same prompt and the same rater, so the
  rater's own leniency cancels out, which a difference of thumbs from two groups of users cannot do.
One SPRT on the sum keeps Wald's error rates (α, β) whatever the mix of thumbs and votes, without splitting α
between two tests. Its boundaries are meant for a look after every rating; ``simulate_canaries`` measures its
error rates looking that often. Only ratings that can decide are counted (``Registry.thumbs`` and
``Registry.votes`` with ``requested_model`` and ``max_per_user``): completions asked for by the alias, of
identified users, the latest rating or ranking of each, at most ``max_ratings_per_user`` per user and side (or
votes per user).

Rollback: for ``rollback_window_s`` after a promotion, the new version's ratings since its promotion are compared
with a fixed reference, its predecessor's ratings in the ``rollback_window_s`` before the promotion, by a
one-sided open SPRT of H1 "new = reference − ``rollback_effect``": it rolls back once the likelihood ratio
reaches 1 / ``rollback_alpha`` (``rollback_due``), and otherwise watches until the window closes. Thumbs are the
safety net here, votes have no say: once promoted, nothing serves the predecessor beside the new version to be
compared with.

Every decision is a registry transition whose audit details carry its statistics. Decisions are guarded
(``expect``): when several processes run the monitor, one acts and the others' identical verdicts are refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from statistics import NormalDist

import numpy as np

from liveloop.registry import IllegalTransition, Kind, Registry, State, Thumbs, Votes
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


# --- the sequential tests: pure functions of the counts, on numbers (the monitor) or arrays (the simulator) ----


def difference_log_lr(new_up, new_n, ref_up, ref_n, effect: float):
    """log Λ of H1 "p_new − p_ref = effect" against H0 "p_new = p_ref".

    The observed difference d = new_up/new_n − ref_up/ref_n is taken as N(θ, V), V = p̄(1 − p̄)(1/new_n + 1/ref_n)
    with the pooled rate p̄ = (new_up + ref_up + 1) / (new_n + ref_n + 2) (one pseudo-rating each way, so that
    all-up or all-down sides do not make V zero). Then log Λ = effect·d/V − effect²/(2V).
    """
    p = (new_up + ref_up + 1) / (new_n + ref_n + 2)
    variance = p * (1 - p) * (1 / new_n + 1 / ref_n)
    d = new_up / new_n - ref_up / ref_n
    return effect * d / variance - effect**2 / (2 * variance)


def preference_log_lr(wins, votes, effect: float):
    """log Λ of H1 "P(canary preferred) = ½ + effect" against H0 "= ½", from the canary's ``wins`` among ``votes``
    paired votes. Each vote is a Bernoulli draw, so the ratio is exact:
    log Λ = wins·log(1 + 2·effect) + (votes − wins)·log(1 − 2·effect)."""
    return wins * math.log1p(2 * effect) + (votes - wins) * math.log1p(-2 * effect)


class Outcome(StrEnum):
    CONTINUE = "continue"  # neither boundary crossed: keep collecting
    PROMOTE = "promote"  # log Λ ≥ log((1 − β)/α): the canary is better than live
    REJECT = "reject"  # log Λ ≤ log(β/(1 − α)): evidence it is not better by canary_effect
    CAP = "cap"  # canary_max_ratings reached with neither: rejected for want of evidence


@dataclass(frozen=True)
class CanaryRule:
    """Wald's SPRT of H0 "canary = live" against H1 "canary better" (thumbs-up rate + ``effect``, preferred in a
    paired vote with probability ½ + ``vote_effect``), truncated at ``max_ratings``."""

    alpha: float  # P(promote | H0), before truncation and approximation
    beta: float  # P(reject | H1)
    effect: float
    min_ratings: int  # thumbs of each side before they count (their variance is estimated), or votes to look
    max_ratings: int  # thumbs of both sides and votes together
    vote_effect: float

    @classmethod
    def from_settings(cls, settings: Settings) -> CanaryRule:
        return cls(settings.canary_alpha, settings.canary_beta, settings.canary_effect,
                   settings.canary_min_ratings, settings.canary_max_ratings, settings.canary_vote_effect)

    @property
    def bounds(self) -> tuple[float, float]:
        """(reject below, promote above) for log Λ."""
        return math.log(self.beta / (1 - self.alpha)), math.log((1 - self.beta) / self.alpha)


def canary_log_lr(new_up, new_n, live_up, live_n, wins, votes, rule: CanaryRule) -> tuple[np.ndarray, np.ndarray]:
    """(log Λ of all the evidence, whether it may be looked at), elementwise: the thumbs' term once each side has
    ``min_ratings`` (before, their variance is a guess), plus the votes' term (exact from the first vote). A look
    needs the thumbs' term or ``min_ratings`` votes."""
    new_up, new_n, live_up, live_n, wins, votes = np.broadcast_arrays(
        *map(np.asarray, (new_up, new_n, live_up, live_n, wins, votes)))
    thumbs_ready = (new_n >= rule.min_ratings) & (live_n >= rule.min_ratings)
    with np.errstate(divide="ignore", invalid="ignore"):
        thumbs = np.where(thumbs_ready, difference_log_lr(new_up, new_n, live_up, live_n, rule.effect), 0.0)
    return thumbs + preference_log_lr(wins, votes, rule.vote_effect), thumbs_ready | (votes >= rule.min_ratings)


def canary_outcome(new_up, new_n, live_up, live_n, rule: CanaryRule, collected=None, *, wins=0,
                   votes=0) -> np.ndarray:
    """The decision at one look, elementwise: an array of ``Outcome`` values. ``wins`` of ``votes``: the paired
    votes the canary won. ``collected``: the thumbs and votes gathered before the per-user cap (default
    ``new_n + live_n + votes``); ``max_ratings`` applies to it, so a canary whose few users have all reached their
    cap still ends."""
    log_lr, ready = canary_log_lr(new_up, new_n, live_up, live_n, wins, votes, rule)
    collected = np.asarray(new_n) + np.asarray(live_n) + np.asarray(votes) if collected is None else np.asarray(
        collected)
    reject_below, promote_above = rule.bounds
    return np.select(
        [ready & (log_lr >= promote_above), ready & (log_lr <= reject_below), collected >= rule.max_ratings],
        [Outcome.PROMOTE, Outcome.REJECT, Outcome.CAP], Outcome.CONTINUE,
    )


@dataclass(frozen=True)
class RollbackRule:
    """One-sided open SPRT of H0 "new = reference" against H1 "new = reference − effect": an exact likelihood ratio
    ever reaches 1/α under H0 with probability at most α however often it is looked at (Ville's inequality); the
    fixed reference's own noise is outside that bound, so ``simulate_rollbacks`` measures it."""

    alpha: float
    effect: float
    min_ratings: int  # each side, before the first look

    @classmethod
    def from_settings(cls, settings: Settings) -> RollbackRule:
        return cls(settings.rollback_alpha, settings.rollback_effect, settings.rollback_min_ratings)


def rollback_due(new_up, new_n, ref_up, ref_n, rule: RollbackRule) -> np.ndarray:
    """Whether the new version's drop is established, elementwise."""
    new_up, new_n, ref_up, ref_n = np.broadcast_arrays(*map(np.asarray, (new_up, new_n, ref_up, ref_n)))
    ready = (new_n >= rule.min_ratings) & (ref_n >= rule.min_ratings)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lr = difference_log_lr(new_up, new_n, ref_up, ref_n, -rule.effect)
    return ready & (log_lr >= math.log(1 / rule.alpha))


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
            trained = sum(len(v.consumed_event_ids) for v in self.registry.ancestry(name))
            if trained < self.settings.canary_min_trained_ratings:
                log.info("%s stays approved for now: its lineage trained on %d ratings, a canary needs %d", name,
                         trained, self.settings.canary_min_trained_ratings)
                return
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
        sides, since = [canary.name, routing.live], canary.state_changed_at
        counts = self.deciding_thumbs(sides, since=since, until=now)
        new, live = counts.get(canary.name, Thumbs()), counts.get(routing.live, Thumbs())
        votes = self.deciding_votes(canary.name, routing.live, since=since, until=now)
        collected = self._collected(canary, routing.live, now, votes)
        rule = CanaryRule.from_settings(self.settings)
        outcome = Outcome(canary_outcome(new.up, new.n, live.up, live.n, rule, collected, wins=votes.won,
                                         votes=votes.n).item())
        if outcome is Outcome.CONTINUE:
            self._supersede(canary, collected)
            return
        log_lr, _ = canary_log_lr(new.up, new.n, live.up, live.n, votes.won, votes.n, rule)
        details = {**_counts(new, live), "votes_won": votes.won, "votes_n": votes.n, "collected": collected,
                   "live": routing.live, "outcome": outcome.value, "log_lr": float(log_lr),
                   "bounds": list(rule.bounds), "alpha": rule.alpha, "beta": rule.beta, "effect": rule.effect,
                   "vote_effect": rule.vote_effect, "max_ratings": rule.max_ratings,
                   "max_ratings_per_user": self.settings.max_ratings_per_user}
        reason = _canary_reason(outcome, new, live, votes, rule)
        if outcome is Outcome.PROMOTE:
            self.registry.promote(canary.name, actor=CANARY_ACTOR, reason=reason, details=details,
                                  expect=State.CANARY)
        else:
            self.registry.reject(canary.name, actor=CANARY_ACTOR, reason=reason, details=details,
                                 expect=State.CANARY)
        log.info("canary %s: %s", canary.name, reason)

    def wants_candidate(self, now: datetime | None = None) -> bool:
        """Whether a newly approved version would be used now or soon: no canary holds the slot, or the canary has
        been undecided for half of ``canary_supersede_ratings``. From then on a successor is gated while the canary
        runs on, so that one is approved when the canary may give way to it (a gate run takes a minute or two of
        ratings) or, if the canary is decided first, starts the next canary at once. Under the manual policy
        always: an engineer may promote any approved version."""
        routing = self.registry.routing(self.kind)
        if self.settings.promotion_policy != "auto" or routing.canary is None:
            return True
        limit = self.settings.canary_supersede_ratings
        if not limit:
            return False
        canary, now = self.registry.get(routing.canary), now or utcnow()
        votes = self.deciding_votes(canary.name, routing.live, since=canary.state_changed_at, until=now)
        return 2 * self._collected(canary, routing.live, now, votes) >= limit

    def _collected(self, canary: AdapterVersion, live: str | None, now: datetime, votes: Votes) -> int:
        """Ratings of both sides since the canary started (every user's, through the alias), and ``votes``'
        comparisons of the two."""
        thumbs = self.registry.thumbs([canary.name, live], since=canary.state_changed_at, until=now,
                                      requested_model=self.settings.model_alias)
        return votes.compared + sum(t.n for t in thumbs.values())

    def _supersede(self, canary: AdapterVersion, collected: int) -> None:
        """Reject a canary undecided after ``canary_supersede_ratings`` when a newer approved version was trained
        from it: a canary only slightly better than live takes up to ``canary_max_ratings`` to decide, while the
        versions behind it, trained further, wait. ``_start_next`` then starts the newest of them."""
        limit = self.settings.canary_supersede_ratings
        if not limit or collected < limit:
            return
        newer = [v for v in self.registry.versions(kind=self.kind, states=[State.APPROVED])
                 if _utc(v.created_at) > _utc(canary.created_at)
                 and canary.name in {a.name for a in self.registry.ancestry(v.name)}]
        if not newer:
            return
        reason = f"undecided after {collected} ratings while {newer[0].name}, trained further from it, waited"
        self.registry.reject(canary.name, actor=CANARY_ACTOR, reason=reason, expect=State.CANARY,
                             details={"collected": collected, "superseded_by": newer[0].name, "limit": limit})
        log.info("canary %s: %s", canary.name, reason)

    def _watch_rollback(self, now: datetime) -> None:
        live = self.registry.live(self.kind)
        if live is None or not self._newly_promoted(live, now):
            return
        promoted_at = _utc(live.state_changed_at)
        window = timedelta(seconds=self.settings.rollback_window_s)
        new = self.deciding_thumbs([live.name], since=promoted_at, until=now).get(live.name, Thumbs())
        before = self.deciding_thumbs([live.predecessor], since=promoted_at - window,
                                       until=promoted_at).get(live.predecessor, Thumbs())
        rule = RollbackRule.from_settings(self.settings)
        if not rollback_due(new.up, new.n, before.up, before.n, rule):
            return
        reason = (f"thumbs-up {_rate(new)} (n={new.n}) fell below its predecessor's {_rate(before)} "
                  f"(n={before.n}, the {window.total_seconds():.0f} s before its promotion): the likelihood ratio "
                  f"of a drop of {rule.effect} reached 1/alpha = {1 / rule.alpha:.0f}")
        self.registry.rollback(self.kind, actor=ROLLBACK_ACTOR, reason=reason, expect_live=live.name,
                               details={**_counts(new, before), "predecessor": live.predecessor,
                                        "log_lr": _log_lr(new, before, -rule.effect), "alpha": rule.alpha,
                                        "effect": rule.effect, "window_s": window.total_seconds(),
                                        "max_ratings_per_user": self.settings.max_ratings_per_user})
        log.warning("rolled back %s: %s", live.name, reason)

    def deciding_thumbs(self, versions: list[str | None], *, since: datetime,
                         until: datetime) -> dict[str | None, Thumbs]:
        """The ratings a decision may count: requested through the alias (pinned requests chose their version),
        identified users only, each user's first ``max_ratings_per_user`` rated completions per version."""
        return self.registry.thumbs(versions, since=since, until=until, requested_model=self.settings.model_alias,
                                    max_per_user=self.settings.max_ratings_per_user)

    def deciding_votes(self, canary: str, live: str | None, *, since: datetime, until: datetime) -> Votes:
        """The paired votes a decision may count, on the same terms as ``deciding_thumbs``."""
        return self.registry.votes(canary, live, since=since, until=until, requested_model=self.settings.model_alias,
                                   max_per_user=self.settings.max_ratings_per_user)

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


def _counts(new: Thumbs, reference: Thumbs) -> dict:
    return {"new_up": new.up, "new_n": new.n, "reference_up": reference.up, "reference_n": reference.n}


def _log_lr(new: Thumbs, reference: Thumbs, effect: float) -> float | None:
    return float(difference_log_lr(new.up, new.n, reference.up, reference.n, effect)) if new.n and reference.n else None


def _rate(thumbs: Thumbs) -> str:
    return "-" if thumbs.rate is None else f"{thumbs.rate:.3f}"


def _canary_reason(outcome: Outcome, new: Thumbs, live: Thumbs, votes: Votes, rule: CanaryRule) -> str:
    rates = f"thumbs-up {_rate(new)} (n={new.n}) against live's {_rate(live)} (n={live.n})"
    if votes.n:
        rates += f", preferred in {votes.won} of {votes.n} paired votes"
    return {
        Outcome.PROMOTE: f"{rates}: better than live (SPRT, alpha={rule.alpha}, beta={rule.beta})",
        Outcome.REJECT: f"{rates}: not better than live by {rule.effect} (SPRT, alpha={rule.alpha}, beta={rule.beta})",
        Outcome.CAP: f"{rates}: no evidence either way within {rule.max_ratings} ratings",
    }[outcome]


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every timestamp liveloop writes is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- binomial simulation of the rules (tests/core/test_promotion.py, bench/canary.py) ----------------------------


def latent_preference(p_canary, p_live):
    """P(canary preferred) in a paired vote, for thumbs-up rates ``p_canary`` and ``p_live`` (Thurstone's model): a
    rater sees an answer's quality plus N(0, 1) noise, presses thumbs up when it is above their threshold and
    prefers the better of two answers, so P = Φ((Φ⁻¹(p_canary) − Φ⁻¹(p_live)) / √2). Ten points better at a
    thumbs-up rate of 0.3 is preferred 57.6 % of the time."""
    z = NormalDist().inv_cdf
    return NormalDist().cdf((z(p_canary) - z(p_live)) / math.sqrt(2))


def coin_preference(p_canary, p_live):
    """P(canary preferred) when a vote is only two thumbs, a coin deciding between two ups or two downs:
    ½ + (p_canary − p_live)/2. The least a vote can carry; ten points better is preferred 55 % of the time."""
    return 0.5 + (np.asarray(p_canary) - np.asarray(p_live)) / 2


def simulate_canaries(p_canary: float, p_live: float, rule: CanaryRule, *, fraction: float, canaries: int,
                      seed: int, comparisons: float = 0.0,
                      preference=latent_preference) -> tuple[np.ndarray, np.ndarray]:
    """``canaries`` independent canaries whose ratings arrive one at a time from users on the canary's side with
    probability ``fraction``. A rating is a comparison of two answers with probability ``comparisons``, else a
    thumb, up with its side's rate; a comparison by a user of the canary's side is a paired vote, won by the canary
    with probability ``preference(p_canary, p_live)``, one by another user compares two live answers and says
    nothing of the canary. ``canary_outcome`` looks after every rating (the most often production can look).
    Returns each canary's outcome and the ratings (of every user, thumbs and comparisons) it took."""
    rng = np.random.default_rng(seed)
    in_slice = rng.random((canaries, rule.max_ratings)) < fraction  # (C, N)
    p_up = np.where(in_slice, p_canary, p_live)
    return _first_decisions(in_slice, p_up, preference(p_canary, p_live), comparisons, rule, rng)


def simulate_user_canaries(p_canary: float, p_live: float, rule: CanaryRule, *, fraction: float, users: int,
                           rate_sd: float, canaries: int, seed: int, comparisons: float = 0.0,
                           preference=latent_preference) -> tuple[np.ndarray, np.ndarray]:
    """As ``simulate_canaries``, but the ratings come from ``users`` users taking turns at random, each on one side
    for the whole canary (as the stable hash puts them), and each with a thumbs-up rate of their own: Beta with
    mean ``p_live`` and standard deviation ``rate_sd``, plus ``p_canary − p_live`` when served the canary. A
    user's vote follows ``preference`` at their own two rates."""
    rng = np.random.default_rng(seed)
    if rate_sd > 0:
        strength = p_live * (1 - p_live) / rate_sd**2 - 1
        rates = rng.beta(p_live * strength, (1 - p_live) * strength, size=(canaries, users))  # (C, U)
    else:
        rates = np.full((canaries, users), p_live)
    inside = rng.random((canaries, users)) < fraction  # (C, U)
    who = rng.integers(0, users, size=(canaries, rule.max_ratings))  # (C, N)
    canary_rates = np.clip(rates + p_canary - p_live, 1e-6, 1 - 1e-6)  # (C, U)
    preferred = np.vectorize(preference)(canary_rates, rates) if comparisons > 0 else np.full_like(rates, 0.5)
    in_slice = np.take_along_axis(inside, who, axis=1)
    p_up = np.take_along_axis(np.where(inside, canary_rates, rates), who, axis=1)
    return _first_decisions(in_slice, p_up, np.take_along_axis(preferred, who, axis=1), comparisons, rule, rng)


def _first_decisions(in_slice: np.ndarray, p_up: np.ndarray, preferred, comparisons: float, rule: CanaryRule,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each row's outcome at its first look that decides, and the ratings that took; looks after every rating.
    ``in_slice`` (C, N): the rater is on the canary's side; ``p_up`` (C, N): the thumbs-up rate of what they rate;
    ``preferred``: P(canary preferred) of a vote."""
    up = rng.random(in_slice.shape) < p_up  # (C, N)
    compared = np.zeros_like(in_slice)  # with no comparisons, no draws: the thumbs-only figures stay as they were
    won = np.zeros_like(in_slice)
    if comparisons > 0:
        compared = rng.random(in_slice.shape) < comparisons
        won = rng.random(in_slice.shape) < preferred
    vote, on_canary, on_live = in_slice & compared, in_slice & ~compared, ~in_slice & ~compared
    outcomes = canary_outcome(np.cumsum(up & on_canary, axis=1), np.cumsum(on_canary, axis=1),
                              np.cumsum(up & on_live, axis=1), np.cumsum(on_live, axis=1), rule,
                              np.arange(1, in_slice.shape[1] + 1),  # every rating counts towards the cap
                              wins=np.cumsum(vote & won, axis=1), votes=np.cumsum(vote, axis=1))
    first = np.argmax(outcomes != Outcome.CONTINUE, axis=1)  # the last column is decided (CAP at the latest)
    return outcomes[np.arange(len(outcomes)), first], first + 1


def simulate_rollbacks(p_new: float, p_reference: float, rule: RollbackRule, *, reference_n: int, watched: int,
                       runs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``runs`` promotions: a reference of ``reference_n`` ratings, then up to ``watched`` ratings of the new
    version, ``rollback_due`` looked at after each. Returns whether each rolled back and after how many ratings."""
    rng = np.random.default_rng(seed)
    reference_up = rng.binomial(reference_n, p_reference, size=(runs, 1))  # (R, 1)
    new_up = np.cumsum(rng.random((runs, watched)) < p_new, axis=1)  # (R, W)
    due = rollback_due(new_up, np.arange(1, watched + 1), reference_up, reference_n, rule)
    return due.any(axis=1), np.argmax(due, axis=1) + 1
