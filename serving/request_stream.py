"""What a client hands the engine and gets back: the request, its token events and result, and the stream between
the engine thread and the client (asyncio or a plain thread)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from liveloop.sampling import SamplingParams


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

    def publish(self, *, event: TokenEvent | None = None, result: GenerationResult | None = None,
                error: BaseException | None = None) -> None:
        """Hand a token event, the result or an error to the consumer (engine thread)."""
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
