"""The loop's state as the trainer exports it to Prometheus, computed from the registry and the ratings."""

from __future__ import annotations

import math

from liveloop.state_metrics import StateCollector, wilson_interval


def _samples(collector: StateCollector) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for family in collector.collect() for s in family.samples}


def test_state_metrics_show_the_routing_the_decision_thumbs_and_the_audit(registry, registry_db, rate, compare,
                                                                           make_adapter_dir, make_settings):
    for i, verdict in enumerate(["approve", "approve", "reject", "reject"], start=1):
        registry.register(f"policy-{i}", make_adapter_dir(f"policy-{i}", scale=0.01, seed=i))
        registry.judge(f"policy-{i}", report={}, failed=[] if verdict == "approve" else ["kl"])
    registry.promote("policy-1", actor="test", reason="live")
    registry.start_canary("policy-2", actor="test", reason="canary")
    rate("policy-1", up=3, down=1)
    rate("policy-2", up=1, down=1, changed_mind=1)
    rate("policy-2", up=2, requested_model="policy-2")  # pinned: no say in the decision, served all the same
    compare("policy-2", "policy-1", first_wins=3, second_wins=1)

    samples = _samples(StateCollector(registry, registry_db.sessions, make_settings()))

    def value(name: str, **labels) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    assert value("liveloop_version_info", version="policy-1", state="promoted") == 1
    assert value("liveloop_version_info", version="policy-2", state="canary") == 1
    assert value("liveloop_version_rated_completions", version="policy-2", rating="up") == 3
    assert value("liveloop_version_rated_completions", version="policy-2", rating="down") == 1
    assert value("liveloop_decision_rated_completions", role="canary", version="policy-2", rating="up") == 1
    assert value("liveloop_decision_thumbs_up_ratio", role="live", version="policy-1") == 0.75
    assert value("liveloop_decision_paired_votes", role="canary", version="policy-2") == 3
    assert value("liveloop_decision_paired_votes", role="live", version="policy-1") == 1
    low, high = wilson_interval(3, 4)
    assert value("liveloop_decision_thumbs_up_ratio_lower", role="live", version="policy-1") == low < 0.75 < high
    assert value("liveloop_decision_thumbs_up_ratio_upper", role="live", version="policy-1") == high
    transitions = {state: value("liveloop_registry_transitions_total", to_state=state)
                   for state in ("candidate", "approved", "rejected", "canary", "promoted", "rolled_back")}
    assert transitions == {"candidate": 4, "approved": 2, "rejected": 2, "canary": 1, "promoted": 1,
                           "rolled_back": 0}
    assert value("liveloop_gate_rejections_in_a_row") == 2
    assert value("liveloop_outbox_oldest_unsent_age_seconds") >= 0
    assert not any(name == "liveloop_rating_to_version_seconds" for name, _ in samples)  # trained on nothing


def test_wilson_interval_stays_within_zero_and_one():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0 < high < 0.35
    low, high = wilson_interval(50, 100)
    assert math.isclose(low + high, 1.0) and 0.40 < low < 0.41
