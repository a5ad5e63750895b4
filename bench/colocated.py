"""Serving and training on one machine, as ``liveloop up`` runs them: each alone, then both together, in one run.

For each split of torch threads between the two processes (``serve:train``; by default ``liveloop up``'s own,
``core_split`` of the settings, and ``0:0``, torch's default of every core for each):

- serving: ``liveloop serve`` in a subprocess with the serve threads, fp32, the live alias through a random r16 adapter,
  ``--concurrency`` streaming clients from this process in a closed loop; tokens/s counts the tokens that arrive
  within the measured window;
- training: one PPO update of bench/ppo.py's shape and default config (``bench/ppo.py --variant ours``) in a
  subprocess with the train threads; tokens/s as bench/ppo.py counts them, over the update alone (not the load);
- three phases: the update alone; serving alone, for as long as that update took; both, the load running from
  before the update starts until it ends, and serving counted over the update's own start to end.

Printed: each side's tokens/s alone and together, and together / alone. Timings on a shared machine move with its
load: compare the ratios, measured in one run.

    python bench/colocated.py [--splits 1:1 0:0] [--concurrency 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# `python bench/….py` puts bench/ first on sys.path, where bench/serving.py and bench/feedback.py would shadow the
# packages of those names: the repository goes first, and bench/ last, for its shared helpers (loadgen)
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[:1] = [str(Path(__file__).resolve().parent.parent)]
    sys.path.append(str(Path(__file__).resolve().parent))

from loadgen import REPO, Run, chat_prompts, http_run, random_adapter, running_server

from liveloop.cli import core_split
from liveloop.model import load_base_model
from liveloop.sampling import SamplingParams
from liveloop.settings import Settings

CLOCK_OFFSET = time.time() - time.perf_counter()  # Unix time of the trainer's report → this process's perf_counter


@dataclass
class Phase:
    serve_tokens_per_s: float | None = None
    train_tokens_per_s: float | None = None


def serving_rate(run: Run, start: float, end: float) -> float:
    return run.tokens_between(start, end) / (end - start)


async def train(threads: int, shape: list[int]) -> dict:
    """One update of bench/ppo.py in a subprocess; its report, with start and end on this process's clock."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "bench" / "ppo.py"), "--variant", "ours", "--threads", str(threads),
        "--shape", *map(str, shape), cwd=REPO, stdout=subprocess.PIPE)
    out, _ = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"bench/ppo.py exited with {process.returncode}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    return report | {"started": report["started"] - CLOCK_OFFSET, "ended": report["ended"] - CLOCK_OFFSET}


async def serve_for(url: str, params: SamplingParams, prompts: list[list[int]], concurrency: int,
                    seconds: float) -> float:
    stop = asyncio.Event()
    load = asyncio.create_task(http_run(url, "serving alone", params, prompts, concurrency, until=stop))
    await asyncio.sleep(seconds / 4)  # the batch fills up before the window opens
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    return serving_rate(await load, start, start + seconds)


async def together(url: str, params: SamplingParams, prompts: list[list[int]], args: argparse.Namespace,
                   threads: int) -> Phase:
    stop = asyncio.Event()
    load = asyncio.create_task(http_run(url, "serving beside training", params, prompts, args.concurrency,
                                        until=stop))
    report = await train(threads, args.train_shape)
    stop.set()
    return Phase(serving_rate(await load, report["started"], report["ended"]), report["tokens_per_s"])


def measure_split(serve_threads: int, train_threads: int, adapter_dir: Path, args: argparse.Namespace,
                  prompts: list[list[int]]) -> tuple[Phase, Phase]:
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    trained = asyncio.run(train(train_threads, args.train_shape))
    alone = Phase(train_tokens_per_s=trained["tokens_per_s"])
    print(f"  training alone: {alone.train_tokens_per_s:.1f} tokens/s ({trained['seconds']:.1f} s)", flush=True)
    with running_server(adapter_dir, "float32", serve_threads, args.concurrency) as url:
        alone.serve_tokens_per_s = asyncio.run(serve_for(url, params, prompts, args.concurrency,
                                                         trained["seconds"]))
        print(f"  serving alone: {alone.serve_tokens_per_s:.1f} tokens/s", flush=True)
        both = asyncio.run(together(url, params, prompts, args, train_threads))
    return alone, both


def parse_split(text: str) -> tuple[int, int]:
    serve, _, train_ = text.partition(":")
    return int(serve), int(train_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_split = "{}:{}".format(*core_split(Settings(), os.cpu_count() or 1))
    parser.add_argument("--splits", nargs="+", default=[default_split, "0:0"],
                        help="serve:train torch threads; 0 is torch's default (every core)")
    parser.add_argument("--concurrency", type=int, default=8, help="serving clients in a closed loop")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--train-shape", type=int, nargs=3, default=[16, 40, 128],
                        metavar=("BATCH", "PROMPT", "RESPONSE"), help="bench/ppo.py --shape")
    args = parser.parse_args()
    base = load_base_model(Settings())
    prompts = chat_prompts(base)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; serving {args.concurrency} clients × "
          f"{args.max_tokens} tokens with a live r16 adapter; training bench/ppo.py's update", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = random_adapter(base, Path(tmp) / "bench-live")
        for split in args.splits:
            print(f"split {split} (serve:train threads)", flush=True)
            results[split] = measure_split(*parse_split(split), adapter_dir, args, prompts)
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    print(f"{'serve:train':12} {'serve alone':>11} {'together':>9} {'ratio':>6} {'train alone':>11} {'together':>9} "
          f"{'ratio':>6}")
    for split, (alone, both) in results.items():
        print(f"{split:12} {alone.serve_tokens_per_s:11.1f} {both.serve_tokens_per_s:9.1f} "
              f"{both.serve_tokens_per_s / alone.serve_tokens_per_s:6.2f} {alone.train_tokens_per_s:11.1f} "
              f"{both.train_tokens_per_s:9.1f} {both.train_tokens_per_s / alone.train_tokens_per_s:6.2f}")


if __name__ == "__main__":
    main()
