"""One sequence being generated: its prompt, sampling parameters, adapter, random generator and tokens so far.

The model runner hands each sampled token to ``append`` and ends a sequence with ``finish`` or ``fail``; serving's
sequence (``serving.engine``) extends them to stream tokens, apply stop strings and publish the result.
"""

from __future__ import annotations

from collections.abc import Sequence as Ids

import torch

from liveloop.sampling import SamplingParams


class Sequence:
    """A prompt and what was sampled for it; ``finish_reason`` is None while it still runs."""

    def __init__(self, prompt_ids: Ids[int], params: SamplingParams, *, generator: torch.Generator,
                 adapter: str | None = None):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.generator = generator  # one uniform draw per token (liveloop.sampling.sample)
        self.adapter = adapter  # the peft adapter this row runs under (None: the base, adapters off)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []  # behaviour log-probs: each token's under the distribution sampled from
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float, reason: str | None) -> None:
        """Add a sampled token; ``reason`` ("stop": an end token, "length": max_tokens or the context) ends it."""
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        if reason is not None:
            self.finish(reason)

    def finish(self, reason: str) -> None:
        self.finish_reason = reason

    def fail(self, error: BaseException) -> None:
        """The forward pass or sampling of this sequence's batch raised ``error``."""
        self.error = error
        self.finish_reason = "error"
