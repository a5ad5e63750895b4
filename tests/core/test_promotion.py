from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from liveloop.promotion import Promoter, compare, in_canary
from liveloop.registry import State, Thumbs
from liveloop.tables import utcnow


def approve(registry, make_adapter_dir, name: str, seed: int = 0) -> None:
    registry.register(name, make_adapter_dir(name, seed=seed))
    registry.judge(name, report={}, failed=[])


@pytest.fixture
def promoter(registry, make_settings):
    def make(**overrides) -> Promoter:
        settings = make_settings(**{"canary_fraction": 0.1, "canary_min_ratings": 100, "rollback_min_ratings": 100,
                                    **overrides})
        return Promoter(registry, settings)

    return make


def test_z_test_matches_hand_computed_values():
    test = compare(Thumbs(up=40, down=60), Thumbs(up=60, down=40))
    # pooled p = 0.5, se = sqrt(0.25 · (1/100 + 1/100)) = 0.0707; z = -0.2 / 0.0707 = -2.828
    assert test.z == pytest.approx(-2.8284, abs=1e-4) and test.p_value == pytest.approx(0.002339, abs=1e-5)
    assert compare(Thumbs(up=60, down=40), Thumbs(up=40, down=60)).p_value == pytest.approx(1 - 0.002339, abs=1e-5)
    assert compare(Thumbs(up=10), Thumbs(up=5)).p_value == 0.5  # both all-up: no evidence either way


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
    assert registry.audit("a")[0].details == {"fraction": 0.1}
    approve(registry, make_adapter_dir, "b", seed=1)
    promoter().after_gates("b")  # a canary is running: b waits
    assert registry.get("b").state == "approved"
    approve(registry, make_adapter_dir, "c", seed=2)
    promoter(canary_fraction=0.0).after_gates("c")
    assert registry.routing().live == "c"


def test_manual_policy_leaves_approved_versions_to_an_engineer(registry, make_adapter_dir, promoter):
    approve(registry, make_adapter_dir, "a")
    manual = promoter(promotion_policy="manual")
    manual.after_gates("a")
    manual.tick()
    assert registry.get("a").state == "approved"


def test_a_canary_not_worse_than_live_is_promoted_with_its_statistics(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "live")
    registry.promote("live", actor="alice", reason="x")
    approve(registry, make_adapter_dir, "cand", seed=1)
    promoter().after_gates("cand")
    rate("cand", up=48, down=51)
    rate("live", up=50, down=50)
    rate("live", up=0, down=100, at=utcnow() - timedelta(days=1))  # before the canary: not compared
    promoter().tick()
    assert registry.get("cand").state == "canary"  # 100 ratings on the canary side are needed
    rate("cand", up=1)
    promoter().tick()
    assert registry.routing().live == "cand" and registry.get("live").state == "retired"
    decision = registry.audit("cand")[0]
    assert (decision.actor, decision.from_state, decision.to_state) == ("canary", "canary", "promoted")
    assert (decision.details["new_up"], decision.details["new_n"]) == (49, 100)
    assert (decision.details["reference_up"], decision.details["reference_n"]) == (50, 100)
    assert decision.details["p_value"] > 0.05 and "not significantly below" in decision.reason


def test_a_canary_significantly_worse_than_live_is_rejected(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    rate("cand", up=30, down=70)
    rate(None, up=60, down=40)  # the base model is live
    promoter().tick()
    assert registry.get("cand").state == "rejected" and registry.routing().live is None
    decision = registry.audit("cand")[0]
    assert decision.details["p_value"] < 0.05 and decision.details["live"] is None
    assert "significantly below live's 0.600" in decision.reason


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
    assert decision.details["p_value"] < 0.01 and decision.details["new_n"] == 100
    promoter().tick(now=utcnow() + timedelta(hours=1))  # 'old' came back by rollback: not watched
    assert registry.routing().live == "old"


def test_no_rollback_without_a_significant_drop_or_after_the_window(registry, make_adapter_dir, promoter, rate):
    promote_over(registry, make_adapter_dir, rate, before=(70, 30), after=(40, 60))
    promoter(rollback_window_s=3600).tick(now=utcnow() + timedelta(hours=2))  # the window has closed
    promoter(rollback_alpha=1e-12).tick(now=utcnow() + timedelta(minutes=50))  # not significant enough
    promoter(rollback_min_ratings=101).tick(now=utcnow() + timedelta(minutes=50))  # too few ratings
    assert registry.routing().live == "new"
    assert registry.audit("new")[0].to_state == State.PROMOTED


def test_monitors_in_several_processes_decide_a_canary_once(registry, make_adapter_dir, promoter, rate):
    approve(registry, make_adapter_dir, "cand")
    promoter().after_gates("cand")
    rate("cand", up=50, down=50)
    rate(None, up=50, down=50)
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
