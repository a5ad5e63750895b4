"""Hot-swap: the watcher against a real engine and registry, then the app over HTTP, then two replica processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import openai
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from feedback.broker import free_port
from feedback.kafka import ensure_topics
from feedback.relay import Relay
from liveloop.adapter_artifacts import WEIGHTS
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.model import load_base_model
from liveloop.promotion import in_canary
from liveloop.registry import Registry, open_registry
from liveloop.sampling import SamplingParams
from liveloop.tables import Completion
from serving.engine import Engine, GenerationRequest
from serving.hotswap import AdapterWatcher
from serving.routing import AdapterSet

WAIT_S = 60.0  # an upper bound for "eventually", far above what any of this takes; not a speed assertion


def eventually(check: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.02)


def approve(registry: Registry, make_adapter_dir, name: str, seed: int) -> None:
    registry.register(name, make_adapter_dir(name, scale=0.05, seed=seed))
    registry.judge(name, report={"passed": True, "gates": []}, failed=[])


@dataclass
class Replica:
    watcher: AdapterWatcher
    engine: Engine
    adapters: AdapterSet

    def served_by(self, user: str | None = None) -> str | None:
        """Generate through the alias and return the adapter the engine ran the request with."""
        resolved = self.adapters.resolve("liveloop", user)
        prompt = self.engine.base.tokenizer("Hello there")["input_ids"]
        result = self.engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=2), resolved.adapter))
        return result.wait(WAIT_S).adapter


@pytest.fixture
def replica(registry, make_settings, tiny_model_dir):
    """One serving replica without HTTP: engine, adapter set and watcher (its thread not started)."""
    engines = []

    def make(**overrides) -> Replica:
        settings = make_settings(**{"base_model": tiny_model_dir, "canary_fraction": 0.5, **overrides})
        engine = Engine(load_base_model(settings), max_batch_size=8, max_queue=64)
        engine.start()
        engines.append(engine)
        adapters = AdapterSet(base_model_id=engine.base.model_id, alias="liveloop",
                              canary_fraction=settings.canary_fraction)
        return Replica(AdapterWatcher(registry=registry, engine=engine, adapters=adapters, settings=settings),
                       engine, adapters)

    yield make
    for engine in engines:
        engine.shutdown()


def test_promotion_and_rollback_switch_what_the_alias_serves(registry, make_adapter_dir, replica):
    node = replica()
    node.watcher.sync()
    assert node.served_by() is None  # nothing promoted: the base model
    for seed, name in enumerate(["v1", "v2"]):
        approve(registry, make_adapter_dir, name, seed)
        registry.promote(name, actor="alice", reason="x")
        node.watcher.sync()
        assert node.served_by() == name and node.adapters.live == name
    assert node.adapters.previous == "v1" and set(node.engine.loaded_adapters()) == {"v1", "v2"}
    registry.rollback(actor="alice", reason="x")
    node.watcher.sync()  # v1 stayed loaded: the rollback is a pointer switch
    assert node.served_by() == "v1" and node.watcher.revision == registry.routing().revision
    eventually(lambda: node.engine.adapter_slot("v1") is None, "the live version merged into the weights")
    assert node.engine.adapter_slot("v2") not in (None, "__base__")  # v2's rows run their difference to it


def test_without_merging_the_live_version_runs_its_own_adapter(registry, make_adapter_dir, replica):
    node = replica(merge_live_adapter=False)
    approve(registry, make_adapter_dir, "v1", 0)
    registry.promote("v1", actor="alice", reason="x")
    node.watcher.sync()
    assert node.served_by() == "v1" and node.engine.adapter_slot("v1") not in (None, "__base__")
    assert node.engine.adapter_slot(None) is None


def test_the_newest_approved_version_is_loaded_ahead_so_promoting_it_is_a_switch(registry, make_adapter_dir,
                                                                                   replica):
    node = replica()
    approve(registry, make_adapter_dir, "v1", 0)
    registry.promote("v1", actor="alice", reason="x")
    approve(registry, make_adapter_dir, "v2", 1)
    approve(registry, make_adapter_dir, "v3", 2)
    node.watcher.sync()
    assert node.adapters.live == "v1" and set(node.engine.loaded_adapters()) == {"v1", "v3"}  # v3: standby
    loads, load = [], node.engine.load_adapter
    node.engine.load_adapter = lambda name, *args: loads.append(name) or load(name, *args)  # a spy
    registry.promote("v3", actor="alice", reason="x")
    node.watcher.sync()
    assert node.served_by() == "v3" and loads == ["v2"]  # v3 was ready; v2 is the standby now


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_artifact_is_refused_and_serving_is_unchanged(registry, make_adapter_dir, replica, damage):
    node = replica()
    approve(registry, make_adapter_dir, "good", 0)
    registry.promote("good", actor="alice", reason="x")
    node.watcher.sync()
    approve(registry, make_adapter_dir, "bad", 1)
    stored = registry.store.path(registry.get("bad").uri)
    if damage == "corrupt":
        data = bytearray((stored / WEIGHTS).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (stored / WEIGHTS).write_bytes(bytes(data))
    else:
        shutil.rmtree(stored)
    registry.promote("bad", actor="alice", reason="x")
    node.watcher.sync()
    assert node.adapters.live == "good" and node.served_by() == "good"
    assert "bad" in node.adapters.refused and "bad" not in node.engine.loaded_adapters()
    assert node.watcher.revision != registry.routing().revision  # retried at the next sync
    registry.rollback(actor="alice", reason="bad artifact")
    node.watcher.sync()
    assert node.adapters.live == "good" and node.watcher.revision == registry.routing().revision


def test_the_canary_serves_a_stable_slice_of_users(registry, make_adapter_dir, replica):
    node = replica(canary_fraction=0.5)
    approve(registry, make_adapter_dir, "live", 0)
    registry.promote("live", actor="alice", reason="x")
    approve(registry, make_adapter_dir, "cand", 1)
    registry.start_canary("cand", actor="canary", reason="x")
    node.watcher.sync()
    users = [f"user-{i}" for i in range(12)]
    served = {user: node.served_by(user) for user in users}
    assert served == {user: "cand" if in_canary(user, "cand", 0.5) else "live" for user in users}
    assert set(served.values()) == {"live", "cand"} and node.served_by(None) == "live"


def test_versions_out_of_the_routing_are_unloaded_after_the_grace_period(registry, make_adapter_dir, replica):
    node = replica(adapter_unload_grace_s=0)
    for seed, name in enumerate(["v1", "v2", "v3"]):
        approve(registry, make_adapter_dir, name, seed)
        registry.promote(name, actor="alice", reason="x")
        node.watcher.sync()
    eventually(lambda: set(node.engine.loaded_adapters()) == {"v2", "v3"}, "v1 unloaded")
    assert [card.id for card in node.adapters.model_cards()][2:] == ["v2", "v3"]


def test_an_adapter_event_wakes_the_watcher_before_its_poll(registry_db, make_adapter_dir, replica, broker):
    """With polling an hour apart, only the adapter-events message (outbox → relay → Kafka) can deliver it."""
    node_registry = registry_db.registry
    # the engineer's registry, as another process has it: its transitions do not wake the replica's watcher
    registry = Registry(registry_db.sessions, node_registry.store, events_topic=node_registry.events_topic)
    node = replica(kafka_bootstrap=broker.bootstrap, adapter_poll_s=3600, relay_poll_interval_s=0.05,
                   adapter_events_topic=registry.events_topic)
    ensure_topics(node.watcher.settings)
    relay = Relay(registry_db.sessions, node.watcher.settings).start()
    node.watcher.sync()
    node.watcher.start()
    try:
        assert node.watcher.events.listening.wait(WAIT_S)  # at the topic's end before the event is written
        approve(registry, make_adapter_dir, "v1", 0)
        registry.promote("v1", actor="alice", reason="x")
        eventually(lambda: node.adapters.live == "v1", "the event made the replica load and switch")
    finally:
        node.watcher.stop()
        relay.stop()


def test_a_transition_through_this_process_s_registry_wakes_the_watcher_at_once(registry, make_adapter_dir,
                                                                                  replica):
    node = replica(adapter_poll_s=3600)  # no Kafka either: only the registry's own call can deliver it
    node.watcher.sync()
    node.watcher.start()
    try:
        approve(registry, make_adapter_dir, "v1", 0)
        registry.promote("v1", actor="alice", reason="x")
        eventually(lambda: node.adapters.live == "v1", "the replica switched without a poll or an event")
    finally:
        node.watcher.stop()


# --- over HTTP --------------------------------------------------------------------------------------------


@dataclass
class AppDB:
    registry: Registry
    sessions: sessionmaker[Session]


@pytest.fixture
def app_db(make_settings, tiny_model_dir):
    """The (migrated) database and registry of the app ``serve`` starts: the same settings, so the same files."""
    settings = make_settings(base_model=tiny_model_dir)
    migrate(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    yield AppDB(open_registry(sessions, settings), sessions)
    engine.dispose()


def test_promote_and_rollback_are_visible_over_http(serve, app_db, make_adapter_dir):
    registry = app_db.registry
    with serve(adapter_poll_s=0.05) as url:
        approve(registry, make_adapter_dir, "v1", 0)
        promoted = time.time()
        registry.promote("v1", actor="alice", reason="x")
        eventually(lambda: httpx.get(f"{url}/readyz").json()["live_version"] == "v1", "v1 live on /readyz")
        assert promoted < httpx.get(f"{url}/readyz").json()["live_since"] < time.time()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(model="liveloop", max_tokens=3,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "v1"
        assert {m.id: m.state for m in client.models.list().data}["v1"] == "live"
        registry.rollback(actor="alice", reason="x")
        eventually(lambda: httpx.get(f"{url}/readyz").json()["live_version"] is None, "back to the base model")


def test_twenty_swaps_under_32_streaming_clients_fail_nothing(serve, app_db, make_adapter_dir):
    names, registry = [f"s{i:02d}" for i in range(20)], app_db.registry
    with serve(adapter_poll_s=0.05, adapter_unload_grace_s=1.0, max_batch_size=32, max_queue=256) as url:
        for seed, name in enumerate(names):
            approve(registry, make_adapter_dir, name, seed)
        base_model_id = httpx.get(f"{url}/readyz").json()["model"]
        done, failures, responses = threading.Event(), [], []

        def client_loop(i: int) -> None:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            while not done.is_set():
                try:
                    chunks = list(client.chat.completions.create(
                        model="liveloop", max_tokens=8, stream=True, user=f"user-{i}",
                        messages=[{"role": "user", "content": f"Count to ten, client {i}."}]))
                    responses.append((chunks[0].id, {c.model for c in chunks}))
                except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                    failures.append(repr(exc))

        clients = [threading.Thread(target=client_loop, args=(i,)) for i in range(32)]
        for thread in clients:
            thread.start()
        try:
            for name in names:
                registry.promote(name, actor="swap-test", reason="swap")
                eventually(lambda name=name: httpx.get(f"{url}/readyz").json()["live_version"] == name, name)
                before = len(responses)
                eventually(lambda before=before: len(responses) > before + 8, "requests served after the swap")
        finally:
            done.set()
            for thread in clients:
                thread.join(WAIT_S)
        assert failures == []
        assert all(len(models) == 1 for _, models in responses)  # every chunk of a response: one version
        served = {next(iter(models)) for _, models in responses}
        assert len(served & set(names)) >= 10  # the swaps were seen by the clients

        def stored() -> dict[str, str | None]:
            with app_db.sessions() as session:
                return dict(session.execute(select(Completion.id, Completion.adapter_version)).all())

        eventually(lambda: len(stored()) >= len(responses), "every completion stored")
        served_by = {cid: version or base_model_id for cid, version in stored().items()}  # the rows agree
        assert all(served_by[cid] == next(iter(models)) for cid, models in responses)


def test_two_replica_processes_converge_on_the_live_version(make_settings, tiny_model_dir, app_db,
                                                            make_adapter_dir, tmp_path):
    settings = make_settings(base_model=tiny_model_dir)
    env = {**os.environ, "LIVELOOP_BASE_MODEL": str(tiny_model_dir), "LIVELOOP_DATA_DIR": str(settings.data_dir),
           "LIVELOOP_MODEL_CACHE_DIR": str(settings.resolved_model_cache_dir), "LIVELOOP_ADAPTER_POLL_S": "0.1",
           "LIVELOOP_TORCH_THREADS": "1", "LIVELOOP_KAFKA_BOOTSTRAP": "", "LIVELOOP_RELAY_IN_API": "false"}
    ports = [free_port(), free_port()]
    command = [sys.executable, "-c", "from liveloop.cli import app; app()", "serve", "--port"]
    processes = [subprocess.Popen([*command, str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"replica-{port}.log", "w"))
                 for port in ports]

    def live_versions() -> list:
        try:
            return [httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=5).json().get("live_version", "?")
                    for p in ports]
        except httpx.TransportError:
            return ["down"]

    registry = app_db.registry
    try:
        eventually(lambda: live_versions() == [None, None], "both replicas up on the base model", 180)
        for seed, name in enumerate(["v1", "v2"]):
            approve(registry, make_adapter_dir, name, seed)
            registry.promote(name, actor="alice", reason="x")
            eventually(lambda name=name: live_versions() == [name, name], f"both replicas on {name}")
        registry.rollback(actor="alice", reason="x")
        eventually(lambda: live_versions() == ["v1", "v1"], "both replicas rolled back to v1")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
