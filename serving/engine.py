"""The generation engine: continuous batching over one base model, with a LoRA adapter pinned per request.

One thread owns the model. Each ``step``:
  1. runs queued control work (new adapter slots, log-prob spot checks) and unloads adapters nobody uses any
     more, so a forward pass never sees the model's adapters change under it;
  2. drops cancelled requests (queued or running);
  3. admits waiting requests: one left-padded prefill for all of them, their first token sampled, their rows
     merged into the running batch (``serving.batch``);
  4. decodes one token for every running row, streams it, and drops finished rows at once.

Rows of one batch may use different adapters: peft's ``adapter_names`` applies each row's own (unmerged) LoRA
weights, and ``"__base__"`` means none. Unmerged LoRA costs decode speed on CPU (see bench/serving.py), but merging
would make the base model, the reference for the KL penalty, unavailable to other rows.

An adapter version is loaded into a slot (``serving.slots``): the thread that loads it reads, hashes and checks
the files and copies the weights into a free slot, without waiting for a decode step; only when no slot is free
does the engine thread add one between steps. After each load the engine adds a spare slot if none is left, so
the next version finds one; unloading frees a version's slot for the next.

Tokens are sampled only through ``liveloop.sampling``: one uniform draw per row per token from the request's own
``torch.Generator`` (seeded by ``params.seed`` when given, so the same seed, prompt and adapter give the same
tokens whatever else is in the batch), and the log-prob recorded is the chosen token's under exactly the
distribution sampled from (``sampling_logprobs``: temperature, then top-p renormalised; greedy is a point mass).

A completion's ``token_ids`` and ``logprobs`` hold every sampled token, including the EOS token and the token that
completed a stop string: the policy chose them and PPO needs their log-probs. Its ``text`` excludes the stop
string and anything the same token added after it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from liveloop.adapters import AdapterWeights, read_adapter
from liveloop.model import BaseModel
from liveloop.sampling import BASE_ADAPTER, SamplingParams, sample, sampling_logprobs, sequence_logprobs
from serving import metrics
from serving.batch import DecodeBatch
from serving.detokenize import IncrementalText
from serving.slots import Slot, SlotPool

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # a loaded adapter version; None = the base model with adapters off
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float  # behaviour log-prob under the distribution sampled from
    text: str  # what this token adds to the output; "" while held back (partial character, maybe a stop string)


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) | "length" (max_tokens or context) | "cancelled"
    prompt_tokens: int
    adapter: str | None
    dtype: str


@dataclass(frozen=True)
class StepStats:
    admitted: int  # requests prefilled this step (each got its first token)
    decoded: int  # rows that got one more token from the decode step


class EngineError(Exception):
    pass


class EngineFull(EngineError):
    """The waiting queue is full; try again later."""


class UnknownAdapter(EngineError):
    """No servable adapter has this name (never loaded, or being unloaded)."""


class InvalidRequest(EngineError, ValueError):
    """The request cannot be generated as given."""


class EngineStopped(EngineError):
    """The engine was shut down (or stopped after an internal error)."""


class RequestStream:
    """Token events and the final result of one request, handed from the engine thread to a consumer.

    From asyncio: ``async for event in stream`` and ``await stream.result()``; from a plain thread: ``wait()``. An
    error inside the engine is raised by all three. ``cancel()`` ends the request at the next engine step.
    """

    def __init__(self, request: GenerationRequest, wake_engine: Callable[[], None]):
        self.request = request
        self.cancel_requested = False
        self._wake_engine = wake_engine
        self._cond = threading.Condition()
        self._events: list[TokenEvent] = []
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    @property
    def events(self) -> list[TokenEvent]:
        with self._cond:
            return list(self._events)

    def cancel(self) -> None:
        self.cancel_requested = True
        self._wake_engine()

    async def __aiter__(self):
        seen = 0
        while True:
            await self._until(lambda seen=seen: len(self._events) > seen or self.done)
            with self._cond:
                new, ended = self._events[seen:], self.done
            for event in new:
                yield event
            seen += len(new)
            if ended:
                self._outcome()  # raises the engine's error, if any
                return

    async def result(self) -> GenerationResult:
        await self._until(lambda: self.done)
        return self._outcome()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.request.request_id} not finished after {timeout} s")
        return self._outcome()

    def _outcome(self) -> GenerationResult:
        if self._error is not None:
            raise self._error
        return self._result

    async def _until(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if ready():
                    return
                future = loop.create_future()
                self._async_waiters.append((loop, future))
            await future

    # --- engine side ---------------------------------------------------------------------------------------------

    def _publish(self, *, event: TokenEvent | None = None, result: GenerationResult | None = None,
                 error: BaseException | None = None) -> None:
        with self._cond:
            if event is not None:
                self._events.append(event)
            self._result, self._error = result or self._result, error or self._error
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
                pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _Sequence:
    """One request's life in the engine: its stream, random generator, tokens and text so far."""

    def __init__(self, request: GenerationRequest, stream: RequestStream, text: IncrementalText):
        self.request, self.stream, self.text = request, stream, text
        self.params = request.params
        self.generator = torch.Generator()
        if request.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.params.seed)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.submitted = time.perf_counter()
        self.finished = False


class Engine:
    """Continuous-batching generation over ``base``; see the module docstring. Thread-safe entry points:
    ``submit``, ``load_adapter``, ``unload_adapter``, ``loaded_adapters``, ``adapter_slot``, ``spot_check``,
    ``shutdown``.
    ``step`` runs on the engine's own thread after ``start()``, or is called directly (benchmarks, tests)."""

    def __init__(self, base: BaseModel, *, max_batch_size: int, max_queue: int, max_prefill_tokens: int = 4096):
        self.base = base
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        # Padded prompt tokens prefilled in one step at most: bounds the stall a burst of arrivals causes running
        # rows. One request is always admitted, however long.
        self.max_prefill_tokens = max_prefill_tokens
        self.dtype = str(base.dtype).removeprefix("torch.")
        self._slots = SlotPool(base.model)
        self._eos = base.eos_token_ids
        self._vocab_size = base.model.get_input_embeddings().num_embeddings
        self._tokenizer = base.tokenizer.backend_tokenizer
        # Shared with other threads, guarded by _lock (which also wakes the engine thread).
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._tasks: deque[tuple[Callable[[], object], Future]] = deque()
        self._adapters: set[str] = set()
        self._slot_of: dict[str, Slot] = {}  # loaded adapter (servable or unloading) → the slot holding it
        self._loading: dict[str, Future] = {}
        self._unloading: set[str] = set()
        self._pins: Counter[str] = Counter()  # adapter → queued, running and spot-checked requests using it
        self._stopped = False
        self._thread: threading.Thread | None = None
        # Engine thread only.
        self._running: list[_Sequence] = []
        self._batch: DecodeBatch | None = None

    @property
    def model(self) -> torch.nn.Module:
        """What forward passes run on: the base model, or the PeftModel wrapping it since the first adapter load."""
        return self.base.model if self._slots.peft is None else self._slots.peft

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
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
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
                with self._lock:
                    self._stopped = True
                self._abandon(EngineStopped(f"the engine stopped after an internal error: {exc!r}"))
                return

    def _has_work(self) -> bool:
        unloadable = any(self._pins[name] == 0 for name in self._unloading)
        return bool(self._waiting or self._tasks or self._running or unloadable)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _abandon(self, error: EngineError) -> None:
        with self._lock:
            sequences, self._waiting = [*self._running, *self._waiting], deque()
            tasks, self._tasks = list(self._tasks), deque()
        self._running, self._batch = [], None
        self._fail(sequences, error)
        for _, future in tasks:
            future.cancel()
        self._update_gauges()

    # --- requests ------------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its tokens arrive on the returned stream. Raises InvalidRequest, UnknownAdapter,
        EngineFull (the queue holds ``max_queue`` waiting requests) or EngineStopped."""
        self._validate(request)
        stream = RequestStream(request, self._wake)
        sequence = _Sequence(request, stream, IncrementalText(self._tokenizer, request.params.stop))
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine is shut down")
            self._require_servable(request.adapter)
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting")
            self._pin(request.adapter)
            self._waiting.append(sequence)
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._lock.notify_all()
        return stream

    def _validate(self, request: GenerationRequest) -> None:
        params, prompt = request.params, request.prompt_ids
        context = self.base.context_length
        problems = [
            (not prompt, "the prompt is empty"),
            (len(prompt) >= context, f"the prompt has {len(prompt)} tokens; the context holds {context}"),
            (any(not (isinstance(t, int) and 0 <= t < self._vocab_size) for t in prompt),
             f"prompt ids must be integers in [0, {self._vocab_size})"),
            (params.max_tokens < 1, "max_tokens must be at least 1"),
            (params.temperature < 0, "temperature must be >= 0"),
            (not 0 < params.top_p <= 1, "top_p must be in (0, 1]"),
            (any(not s for s in params.stop), "stop strings must not be empty"),
        ]
        for failed, message in problems:
            if failed:
                raise InvalidRequest(message)

    def _require_servable(self, adapter: str | None) -> None:
        if adapter is not None and (adapter not in self._adapters or adapter in self._unloading):
            raise UnknownAdapter(f"adapter {adapter!r} is not loaded")

    def _pin(self, adapter: str | None) -> None:
        if adapter is not None:
            self._pins[adapter] += 1

    def _unpin(self, adapter: str | None) -> None:
        if adapter is not None:
            with self._lock:
                self._pins[adapter] -= 1
                self._lock.notify_all()

    # --- adapters ------------------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path, sha256: str | None = None) -> Future:
        """Load an adapter directory under a new name (see the module docstring: the calling thread does the
        reading and, given a free slot, the loading). The future resolves to None once requests may use ``name``,
        or raises (AdapterArtifactError for a corrupt or foreign directory, or weights whose sha256 is not
        ``sha256``, the registry's record, when given)."""
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine is shut down")
            pending = self._loading.get(name)
            if not name or name == BASE_ADAPTER or name in self._adapters or (pending and not pending.done()):
                raise ValueError(f"adapter name {name!r} is taken: versions are immutable, load under a new name")
            future: Future = Future()
            self._loading[name] = future
        try:  # the checked sha256 is that of the bytes loaded: read_adapter parses the very bytes it hashed
            adapter = read_adapter(Path(path), base_model_id=self.base.model_id, sha256=sha256)
        except Exception as exc:
            with self._lock:
                self._loading.pop(name, None)
            future.set_exception(exc)
            return future
        slot = self._slots.take(adapter.config)
        if slot is not None:
            _settle(future, lambda: self._install(name, adapter, slot))
        else:
            with self._lock:
                self._enqueue(lambda: self._install(name, adapter, None), future)
        return future

    def _install(self, name: str, adapter: AdapterWeights, slot: Slot | None) -> None:
        """Copy the weights into ``slot`` (None: a slot this engine-thread call takes or creates) and make
        ``name`` servable."""
        config = adapter.config
        try:
            slot = slot or self._slots.take(config) or self._slots.create(config)
            try:
                slot.fill(adapter.tensors)
            except BaseException:
                self._slots.release(slot)
                raise
            with self._lock:
                self._slot_of[name] = slot
                self._adapters.add(name)
                if not self._slots.has_free(config):
                    self._enqueue(lambda: self._slots.ensure_spare(config))
        finally:
            with self._lock:
                self._loading.pop(name, None)
        log.info("adapter %s loaded into %s", name, slot.name)
        self._update_gauges()

    def unload_adapter(self, name: str) -> None:
        """Stop accepting requests for ``name`` now; free it once no queued or running request uses it."""
        with self._lock:
            self._require_servable(name)
            self._unloading.add(name)
            self._lock.notify_all()

    def loaded_adapters(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters - self._unloading)

    def adapter_slot(self, name: str | None) -> str | None:
        """The peft adapter of ``model`` that holds the loaded version ``name`` (None: the base model), for a
        forward pass with ``adapter_names``."""
        with self._lock:
            return None if name is None else self._slot_of[name].name

    def _unload_unused(self) -> None:
        with self._lock:
            unused = [name for name in self._unloading if self._pins[name] == 0]
        for name in unused:
            with self._lock:
                self._slots.release(self._slot_of.pop(name))
                self._adapters.discard(name)
                self._unloading.discard(name)
            log.info("adapter %s unloaded", name)
        if unused:
            self._update_gauges()

    def spot_check(self, request: GenerationRequest, result: GenerationResult) -> Future:
        """Recompute a finished completion's behaviour log-probs with one full forward (between decode steps);
        the future gives the largest absolute difference to the recorded ones, also exported as a metric."""
        with self._lock:
            self._require_servable(request.adapter)
            return self._enqueue(lambda: self._check(request, result))

    def _check(self, request: GenerationRequest, result: GenerationResult) -> float:
        with self._lock:  # unloads happen on this thread too: the adapter cannot go away during the forward
            if request.adapter is not None and request.adapter not in self._adapters:
                raise UnknownAdapter(f"adapter {request.adapter!r} was unloaded before the check ran")
        recomputed = sequence_logprobs(self.model, request.prompt_ids, result.token_ids, request.params,
                                       adapter=self.adapter_slot(request.adapter))
        mismatch = max((abs(a - b) for a, b in zip(result.logprobs, recomputed, strict=True)), default=0.0)
        metrics.LOGPROB_MISMATCH.observe(mismatch)
        metrics.LOGPROB_MISMATCH_LAST.set(mismatch)
        return mismatch

    def _enqueue(self, work: Callable[[], object], future: Future | None = None) -> Future:
        """Queue work for the engine thread; its outcome goes to ``future`` (a new one by default). The caller
        holds the lock."""
        future = future or Future()
        if self._stopped:
            future.set_exception(EngineStopped("the engine is shut down"))
            return future
        self._tasks.append((work, future))
        self._lock.notify_all()
        return future

    def _run_tasks(self) -> None:
        with self._lock:
            tasks, self._tasks = list(self._tasks), deque()
        for work, future in tasks:
            _settle(future, work)

    # --- the step ------------------------------------------------------------------------------------------------

    def step(self) -> StepStats:
        """One scheduling round and decode step (see the module docstring)."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("step() is driven by the engine thread once start() was called")
        self._run_tasks()
        self._unload_unused()
        self._drop_cancelled()
        admitted = self._admit()
        decoded = self._decode() if self._running else 0
        self._unload_unused()
        self._update_gauges()
        return StepStats(admitted=admitted, decoded=decoded)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [s for s in self._waiting if s.stream.cancel_requested]
            self._waiting = deque(s for s in self._waiting if not s.stream.cancel_requested)
        for sequence in cancelled + [s for s in self._running if s.stream.cancel_requested]:
            self._finish(sequence, "cancelled")
        self._batch, self._running = _compact(self._batch, self._running)

    def _admit(self) -> int:
        newcomers = self._take_waiting()
        if not newcomers:
            return 0
        started = time.perf_counter()
        try:
            batch, logits = DecodeBatch.prefill(self.model, [s.request.prompt_ids for s in newcomers],
                                                **self._adapter_kwargs(newcomers))
            self._sample(newcomers, logits)
        except Exception as exc:  # e.g. out of memory: these requests fail, the running batch goes on
            log.exception("prefill of %d requests failed", len(newcomers))
            self._fail(newcomers, exc)
            return 0
        metrics.STEP_SECONDS.labels("prefill").observe(time.perf_counter() - started)
        metrics.PROMPT_TOKENS.inc(sum(len(s.request.prompt_ids) for s in newcomers))
        batch, newcomers = _compact(batch, newcomers)
        if newcomers:
            self._batch = batch if self._batch is None else self._batch.merge(batch)
            self._running += newcomers
        return len(newcomers)

    def _take_waiting(self) -> list[_Sequence]:
        """Pop as many waiting requests as free rows and the prefill budget allow (at least one)."""
        taken: list[_Sequence] = []
        longest = 0
        with self._lock:
            while self._waiting and len(self._running) + len(taken) < self.max_batch_size:
                longest = max(longest, len(self._waiting[0].request.prompt_ids))
                if taken and longest * (len(taken) + 1) > self.max_prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
            metrics.QUEUE_DEPTH.set(len(self._waiting))
        return taken

    def _decode(self) -> int:
        sequences = self._running
        started = time.perf_counter()
        tokens = torch.tensor([s.token_ids[-1] for s in sequences], device=self.base.device)
        try:
            logits = self._batch.decode(self.model, tokens, **self._adapter_kwargs(sequences))
            self._sample(sequences, logits)
        except Exception as exc:  # the batch's cache is in an unknown state: its requests fail, the engine goes on
            log.exception("decode step of %d sequences failed", len(sequences))
            self._fail(sequences, exc)
            self._running, self._batch = [], None
            return 0
        metrics.STEP_SECONDS.labels("decode").observe(time.perf_counter() - started)
        self._batch, self._running = _compact(self._batch, sequences)
        return len(sequences)

    def _adapter_kwargs(self, sequences: list[_Sequence]) -> dict:
        if self._slots.peft is None:
            return {}
        return {"adapter_names": [self.adapter_slot(s.request.adapter) or BASE_ADAPTER for s in sequences]}

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row of logits (N, V) and hand it to its sequence."""
        temperature = torch.tensor([s.params.temperature for s in sequences], device=logits.device)
        top_p = torch.tensor([s.params.top_p for s in sequences], device=logits.device)
        logp = sampling_logprobs(logits, temperature, top_p)  # (N, V)
        uniforms = torch.cat([torch.rand(1, generator=s.generator) for s in sequences])  # (N,)
        tokens, chosen = sample(logp, uniforms)
        for sequence, token, logprob in zip(sequences, tokens.tolist(), chosen.tolist(), strict=True):
            self._append(sequence, token, logprob)
        metrics.GENERATED_TOKENS.inc(len(sequences))

    def _append(self, sequence: _Sequence, token: int, logprob: float) -> None:
        sequence.token_ids.append(token)
        sequence.logprobs.append(logprob)
        if len(sequence.token_ids) == 1:
            metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - sequence.submitted)
        text = "" if token in self._eos else sequence.text.push(token)
        reason = None
        if token in self._eos or sequence.text.stopped:
            reason = "stop"
        elif (len(sequence.token_ids) >= sequence.params.max_tokens
              or len(sequence.request.prompt_ids) + len(sequence.token_ids) >= self.base.context_length):
            reason = "length"
        if reason is not None:
            text += sequence.text.flush()
        sequence.stream._publish(event=TokenEvent(token, logprob, text))
        if reason is not None:
            self._finish(sequence, reason)

    def _finish(self, sequence: _Sequence, reason: str) -> None:
        sequence.finished = True
        result = GenerationResult(
            token_ids=list(sequence.token_ids), logprobs=list(sequence.logprobs), text=sequence.text.text,
            finish_reason=reason, prompt_tokens=len(sequence.request.prompt_ids), adapter=sequence.request.adapter,
            dtype=self.dtype,
        )
        self._unpin(sequence.request.adapter)
        metrics.FINISHED.labels(reason).inc()
        sequence.stream._publish(result=result)

    def _fail(self, sequences: list[_Sequence], error: BaseException) -> None:
        for sequence in sequences:
            if not sequence.finished:
                sequence.finished = True
                self._unpin(sequence.request.adapter)
                metrics.FINISHED.labels("error").inc()
                sequence.stream._publish(error=error)

    def _update_gauges(self) -> None:
        with self._lock:
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            metrics.ADAPTERS_LOADED.set(len(self._adapters))
        metrics.RUNNING.set(len(self._running))


def _settle(future: Future, work: Callable[[], object]) -> None:
    """Run ``work`` and put its result or exception into ``future``, unless the future was cancelled."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(work())
    except Exception as exc:
        log.warning("engine work failed: %s", exc)
        future.set_exception(exc)


def _compact(batch: DecodeBatch | None, sequences: list[_Sequence]) -> tuple[DecodeBatch | None, list[_Sequence]]:
    """Drop finished rows from the batch and the matching sequence list."""
    keep = [i for i, s in enumerate(sequences) if not s.finished]
    if len(keep) == len(sequences):
        return batch, sequences
    if not keep:
        return None, []
    return batch.select(keep), [sequences[i] for i in keep]
