"""infra/docker-compose.yml against the code it runs (no Docker engine here): each liveloop service runs a real
command with real settings, each service has a health check on a port it serves, data lives on volumes, and the
deployment is closed by default. Monitoring (Prometheus, Grafana): tests/infra/test_compose.py."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from sqlalchemy import make_url

from liveloop.cli import app, refuse_open
from liveloop.settings import ADMIN_TOKEN_MIN_CHARS, Settings

INFRA = Path(__file__).resolve().parents[2] / "infra"
DOCKERFILE = INFRA.parent / "Dockerfile"
COMPOSE = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
LIVELOOP = {name: service for name, service in SERVICES.items() if service.get("image") == "liveloop:latest"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(value: str, shell: dict[str, str]) -> str:
    """Compose's ``${X}``, ``${X:-default}`` and ``${X:?error}``, as ``docker compose`` resolves them."""

    def resolve(match: re.Match) -> str:
        name, kind, rest = match.groups()
        if shell.get(name):
            return shell[name]
        if kind == "?":
            raise ValueError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return _VARIABLE.sub(resolve, str(value))


def settings_of(service: dict, shell: dict[str, str]) -> Settings:
    """The settings a liveloop container starts with: the image's LIVELOOP_ variables, then the service's."""
    image_env = dict(re.findall(r"(LIVELOOP_\w+)=(\S+)", DOCKERFILE.read_text()))
    env = image_env | {name: interpolate(value, shell) for name, value in service["environment"].items()}
    return Settings(_env_file=None, **{name.removeprefix("LIVELOOP_").lower(): value for name, value in env.items()})


def option(service: dict, name: str, default: object) -> str:
    command = service["command"]
    return command[command.index(name) + 1] if name in command else str(default)


def probed(service: dict) -> tuple[int, str]:
    """The port and path a service's health check requests."""
    address = urlsplit(re.search(r"http://[^'\" ]+", " ".join(service["healthcheck"]["test"])).group(0))
    assert address.hostname == "127.0.0.1"
    return address.port, address.path


SHELL = {"LIVELOOP_ADMIN_TOKEN": "x" * ADMIN_TOKEN_MIN_CHARS}


@pytest.mark.parametrize("name", sorted(LIVELOOP))
def test_each_liveloop_service_runs_a_command_with_known_settings(name):
    service = LIVELOOP[name]
    commands = typer.main.get_command(app).commands
    assert service["command"][0] in commands
    unknown = [v for v in service["environment"] if v.removeprefix("LIVELOOP_").lower() not in Settings.model_fields]
    assert not unknown
    settings = settings_of(service, SHELL)
    assert make_url(settings.database_url).host in SERVICES and settings.kafka_bootstrap.split(":")[0] in SERVICES


def test_every_service_has_a_health_check_on_what_it_serves():
    trainer = settings_of(LIVELOOP["trainer"], SHELL)
    served = {  # the port and path each long-running liveloop service answers on
        "api": (int(option(LIVELOOP["api"], "--port", 8000)), "/healthz"),
        "relay": (int(option(LIVELOOP["relay"], "--metrics-port", "")), "/metrics"),
        "trainer": (trainer.trainer_metrics_port, "/metrics"),
    }
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no health check"
        if check.get("disable"):
            assert service.get("restart") == "no", f"{name} runs for good but has no health check"
        elif name in served:
            assert probed(service) == served[name], name
    assert set(served) | {"migrate"} == set(LIVELOOP)


def test_data_lives_on_declared_volumes():
    mounts = {name: dict(volume.split(":")[:2] for volume in service.get("volumes", []))
              for name, service in SERVICES.items()}
    named = {source for service_mounts in mounts.values() for source in service_mounts if not source.startswith(".")}
    assert named == set(COMPOSE["volumes"])
    kafka_logs = Path(SERVICES["kafka"]["environment"]["KAFKA_LOG_DIRS"])
    assert any(kafka_logs.is_relative_to(target) for target in mounts["kafka"].values())
    for name in LIVELOOP:
        settings = settings_of(LIVELOOP[name], SHELL)
        assert settings.resolved_artifact_dir.is_relative_to(mounts[name]["adapters"]), name
    postgres = SERVICES["postgres"]["environment"]
    url = make_url(settings_of(LIVELOOP["api"], SHELL).database_url)
    assert (url.username, url.password, url.database) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])


def test_the_deployment_is_closed_by_default():
    with pytest.raises(ValueError, match="LIVELOOP_ADMIN_TOKEN"):
        settings_of(LIVELOOP["api"], {})  # no admin token: compose refuses to start
    api = settings_of(LIVELOOP["api"], SHELL)
    assert api.admin_token is not None
    with pytest.raises(typer.Exit):  # no API keys on 0.0.0.0: the API refuses to start
        refuse_open(api, option(LIVELOOP["api"], "--host", api.host))
    refuse_open(settings_of(LIVELOOP["api"], SHELL | {"LIVELOOP_API_KEYS": "alice:sk-1"}), "0.0.0.0")
    refuse_open(settings_of(LIVELOOP["api"], SHELL | {"LIVELOOP_ALLOW_OPEN": "true"}), "0.0.0.0")
