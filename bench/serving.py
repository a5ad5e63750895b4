"""Serving throughput against transformers' continuous batching and against the decode-step bound, in one run.

For each dtype and each concurrency, on the same chat prompts and sampling parameters (temperature, top_p,
max_tokens; a request may stop early at EOS, and tokens/s counts the tokens generated), with the same closed loop
of clients (each sends its next request when its last one finished), ``rounds`` requests per client:

  (a) the peer: transformers' continuous batching (the manager behind ``generate_batch``: paged KV cache, its own
      scheduler and sampler), in this process, no adapter;
  (b) the engine alone: ``serving.engine.Engine`` in a subprocess, its load sent from this process over a bare
      local socket (one JSON line per request, a line back per token): the engine without HTTP, SSE, the chat
      template and the database; with no adapter, and with a live (random r16) adapter on every request;
  (c) ``liveloop serve`` over HTTP (streaming, the live alias) in a subprocess, as production runs it: with no
      live version, and with the same adapter registered and promoted live;
  (d) the bounds: one bare batched decode step (forward only) for max(concurrency) rows, without the adapter and
      with it unmerged, as tokens/s. Serving merges its live version into the weights, and a batch of its rows
      runs the very forward of the model without adapters: the live-adapter rows are held to the first bound.

Each row prints tokens/s, p50/p95 request latency, p50 time to first token and ``× peer``, its ratio to (a) at the
same concurrency and dtype; then each HTTP row at the largest concurrency against the bounds. Timings on a shared
machine move with its load: compare the ratios, measured in one run. The servers get ``--threads`` torch threads,
as does this process (the peer and the bounds); 0 keeps torch's default.

    python bench/serving.py --dtype float32 bfloat16 --concurrency 1 8 32 --max-tokens 64 [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

# `python bench/….py` puts bench/ first on sys.path, where bench/serving.py and bench/feedback.py would shadow the
# packages of those names: the repository goes first, and bench/ last, for its shared helpers (loadgen)
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[:1] = [str(Path(__file__).resolve().parent.parent)]
    sys.path.append(str(Path(__file__).resolve().parent))

import torch
from loadgen import REPO, Client, Run, Sample, chat_prompts, drive, http_run, random_adapter, running_server
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from feedback.broker import free_port
from liveloop.engine.batch import DecodeBatch
from liveloop.model import LoadedModel, load_base_model
from liveloop.sampling import SamplingParams
from liveloop.settings import Settings
from serving.engine import Engine, GenerationRequest

ADAPTER = "live"


def decode_step_seconds(model: torch.nn.Module, prompts: list[list[int]], steps: int = 8,
                        **forward_kwargs) -> float:
    """Median time of one bare decode step (forward only, greedy feed) for len(prompts) sequences: the bound."""
    batch, logits = DecodeBatch.prefill(model, prompts, **forward_kwargs)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        logits = batch.decode(model, logits.argmax(-1), **forward_kwargs)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bounds(base: LoadedModel, prompts: list[list[int]], adapter_dir: Path) -> dict[str, float]:
    rows = len(prompts)
    engine = Engine(base, max_batch_size=rows, max_queue=rows)
    found = {f"decode-step bound, {rows} rows": rows / decode_step_seconds(base.model, prompts)}
    engine.load_adapter(ADAPTER, adapter_dir)
    engine.step()  # runs the load
    slots = [engine.adapter_slot(ADAPTER)] * rows
    found[f"decode-step bound, {rows} rows, adapter unmerged"] = rows / decode_step_seconds(engine.model, prompts,
                                                                                           adapter_names=slots)
    return found


async def transformers_runs(model: torch.nn.Module, eos_token_ids: list[int], prompts: list[list[int]],
                            params: SamplingParams, concurrencies: list[int], rounds: int) -> list[Run]:
    """The peer at each concurrency: a manager sized for it (the KV cache it reserves is otherwise 60 % of free
    RAM), requests added by the closed loop, tokens streamed back to its handler on this event loop."""
    config = GenerationConfig(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0,
                              max_new_tokens=params.max_tokens, eos_token_id=eos_token_ids)
    runs = []
    for concurrency in concurrencies:
        pages_per_request = -(-(max(map(len, prompts)) + params.max_tokens) // 256)  # default page_size
        manager = model.init_continuous_batching(config, ContinuousBatchingConfig(
            num_blocks=2 * concurrency * pages_per_request, max_batch_tokens=4096,
            max_requests_per_batch=concurrency))
        manager.start()
        try:
            client = transformers_client(manager)
            await drive("warm-up", client, prompts, 1, 1)
            runs.append(await drive(f"transformers CB, {concurrency} concurrent", client, prompts, concurrency,
                                    rounds))
        finally:
            manager.stop(block=True)
            manager.destroy()
    return runs


def transformers_client(manager) -> Client:
    counter = iter(range(sys.maxsize))

    async def generate(prompt_ids: list[int], seed: int) -> Sample:
        done, times = asyncio.get_running_loop().create_future(), []

        def on_output(output) -> None:
            times.extend([time.perf_counter()] * (len(output.generated_tokens) - len(times)))
            if output.is_finished():
                done.set_result(output)

        request_id = f"bench-{next(counter)}"
        manager.register_result_handler(request_id, on_output)
        started = time.perf_counter()
        manager.add_request(prompt_ids, request_id=request_id, streaming=True)
        output = await done
        if output.error is not None:
            raise RuntimeError(output.error)
        return Sample(len(times), time.perf_counter() - started, times[0] - started if times else float("nan"),
                      times)

    return generate


@contextmanager
def engine_process(args: argparse.Namespace, dtype: str, adapter_dir: Path | None) -> Iterator[int]:
    """This file's ``--engine-server`` mode in a subprocess; yields its port once it listens."""
    port = free_port()
    command = [sys.executable, __file__, "--engine-server", str(port), "--dtype", dtype, "--threads",
               str(args.threads), "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
               "--top-p", str(args.top_p), "--concurrency", str(max(args.concurrency))]
    if adapter_dir is not None:
        command += ["--adapter-dir", str(adapter_dir)]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the engine server exited with {server.wait()}")
        yield port
    finally:
        server.terminate()
        server.wait(60)


def serve_engine(args: argparse.Namespace) -> None:
    """``--engine-server PORT``: the engine in this process; per connection one request, a line per token."""
    base = load_base_model(Settings(dtype=args.dtype[0], torch_threads=args.threads))
    concurrency = args.concurrency[0]
    engine = Engine(base, max_batch_size=concurrency, max_queue=4 * concurrency)
    if args.adapter_dir:
        engine.load_adapter(ADAPTER, args.adapter_dir)
        engine.merge_adapter(ADAPTER)  # as serving does with its live version
        engine.step()
    engine.start()
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = json.loads(await reader.readline())
        stream = engine.submit(GenerationRequest(request["prompt_ids"], replace(params, seed=request["seed"]),
                                                 adapter=ADAPTER if args.adapter_dir else None))
        async for _ in stream:
            writer.write(b"t\n")
        writer.write(b"end\n")
        await writer.drain()
        writer.close()

    async def listen() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", args.engine_server)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(listen())
    finally:
        engine.shutdown()


def socket_client(port: int) -> Client:
    async def generate(prompt_ids: list[int], seed: int) -> Sample:
        started, times = time.perf_counter(), []
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(json.dumps({"prompt_ids": prompt_ids, "seed": seed}).encode() + b"\n")
        while await reader.readline() == b"t\n":
            times.append(time.perf_counter())
        writer.close()
        return Sample(len(times), time.perf_counter() - started,
                      times[0] - started if times else float("nan"), times)

    return generate


async def socket_runs(port: int, label: str, prompts: list[list[int]], args: argparse.Namespace) -> list[Run]:
    client = socket_client(port)
    await drive("warm-up", client, prompts, 1, 1)
    return [await drive(f"engine alone, {label}, {c} concurrent", client, prompts, c, args.rounds)
            for c in args.concurrency]


def measure_dtype(args: argparse.Namespace, dtype: str, adapter_dir: Path) -> tuple[list[Run], dict[str, float]]:
    base = load_base_model(Settings(dtype=dtype, torch_threads=args.threads))
    prompts = chat_prompts(base)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    found = bounds(base, (prompts * 4)[:max(args.concurrency)], adapter_dir)
    # the peer gets a model of its own: the engine's has LoRA layers injected, and the peer swaps attention
    peer = AutoModelForCausalLM.from_pretrained(base.path, dtype=base.dtype).eval()
    runs = asyncio.run(transformers_runs(peer, sorted(base.eos_token_ids), prompts, params, args.concurrency,
                                         args.rounds))
    del base, peer
    gc.collect()
    for label, adapter in (("no adapter", None), ("live adapter", adapter_dir)):
        with engine_process(args, dtype, adapter) as port:
            runs += asyncio.run(socket_runs(port, label, prompts, args))
        with running_server(adapter, dtype, args.threads, max(args.concurrency)) as url:
            runs += [asyncio.run(http_run(url, f"HTTP, {label}, {c} concurrent", params, prompts, c, args.rounds))
                     for c in args.concurrency]
    return runs, found


def report(dtype: str, runs: list[Run], found: dict[str, float], concurrencies: list[int]) -> None:
    peers = {run.concurrency: run for run in runs if run.name.startswith("transformers CB")}
    print(f"\n{dtype}\n{'configuration':44} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} "
          f"{'ttft50 s':>8} {'× peer':>6}")
    for run in sorted(runs, key=lambda r: r.concurrency):
        peer = peers[run.concurrency]
        ttft = statistics.median(s.first_token for s in run.samples)
        print(f"{run.name:44} {len(run.samples):5d} {run.tokens:7d} {run.tokens_per_second:8.1f} "
              f"{run.latency_quantile(0.5):7.2f} {run.latency_quantile(0.95):7.2f} {ttft:8.2f} "
              f"{run.tokens_per_second / peer.tokens_per_second:6.2f}")
    for name, tokens_per_second in found.items():
        print(f"{name:44} {'':5} {'':7} {tokens_per_second:8.1f}")
    widest = max(concurrencies)
    for label, bound in (("no adapter", f"decode-step bound, {widest} rows"),
                         ("live adapter", f"decode-step bound, {widest} rows")):  # merged: the same forward
        run = next(r for r in runs if r.name == f"HTTP, {label}, {widest} concurrent")
        print(f"{run.name} / {bound}: {run.tokens_per_second / found[bound]:.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads of every process; 0: torch's default")
    parser.add_argument("--engine-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.engine_server:
        serve_engine(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.max_tokens} new tokens at "
          f"T={args.temperature} top_p={args.top_p}, {args.rounds} requests per client", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = random_adapter(load_base_model(Settings()), Path(tmp) / "bench-live")
        for dtype in args.dtype:
            runs, found = measure_dtype(args, dtype, adapter_dir)
            report(dtype, runs, found, args.concurrency)


if __name__ == "__main__":
    main()
