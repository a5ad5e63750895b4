"""The decode step every generation runs: serving's engine, the trainer's rollouts and the gates.

``ModelRunner.step`` prefills the sequences that join (one left-padded forward, their first token sampled), then
decodes one token for every running sequence, and drops finished ones from the batch (``DecodeBatch``). A token is
drawn only through ``liveloop.sampling``: one uniform per row from the sequence's own generator, and the log-prob
recorded is the token's under exactly the distribution sampled from (temperature, then top-p).

A sequence ends at an end-of-sequence token ("stop", the token is kept: choosing to stop is an action), after its
``max_tokens`` or at the end of the context ("length"). A failing forward fails the sequences of that forward (a
prefill's newcomers, or the whole running batch, whose cache is then in an unknown state); the runner goes on.

Rows of one batch may use different adapters: with ``adapter_per_row`` and a peft model, each forward passes
peft's ``adapter_names`` (``Sequence.adapter``; None is the base with adapters off, ``BASE_ADAPTER``), which needs
the model in eval mode. Without it the model runs as it is: its active adapter, or none inside
``disable_adapter()``. ``adapters_off``, when given, runs a batch in which no row uses an adapter without peft's
per-row machinery. ``forward_names`` maps a row's adapter to the one its forward runs under where they differ
(serving's merged version: ``serving.slots``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel

from liveloop.engine.batch import DecodeBatch
from liveloop.engine.prefix_cache import Prefix, PrefixCache
from liveloop.engine.sequence import Sequence
from liveloop.sampling import BASE_ADAPTER, sample, sampling_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutcome:
    admitted: int  # sequences prefilled this step and still running (each got its first token)
    decoded: int  # sequences that got one more token from the decode forward
    prefill_seconds: float | None  # None: no prefill ran, or it failed
    decode_seconds: float | None


class ModelRunner:
    """The running batch of one model and the step that advances it; not thread-safe (one thread steps it)."""

    def __init__(self, *, eos_token_ids: Collection[int], context_length: int, adapter_per_row: bool = True,
                 forward_names: Mapping[str | None, str] | None = None,
                 adapters_off: Callable[[], AbstractContextManager[torch.nn.Module]] | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.context_length = context_length
        self.adapter_per_row = adapter_per_row
        self.forward_names = forward_names if forward_names is not None else {}
        self.adapters_off = adapters_off
        self.prefix_cache = prefix_cache
        self.running: list[Sequence] = []
        self.batch: DecodeBatch | None = None

    def step(self, model: torch.nn.Module, newcomers: list[Sequence]) -> StepOutcome:
        """Prefill ``newcomers`` into the batch, then decode one token for every running sequence."""
        admitted, prefill_seconds = self._prefill(model, newcomers) if newcomers else (0, None)
        decoded, decode_seconds = self._decode(model) if self.running else (0, None)
        return StepOutcome(admitted, decoded, prefill_seconds, decode_seconds)

    def drop_finished(self) -> None:
        """Remove finished rows (e.g. cancelled between steps) from the batch."""
        self.batch, self.running = _compact(self.batch, self.running)

    def clear(self) -> list[Sequence]:
        """Empty the batch; return the sequences that were running."""
        running, self.running, self.batch = self.running, [], None
        return running

    def _prefill(self, model: torch.nn.Module, newcomers: list[Sequence]) -> tuple[int, float | None]:
        started = time.perf_counter()
        try:
            names = self._row_names(newcomers)
            prefixes = ([self.prefix_cache.lookup(name, s.prompt_ids) for name, s in zip(names, newcomers, strict=True)]
                        if self.prefix_cache is not None else None)
            with self._forward(model, names) as (forward_model, kwargs):
                batch, logits = DecodeBatch.prefill(forward_model, [s.prompt_ids for s in newcomers], prefixes,
                                                    **kwargs)
            self._sample(newcomers, logits)
            if self.prefix_cache is not None:
                self._keep_prefixes(batch, names, newcomers, prefixes)
        except Exception as exc:  # e.g. out of memory: these sequences fail, the running batch goes on
            log.exception("prefill of %d sequences failed", len(newcomers))
            _fail(newcomers, exc)
            return 0, None
        seconds = time.perf_counter() - started
        batch, newcomers = _compact(batch, newcomers)
        if newcomers:
            self.batch = batch if self.batch is None else self.batch.merge(batch)
            self.running += newcomers
        return len(newcomers), seconds

    def _decode(self, model: torch.nn.Module) -> tuple[int, float | None]:
        sequences = self.running
        started = time.perf_counter()
        tokens = torch.tensor([s.token_ids[-1] for s in sequences], device=model.device)  # (B,)
        try:
            with self._forward(model, self._row_names(sequences)) as (forward_model, kwargs):
                logits = self.batch.decode(forward_model, tokens, **kwargs)
            self._sample(sequences, logits)
        except Exception as exc:  # the batch's cache is in an unknown state: its sequences fail
            log.exception("decode step of %d sequences failed", len(sequences))
            _fail(self.clear(), exc)
            return 0, None
        seconds = time.perf_counter() - started
        self.drop_finished()
        return len(sequences), seconds

    def _row_names(self, sequences: list[Sequence]) -> list[str]:
        """The adapter each row's forward runs under (``BASE_ADAPTER``: none)."""
        names = self.forward_names
        return [names.get(s.adapter, s.adapter or BASE_ADAPTER) for s in sequences]

    @contextmanager
    def _forward(self, model: torch.nn.Module, names: list[str]) -> Iterator[tuple[torch.nn.Module, dict]]:
        """The model to run rows under adapters ``names`` through, and its keyword arguments."""
        if not self.adapter_per_row or not isinstance(model, PeftModel):
            yield model, {}
            return
        if self.adapters_off is not None and all(name == BASE_ADAPTER for name in names):
            with self.adapters_off() as plain:  # peft's mixed batch costs ~10 % of a step even with no adapter
                yield plain, {}
            return
        yield model, {"adapter_names": names}

    def _keep_prefixes(self, batch: DecodeBatch, names: list[str], sequences: list[Sequence],
                       prefixes: list[Prefix | None]) -> None:
        """Keep the prefixes other prompts have shared (``PrefixCache.worth_keeping``) out of this prefill."""
        for row, (name, sequence, prefix) in enumerate(zip(names, sequences, prefixes, strict=True)):
            length = self.prefix_cache.worth_keeping(name, sequence.prompt_ids, prefix.length if prefix else 0)
            if length:
                self.prefix_cache.keep(name, sequence.prompt_ids, batch.prefix(row, length))

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row of logits (N, V) and hand it to its sequence."""
        temperature = torch.tensor([s.params.temperature for s in sequences], device=logits.device)  # (N,)
        top_p = torch.tensor([s.params.top_p for s in sequences], device=logits.device)  # (N,)
        logp = sampling_logprobs(logits, temperature, top_p)  # (N, V)
        uniforms = torch.cat([torch.rand(1, generator=s.generator) for s in sequences])  # (N,)
        tokens, chosen = sample(logp, uniforms)  # (N,), (N,)
        for sequence, token, logprob in zip(sequences, tokens.tolist(), chosen.tolist(), strict=True):
            sequence.append(token, logprob, self._finish_reason(sequence, token))

    def _finish_reason(self, sequence: Sequence, token: int) -> str | None:
        """Why ``sequence`` ends with ``token`` as its next token, or None."""
        if token in self.eos_token_ids:
            return "stop"
        length = len(sequence.token_ids) + 1
        if length >= sequence.params.max_tokens or len(sequence.prompt_ids) + length >= self.context_length:
            return "length"
        return None


def _fail(sequences: list[Sequence], error: BaseException) -> None:
    for sequence in sequences:
        if not sequence.finished:
            sequence.fail(error)


def _compact(batch: DecodeBatch | None, sequences: list[Sequence]) -> tuple[DecodeBatch | None, list[Sequence]]:
    """Drop finished rows from the batch (in place) and the matching sequence list."""
    finished = [i for i, s in enumerate(sequences) if s.finished]
    if not finished:
        return batch, sequences
    if len(finished) == len(sequences):
        return None, []
    return batch, [sequences[i] for i in batch.drop(finished)]
