from __future__ import annotations

import math
import threading
from datetime import timedelta

import numpy as np
import pytest

from liveloop.promotion import (
    CanaryRule,
    Outcome,
    Promoter,
    RollbackRule,
    canary_outcome,
    coin_preference,
    difference_log_lr,
    in_canary,
    latent_preference,
    preference_log_lr,
    simulate_canaries,
    simulate_rollbacks,
    simulate_user_canaries,
)
from liveloop.registry import Lineage, State
from liveloop.tables import utcnow


def approve(registry, make_adapter_dir, name: str, seed: int = 0, trained: int = 200, parent: str | None = None
            ) -> None:
    """Register ``name`` as trained on ``trained`` ratings (after ``parent``'s) and pass it through the gates."""
    lineage = Lineage(parent=parent, event_ids=tuple(f"{name}-event-{i}" for i in range(trained)))
    registry.register(name, make_adapter_dir(name, seed=seed), lineage=lineage)
    registry.judge(name, report={}, failed=[])


@pytest.fixture
def promoter(registry, make_settings):
    def make(**overrides) -> Promoter:
        return Promoter(registry, make_settings(**overrides))

    return make


@pytest.fixture
def defaults(make_settings):
    return make_settings()


def test_log_likelihood_ratio_matches_hand_computed_values():
    # pooled p = (75 + 40 + 1) / 202 = 0.57426; V = p(1-p)(1/100 + 1/100) = 0.0048897; d = 0.35
    # log Λ = 0.1 · 0.35 / V − 0.01 / (2V) = 7.1578 − 1.0225
    assert difference_log_lr(75, 100, 40, 100, 0.1) == pytest.approx(6.1353, abs=1e-3)
    # equal rates: d = 0, p = 81/202, V = 0.0048036, log Λ = −0.01 / (2V)
    assert difference_log_lr(40, 100, 40, 100, 0.1) == pytest.approx(-1.0409, abs=1e-3)
    assert math.isfinite(difference_log_lr(20, 20, 20, 20, 0.1))  # all up on both sides: V stays positive


def test_canary_outcome_follows_walds_boundaries():
    rule = CanaryRule(alpha=0.005, beta=0.1, effect=0.1, min_ratings=20, max_ratings=400, vote_effect=0.075)
    reject_below, promote_above = rule.bounds
    assert (reject_below, promote_above) == pytest.approx((math.log(0.1 / 0.995), math.log(0.9 / 0.005)))
    assert canary_outcome(75, 100, 40, 100, rule) == Outcome.PROMOTE
    assert canary_outcome(30, 100, 60, 100, rule) == Outcome.REJECT
    assert canary_outcome(10, 20, 10, 20, rule) == Outcome.CONTINUE
    assert canary_outcome(19, 19, 0, 100, rule) == Outcome.CONTINUE  # too few canary ratings to look
    assert canary_outcome(105, 200, 100, 200, rule) == Outcome.CAP
    batch = canary_outcome(np.array([75, 30]), 100, np.array([40, 60]), 100, rule)
    assert list(batch) == [Outcome.PROMOTE, Outcome.REJECT]


@pytest.mark.parametrize(("p_canary", "p_live", "wanted", "at_least"), [
    (0.3, 0.3, Outcome.PROMOTE, None),  # random raters: promoted in < 1 %
    (0.4, 0.3, Outcome.PROMOTE, 0.80),  # 10 points better: promoted in ≥ 80 %
    (0.2, 0.3, Outcome.REJECT, 0.95),  # 10 points worse: rejected in ≥ 95 %
])
def test_simulated_canaries_meet_the_error_rates_at_the_defaults(defaults, p_canary, p_live, wanted, at_least):
    rule = CanaryRule.from_settings(defaults)
    outcomes, ratings = simulate_canaries(p_canary, p_live, rule, fraction=defaults.canary_fraction,
                                          canaries=1000, seed=14)
    share = float(np.mean(outcomes == wanted))
    if at_least is None:
        assert share < 0.01
    else:
        assert share >= at_least
    assert not np.any(outcomes == Outcome.CONTINUE) and ratings.max() <= defaults.canary_max_ratings


def test_vote_log_likelihood_ratio_matches_hand_computed_values():
    # 60 of 100 votes for the canary: 60·log(1.15) + 40·log(0.85) = 8.385714 − 6.500756
    assert preference_log_lr(60, 100, 0.075) == pytest.approx(1.884958, abs=1e-5)
    assert preference_log_lr(50, 100, 0.075) == pytest.approx(-1.137850, abs=1e-5)  # an even split favours H0
    assert preference_log_lr(0, 0, 0.075) == 0


def test_votes_and_thumbs_add_up_in_one_test():
    rule = CanaryRule(alpha=0.005, beta=0.1, effect=0.1, min_ratings=20, max_ratings=1600, vote_effect=0.075)
    # thumbs 70/100 against 40/100: log Λ 5.05, short of log(0.9/0.005) = 5.19; one vote won adds 0.140, two 0.280
    assert canary_outcome(70, 100, 40, 100, rule, wins=1, votes=1) == Outcome.CONTINUE
    assert canary_outcome(70, 100, 40, 100, rule, wins=2, votes=2) == Outcome.PROMOTE
    # votes decide alone, thumbs too few to count, once there are min_ratings of them
    assert canary_outcome(5, 5, 0, 5, rule, wins=19, votes=19) == Outcome.CONTINUE
    assert canary_outcome(5, 5, 0, 5, rule, wins=38, votes=38) == Outcome.PROMOTE  # 38 · 0.140 = 5.31
    assert canary_outcome(0, 0, 0, 0, rule, wins=5, votes=25) == Outcome.REJECT  # 0.70 − 3.25 < log(0.1/0.995)
    assert canary_outcome(0, 0, 0, 0, rule, wins=10, votes=20, collected=1600) == Outcome.CAP  # votes count to the cap


def test_a_vote_carries_what_thurstones_rater_sees():
    assert latent_preference(0.3, 0.3) == pytest.approx(0.5)
    assert latent_preference(0.4, 0.3) == pytest.approx(0.576, abs=1e-3)
    assert latent_preference(0.2, 0.3) == pytest.approx(1 - latent_preference(0.3, 0.2))
    assert coin_preference(0.4, 0.3) == pytest.approx(0.55)


@pytest.mark.parametrize(("p_canary", "wanted", "at_least"), [
    (0.3, Outcome.PROMOTE, None),  # random raters: promoted in < 1 %
    (0.4, Outcome.PROMOTE, 0.80),  # 10 points better: promoted in ≥ 80 %
    (0.2, Outcome.REJECT, 0.95),  # 10 points worse: rejected in ≥ 95 %
])
def test_simulated_head_to_head_canaries_meet_the_error_rates_at_the_defaults(defaults, p_canary, wanted, at_least):
    rule = CanaryRule.from_settings(defaults)
    outcomes, _ = simulate_canaries(p_canary, 0.3, rule, fraction=defaults.canary_fraction, comparisons=1.0,
                                    canaries=1000, seed=14)
    share = float(np.mean(outcomes == wanted))
    assert share < 0.01 if at_least is None else share >= at_least
    assert not np.any(outcomes == Outcome.CONTINUE)


def test_head_to_head_decides_on_fewer_ratings_than_thumbs(defaults):
    """At the same α and β: the votes of users who each compare live with canary decide sooner than thumbs."""
    rule = CanaryRule.from_settings(defaults)
    for p_canary in (0.3, 0.4):
        _, thumbs = simulate_canaries(p_canary, 0.3, rule, fraction=defaults.canary_fraction, canaries=1000, seed=3)
        _, votes = simulate_canaries(p_canary, 0.3, rule, fraction=1.0, comparisons=1.0, canaries=1000, seed=3)
        assert np.median(votes) < 0.75 * np.median(thumbs)


def test_votes_keep_the_error_rate_where_users_of_unlike_habits_break_thumbs(defaults):
    """Eight users whose own thumbs-up rates differ (sd 0.1): a difference of thumbs between two groups of users
    measures the users, a paired vote the versions."""
    rule = CanaryRule.from_settings(defaults)
    kwargs = dict(fraction=defaults.canary_fraction, users=8, rate_sd=0.1, canaries=1000, seed=8)
    thumbs, _ = simulate_user_canaries(0.3, 0.3, rule, **kwargs)
    votes, _ = simulate_user_canaries(0.3, 0.3, rule, comparisons=1.0, **kwargs)
    assert np.mean(votes == Outcome.PROMOTE) < 0.01 < 0.05 < np.mean(thumbs == Outcome.PROMOTE)


def test_simulated_rollbacks_are_rare_for_an_equal_version_and_usual_for_a_drop(defaults):
    rule = RollbackRule.from_settings(defaults)
    equal, _ = simulate_rollbacks(0.3, 0.3, rule, reference_n=400, watched=2000, runs=1000, seed=14)
    drop, after = simulate_rollbacks(0.2, 0.3, rule, reference_n=400, watched=2000, runs=1000, seed=15)
    assert equal.mean() < defaults.rollback_alpha and drop.mean() >= 0.8
    assert np.median(after[drop]) < 500


def test_settings_refuse_a_cap_below_the_ratings_needed_to_look(make_settings):
    with pytest.raises(ValueError, match="LIVELOOP_CANARY_MAX_RATINGS"):
        make_settings(canary_min_ratings=50, canary_max_ratings=99)


def test_canary_users_are_a_stable_fraction_chosen_per_canary():
    users = [f"user-{i}" for i in range(20_000)]
    chosen = {u for u in users if in_canary(u, "v7", 0.1)}
    assert 0.09 < len(chosen) / len(users) < 0.11
    assert chosen == {u for u in users if in_canary(u, "v7", 0.1)}  # stable
    assert chosen != {u for u in users if in_canary(u, "v8", 0.1)}  # another canary, another slice
    assert not in_canary(None, "v7", 0.99) and not any(in_canary(u, "v7", 0.0) for u in users[:100])


def test_auto_policy_starts_a_canary_or_promotes_when_canary_is_off(registry, make_adapter_dir, promoter):
    approve(registry, make_adapter_dir, "a")
    promoter().after_gates("a")
    assert registry.get("a").state == "canary"
    assert registry.audit("a")[0].details == {"fraction": 0.5}
    approve(registry, make_adapter_dir, "b", seed=1)
    promoter().after_gates("b")  # a canary is running: b waits
    assert registry.get("b").state == "approved"
    approve(registry, make_adapter_dir, "c", seed=2)
    promoter(canary_fraction=0.0).after_gates("c")
    assert registry.routing().live == "c"


def test_a_canary_waits_until_the_lineage_has_trained_on_enough_ratings(registry, make_adapter_dir, promoter):
    needed = promoter().settings.canary_min_trained_ratings
    approve(registry, make_adapter_dir, "young", trained=needed // 2)
    promoter().after_gates("young")
    assert registry.get("young").state == "approved"  # a first handful of ratings: not worth a canary
    approve(registry, make_adapter_dir, "older", seed=1, trained=needed - needed // 2, parent="young")
    promoter().after_gates("older")  # its lineage counts its parent's ratings too
    assert registry.get("older").state == "canary"


def test_manual_policy_leaves_approved_versions_to_an_engineer(registry, make_adapter_dir, promoter):
    approve(registry, make_adapter_dir, "a")
    manual = promoter(promotion_policy="manual")
    manual.after_gates("a")
    manual.tick()
    assert registry.get("a").state == "approved"


def test_a_canary_better_than_live_is_promoted_with_its_statistics(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "live")
    registry.promote("live", actor="alice", reason="x")
    approve(registry, make_adapter_dir, "cand", seed=1)
    promoter().after_gates("cand")
    rate("cand", up=70, down=30)
    rate("live", up=40, down=60)
    rate("live", up=100, at=utcnow() - timedelta(days=1))  # before the canary: not compared
    promoter().tick()
    assert registry.get("cand").state == "canary"  # log Λ 5.05: not yet past log(0.9/0.005) = 5.19
    rate("cand", up=5)
    promoter().tick()
    assert registry.routing().live == "cand" and registry.get("live").state == "retired"
    decision = registry.audit("cand")[0]
    assert (decision.actor, decision.from_state, decision.to_state) == ("canary", "canary", "promoted")
    assert (decision.details["new_up"], decision.details["new_n"]) == (75, 105)
    assert (decision.details["reference_up"], decision.details["reference_n"]) == (40, 100)
    assert decision.details["outcome"] == "promote" and decision.details["log_lr"] > decision.details["bounds"][1]
    assert "better than live" in decision.reason


def test_a_canary_not_better_than_live_is_rejected(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    rate("cand", up=30, down=70)
    rate(None, up=60, down=40)  # the base model is live
    promoter().tick()
    assert registry.get("cand").state == "rejected" and registry.routing().live is None
    decision = registry.audit("cand")[0]
    assert decision.details["outcome"] == "reject" and decision.details["live"] is None
    assert "not better than live by 0.1" in decision.reason


def test_a_canary_without_evidence_at_the_cap_is_rejected_and_says_so(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    rate("cand", up=11, down=9)
    rate(None, up=10, down=10)
    promoter(canary_max_ratings=41).tick()
    assert registry.get("cand").state == "canary"
    promoter(canary_max_ratings=40).tick()
    decision = registry.audit("cand")[0]
    assert decision.to_state == "rejected" and decision.details["outcome"] == "cap"
    assert "no evidence either way within 40 ratings" in decision.reason


def test_a_canary_of_few_capped_users_still_ends_at_the_cap(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    rate("cand", up=30, down=30, user="alice")  # 10 of them count: too few to look
    rate(None, up=20, down=19, user="bob")
    promoter(max_ratings_per_user=10, canary_max_ratings=100).tick()
    assert registry.get("cand").state == "canary"
    rate(None, down=1, user="bob")
    promoter(max_ratings_per_user=10, canary_max_ratings=100).tick()
    decision = registry.audit("cand")[0]
    assert (decision.to_state, decision.details["outcome"], decision.details["collected"]) == ("rejected", "cap", 100)
    assert (decision.details["new_n"], decision.details["reference_n"]) == (10, 10)


def test_pinned_anonymous_and_excess_ratings_do_not_decide_a_canary(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    rate("cand", up=45, down=55)
    rate(None, up=50, down=50)
    rate("cand", up=500, requested_model="cand")  # asked for the canary by name
    rate(None, down=500, requested_model="SmolLM2-135M-Instruct")  # asked for the base model by name
    rate("cand", up=500, user=None)  # no identity: never in the canary slice
    rate("cand", up=500, user="scripted")  # one key: counts for max_ratings_per_user
    promoter(max_ratings_per_user=5).tick()
    assert registry.get("cand").state == "canary"
    assert registry.thumbs(["cand"])["cand"].n == 1600  # what `adapters list` shows still counts everything
    promoter().tick()  # the default cap (200) is sized for a few users: against 100 others, one key still wins
    assert registry.routing().live == "cand"


def test_a_canary_preferred_head_to_head_is_promoted_on_paired_votes(registry, make_adapter_dir, promoter, rate,
                                                                      compare):
    approve(registry, make_adapter_dir, "live")
    registry.promote("live", actor="alice", reason="x")
    approve(registry, make_adapter_dir, "cand", seed=1)
    promoter().after_gates("cand")
    rate("cand", up=5)  # too few thumbs to count
    compare("cand", "live", first_wins=40, second_wins=5, changed_mind=2)  # the latest ranking counts
    compare("live", "cand", first_wins=100, requested_model="cand")  # pinned: no say
    compare("live", "live", first_wins=100)  # no vote
    compare("cand", "live", second_wins=50, at=utcnow() - timedelta(days=1))  # before the canary
    promoter().tick()
    assert registry.get("cand").state == "canary"  # 40 · log 1.15 − 5 · log(1/0.85) = 4.78 < 5.19
    compare("live", "cand", second_wins=4)
    promoter().tick()
    assert registry.routing().live == "cand"
    decision = registry.audit("cand")[0]
    assert (decision.details["votes_won"], decision.details["votes_n"]) == (44, 49)
    assert decision.details["outcome"] == "promote" and decision.details["log_lr"] > decision.details["bounds"][1]
    assert decision.details["collected"] == 5 + 49 + 100  # the comparisons of live with live count to the cap
    assert "preferred in 44 of 49 paired votes" in decision.reason


def test_a_canary_that_loses_head_to_head_is_rejected(registry, make_adapter_dir, promoter, compare):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    compare("cand", None, first_wins=5, second_wins=25)  # the base model is live
    promoter().tick()
    decision = registry.audit("cand")[0]
    assert decision.to_state == "rejected" and decision.details["outcome"] == "reject"
    assert (decision.details["votes_won"], decision.details["votes_n"]) == (5, 30)
    assert "not better than live by 0.1" in decision.reason


def test_votes_beyond_a_users_cap_or_of_no_identity_do_not_count(registry, make_adapter_dir, promoter, compare):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    compare("cand", None, first_wins=60, user="scripted")  # one key: its first 10 count
    compare("cand", None, first_wins=60, user=None)  # no identity: never in the canary slice
    compare("cand", None, first_wins=10, second_wins=10)
    promoter(max_ratings_per_user=10).tick()
    assert registry.get("cand").state == "canary"
    votes = promoter(max_ratings_per_user=10).deciding_votes("cand", None, since=utcnow() - timedelta(hours=1),
                                                             until=utcnow())
    assert (votes.won, votes.n, votes.compared) == (20, 30, 140)


def test_the_next_approved_version_starts_its_canary_when_one_ends(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "first")
    promoter().after_gates("first")
    approve(registry, make_adapter_dir, "second", seed=1)
    approve(registry, make_adapter_dir, "third", seed=2)
    rate("first", up=10, down=90)
    rate(None, up=90, down=10)
    promoter().tick()
    assert registry.get("first").state == "rejected"
    assert (registry.get("second").state, registry.get("third").state) == ("approved", "canary")  # newest first


def test_an_undecided_canary_gives_way_to_a_newer_version_trained_from_it(registry, make_adapter_dir, promoter,
                                                                           rate):
    approve(registry, make_adapter_dir, "first")
    promoter().after_gates("first")
    approve(registry, make_adapter_dir, "other", seed=1)  # newer, but not trained from the canary
    rate("first", up=12, down=28)
    rate(None, up=10, down=30)  # 80 ratings, about equal: no decision
    promoter(canary_supersede_ratings=80).tick()
    assert registry.get("first").state == "canary"  # nothing newer descends from it
    approve(registry, make_adapter_dir, "second", seed=2, parent="first")
    promoter(canary_supersede_ratings=81).tick()
    assert registry.get("first").state == "canary"  # not yet at the limit
    promoter(canary_supersede_ratings=0).tick()
    assert registry.get("first").state == "canary"  # 0: never
    promoter(canary_supersede_ratings=80).tick()
    decision = registry.audit("first")[0]
    assert decision.to_state == "rejected" and decision.details["superseded_by"] == "second"
    assert "undecided after 80 ratings" in decision.reason
    assert registry.get("second").state == "canary" and registry.get("other").state == "approved"


def test_an_approved_version_is_wanted_while_the_canary_slot_could_take_it(registry, make_adapter_dir, promoter,
                                                                          rate):
    assert promoter().wants_candidate()  # no canary
    approve(registry, make_adapter_dir, "first")
    promoter().after_gates("first")
    assert not promoter().wants_candidate()  # a canary just started holds the slot
    assert promoter(promotion_policy="manual").wants_candidate()  # an engineer may promote any approved version
    rate("first", up=12, down=28)
    rate(None, up=10, down=30)
    assert not promoter(canary_supersede_ratings=161).wants_candidate()
    # half-way to giving way: a successor is gated while the canary runs on
    assert promoter(canary_supersede_ratings=160).wants_candidate()
    assert not promoter(canary_supersede_ratings=0).wants_candidate()  # 0: a canary never gives way


def promote_over(registry, make_adapter_dir, rate, *, before: tuple[int, int], after: tuple[int, int]):
    """'old' live for an hour with ``before`` ratings, then 'new' promoted and rated ``after``."""
    approve(registry, make_adapter_dir, "old")
    registry.promote("old", actor="alice", reason="x")
    approve(registry, make_adapter_dir, "new", seed=1)
    registry.promote("new", actor="alice", reason="x")
    rate("old", up=before[0], down=before[1], at=utcnow() - timedelta(minutes=30))
    rate("new", up=after[0], down=after[1])


def test_a_new_version_whose_thumbs_drop_is_rolled_back(registry, make_adapter_dir, promoter, rate):
    promote_over(registry, make_adapter_dir, rate, before=(70, 30), after=(40, 60))
    promoter().tick(now=utcnow() + timedelta(hours=1))
    assert registry.routing().live == "old" and registry.get("new").state == "rolled_back"
    decision = registry.audit("new")[0]
    assert (decision.actor, decision.details["predecessor"]) == ("rollback-monitor", "old")
    assert decision.details["log_lr"] >= math.log(100) and decision.details["new_n"] == 100
    promoter().tick(now=utcnow() + timedelta(hours=1))  # 'old' came back by rollback: not watched
    assert registry.routing().live == "old"


def test_no_rollback_without_evidence_of_a_drop_or_after_the_window(registry, make_adapter_dir, promoter, rate):
    promote_over(registry, make_adapter_dir, rate, before=(70, 30), after=(40, 60))
    promoter(rollback_window_s=3600).tick(now=utcnow() + timedelta(hours=2))  # the window has closed
    promoter(rollback_alpha=1e-12).tick(now=utcnow() + timedelta(minutes=50))  # not enough evidence for that
    promoter(rollback_min_ratings=101).tick(now=utcnow() + timedelta(minutes=50))  # too few ratings
    promoter(rollback_window_s=600).tick(now=utcnow() + timedelta(minutes=5))  # the reference is before 'old' was rated
    assert registry.routing().live == "new"
    assert registry.audit("new")[0].to_state == State.PROMOTED


def test_no_rollback_for_a_new_version_as_good_as_its_predecessor(registry, make_adapter_dir, promoter, rate):
    promote_over(registry, make_adapter_dir, rate, before=(70, 30), after=(66, 34))
    for minutes in (10, 20, 30, 40):  # many looks at the same evidence
        promoter().tick(now=utcnow() + timedelta(minutes=minutes))
    assert registry.routing().live == "new"


def test_monitors_in_several_processes_decide_a_canary_once(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    rate("cand", up=75, down=25)
    rate(None, up=40, down=60)
    monitors = [promoter() for _ in range(4)]
    barrier = threading.Barrier(len(monitors))

    def tick(monitor: Promoter) -> None:
        barrier.wait()
        monitor.tick()

    threads = [threading.Thread(target=tick, args=(m,)) for m in monitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.routing().live == "cand"
    assert [t.to_state for t in registry.audit("cand")].count("promoted") == 1
