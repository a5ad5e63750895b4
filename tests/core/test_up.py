"""`liveloop up` stopped with Ctrl-C and started again, with the real processes: the API, the trainer and the
embedded broker (which keeps nothing). The live version, the canary and its ratings, the trainer's lineage go on
where they were, and every rating is consumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import select

from feedback.broker import free_port
from liveloop.artifacts import LocalArtifactStore
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.model import load_base_model
from liveloop.registry import Kind, Registry, State
from liveloop.tables import ConsumedFeedback, OutboxMessage
from tests.conftest import MODEL_CACHE
from tests.feedback.helpers import wait_until
from trainer.config import PPOConfig
from trainer.policy import Policy

PPO = {"ppo_epochs": 1, "num_minibatches": 1}


@pytest.fixture
def up_settings(make_settings, tiny_model_dir):
    settings = make_settings(base_model=tiny_model_dir, ppo=PPO, port=free_port(), train_batch_min=4,
                             train_poll_s=0.5, trainer_metrics_port=0, promotion_policy="manual",
                             promotion_interval_s=3600, canary_fraction=0.5, gate_holdout_fraction=0.001,
                             gate_prompts=2, gate_max_new_tokens=4, adapter_poll_s=0.2,
                             kafka_session_timeout_ms=3_000, kafka_heartbeat_interval_ms=500)
    migrate(settings.resolved_database_url)
    return settings


def _env(settings) -> dict[str, str]:
    names = ("data_dir", "base_model", "ppo", "port", "train_batch_min", "train_poll_s", "trainer_metrics_port",
             "promotion_policy", "promotion_interval_s", "canary_fraction", "gate_holdout_fraction", "gate_prompts",
             "gate_max_new_tokens", "adapter_poll_s", "kafka_session_timeout_ms", "kafka_heartbeat_interval_ms")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELOOP_")}
    env["LIVELOOP_MODEL_CACHE_DIR"] = str(MODEL_CACHE)
    for name in names:
        value = getattr(settings, name)
        env[f"LIVELOOP_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    return env


def _policy_version(settings, dest: Path, version: int, seed: int) -> Path:
    """A stored policy checkpoint of PPO version ``version``, with weights of its own."""
    base = load_base_model(settings)
    policy = Policy.create(base.model, PPOConfig.from_dict(settings.ppo), base_model_id=base.model_id)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    policy.version = version
    policy.save(dest)
    return dest


class Up:
    """``liveloop up`` in a terminal of its own: ``interrupt`` is Ctrl-C (SIGINT to the foreground group)."""

    def __init__(self, settings, log_path: Path):
        self.url = f"http://127.0.0.1:{settings.port}"
        with log_path.open("ab") as output:
            self.process = subprocess.Popen([sys.executable, "-m", "liveloop", "up"], env=_env(settings),
                                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def ready(self) -> dict:
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, "liveloop up exited"
            try:
                answer = self.client.get("/readyz")
                if answer.status_code == 200:
                    return answer.json()
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "liveloop up did not get ready"
            time.sleep(0.2)

    def chat_and_rate(self, users: list[str]) -> list[str]:
        """One short chat per user, each rated (up for even users); the versions that served them."""
        served = []
        for i, user in enumerate(users):
            reply = self.client.post("/v1/chat/completions", json={
                "model": "liveloop", "messages": [{"role": "user", "content": f"Say {user}."}], "max_tokens": 4,
                "user": user})
            assert reply.status_code == 200, reply.text
            served.append(reply.json()["model"])
            rated = self.client.post("/v1/feedback", json={"completion_id": reply.json()["id"],
                                                            "rating": "up" if i % 2 == 0 else "down"})
            assert rated.status_code == 202, rated.text
        return served

    def interrupt(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)
        self.client.close()
        return self.process.wait(90)


def live_and_canary(settings, tmp_path: Path, sessions=None) -> Registry:
    """The registry of ``settings`` with "policy-00001-live" live and "policy-00002-canary" its canary."""
    sessions = sessions or make_sessionmaker(make_engine(settings.resolved_database_url))
    registry = Registry(sessions, LocalArtifactStore(settings.resolved_artifact_dir))
    for name, version in (("policy-00001-live", 1), ("policy-00002-canary", 2)):
        registry.register(name, _policy_version(settings, tmp_path / name, version, seed=version))
        registry.judge(name, report={}, failed=[])
    registry.promote("policy-00001-live", actor="test", reason="a live version")
    registry.start_canary("policy-00002-canary", actor="test", reason="a canary")
    return registry


def test_ctrl_c_and_up_again_keeps_the_loop_state_and_every_rating(up_settings, tmp_path):
    settings = up_settings
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    registry = live_and_canary(settings, tmp_path, sessions)

    first = Up(settings, tmp_path / "up.log")
    wait_until(lambda: (lambda r: (r["live_version"], r["canary_version"]))(first.ready())
               == ("policy-00001-live", "policy-00002-canary"), timeout_s=60)
    served = first.chat_and_rate([f"user-{i}" for i in range(8)])
    assert "policy-00002-canary" in served and "policy-00001-live" in served
    wait_until(lambda: len(registry.versions(kind=Kind.POLICY)) == 3, timeout_s=60)  # the trainer's first
    first.chat_and_rate([f"user-{i}" for i in range(8, 14)])
    assert first.interrupt() is not None  # Ctrl-C, perhaps while the trainer updates on those ratings
    canary_thumbs = registry.thumbs(["policy-00002-canary"])

    second = Up(settings, tmp_path / "up.log")
    ready = second.ready()
    assert (ready["live_version"], ready["canary_version"]) == ("policy-00001-live", "policy-00002-canary")

    def everything_consumed() -> bool:
        with sessions() as session:
            sent = set(session.scalars(select(OutboxMessage.event_id).where(
                OutboxMessage.topic == settings.feedback_topic)))
            consumed = set(session.scalars(select(ConsumedFeedback.event_id)))
        return len(sent) == 14 and sent <= consumed

    wait_until(everything_consumed, timeout_s=60)
    second.interrupt()

    routing = registry.routing()
    assert (routing.live, routing.canary) == ("policy-00001-live", "policy-00002-canary")
    assert registry.thumbs(["policy-00002-canary"]) == canary_thumbs  # its collected ratings, as they were
    versions = registry.versions(kind=Kind.POLICY)
    trained = Counter(e for v in versions for e in v.consumed_event_ids)
    with sessions() as session:
        outcomes = dict(session.execute(select(ConsumedFeedback.event_id, ConsumedFeedback.outcome)).all())
    assert trained == Counter(e for e, outcome in outcomes.items() if outcome == "trained")  # each once
    rejected = {v.name for v in versions if v.state == State.REJECTED}
    made = [v for v in versions if v.name not in ("policy-00001-live", "policy-00002-canary")]
    assert made and all(v.parent not in rejected for v in made)  # the lineage went on from what serves
    assert not [t for t in registry.audit() if "orphan" in t.reason]


def test_ctrl_c_stops_the_trainer_then_the_api_then_the_broker_quietly(up_settings, tmp_path):
    log_path = tmp_path / "up.log"
    up = Up(up_settings, log_path)
    up.ready()
    wait_until(lambda: "training a fresh adapter" in log_path.read_text(), timeout_s=60)  # its handlers are set
    interrupted = time.monotonic()
    assert up.interrupt() == 0
    assert time.monotonic() - interrupted < 15  # the trainer gets 10 s to finish its step, then is killed
    output = log_path.read_text()
    assert "Traceback" not in output and "Aborted" not in output, output
    assert " INFO kafka" not in output  # third-party libraries speak at WARNING
    assert f"API            http://127.0.0.1:{up_settings.port}/v1" in output  # where things are
    stops = [output.find(line) for line in ("trainer stopped", "API stopped", "embedded Kafka broker stopped")]
    assert -1 not in stops and stops == sorted(stops), output
    tansu = int(re.search(r"Tansu\) at \S+, pid (\d+)", output).group(1))
    assert not Path(f"/proc/{tansu}").exists()
