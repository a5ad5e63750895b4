"""Serving throughput, measured side by side in one run on the same model, prompts and sampling parameters.

  (a) sequential ``model.generate``, one request at a time: the baseline every ratio refers to;
  (b) the engine at 1, 8 and 32 concurrent clients (closed loop: each client sends its next request when the last
      one finished), reporting aggregate tokens/s, p50/p95 request latency and p50 time to first token;
  (c) the bound: one bare batched decode step (forward pass only) for 32 sequences, as tokens/s.

With ``--adapter`` a random r16 LoRA on all seven projections is loaded and every request uses it, as the live
policy adapter would be; the bound is then reported both without and with the adapter.

Clients are coroutines ``generate(prompt_ids, seed) -> Sample``, so another transport (an HTTP client against
``liveloop serve``) plugs into ``drive`` beside ``engine_client``. Timings on a shared machine move with its load;
the ratios, measured in one run, are what to compare.

    python bench/serving.py --max-tokens 64 --concurrency 1 8 32 [--adapter] [--dtype bfloat16] [--threads 2]
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
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

# `python bench/serving.py` puts bench/ first on sys.path, where this file would shadow the `serving` package.
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path.pop(0)

import httpx
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from feedback.broker import free_port
from liveloop.adapter_artifacts import default_lora_config, save_adapter
from liveloop.artifacts import LocalArtifactStore
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.engine.batch import DecodeBatch
from liveloop.model import LoadedModel, load_base_model
from liveloop.registry import Registry
from liveloop.sampling import SamplingParams
from liveloop.settings import Settings
from serving.engine import Engine, GenerationRequest

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
    "Give me three tips for better sleep.", "What is a prime number?", "Describe a sunset in two sentences.",
    "How do vaccines work?", "Suggest a name for a pet turtle.", "Why is the sky blue?", "What is 12 times 13?",
    "Summarise the plot of Cinderella.", "How do I boil an egg?", "What rhymes with orange?",
    "Tell me a fun fact about octopuses.", "What is photosynthesis?", "Write a limerick about a cat.",
    "How far is the Moon?", "What does a CPU do?", "Name three famous painters.", "How do bees make honey?",
    "What is the Pythagorean theorem?", "Give me a synonym for happy.", "Why do leaves change colour?",
    "What is machine learning?", "Write a short thank-you note.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Describe a rainforest.", "What is an atom?",
    "Suggest a weekend activity.", "What causes thunder?", "Explain what a verb is.",
]


@dataclass
class Sample:
    tokens: int
    latency: float
    first_token: float


@dataclass
class Run:
    name: str
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def latency_quantile(self, q: float) -> float:
        latencies = sorted(s.latency for s in self.samples)
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]


Client = Callable[[list[int], int], Awaitable[Sample]]


async def drive(name: str, generate: Client, prompts: list[list[int]], concurrency: int, rounds: int) -> Run:
    """``concurrency`` clients in a closed loop, ``rounds`` requests each, over the prompts in turn."""
    run = Run(name)
    queue = list(range(concurrency * rounds))

    async def client() -> None:
        while queue:
            i = queue.pop()
            run.samples.append(await generate(prompts[i % len(prompts)], i))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - started
    return run


def engine_client(engine: Engine, params: SamplingParams, adapter: str | None) -> Client:
    async def generate(prompt_ids: list[int], seed: int) -> Sample:
        started = time.perf_counter()
        first = None
        stream = engine.submit(GenerationRequest(prompt_ids, replace(params, seed=seed), adapter=adapter))
        async for _ in stream:
            first = first or time.perf_counter() - started
        result = await stream.result()
        return Sample(len(result.token_ids), time.perf_counter() - started, first)

    return generate


def http_client(http: httpx.AsyncClient, params: SamplingParams, messages: dict[int, list[dict]]) -> Client:
    """A streaming chat-completions client against a running ``liveloop serve`` (the live alias)."""

    async def generate(prompt_ids: list[int], seed: int) -> Sample:
        body = {"model": "liveloop", "messages": messages[id(prompt_ids)], "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "seed": seed, "stream": True,
                "stream_options": {"include_usage": True}}
        started, first, tokens = time.perf_counter(), None, 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter() - started
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return Sample(tokens, time.perf_counter() - started, first or float("nan"))

    return generate


@contextmanager
def running_server(adapter_dir: Path | None, dtype: str, threads: int) -> Iterator[str]:
    """``liveloop serve`` in a subprocess on a fresh SQLite database; with ``adapter_dir``, registered and
    promoted first, so the live alias serves through that adapter as production would."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), model_cache_dir=Settings().resolved_model_cache_dir, dtype=dtype,
                            torch_threads=threads, max_batch_size=32, max_queue=256)
        if adapter_dir is not None:
            migrate(settings.resolved_database_url)
            sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
            registry = Registry(sessions, LocalArtifactStore(settings.resolved_artifact_dir))
            registry.register("bench-live", adapter_dir)
            registry.judge("bench-live", report={}, failed=[])
            registry.promote("bench-live", actor="bench", reason="serving benchmark")
        port = free_port()
        env = {**os.environ, **{f"LIVELOOP_{k.upper()}": str(v) for k, v in {
            "data_dir": tmp, "model_cache_dir": settings.resolved_model_cache_dir, "dtype": dtype,
            "torch_threads": threads, "max_batch_size": 32, "max_queue": 256, "port": port}.items()}}
        server = subprocess.Popen([sys.executable, "-m", "liveloop", "serve"], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, server, expect_live="bench-live" if adapter_dir else None)
            yield url
        finally:
            server.terminate()
            server.wait(60)


def _wait_ready(url: str, server: subprocess.Popen, expect_live: str | None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"liveloop serve exited with {server.returncode}")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=2)
            if ready.status_code == 200 and ready.json()["live_version"] == expect_live:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready with live version {expect_live} in {timeout_s} s")


def sequential_generate(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, requests: int,
                        pad_token_id: int, **generate_kwargs) -> Run:
    """The baseline: ``model.generate`` one request at a time (no batching, its own KV cache)."""
    run = Run("sequential generate")
    started = time.perf_counter()
    for i in range(requests):
        prompt = torch.tensor([prompts[i % len(prompts)]])
        t0 = time.perf_counter()
        torch.manual_seed(i)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                             temperature=params.temperature, top_p=params.top_p, max_new_tokens=params.max_tokens,
                             pad_token_id=pad_token_id, **generate_kwargs)
        latency = time.perf_counter() - t0
        run.samples.append(Sample(out.shape[1] - prompt.shape[1], latency, float("nan")))
    run.seconds = time.perf_counter() - started
    return run


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


def random_adapter(base: LoadedModel, dest: Path) -> Path:
    """An r16 LoRA on all seven projections with small random B: the cost of a real policy adapter."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base.path, dtype=base.dtype), default_lora_config(),
                           adapter_name="policy")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    save_adapter(model, "policy", dest, base_model_id=base.model_id)
    return dest


def report(runs: list[Run], baseline: Run, bounds: dict[str, float]) -> None:
    print(f"\n{'configuration':34} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} "
          f"{'ttft50 s':>8} {'× seq':>6}")
    for run in [baseline, *runs]:
        ttft = statistics.median(s.first_token for s in run.samples)
        print(f"{run.name:34} {len(run.samples):5d} {run.tokens:7d} {run.tokens_per_second:8.1f} "
              f"{run.latency_quantile(0.5):7.2f} {run.latency_quantile(0.95):7.2f} {ttft:8.2f} "
              f"{run.tokens_per_second / baseline.tokens_per_second:6.2f}")
    for name, tokens_per_second in bounds.items():
        print(f"{name:34} {'':5} {'':7} {tokens_per_second:8.1f}")
    widest = runs[-1]
    for name, tokens_per_second in bounds.items():
        print(f"{widest.name} / {name}: {widest.tokens_per_second / tokens_per_second:.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--sequential-requests", type=int, default=4, help="requests for the generate baseline")
    parser.add_argument("--adapter", action="store_true", help="every request uses a (random) r16 LoRA adapter")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--http", action="store_true",
                        help="also measure `liveloop serve` over HTTP (streaming, the live alias) at each concurrency")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    base = load_base_model(Settings(dtype=args.dtype, torch_threads=args.threads))
    prompts = [base.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  return_dict=False) for q in QUESTIONS]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    engine = Engine(base, max_batch_size=max(args.concurrency), max_queue=max(args.concurrency) * 2)
    bounds = {"decode-step bound, 32 rows": 32 / decode_step_seconds(base.model, prompts[:32])}
    adapter, generate_kwargs = None, {}
    if args.adapter:
        adapter = "live"
        with tempfile.TemporaryDirectory() as tmp:
            engine.load_adapter(adapter, random_adapter(base, Path(tmp) / adapter))
            engine.step()  # runs the load
        generate_kwargs = {"adapter_names": [engine.adapter_slot(adapter)]}
        bounds["decode-step bound, 32 rows, adapter"] = 32 / decode_step_seconds(
            engine.model, prompts[:32], adapter_names=generate_kwargs["adapter_names"] * 32)
    print(f"model {base.model_id} {args.dtype}, torch threads {torch.get_num_threads()}, adapter {adapter}, "
          f"{args.max_tokens} new tokens at T={args.temperature} top_p={args.top_p}")
    sequential_generate(engine.model, prompts, replace(params, max_tokens=2), 1, base.tokenizer.pad_token_id,
                        **generate_kwargs)  # warm-up
    baseline = sequential_generate(engine.model, prompts, params, args.sequential_requests,
                                   base.tokenizer.pad_token_id, **generate_kwargs)
    engine.start()
    client = engine_client(engine, params, adapter)
    runs = [asyncio.run(drive(f"engine, {c} concurrent", client, prompts, c, args.rounds)) for c in args.concurrency]
    engine.shutdown()
    if args.http:
        runs += http_runs(args, base, prompts, params)
    report(runs, baseline, bounds)


def http_runs(args: argparse.Namespace, base: LoadedModel, prompts: list[list[int]],
              params: SamplingParams) -> list[Run]:
    messages = {id(p): [{"role": "user", "content": q}] for p, q in zip(prompts, QUESTIONS, strict=True)}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = random_adapter(base, Path(tmp) / "bench-live") if args.adapter else None
        with running_server(adapter_dir, args.dtype, args.threads) as url:

            async def measure(concurrency: int) -> Run:
                async with httpx.AsyncClient(base_url=url, timeout=600,
                                             limits=httpx.Limits(max_connections=64)) as http:
                    client = http_client(http, params, messages)
                    await drive("http warm-up", client, prompts, 1, 1)
                    return await drive(f"HTTP, {concurrency} concurrent", client, prompts, concurrency, args.rounds)

            return [asyncio.run(measure(c)) for c in args.concurrency]


if __name__ == "__main__":
    main()
