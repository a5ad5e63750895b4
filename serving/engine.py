"""The serving engine: continuous batching over one base model, a LoRA adapter pinned per request, on one thread.

Its parts each do one job: ``serving.scheduler`` queues requests and picks who joins the batch,
``liveloop.engine.model_runner`` runs the decode step (the one the trainer's rollouts and the gates run too),
``serving.adapter_table`` keeps the loaded adapter versions and their pins, ``serving.tasks`` carries work from
other threads to this one, and ``serving.request_stream`` carries tokens back. Each ``step``:
  1. runs queued tasks (new adapter slots, log-prob spot checks) and unloads versions nobody uses any more, so a
     forward pass never sees the model's adapters change under it;
  2. drops cancelled requests (queued or running);
  3. runs the decode step: the admitted requests are prefilled into the batch with their first token, then every
     running row decodes one token, streamed at once, and finished rows leave.

Rows of one batch may use different adapters: peft's ``adapter_names`` applies each row's own LoRA weights, and
``"__base__"`` means none. Unmerged LoRA costs decode speed on CPU (see bench/serving.py), so one version, the
live one (``merge_adapter``), may be merged into the base weights: its rows run with no adapter, and every other
row's adapter holds its difference to the merged one (``serving.slots``), so the base stays servable too.

Tokens are sampled only through ``liveloop.sampling``, one uniform per row per token from the request's own
``torch.Generator`` (seeded by ``params.seed`` when given), and the log-prob recorded is the chosen token's under
exactly the distribution sampled from.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from liveloop.engine.model_runner import ModelRunner
from liveloop.engine.prefix_cache import PrefixCache
from liveloop.model import LoadedModel
from liveloop.sampling import MIN_TEMPERATURE, SEED_RANGE
from serving import metrics
from serving.adapter_table import AdapterTable
from serving.detokenize import IncrementalText
from serving.engine_errors import EngineError, EngineFull, EngineStopped, InvalidRequest, UnknownAdapter
from serving.request_stream import GenerationRequest, GenerationResult, RequestStream, TokenEvent
from serving.scheduler import Scheduler
from serving.sequence import ServedSequence
from serving.spot_check import logprob_mismatch
from serving.tasks import TaskQueue

__all__ = ["Engine", "EngineError", "EngineFull", "EngineStopped", "GenerationRequest", "GenerationResult",
           "InvalidRequest", "RequestStream", "StepStats", "TokenEvent", "UnknownAdapter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    admitted: int  # requests prefilled this step (each got its first token)
    decoded: int  # rows that got one more token from the decode step


class Engine:
    """Continuous-batching generation over ``base``; see the module docstring. Thread-safe entry points:
    ``submit``, ``load_adapter``, ``merge_adapter``, ``unload_adapter``, ``loaded_adapters``, ``adapter_slot``,
    ``spot_check``, ``shutdown``.
    ``step`` runs on the engine's own thread after ``start()``, or is called directly (benchmarks, tests)."""

    def __init__(self, base: LoadedModel, *, max_batch_size: int, max_queue: int, max_prefill_tokens: int = 4096):
        self.base = base
        self.dtype = str(base.dtype).removeprefix("torch.")
        self._vocab_size = base.model.get_input_embeddings().num_embeddings
        self._tokenizer = base.tokenizer.backend_tokenizer
        # Guards the parts' shared state (each takes it) and wakes the engine thread.
        self._lock = threading.Condition()
        self._tasks = TaskQueue(self._lock)
        self._adapters = AdapterTable(base.model, base_model_id=base.model_id, lock=self._lock, tasks=self._tasks)
        self._scheduler = Scheduler(max_batch_size=max_batch_size, max_queue=max_queue,
                                    max_prefill_tokens=max_prefill_tokens, lock=self._lock)
        self._runner = ModelRunner(eos_token_ids=base.eos_token_ids, context_length=base.context_length,
                                   forward_names=self._adapters.forward_names,
                                   adapters_off=self._adapters.adapters_off,
                                   prefix_cache=PrefixCache(weights_epoch=self._adapters.weights_epoch))  # this thread
        self._prefix_counted = (0, 0)  # the prefix cache's token counts already exported
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> torch.nn.Module:
        """What forward passes run on: the base model, or the PeftModel wrapping it since the first adapter load."""
        return self.base.model if self._adapters.peft is None else self._adapters.peft

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopped:
                raise RuntimeError("the engine was already started")
            self._thread = threading.Thread(target=self._loop, name="liveloop-engine", daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        """The engine thread is alive and accepting work (false before start, after shutdown or a crash)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        """Stop the thread; every queued or running request and pending task ends with EngineStopped."""
        self._stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._abandon(EngineStopped("the engine was shut down"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopped or self._has_work())
                if self._stopped:
                    return
            try:
                self.step()
            except BaseException as exc:  # a bug outside the guarded forward passes: fail loudly, never hang
                log.exception("engine loop crashed; stopping the engine")
                self._stop()
                self._abandon(EngineStopped(f"the engine stopped after an internal error: {exc!r}"))
                return

    def _has_work(self) -> bool:
        return bool(self._scheduler or self._tasks or self._runner.running or self._adapters.has_unused())

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._tasks.close()
            self._lock.notify_all()

    def _abandon(self, error: EngineError) -> None:
        self._tasks.close()
        for sequence in [*self._runner.clear(), *self._scheduler.drain()]:
            if not sequence.finished:
                sequence.fail(error)
        self._update_gauges()

    # --- requests ------------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its tokens arrive on the returned stream. Raises InvalidRequest, UnknownAdapter,
        EngineFull (the queue holds ``max_queue`` waiting requests) or EngineStopped."""
        [stream] = self.submit_all([request])
        return stream

    def submit_all(self, requests: list[GenerationRequest]) -> list[RequestStream]:
        """Queue requests all together or none of them (the choices of one chat request); each counts against
        ``max_queue``. Raises as ``submit`` does."""
        for request in requests:
            self._validate(request)
        streams = [RequestStream(request, self._wake) for request in requests]
        texts = [IncrementalText(self._tokenizer, request.params.stop) for request in requests]
        pinned: list[str | None] = []
        with self._lock:  # the adapters are pinned and the requests queued at once, or none
            if self._stopped:
                raise EngineStopped("the engine is shut down")
            try:
                sequences = []
                for request, stream, text in zip(requests, streams, texts, strict=True):
                    slot = self._adapters.pin(request.adapter)
                    pinned.append(request.adapter)
                    sequences.append(ServedSequence(request, stream, text, slot=slot, on_done=self._done))
                self._scheduler.add(*sequences)
            except BaseException:
                for adapter in pinned:
                    self._adapters.unpin(adapter)
                raise
        return streams

    def _validate(self, request: GenerationRequest) -> None:
        params, prompt = request.params, request.prompt_ids
        context = self.base.context_length
        problems = [
            (not prompt, "the prompt is empty"),
            (len(prompt) >= context, f"the prompt has {len(prompt)} tokens; the context holds {context}"),
            (any(not (isinstance(t, int) and 0 <= t < self._vocab_size) for t in prompt),
             f"prompt ids must be integers in [0, {self._vocab_size})"),
            (params.max_tokens < 1, "max_tokens must be at least 1"),
            (not (params.temperature == 0 or MIN_TEMPERATURE <= params.temperature < math.inf),
             f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}"),
            (not 0 < params.top_p <= 1, "top_p must be in (0, 1]"),
            (params.seed is not None and not SEED_RANGE[0] <= params.seed <= SEED_RANGE[1],
             "seed must be a 64-bit integer"),
            (any(not s for s in params.stop), "stop strings must not be empty"),
        ]
        for failed, message in problems:
            if failed:
                raise InvalidRequest(message)

    def _done(self, sequence: ServedSequence) -> None:
        """Publish a finished or failed sequence's outcome and release its adapter."""
        self._adapters.unpin(sequence.request.adapter)
        if sequence.error is not None:
            metrics.FINISHED.labels("error").inc()
            sequence.stream.publish(error=sequence.error)
            return
        result = GenerationResult(
            token_ids=list(sequence.token_ids), logprobs=list(sequence.logprobs), text=sequence.text.text,
            finish_reason=sequence.finish_reason, prompt_tokens=len(sequence.prompt_ids),
            adapter=sequence.request.adapter, dtype=self.dtype,
        )
        metrics.FINISHED.labels(sequence.finish_reason).inc()
        metrics.E2E_LATENCY.observe(time.perf_counter() - sequence.submitted)
        sequence.stream.publish(result=result)

    # --- adapters ------------------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path, sha256: str | None = None) -> Future:
        """Load an adapter version (``AdapterTable.load``): the future resolves once requests may use ``name``."""
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine is shut down")
        return self._adapters.load(name, path, sha256)

    def unload_adapter(self, name: str) -> None:
        """Stop accepting requests for ``name`` now; free it once no queued or running request uses it."""
        self._adapters.unload(name)

    def merge_adapter(self, name: str | None) -> Future:
        """Merge the loaded version ``name`` into the base weights (None: unmerge), between decode steps; its rows
        then run with no adapter cost. Requests in flight go on with the weights they started with."""
        return self._tasks.submit(lambda: self._adapters.merge(name))

    def loaded_adapters(self) -> list[str]:
        return self._adapters.servable()

    def adapter_slot(self, name: str | None) -> str | None:
        """The peft adapter of ``model`` a forward pass runs the loaded version ``name`` (None: the base model)
        under, with ``adapter_names``."""
        return self._adapters.slot(name)

    def spot_check(self, request: GenerationRequest, result: GenerationResult) -> Future:
        """Recompute a finished completion's behaviour log-probs with one full forward (between decode steps);
        the future gives the largest absolute difference to the recorded ones, also exported as a metric."""
        self._adapters.require_servable(request.adapter)
        return self._tasks.submit(lambda: self._check(request, result))

    def _check(self, request: GenerationRequest, result: GenerationResult) -> float:
        # unloads happen on this thread too: the adapter cannot go away during the forward
        if not self._adapters.is_loaded(request.adapter):
            raise UnknownAdapter(f"adapter {request.adapter!r} was unloaded before the check ran")
        return logprob_mismatch(self.model, request, result, self.adapter_slot(request.adapter))

    # --- the step ------------------------------------------------------------------------------------------------

    def step(self) -> StepStats:
        """One scheduling round and decode step (see the module docstring)."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("step() is driven by the engine thread once start() was called")
        self._tasks.run_pending()
        self._adapters.unload_unused()
        self._drop_cancelled()
        newcomers = self._scheduler.admit(running=len(self._runner.running))
        outcome = self._runner.step(self.model, newcomers)
        if outcome.prefill_seconds is not None:
            metrics.STEP_SECONDS.labels("prefill").observe(outcome.prefill_seconds)
            metrics.PROMPT_TOKENS.inc(sum(len(s.prompt_ids) for s in newcomers))
        cache = self._runner.prefix_cache
        metrics.PREFIX_CACHE_QUERIES.inc(cache.queried_tokens - self._prefix_counted[0])
        metrics.PREFIX_CACHE_HITS.inc(cache.hit_tokens - self._prefix_counted[1])
        self._prefix_counted = (cache.queried_tokens, cache.hit_tokens)
        if outcome.decode_seconds is not None:
            metrics.STEP_SECONDS.labels("decode").observe(outcome.decode_seconds)
        self._adapters.unload_unused()
        self._update_gauges()
        return StepStats(admitted=outcome.admitted, decoded=outcome.decoded)

    def _drop_cancelled(self) -> None:
        cancelled = self._scheduler.remove_cancelled()
        for sequence in cancelled + [s for s in self._runner.running if s.stream.cancel_requested]:
            sequence.finish("cancelled")
        self._runner.drop_finished()

    def _update_gauges(self) -> None:
        metrics.WAITING.set(len(self._scheduler))
        metrics.ADAPTERS_LOADED.set(len(self._adapters))
        metrics.RUNNING.set(len(self._runner.running))
