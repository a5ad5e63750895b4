"""What ``liveloop serve`` and ``liveloop up`` refuse to start with: a misspelt or unknown LIVELOOP_ variable
(environment or .env), a short admin token, and an API without keys beyond loopback. The commands run as real
subprocesses (each costs a few seconds of imports); the settings checks they share are also tested directly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from feedback.broker import free_port
from liveloop.settings import Settings
from tests.conftest import MODEL_CACHE
from tests.feedback.helpers import wait_until

LIVELOOP = str(Path(sys.executable).parent / "liveloop")


@pytest.fixture
def start(tmp_path):
    """``start(*args, cwd=tmp_path, **variables)``: a ``liveloop`` command with only these LIVELOOP_ variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIVELOOP_")}

    def run(*args: str, cwd: Path = tmp_path, **variables) -> subprocess.CompletedProcess:
        env = clean | {"LIVELOOP_DATA_DIR": str(tmp_path / "var")} | variables
        return subprocess.run([LIVELOOP, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)

    return run


def test_a_misspelt_variable_is_named_and_nothing_starts(start):
    result = start("serve", LIVELOOP_API_KEY="alice:sk-1")
    assert result.returncode == 2
    assert "LIVELOOP_API_KEY (did you mean LIVELOOP_API_KEYS?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_variable_in_dotenv_is_named(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LIVELOOP_PORT=8123\nLIVELOOP_ADMIN_TOKN=x\nPOSTGRES_PASSWORD=other-tools\n")
    with pytest.raises(ValueError, match=r"LIVELOOP_ADMIN_TOKN \(did you mean LIVELOOP_ADMIN_TOKEN\?\)") as error:
        Settings(_env_file=dotenv)
    assert "POSTGRES_PASSWORD" not in str(error.value)  # a shared .env may hold other tools' variables
    assert Settings(_env_file=None).port == 8000


def test_a_short_admin_token_is_refused(make_settings):
    with pytest.raises(ValueError, match="LIVELOOP_ADMIN_TOKEN must have at least 32 characters"):
        make_settings(admin_token="change-me")
    assert make_settings(admin_token="x" * 32).admin_token is not None


@pytest.mark.parametrize(("command", "variables"), [(["serve", "--host", "0.0.0.0"], {}),
                                                    (["up"], {"LIVELOOP_HOST": "::"})])
def test_an_open_api_beyond_loopback_is_refused(start, command, variables):
    result = start(*command, **variables)
    assert result.returncode == 2
    assert "refusing to serve" in result.stderr and "LIVELOOP_API_KEYS" in result.stderr


def test_an_open_api_beyond_loopback_starts_when_allowed(tiny_model_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELOOP_")} | {
        "LIVELOOP_DATA_DIR": str(tmp_path / "var"), "LIVELOOP_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "LIVELOOP_BASE_MODEL": str(tiny_model_dir), "LIVELOOP_ALLOW_OPEN": "true", "LIVELOOP_RELAY_IN_API": "false"}
    server = subprocess.Popen([LIVELOOP, "serve", "--host", "0.0.0.0", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def healthy() -> bool:
        assert server.poll() is None, server.stdout.read()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, timeout_s=60)
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    # uvicorn ends by raising the signal again once it shut down gracefully
    assert server.returncode == -signal.SIGTERM and "Application shutdown complete" in output, output
    assert "Traceback" not in output, output
