from __future__ import annotations

import pytest
from typer.testing import CliRunner

from liveloop.cli import app
from liveloop.registry import Lineage


@pytest.fixture
def cli(registry_db, database_url, tmp_path, monkeypatch):
    """Run ``liveloop adapters …`` against the registry fixture's database; returns (exit code, output)."""
    monkeypatch.setenv("LIVELOOP_DATABASE_URL", database_url)
    monkeypatch.setenv("LIVELOOP_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LIVELOOP_ARTIFACT_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps tables to the terminal width

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["adapters", *args])
        return result.exit_code, result.output

    return run


@pytest.fixture
def versions(registry, make_adapter_dir, rate):
    registry.register("v1", make_adapter_dir("v1"), lineage=Lineage(reward_source="direct", event_ids=("e1",)))
    registry.judge("v1", report={"passed": True, "gates": [
        {"name": "kl", "value": 0.0123, "threshold": 0.5, "passed": True, "details": {"tokens": 96}}]}, failed=[])
    registry.promote("v1", actor="trainer", reason="first")
    registry.register("v2", make_adapter_dir("v2", seed=1), lineage=Lineage(parent="v1", reward_source="direct"),
                      training_metrics={"kl": 0.02})
    registry.judge("v2", report={"passed": True, "gates": []}, failed=[])
    rate("v1", up=3, down=1)
    return registry


def test_list_shows_states_gates_and_live_thumbs(cli, versions):
    code, out = cli("list")
    assert code == 0, out
    assert "live: v1" in out and "canary: –" in out
    v1 = next(line for line in out.splitlines() if line.startswith("│ v1 "))
    assert "promoted" in v1 and "pass" in v1 and "75.0% of 4" in v1
    assert "approved" in next(line for line in out.splitlines() if line.startswith("│ v2 "))
    assert not any(line.startswith("│ v1 ") for line in cli("list", "--limit", "1")[1].splitlines())


def test_show_prints_gate_report_metrics_lineage_and_audit(cli, versions):
    code, out = cli("show", "v1")
    assert code == 0, out
    assert "0.0123" in out and "0.5" in out and '"tokens": 96' in out  # the gate report
    assert "events trained on  1" in out and "75.0% of 4" in out
    assert "candidate" in out and "approved" in out and "first" in out  # the audit log
    assert "kl" in cli("show", "v2")[1] and "0.02" in cli("show", "v2")[1]


def test_promote_rollback_and_reject_change_the_registry_and_record_the_actor(cli, versions):
    assert cli("promote", "v2", "--reason", "canary skipped", "--actor", "bob")[0] == 0
    assert versions.routing().live == "v2" and versions.audit("v2")[0].actor == "bob"
    code, out = cli("rollback", "-r", "complaints", "--actor", "bob")
    assert code == 0 and "v2 rolled back; live: v1" in out
    assert versions.get("v2").state == "rolled_back"
    code, out = cli("reject", "v2", "-r", "again")
    assert code == 1 and "IllegalTransition" in out  # rolled back is final


def test_diff_lists_rows_side_by_side(cli, versions):
    code, out = cli("diff", "v1", "v2")
    assert code == 0, out
    assert "common ancestor" in out and "promoted" in out and "approved" in out


def test_unknown_version_is_a_clear_error(cli, versions):
    code, out = cli("show", "nope")
    assert code == 1 and "UnknownVersion" in out and "nope" in out
