import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from feedback.broker import free_port
from feedback.relay import Relay
from liveloop.tables import utcnow
from tests.feedback.helpers import rate_each, wait_until

LIVELOOP = str(Path(sys.executable).parent / "liveloop")


@pytest.fixture
def cli_env(tmp_path):
    def env(**variables) -> dict:
        return os.environ | {"LIVELOOP_DATA_DIR": str(tmp_path / "var")} | {
            f"LIVELOOP_{name.upper()}": str(value) for name, value in variables.items()}

    return env


def test_broker_relay_and_replay_commands(database_url, sessions, add_completion, kafka_settings, cli_env,
                                          read_topic):
    if not database_url.startswith("sqlite"):
        pytest.skip("the commands' wiring does not depend on the database; the library tests cover both")
    port = free_port()
    broker = subprocess.Popen([LIVELOOP, "broker", "--port", str(port)], env=cli_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert f"LIVELOOP_KAFKA_BOOTSTRAP=127.0.0.1:{port}" in broker.stdout.readline()
        settings = kafka_settings(kafka_bootstrap=f"127.0.0.1:{port}")
        since = utcnow()
        rate_each(sessions, settings, [add_completion() for _ in range(3)], rating="down")
        env = cli_env(kafka_bootstrap=settings.kafka_bootstrap, database_url=database_url,
                      feedback_topic=settings.feedback_topic)
        relay = subprocess.Popen([LIVELOOP, "relay", "--metrics-port", "0"], env=env)
        wait_until(lambda: Relay(sessions, settings).depth() == 0)
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0
        replayed = subprocess.run([LIVELOOP, "replay", "--since", since.isoformat()], env=env, capture_output=True,
                                  text=True, timeout=60)
        assert "republished 3 feedback events" in replayed.stdout, replayed.stderr
        assert len(read_topic(settings, settings.feedback_topic, 6)) == 6
    finally:
        broker.send_signal(signal.SIGINT)
        assert broker.wait(30) == 0


def test_relay_without_kafka_says_what_to_set(cli_env):
    result = subprocess.run([LIVELOOP, "relay"], env=cli_env(kafka_bootstrap=""), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "LIVELOOP_KAFKA_BOOTSTRAP is not set" in result.stderr


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(("stop_signal", "preexec"), [(signal.SIGTERM, None), (signal.SIGINT, _ignore_sigint)],
                         ids=["sigterm", "sigint-under-a-parent-that-ignores-it"])
def test_broker_stops_tansu_when_it_stops(cli_env, tmp_path, stop_signal, preexec):
    errors = tmp_path / "broker.err"
    with errors.open("w") as stderr:
        broker = subprocess.Popen([LIVELOOP, "broker", "--port", str(free_port())], env=cli_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=stderr, preexec_fn=preexec)
    assert "LIVELOOP_KAFKA_BOOTSTRAP=" in broker.stdout.readline()
    tansu = int(re.search(r"Tansu\) at \S+, pid (\d+)", errors.read_text()).group(1))
    broker.send_signal(stop_signal)
    assert broker.wait(30) == 0
    assert not Path(f"/proc/{tansu}").exists()
    assert "Traceback" not in errors.read_text()
