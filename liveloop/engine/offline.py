"""Synchronous batched generation: prompts in, one finished ``Generation`` per prompt out.

It drives ``ModelRunner.step``, the step serving's engine runs, until every sequence has finished: the trainer's
fresh rollouts and the gates generate exactly as users are served. Stop strings are not applied: a rollout is a
whole token sequence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel

from liveloop.engine.model_runner import ModelRunner
from liveloop.engine.sequence import Sequence as Running
from liveloop.sampling import SamplingParams

# ``generate(adapter=ACTIVE_ADAPTER)``: run the model as it is (a peft model's active adapter, or none inside
# ``disable_adapter()``), rather than naming an adapter per call.
ACTIVE_ADAPTER = "__active__"


@dataclass(frozen=True)
class Generation:
    """One prompt's response and the log-prob of each response token under the distribution sampled from."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    sampling_params: SamplingParams
    finish_reason: str  # "stop" (an end-of-sequence token, kept in the response) or "length"


def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *,
             eos_token_ids: Collection[int], generator: torch.Generator, adapter: str | None = ACTIVE_ADAPTER,
             max_batch_size: int | None = None) -> list[Generation]:
    """Sample one response per prompt, ``max_batch_size`` rows at a time (all by default), continuously batched.

    ``params[i]`` gives row i its temperature, top-p, max_tokens and optionally a seed of its own; rows without a
    seed draw from ``generator`` (one uniform per row and token), so a seeded generator reproduces the whole call.
    ``adapter`` names the peft adapter every row runs under (None: the base, adapters off; peft then needs the
    model in eval mode), or ``ACTIVE_ADAPTER``. Raises ValueError for a request the model cannot generate, and
    whatever a forward pass raises.
    """
    _validate(model, prompts, params, adapter)
    per_row = adapter != ACTIVE_ADAPTER
    sequences = [Running(prompt, p, generator=generator if p.seed is None else torch.Generator().manual_seed(p.seed),
                         adapter=adapter if per_row else None)
                 for prompt, p in zip(prompts, params, strict=True)]
    runner = ModelRunner(eos_token_ids=eos_token_ids, context_length=model.config.max_position_embeddings,
                         adapter_per_row=per_row)
    waiting, limit = deque(sequences), max_batch_size or len(sequences)
    while waiting or runner.running:
        newcomers = [waiting.popleft() for _ in range(min(len(waiting), limit - len(runner.running)))]
        runner.step(model, newcomers)
        failed = next((s.error for s in sequences if s.error is not None), None)
        if failed is not None:
            raise failed
    return [Generation(tuple(s.prompt_ids), tuple(s.token_ids), tuple(s.logprobs), s.params, s.finish_reason)
            for s in sequences]


def _validate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
              adapter: str | None) -> None:
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
    context = model.config.max_position_embeddings
    if any(not prompt or p.max_tokens < 1 or len(prompt) + p.max_tokens > context
           for prompt, p in zip(prompts, params, strict=True)):
        raise ValueError(f"each prompt must be non-empty and prompt + max_tokens in [1, {context}] tokens")
    if adapter not in (None, ACTIVE_ADAPTER) and (not isinstance(model, PeftModel) or adapter not in model.peft_config):
        raise ValueError(f"adapter {adapter!r} is not loaded in this model")
