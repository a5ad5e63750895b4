"""Pinned evaluation: one version's answers to the evaluation prompts (which no simulated user sees), scored by
the taste's expected probability of a thumbs-up.

The liked share is the mean of P(up) over the answers, not of Bernoulli draws, which would add the coin's noise
to the answers' (a share of 0.3 from 96 draws has a standard error of 0.047 from the coin alone). The standard
error is over the answers. Each prompt is sampled with a fixed seed, so a
version's answers, and so its score, are the same each time it is asked; that is also why
a version is evaluated once per run and its result reused.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass

from liveloop.simulate.client import LiveloopClient, SamplingParams
from liveloop.simulate.preferences import Preference

EVAL_SEED = 1_000_003


@dataclass(frozen=True)
class Scored:
    prompt_index: int
    text: str
    p_up: float


@dataclass(frozen=True)
class Evaluation:
    model: str  # the pinned model name: the base model's id or an adapter version
    served: str  # the response's `model` field
    n: int
    liked_share: float
    stderr: float
    seconds: float
    answers: list[Scored]

    def summary(self) -> dict:
        """The evaluation without its answers."""
        return {k: v for k, v in asdict(self).items() if k != "answers"}


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


async def evaluate(client: LiveloopClient, model: str, prompts: list[str], preference: Preference, *,
                   params: SamplingParams, concurrency: int = 8, samples_per_prompt: int = 1) -> Evaluation:
    """Ask ``model`` (pinned) every prompt ``samples_per_prompt`` times and score the answers."""
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(index: int, sample: int) -> tuple[str, Scored]:
        async with gate:
            reply = await client.chat(prompts[index], model=model, params=params,
                                      seed=EVAL_SEED + sample * len(prompts) + index)
        answer = reply.answers[0]
        return answer.model, Scored(index, answer.text, preference.p_up(answer.text))

    results = await asyncio.gather(*(one(i, s) for s in range(samples_per_prompt) for i in range(len(prompts))))
    answers = [scored for _, scored in results]
    liked, stderr = mean_and_stderr([a.p_up for a in answers])
    return Evaluation(model, results[0][0], len(answers), liked, stderr, time.monotonic() - started, answers)
