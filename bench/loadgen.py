"""What the serving benchmarks share: the prompts, closed-loop clients, and ``liveloop serve`` in a subprocess.

Not run on its own: ``bench/serving.py`` (serving against its peers and its bound) and ``bench/colocated.py``
(serving beside the trainer) import it. A client is a coroutine ``generate(prompt_ids, seed) -> Sample``; ``drive``
runs any number of them in a closed loop (each client sends its next request when its last one finished), so the
same load reaches every system measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from feedback.broker import free_port
from liveloop.adapter_artifacts import default_lora_config, save_adapter
from liveloop.artifacts import LocalArtifactStore
from liveloop.db import make_engine, make_sessionmaker, migrate
from liveloop.model import LoadedModel
from liveloop.registry import Registry
from liveloop.sampling import SamplingParams
from liveloop.settings import Settings

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
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    tokens: int
    latency: float
    first_token: float
    token_times: list[float] = field(default_factory=list)  # perf_counter of each token's arrival, where streamed


@dataclass
class Run:
    name: str
    concurrency: int = 0
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

    def tokens_between(self, start: float, end: float) -> int:
        """Tokens that arrived in [start, end] (perf_counter): the rate of a window that other work shares."""
        return sum(start <= t <= end for s in self.samples for t in s.token_times)


Client = Callable[[list[int], int], Awaitable[Sample]]


def chat_prompts(base: LoadedModel) -> list[list[int]]:
    return [base.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               return_dict=False) for q in QUESTIONS]


async def drive(name: str, generate: Client, prompts: list[list[int]], concurrency: int, rounds: int = 0,
                until: asyncio.Event | None = None) -> Run:
    """``concurrency`` clients in a closed loop over the prompts in turn: ``rounds`` requests each, or, with
    ``until``, until it is set (requests in flight then finish)."""
    run, sent = Run(name, concurrency), 0

    async def client() -> None:
        nonlocal sent
        while (sent < concurrency * rounds) if until is None else not until.is_set():
            i, sent = sent, sent + 1
            run.samples.append(await generate(prompts[i % len(prompts)], i))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - started
    return run


def http_client(http: httpx.AsyncClient, params: SamplingParams, prompts: list[list[int]]) -> Client:
    """A streaming chat-completions client of the live alias; each prompt is sent as its question."""
    messages = {tuple(p): [{"role": "user", "content": q}] for p, q in zip(prompts, QUESTIONS, strict=True)}

    async def generate(prompt_ids: list[int], seed: int) -> Sample:
        body = {"model": "liveloop", "messages": messages[tuple(prompt_ids)], "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "seed": seed, "stream": True,
                "stream_options": {"include_usage": True}}
        started, times, tokens = time.perf_counter(), [], 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        end = time.perf_counter()
        # a chunk carries a token's text; tokens held back (a partial character) arrive with the next chunk
        times += [end] * max(0, tokens - len(times))
        return Sample(tokens, end - started, times[0] - started if times else float("nan"), times)

    return generate


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


@contextmanager
def running_server(adapter_dir: Path | None, dtype: str, threads: int, max_batch_size: int) -> Iterator[str]:
    """``liveloop serve`` in a subprocess on a fresh SQLite database; with ``adapter_dir``, registered and
    promoted first, so the live alias serves through that adapter as production would."""
    with tempfile.TemporaryDirectory() as tmp:
        values = {"data_dir": tmp, "model_cache_dir": Settings().resolved_model_cache_dir, "dtype": dtype,
                  "torch_threads": threads, "max_batch_size": max_batch_size, "max_queue": 4 * max_batch_size,
                  "port": free_port(), "kafka_bootstrap": "", "relay_in_api": False}
        if adapter_dir is not None:
            promote(Settings(_env_file=None, data_dir=Path(tmp)), adapter_dir)
        env = {**os.environ, **{f"LIVELOOP_{k.upper()}": str(v) for k, v in values.items()}}
        log = Path(tmp) / "serve.log"  # uvicorn logs every request: kept out of the bench's output
        with log.open("wb") as output:
            server = subprocess.Popen([sys.executable, "-m", "liveloop", "serve"], env=env, cwd=REPO,
                                      stdout=output, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{values['port']}"
        try:
            wait_ready(url, server, expect_live="bench-live" if adapter_dir else None, log=log)
            yield url
        finally:
            server.terminate()
            server.wait(60)


def promote(settings: Settings, adapter_dir: Path) -> None:
    migrate(settings.resolved_database_url)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    registry = Registry(sessions, LocalArtifactStore(settings.resolved_artifact_dir))
    registry.register("bench-live", adapter_dir)
    registry.judge("bench-live", report={}, failed=[])
    registry.promote("bench-live", actor="bench", reason="serving benchmark")


def wait_ready(url: str, server: subprocess.Popen, expect_live: str | None, log: Path,
               timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"liveloop serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=2)
            if ready.status_code == 200 and ready.json()["live_version"] == expect_live:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready with live version {expect_live} in {timeout_s} s")


async def http_run(url: str, name: str, params: SamplingParams, prompts: list[list[int]], concurrency: int,
                   rounds: int = 0, until: asyncio.Event | None = None) -> Run:
    """One closed-loop load over HTTP, after a one-request warm-up."""
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=2 * concurrency)) as http:
        client = http_client(http, params, prompts)
        await drive("warm-up", client, prompts, 1, 1)
        return await drive(name, client, prompts, concurrency, rounds, until)
