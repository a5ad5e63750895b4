"""infra/docker-compose.yml's monitoring, checked at the YAML level (no Docker here): Prometheus scrapes what the
processes serve, reads the rules it names, and Grafana is provisioned with that Prometheus and the dashboard."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from liveloop.cli.feedback import relay
from liveloop.settings import Settings
from tests.conftest import REPO

INFRA = REPO / "infra"
COMPOSE = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _mounts(service: str) -> dict[str, PurePosixPath]:
    """Container path → host path (relative to infra/) of a service's bind mounts."""
    mounts = {}
    for volume in SERVICES[service]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = PurePosixPath(source)
    return mounts


def _host_path(service: str, container_path: str):
    """The file of infra/ that a container path of a service's bind mounts is."""
    for target, source in _mounts(service).items():
        if container_path == target or container_path.startswith(target + "/"):
            return INFRA / source / PurePosixPath(container_path).relative_to(target)
    raise AssertionError(f"{service} mounts nothing at {container_path}")


def _published(service: str) -> dict[int, int]:
    """Container port → host port."""
    return {int(p.split(":")[1]): int(p.split(":")[0].split("-")[0]) for p in SERVICES[service]["ports"]}


def test_prometheus_scrapes_the_ports_the_processes_serve_and_reads_its_rules():
    config_path = _host_path("prometheus", "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        assert (config_path.parent / rule_file).is_file(), rule_file
    relay_port = inspect.signature(relay).parameters["metrics_port"].default.default
    expected = {"liveloop-api": ("api", Settings.model_fields["port"].default),
                "liveloop-trainer": ("trainer", Settings.model_fields["trainer_metrics_port"].default),
                "liveloop-relay": ("relay", relay_port)}
    jobs = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            jobs[job["job_name"]] = (sd["names"][0], sd["port"])
        for static in job.get("static_configs", []):
            host, port = static["targets"][0].split(":")
            jobs[job["job_name"]] = (host, int(port))
    assert jobs == expected
    assert all(service in SERVICES for service, _ in jobs.values())
    assert "--port" in SERVICES["api"]["command"] and SERVICES["api"]["command"][-1] == str(expected["liveloop-api"][1])
    assert 9090 in _published("prometheus")


def test_grafana_is_provisioned_with_the_prometheus_service_and_the_dashboard():
    grafana = SERVICES["grafana"]
    assert 3000 in _published("grafana")  # Grafana's own port
    for volume in grafana["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (INFRA / source).is_dir(), source
        else:
            assert source in COMPOSE["volumes"], f"named volume {source} is not declared"
    [datasource] = yaml.safe_load(_host_path(
        "grafana", "/etc/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == f"http://prometheus:{next(iter(_published('prometheus')))}"
    [provider] = yaml.safe_load(_host_path(
        "grafana", "/etc/grafana/provisioning/dashboards/liveloop.yml").read_text())["providers"]
    dashboards = _host_path("grafana", provider["options"]["path"])
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["liveloop.json"]
    assert _host_path("grafana", grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()
    panels = json.loads((dashboards / "liveloop.json").read_text())["panels"]
    sources = {target["datasource"]["uid"] for panel in panels for target in panel.get("targets", [])}
    assert sources == {datasource["uid"]}
    assert [p["title"] for p in panels if p["type"] == "row"] == ["Serving", "Feedback", "Learning", "Resources"]


def test_docker_compose_accepts_the_file():
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("Docker Compose is not installed here; the tests above check the file at the YAML level")
    checked = subprocess.run(["docker", "compose", "-f", str(INFRA / "docker-compose.yml"), "config", "--quiet"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
