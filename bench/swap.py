"""Hot-swap under load: from a promotion to the first response served by the new version, over N swaps.

The embedded stack, each part in its own process as ``liveloop up`` runs it, with default settings: the embedded
Kafka broker, one ``liveloop serve`` replica on the packaged SmolLM2 with SQLite (its outbox relay inside), and a
load generator whose ``--clients`` clients stream chat completions through the alias for the whole run. This
process plays the engineer: it promotes versions in the registry. The replica's registry poll is set to a minute,
so what is measured is the event path: outbox → relay → ``adapter-events`` → watcher → verified load → switch.

Per swap: the registry commits the promotion (t0); the replica switches its routing to the new version (t_switch:
the ``live_since`` its /readyz reports, polled every 20 ms, so the polling delay is not counted); the first
streamed chunk of any response names it (t_served, stamped by the load generator). Two kinds of swap,
``--swaps`` of each: *cold*, a version approved long before and not loaded (the replica loads it after the
event), and *warm*, a version approved just before, which the replica has loaded ahead as its standby (the
newest approved version), as it has the canary and the previous live version: the promotion is then a pointer
switch. Reported: p50/p95 of t_switch − t0 and t_served − t0, and requests failed. The baseline, measured in the
same run while the load runs, is a bare adapter load in this process (manifest and sha256 check + peft
``load_adapter`` into a model of its own): what a cold swap would cost if every version became a new peft adapter
(the replica copies it into a free adapter slot instead, see ``serving.slots``).

Measured on the shared 2-core development machine (load average ~2, mostly this benchmark), 20 swaps of each kind,
0 failed requests, two runs:

    promotion → replica serves it as live     warm p50 104–115 ms, p95 158–170 ms; cold p50 178–205 ms, p95 335–337 ms
    promotion → first response on it          warm p50 0.85–1.3 s, p95 2.4–3.9 s; cold p50 1.2–3.6 s, p95 4.8–7.4 s

Before adapter slots and the 0.05 s relay poll, in the same conditions: warm 185 / 317 ms, cold 1.9 / 2.8 s (p50 /
p95). What remains of a warm switch is the relay's poll (≤ 50 ms), the publish (~10 ms) and the broker handing the
message to the replica's consumer (Tansu answers a waiting fetch up to ~200 ms late); a cold one adds reading,
hashing and copying the version (50–100 ms under load). The first response waits for a client's next request: at the
switch all 32 are mid-stream, and finish on the version they started with. Cold swaps here also pay the engine
adding a spare slot (0.5–1 s) right after the switch, as versions are promoted faster than the unload grace
(30 s) frees their slots.

    python bench/swap.py [--swaps 20] [--clients 32] [--max-tokens 16] [--threads 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

# `python bench/swap.py` puts bench/ first on sys.path, where bench/serving.py would shadow the `serving` package.
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path.pop(0)

import httpx
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from feedback.broker import EmbeddedBroker, free_port
from feedback.kafka import ensure_topics
from liveloop.adapter_artifacts import default_lora_config, save_adapter, verify_adapter
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.model import prepare_base_model
from liveloop.registry import Registry, open_registry
from liveloop.settings import Settings

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["Why is the sky blue?", "Write a haiku about the sea.", "How do bees make honey?",
             "Give me three tips for better sleep.", "What is a prime number?", "Explain gravity to a child."]


# --- the load generator (a process of its own: `bench/swap.py --load URL`) -----------------------------------


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The JSON data of each server-sent event. Lines are split at "\\n" only: httpx's ``aiter_lines`` also splits
    at U+2028, NEL and the like, which JSON leaves unescaped in a chunk's text (the model emits them now and then)."""
    rest = b""
    async for data in response.aiter_bytes():
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            if line.startswith(b"data: {"):
                yield line[6:].decode()


async def stream_forever(url: str, i: int, max_tokens: int, seen: set[str]) -> None:
    """One client: request after request; print the wall time a model name is first seen, and every failure."""
    body = {"model": "liveloop", "stream": True, "max_tokens": max_tokens, "user": f"bench-{i}",
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while True:
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    async for data in sse_data(response):
                        model = json.loads(data)["model"]
                        if model not in seen:
                            seen.add(model)
                            print(json.dumps({"model": model, "t": time.time()}), flush=True)
                print(json.dumps({"done": 1}), flush=True)
            except Exception as exc:  # noqa: BLE001 - a failed request is what this benchmark counts
                print(json.dumps({"failed": repr(exc)}), flush=True)


def load_main(url: str, clients: int, max_tokens: int) -> None:
    async def all_clients() -> None:
        seen: set[str] = set()
        await asyncio.gather(*(stream_forever(url, i, max_tokens, seen) for i in range(clients)))

    asyncio.run(all_clients())


class LoadGenerator:
    """The load process and what it reports: first sighting of each version, completed and failed requests."""

    def __init__(self, url: str, clients: int, max_tokens: int):
        self.first_seen: dict[str, float] = {}
        self.completed, self.failures = 0, []
        command = [sys.executable, __file__, "--load", url, "--clients", str(clients), "--max-tokens", str(max_tokens)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            record = json.loads(line)
            if "model" in record:
                self.first_seen[record["model"]] = record["t"]
            elif "failed" in record:
                self.failures.append(record["failed"])
            else:
                self.completed += 1

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


# --- the engineer's side ---------------------------------------------------------------------------------------


def write_adapters(model_dir: Path, model_id: str, names: list[str], dest: Path) -> dict[str, Path]:
    """r16 LoRA adapters on all seven projections with small random B: each changes the output a little."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), default_lora_config(),
                           adapter_name="policy")
    paths = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, 1e-3)
        paths[name] = dest / name
        save_adapter(model, "policy", paths[name], base_model_id=model_id)
    return paths


def baseline_loads(model_dir: Path, model_id: str, paths: list[Path]) -> list[float]:
    """Seconds per bare adapter load (verify + peft load_adapter) into a model of this process."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), paths[0], adapter_name="first")
    seconds = []
    for i, path in enumerate(paths[1:]):
        start = time.perf_counter()
        verify_adapter(path, base_model_id=model_id)
        model.load_adapter(path, adapter_name=f"baseline-{i}")
        seconds.append(time.perf_counter() - start)
    return seconds


def start_replica(settings: Settings, port: int, threads: int, log: Path) -> subprocess.Popen:
    overrides = {"data_dir": settings.data_dir, "kafka_bootstrap": settings.kafka_bootstrap, "adapter_poll_s": 60,
                 "model_cache_dir": settings.resolved_model_cache_dir, "torch_threads": threads,
                 "relay_poll_interval_s": settings.relay_poll_interval_s, "max_batch_size": settings.max_batch_size,
                 "canary_fraction": 0}
    env = {**os.environ, **{f"LIVELOOP_{key.upper()}": str(value) for key, value in overrides.items()}}
    command = [sys.executable, "-c", "from liveloop.cli import app; app()", "serve", "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def readyz(url: str) -> dict:
    try:
        return httpx.get(f"{url}/readyz", timeout=30).json()
    except httpx.TransportError:
        return {}


def approve(registry: Registry, name: str) -> None:
    registry.judge(name, report={"passed": True, "gates": []}, failed=[])


def swap(registry: Registry, url: str, name: str, load: LoadGenerator, *, warm: bool) -> tuple[float, float]:
    """Promote ``name`` (approved now and loaded ahead when ``warm``); return (seconds until the replica served it
    as live, seconds until a client saw it)."""
    if warm:
        approve(registry, name)
        while name not in readyz(url).get("loaded_versions", ()):
            time.sleep(0.02)
    registry.promote(name, actor="bench", reason="swap benchmark")
    t0 = time.time()
    while (status := readyz(url)).get("live_version") != name:
        time.sleep(0.02)  # faster polling would load the replica's event loop it measures
    while name not in load.first_seen:
        time.sleep(0.005)
    return status["live_since"] - t0, load.first_seen[name] - t0


def report(results: dict[str, tuple[list[float], list[float]]], base: list[float], load: LoadGenerator) -> None:
    def p(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000

    print(f"\n{'per swap (ms)':52} {'p50':>8} {'p95':>8} {'max':>8}")
    rows = [("baseline: bare adapter load (verify + peft)", base)]
    for kind, (switch, served) in results.items():
        rows += [(f"{kind}: promotion → replica serves it as live", switch),
                 (f"{kind}: promotion → first response on new version", served)]
    for label, values in rows:
        print(f"{label:52} {p(values, 50):8.1f} {p(values, 95):8.1f} {max(values) * 1000:8.1f}")
    swaps = sum(len(switch) for switch, _ in results.values())
    print(f"\nswaps {swaps}, requests completed {load.completed}, requests failed {len(load.failures)}")
    for kind, (switch, served) in results.items():
        print(f"{kind}: switch p50 / bare load p50 {p(switch, 50) / p(base, 50):.2f}, "
              f"first response p95 / bare load p50 {p(served, 95) / p(base, 50):.2f}")
    for failure in load.failures[:5]:
        print("  failure:", failure)


def run(args: argparse.Namespace, tmp: Path, broker: EmbeddedBroker) -> None:
    settings = Settings(_env_file=None, data_dir=tmp / "var", model_cache_dir=REPO / "var" / "models",
                        kafka_bootstrap=broker.bootstrap, max_batch_size=args.clients)
    model_id, model_dir = prepare_base_model(settings)
    names = {kind: [f"{kind}-{i:02d}" for i in range(args.swaps)] for kind in ("cold", "warm")}
    paths = write_adapters(model_dir, model_id, names["cold"] + names["warm"] +
                           [f"baseline-{i}" for i in range(args.baseline_loads + 1)], tmp / "written")
    migrate(settings.resolved_database_url)
    registry = open_registry(make_sessionmaker(make_engine(settings.resolved_database_url)), settings)
    for name in names["cold"] + names["warm"]:
        registry.register(name, paths[name])
    for name in names["cold"]:  # approved long before their promotion, oldest promoted first
        approve(registry, name)
    ensure_topics(settings)
    url = f"http://127.0.0.1:{free_port()}"
    replica = start_replica(settings, int(url.rsplit(":", 1)[1]), args.threads, tmp / "replica.log")
    while readyz(url).get("status") != "ready":
        if replica.poll() is not None:
            raise SystemExit(f"the replica exited with {replica.returncode}:\n{(tmp / 'replica.log').read_text()}")
        time.sleep(0.2)
    load = LoadGenerator(url, args.clients, args.max_tokens)
    try:
        while not load.first_seen:  # the load is running
            time.sleep(0.05)
        print(f"{model_id} float32, replica torch threads {args.threads or 'default'}, {args.clients} streaming "
              f"clients × {args.max_tokens} tokens, {args.swaps} swaps")
        base = baseline_loads(model_dir, model_id, [p for n, p in paths.items() if n.startswith("baseline-")])
        results = {}
        for kind, kind_names in names.items():
            results[kind] = ([], [])
            for name in kind_names:
                time.sleep(args.pause)  # let the previous swap's requests drain into the new version
                for timings, seconds in zip(results[kind], swap(registry, url, name, load, warm=kind == "warm"),
                                            strict=True):
                    timings.append(seconds)
    finally:
        load.stop()
        replica.terminate()
        replica.wait(60)
    report(results, base, load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=20, help="swaps of each kind (cold, warm)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between one swap's end and the next")
    parser.add_argument("--baseline-loads", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="the replica's torch threads; 0 keeps the default")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # the load generator's own process
    args = parser.parse_args()
    if args.load:
        load_main(args.load, args.clients, args.max_tokens)
        return
    with tempfile.TemporaryDirectory(prefix="liveloop-swap-") as tmp, \
            EmbeddedBroker(log_path=Path(tmp) / "tansu.log") as broker:
        run(args, Path(tmp), broker)


if __name__ == "__main__":
    main()
