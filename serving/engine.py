"""The generation engine: continuous batching over one base model, with a LoRA adapter pinned per request.

One thread owns the model. Each ``step``:
  1. runs queued control work (new adapter slots, log-prob spot checks) and unloads adapters nobody uses any
     more, so a forward pass never sees the model's adapters change under it;
  2. drops cancelled requests (queued or running);
  3. runs the shared decode step (``liveloop.engine.model_runner``): admits waiting requests with one left-padded
     prefill, their first token sampled and their rows merged into the running batch, then decodes one token for
     every running row, streams it, and drops finished rows at once.

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
from liveloop.engine.model_runner import ModelRunner
from liveloop.engine.sequence import Sequence
from liveloop.model import BaseModel
from liveloop.sampling import BASE_ADAPTER, SamplingParams, sequence_logprobs
from serving import metrics
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


class _ServedSequence(Sequence):
    """One request's life in the engine: the core sequence plus its stream and text, and stop strings applied."""

    def __init__(self, request: GenerationRequest, stream: RequestStream, text: IncrementalText, slot: str | None,
                 on_done: Callable[[_ServedSequence], None]):
        generator = torch.Generator()
        if request.params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.params.seed)
        super().__init__(request.prompt_ids, request.params, generator=generator, adapter=slot)
        self.request, self.stream, self.text = request, stream, text
        self.submitted = time.perf_counter()
        self._on_done = on_done

    def append(self, token: int, logprob: float, reason: str | None) -> None:
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        metrics.GENERATED_TOKENS.inc()
        if len(self.token_ids) == 1:
            metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - self.submitted)
        text = "" if reason == "stop" else self.text.push(token)  # "stop" from the runner: an end token
        if self.text.stopped:
            reason = "stop"
        if reason is not None:
            text += self.text.flush()
        self.stream._publish(event=TokenEvent(token, logprob, text))
        if reason is not None:
            self.finish(reason)

    def finish(self, reason: str) -> None:
        super().finish(reason)
        self._on_done(self)

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        self._on_done(self)


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
        self._vocab_size = base.model.get_input_embeddings().num_embeddings
        self._tokenizer = base.tokenizer.backend_tokenizer
        # Shared with other threads, guarded by _lock (which also wakes the engine thread).
        self._lock = threading.Condition()
        self._waiting: deque[_ServedSequence] = deque()
        self._tasks: deque[tuple[Callable[[], object], Future]] = deque()
        self._adapters: set[str] = set()
        self._slot_of: dict[str, Slot] = {}  # loaded adapter (servable or unloading) → the slot holding it
        self._loading: dict[str, Future] = {}
        self._unloading: set[str] = set()
        self._pins: Counter[str] = Counter()  # adapter → queued, running and spot-checked requests using it
        self._stopped = False
        self._thread: threading.Thread | None = None
        # Engine thread only.
        self._runner = ModelRunner(eos_token_ids=base.eos_token_ids, context_length=base.context_length)

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
        return bool(self._waiting or self._tasks or self._runner.running or unloadable)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _abandon(self, error: EngineError) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            tasks, self._tasks = list(self._tasks), deque()
        for sequence in [*self._runner.clear(), *waiting]:
            if not sequence.finished:
                sequence.fail(error)
        for _, future in tasks:
            future.cancel()
        self._update_gauges()

    # --- requests ------------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its tokens arrive on the returned stream. Raises InvalidRequest, UnknownAdapter,
        EngineFull (the queue holds ``max_queue`` waiting requests) or EngineStopped."""
        self._validate(request)
        stream = RequestStream(request, self._wake)
        text = IncrementalText(self._tokenizer, request.params.stop)
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine is shut down")
            self._require_servable(request.adapter)
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting")
            slot = None if request.adapter is None else self._slot_of[request.adapter].name
            sequence = _ServedSequence(request, stream, text, slot, self._done)
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
        newcomers = self._take_waiting()
        outcome = self._runner.step(self.model, newcomers)
        if outcome.prefill_seconds is not None:
            metrics.STEP_SECONDS.labels("prefill").observe(outcome.prefill_seconds)
            metrics.PROMPT_TOKENS.inc(sum(len(s.prompt_ids) for s in newcomers))
        if outcome.decode_seconds is not None:
            metrics.STEP_SECONDS.labels("decode").observe(outcome.decode_seconds)
        self._unload_unused()
        self._update_gauges()
        return StepStats(admitted=outcome.admitted, decoded=outcome.decoded)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [s for s in self._waiting if s.stream.cancel_requested]
            self._waiting = deque(s for s in self._waiting if not s.stream.cancel_requested)
        for sequence in cancelled + [s for s in self._runner.running if s.stream.cancel_requested]:
            sequence.finish("cancelled")
        self._runner.drop_finished()

    def _take_waiting(self) -> list[_ServedSequence]:
        """Pop as many waiting requests as free rows and the prefill budget allow (at least one)."""
        taken: list[_ServedSequence] = []
        longest, running = 0, len(self._runner.running)
        with self._lock:
            while self._waiting and running + len(taken) < self.max_batch_size:
                longest = max(longest, len(self._waiting[0].prompt_ids))
                if taken and longest * (len(taken) + 1) > self.max_prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
            metrics.QUEUE_DEPTH.set(len(self._waiting))
        return taken

    def _done(self, sequence: _ServedSequence) -> None:
        """Publish a finished or failed sequence's outcome and release its adapter."""
        self._unpin(sequence.request.adapter)
        if sequence.error is not None:
            metrics.FINISHED.labels("error").inc()
            sequence.stream._publish(error=sequence.error)
            return
        result = GenerationResult(
            token_ids=list(sequence.token_ids), logprobs=list(sequence.logprobs), text=sequence.text.text,
            finish_reason=sequence.finish_reason, prompt_tokens=len(sequence.prompt_ids),
            adapter=sequence.request.adapter, dtype=self.dtype,
        )
        metrics.FINISHED.labels(sequence.finish_reason).inc()
        sequence.stream._publish(result=result)

    def _update_gauges(self) -> None:
        with self._lock:
            metrics.QUEUE_DEPTH.set(len(self._waiting))
            metrics.ADAPTERS_LOADED.set(len(self._adapters))
        metrics.RUNNING.set(len(self._runner.running))


def _settle(future: Future, work: Callable[[], object]) -> None:
    """Run ``work`` and put its result or exception into ``future``, unless the future was cancelled."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(work())
    except Exception as exc:
        log.warning("engine work failed: %s", exc)
        future.set_exception(exc)

