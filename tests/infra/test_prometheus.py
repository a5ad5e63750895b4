"""The alert rules and the dashboard against a real Prometheus (Debian's package) scraping a live `liveloop up`:
every panel's query and every rule's expression parses and returns data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from feedback.broker import free_port
from tests.conftest import REPO
from tests.core.test_up import Up, live_and_canary, up_settings  # noqa: F401 (a fixture)
from tests.feedback.helpers import wait_until

INFRA = REPO / "infra"
ALERTS = INFRA / "prometheus" / "alerts.yml"
DASHBOARD = INFRA / "grafana" / "dashboards" / "liveloop.json"
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval becomes here (at least 4 scrapes of 1 s)
# Metrics another change adds (the relay's parked rows): required here as soon as the code defines them.
AWAITED = {"liveloop_outbox_parked_rows": REPO / "feedback"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: Debian's 'prometheus' package has it (`make test` installs it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_promtool_accepts_the_config_and_the_rules():
    promtool = _tool("promtool")
    for args in (["check", "config", str(INFRA / "prometheus" / "prometheus.yml")], ["check", "rules", str(ALERTS)]):
        checked = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel, rows' nested panels included."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels += [nested for panel in panels for nested in panel.get("panels", [])]
    return [(panel["title"], target["expr"].replace("$__rate_interval", RATE_INTERVAL))
            for panel in panels for target in panel.get("targets", [])]


def rule_expressions() -> list[tuple[str, str]]:
    """(rule name, expression) of every alerting and recording rule."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(rule.get("alert") or rule["record"], rule["expr"]) for group in groups for rule in group["rules"]]


def without_thresholds(expr: str) -> str:
    """The expression with every comparison made a ``bool`` one: it then returns a sample wherever its operands
    have series, instead of only where an alert would fire (label matchers in braces are left alone)."""
    parts = re.split(r"(\{[^}]*\})", expr)
    return "".join(part if part.startswith("{") else re.sub(r"(>=|<=|==|!=|>|<)(?!\s*bool)", r"\1 bool", part)
                   for part in parts)


def test_without_thresholds_keeps_label_matchers():
    assert (without_thresholds('sum(x{a!="b", c=~"d"}) > 0.5 and on () y == 0')
            == 'sum(x{a!="b", c=~"d"}) > bool 0.5 and on () y == bool 0')


class Prometheus:
    """A real Prometheus on a free loopback port, scraping every second, with the rules of infra/."""

    def __init__(self, workdir: Path, targets: dict[str, str]):
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in targets.items()]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with (workdir / "prometheus.log").open("wb") as log:
            self.process = subprocess.Popen(
                [_tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={self.url[7:]}"],
                stdout=log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=10)
        wait_until(self._ready, timeout_s=30)

    def _ready(self) -> bool:
        assert self.process.poll() is None, "prometheus exited"
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict]:
        answer = self.client.get("/api/v1/query", params={"query": expr})
        assert answer.status_code == 200, f"{expr}: {answer.text}"
        return answer.json()["data"]["result"]

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture
def live_loop(up_settings, tmp_path):  # noqa: F811 (the fixture imported above)
    """`liveloop up` with a live version and a canary, its trainer's metrics on a port of their own."""
    settings = up_settings.model_copy(update={"trainer_metrics_port": free_port()})
    live_and_canary(settings, tmp_path)
    up = Up(settings, tmp_path / "up.log")
    try:
        up.ready()
        yield up, settings
    finally:
        up.interrupt()


def test_every_dashboard_query_and_alert_expression_returns_data(live_loop, tmp_path):
    _tool("prometheus")
    up, settings = live_loop
    prometheus = Prometheus(tmp_path, {"liveloop-api": f"127.0.0.1:{settings.port}",
                                       "liveloop-trainer": f"127.0.0.1:{settings.trainer_metrics_port}"})
    try:
        up.chat_and_rate([f"user-{i}" for i in range(8)])  # the trainer updates on 4, then gates the candidate
        wait_until(lambda: prometheus.query('liveloop_trainer_stage_duration_seconds_count{stage="decide"} > 0')
                   and prometheus.query("liveloop_rating_to_version_seconds"), timeout_s=120)
        up.chat_and_rate([f"user-{i}" for i in range(8, 12)])  # traffic inside the rate windows
        time.sleep(3)  # a few scrapes and rule evaluations after it
        assert {s["metric"]["job"] for s in prometheus.query("up == 1")} == {"liveloop-api", "liveloop-trainer"}
        awaited = {name for name, code in AWAITED.items()
                   if not any(name in path.read_text() for path in code.rglob("*.py"))}
        checks = [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
        checks += [(f"rule {name}", without_thresholds(expr)) for name, expr in rule_expressions()]
        empty = [f"{what}: {expr}" for what, expr in checks
                 if not prometheus.query(expr) and not any(name in expr for name in awaited)]
        assert not empty, "no data:\n" + "\n".join(empty)
        live = {s["metric"]["version"] for s in prometheus.query('liveloop_version_info{state="promoted"}')}
        assert live == {"policy-00001-live"}
        assert prometheus.query('liveloop_trainer_updates_total{outcome="applied"} > 0')
    finally:
        prometheus.stop()
