from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from liveloop.adapter_artifacts import WEIGHTS, AdapterArtifactError
from liveloop.registry import IllegalTransition, Kind, Lineage, NameTaken, Registry, State, Thumbs, UnknownVersion
from liveloop.tables import AdapterTransition, OutboxMessage, utcnow


def approved(registry: Registry, make_adapter_dir, name: str, seed: int = 0) -> None:
    registry.register(name, make_adapter_dir(name, seed=seed))
    registry.judge(name, report={"gates": []}, failed=[])


def transitions(registry: Registry, name: str) -> list[tuple[str | None, str, str]]:
    return [(t.from_state, t.to_state, t.actor) for t in reversed(registry.audit(name))]


def test_register_records_candidate_with_lineage_metrics_and_audit(registry, make_adapter_dir):
    registry.register("v1", make_adapter_dir("v1"))
    lineage = Lineage(parent="v1", reward_source="direct", event_ids=("e1", "e2"), kafka_offsets={"feedback:0": 42})
    version = registry.register("v2", make_adapter_dir("v2", seed=1), lineage=lineage,
                                training_metrics={"kl": 0.01, "reward_mean": 0.3})
    stored = registry.get("v2")
    assert (stored.state, stored.kind, stored.parent, stored.reward_source) == ("candidate", "policy", "v1", "direct")
    assert stored.consumed_event_ids == ["e1", "e2"] and stored.kafka_offsets == {"feedback:0": 42}
    assert stored.training_metrics == {"kl": 0.01, "reward_mean": 0.3} and stored.sha256 == version.sha256
    assert registry.artifact("v2").is_dir()
    assert transitions(registry, "v2") == [(None, "candidate", "trainer")]


def test_a_name_is_never_reused_for_other_weights(registry, make_adapter_dir):
    first = registry.register("v1", make_adapter_dir("v1", seed=0))
    assert registry.register("v1", make_adapter_dir("v1-again", seed=0)).sha256 == first.sha256  # a retry
    with pytest.raises(NameTaken):
        registry.register("v1", make_adapter_dir("v1-other", seed=1))
    assert registry.get("v1").sha256 == first.sha256 and len(registry.audit("v1")) == 1


def test_unknown_versions_and_parents_are_refused(registry, make_adapter_dir):
    with pytest.raises(UnknownVersion):
        registry.promote("nope", actor="alice", reason="x")
    with pytest.raises(Exception, match="(?i)foreign key"):
        registry.register("orphan", make_adapter_dir("orphan"), lineage=Lineage(parent="nope"))


def test_gate_report_is_stored_and_failed_gates_reject(registry, make_adapter_dir):
    registry.register("bad", make_adapter_dir("bad"))
    report = {"passed": False, "gates": [{"name": "kl", "value": 3.0, "threshold": 0.5, "passed": False}]}
    registry.judge("bad", report=report, failed=["kl"])
    assert registry.get("bad").state == "rejected" and registry.get("bad").gate_report == report
    assert registry.audit("bad")[0].reason == "failed gates: kl"
    with pytest.raises(IllegalTransition):  # rejected is final
        registry.promote("bad", actor="alice", reason="override")


def test_promotion_retires_the_live_version_and_rollback_returns_to_it(registry, make_adapter_dir):
    for seed, name in enumerate(["v1", "v2"]):
        approved(registry, make_adapter_dir, name, seed)
    assert registry.routing().live is None  # the base model serves
    registry.promote("v1", actor="alice", reason="looks good")
    registry.start_canary("v2", actor="canary", reason="gates passed", details={"fraction": 0.1})
    assert (registry.routing().live, registry.routing().canary) == ("v1", "v2")
    registry.promote("v2", actor="canary", reason="not worse", details={"p_value": 0.4})
    assert [(v.name, v.state) for v in registry.versions()] == [("v2", "promoted"), ("v1", "retired")]
    assert registry.get("v2").predecessor == "v1"

    assert registry.rollback(actor="bob", reason="complaints").name == "v1"
    assert (registry.get("v1").state, registry.get("v2").state) == ("promoted", "rolled_back")
    assert transitions(registry, "v2") == [(None, "candidate", "trainer"), ("candidate", "approved", "gate"),
                                           ("approved", "canary", "canary"), ("canary", "promoted", "canary"),
                                           ("promoted", "rolled_back", "bob")]
    assert registry.audit("v2")[1].details == {"p_value": 0.4}
    assert registry.rollback(actor="bob", reason="back to base") is None  # v1 replaced the base model
    assert registry.routing().live is None


def test_illegal_transitions_raise_and_change_nothing(registry, make_adapter_dir):
    registry.register("cand", make_adapter_dir("cand"))
    approved(registry, make_adapter_dir, "a", 1)
    approved(registry, make_adapter_dir, "b", 2)
    with pytest.raises(IllegalTransition, match="nothing to roll back"):
        registry.rollback(actor="bob", reason="x")
    with pytest.raises(IllegalTransition, match="candidate → promoted"):
        registry.promote("cand", actor="alice", reason="skip the gates")
    registry.start_canary("a", actor="canary", reason="x")
    with pytest.raises(IllegalTransition, match="a is already in canary"):
        registry.start_canary("b", actor="canary", reason="x")
    registry.promote("b", actor="alice", reason="x")
    with pytest.raises(IllegalTransition):
        registry.promote("b", actor="alice", reason="already live")
    with pytest.raises(IllegalTransition):
        registry.reject("b", actor="alice", reason="live versions are rolled back, not rejected")
    with pytest.raises(IllegalTransition, match="retired"):
        registry.rollback(to="a", actor="bob", reason="a never was live")
    assert {v.name: v.state for v in registry.versions()} == {"cand": "candidate", "a": "canary", "b": "promoted"}


def test_routing_revision_grows_and_each_transition_announces_routing(registry_db, make_adapter_dir):
    registry = registry_db.registry
    before = registry.routing().revision
    approved(registry, make_adapter_dir, "v1")
    assert registry.routing().standby == "v1"  # the newest approved version
    registry.promote("v1", actor="alice", reason="x")
    assert registry.routing().revision == before + 2 and registry.routing().standby is None  # judge, promote
    with registry_db.sessions() as session:
        events = list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))
    assert [e.topic for e in events] == [registry.events_topic] * 2 and registry.events_topic
    assert {k: events[-1].payload[k] for k in ("kind", "revision", "live", "canary")} == {
        "kind": "policy", "revision": before + 2, "live": "v1", "canary": None}


def test_kinds_have_their_own_live_version(registry, make_adapter_dir):
    approved(registry, make_adapter_dir, "p1")
    registry.register("r1", make_adapter_dir("r1", seed=1), kind=Kind.REWARD)
    registry.judge("r1", report={}, failed=[])
    registry.promote("p1", actor="trainer", reason="x")
    registry.promote("r1", actor="trainer", reason="x")
    assert (registry.routing(Kind.POLICY).live, registry.routing(Kind.REWARD).live) == ("p1", "r1")
    with pytest.raises(IllegalTransition, match="retired"):
        registry.rollback(Kind.POLICY, to="r1", actor="bob", reason="wrong kind")


def test_concurrent_promotions_are_serialised(registry_db, make_adapter_dir):
    """Each promotion sees the one before it: the predecessors form one chain and exactly one version is live."""
    registry = registry_db.registry
    names = [f"v{i}" for i in range(6)]
    for seed, name in enumerate(names):
        approved(registry, make_adapter_dir, name, seed)
    barrier = threading.Barrier(len(names))
    errors: list[BaseException] = []

    def promote(name: str) -> None:
        barrier.wait()
        try:
            registry.promote(name, actor="race", reason="x")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    states = {v.name: v.state for v in registry.versions()}
    assert sorted(states.values()) == ["promoted"] + ["retired"] * 5
    chain, name = [], registry.routing().live
    while name is not None:
        chain.append(name)
        name = registry.get(name).predecessor
    assert sorted(chain) == names  # no two promotions replaced the same live version


def test_concurrent_canary_starts_admit_one(registry, make_adapter_dir):
    names = [f"c{i}" for i in range(4)]
    for seed, name in enumerate(names):
        approved(registry, make_adapter_dir, name, seed)
    barrier, outcomes = threading.Barrier(len(names)), []

    def start(name: str) -> None:
        barrier.wait()
        try:
            registry.start_canary(name, actor="race", reason="x")
            outcomes.append("started")
        except IllegalTransition:
            outcomes.append("refused")

    threads = [threading.Thread(target=start, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 3 + ["started"]
    assert [v.state for v in registry.versions()].count("canary") == 1


def test_corrupt_artifact_is_detected_on_read(registry, make_adapter_dir):
    registry.register("v1", make_adapter_dir("v1"))
    weights = registry.artifact("v1") / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterArtifactError, match="sha256"):
        registry.artifact("v1")


def test_thumbs_count_each_completion_once_by_version_and_time(registry, make_adapter_dir, rate):
    registry.register("v1", make_adapter_dir("v1"))
    now = utcnow()
    rate("v1", up=3, down=2, changed_mind=2, at=now)  # two of the downs were ups first
    rate("v1", up=5, at=now - timedelta(days=2))
    rate(None, up=1, down=1, at=now)
    counts = registry.thumbs(["v1", None], since=now - timedelta(hours=1))
    assert (counts["v1"].up, counts["v1"].down, counts[None].n) == (3, 2, 2)
    assert counts["v1"].rate == pytest.approx(0.6)
    assert registry.thumbs(["v1"])["v1"].up == 8
    assert set(registry.thumbs()) == {"v1", None}


def test_deciding_thumbs_leave_out_pinned_requests_and_cap_each_user(registry, make_adapter_dir, rate):
    registry.register("v1", make_adapter_dir("v1"))
    now = utcnow()
    rate("v1", up=3, down=3, changed_mind=3, user="alice", at=now - timedelta(minutes=2))  # alice's first six
    rate("v1", up=10, user="alice", at=now - timedelta(minutes=1))  # beyond her cap
    rate("v1", down=4, user=None, end_user="bob")  # an open API: the request's `user` field identifies
    rate("v1", up=7, user=None)  # no identity at all
    rate("v1", up=9, requested_model="v1")  # pinned to v1 by name
    assert registry.thumbs(["v1"])["v1"] == Thumbs(up=29, down=7)
    assert registry.thumbs(["v1"], requested_model="liveloop")["v1"] == Thumbs(up=20, down=7)
    # alice: her six earliest completions, each once as its latest rating (3 down, 3 up); bob: 4 down
    deciding = registry.thumbs(["v1"], requested_model="liveloop", max_per_user=6)
    assert deciding["v1"] == Thumbs(up=3, down=7)
    assert registry.thumbs(["v1", None], requested_model="liveloop", max_per_user=100)["v1"] == Thumbs(up=13, down=7)


def test_audit_log_is_append_only_history(registry_db, make_adapter_dir):
    registry = registry_db.registry
    approved(registry, make_adapter_dir, "v1")
    registry.promote("v1", actor="alice", reason="x")
    with registry_db.sessions() as session:
        rows = session.scalars(select(AdapterTransition).order_by(AdapterTransition.id)).all()
    assert [(r.from_state, r.to_state) for r in rows] == [(None, "candidate"), ("candidate", "approved"),
                                                          ("approved", "promoted")]
    assert all(r.at is not None for r in rows) and State(rows[-1].to_state) is State.PROMOTED


def test_registry_migration_downgrades_and_upgrades(registry_db, database_url):
    from alembic import command

    from liveloop.db import alembic_config

    command.downgrade(alembic_config(database_url), "0002")
    command.upgrade(alembic_config(database_url), "head")
    assert registry_db.registry.routing().revision == 0


def test_ancestry_and_diff_show_lineage_metrics_gates_and_thumbs(registry, make_adapter_dir, rate):
    registry.register("v1", make_adapter_dir("v1"), lineage=Lineage(event_ids=("e1", "e2")))
    registry.register("v2", make_adapter_dir("v2", seed=1), lineage=Lineage(parent="v1", event_ids=("e3",)),
                      training_metrics={"kl": 0.2})
    registry.register("v3", make_adapter_dir("v3", seed=2), lineage=Lineage(parent="v1", event_ids=("e4", "e5")),
                      training_metrics={"kl": 0.3, "beta": 0.1})
    registry.judge("v2", report={"gates": [{"name": "kl", "value": 0.01}]}, failed=[])
    rate("v2", up=3, down=1)
    assert [v.name for v in registry.ancestry("v2")] == ["v2", "v1"]
    rows = {row.field: row for row in registry.diff("v2", "v3")}
    assert (rows["common ancestor"].a, rows["events since common ancestor"].a,
            rows["events since common ancestor"].b) == ("v1", 1, 2)
    assert not rows["parent"].differs and rows["state"].differs
    assert (rows["metric kl"].a, rows["metric kl"].b, rows["metric beta"].a) == (0.2, 0.3, None)
    assert (rows["gate kl"].a, rows["gate kl"].b) == (0.01, None)
    assert (rows["thumbs-up rate"].a, rows["thumbs-up rate"].b) == (0.75, None)
    with pytest.raises(UnknownVersion):
        registry.ancestry("nope")


def test_a_corrupt_source_is_refused_before_anything_is_stored(registry, make_adapter_dir):
    src = make_adapter_dir("v1")
    (src / WEIGHTS).write_bytes((src / WEIGHTS).read_bytes()[:-100])
    with pytest.raises(AdapterArtifactError, match="sha256"):
        registry.register("v1", src)
    assert registry.versions() == [] and not (registry.store.root / "v1").exists()
