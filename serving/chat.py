"""Chat completions: from a protocol request to engine generation to a stored completion and a response.

Built once at start-up with its engine, adapter set, store and settings; the HTTP handlers only call it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from starlette.requests import ClientDisconnect
from transformers import PreTrainedTokenizerBase

from liveloop.logs import bind_log_context
from liveloop.sampling import SamplingParams
from liveloop.settings import Settings
from serving.engine import Engine, EngineError, GenerationRequest, GenerationResult, RequestStream, TokenEvent
from serving.errors import APIError, BadRequest, engine_error
from serving.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    TokenLogprob,
    Usage,
)
from serving.routing import AdapterSet
from serving.store import CompletionRecord, CompletionStore

log = logging.getLogger(__name__)


def new_completion_id() -> str:
    """Unguessable: feedback refers to completions by id, so an id must not be enumerable."""
    return "chatcmpl-" + secrets.token_urlsafe(24)


@dataclass
class PendingChoice:
    """One choice of a request: a generation of its own, stored as a completion of its own."""

    index: int
    completion_id: str
    served_name: str
    params: SamplingParams
    stream: RequestStream


@dataclass
class PendingCompletion:
    """A request accepted by the engine: what the response and the stored records are built from."""

    id: str  # the response's id; every choice stores it as its request_id
    request: ChatCompletionRequest
    choices: list[PendingChoice]
    prompt_ids: list[int]
    user_id: str | None
    started: float
    created: int

    @property
    def served_name(self) -> str:
        """The versions that answer, in choice order, each once: the response's `model` and version header."""
        return ",".join(dict.fromkeys(choice.served_name for choice in self.choices))


class ChatService:
    def __init__(self, *, engine: Engine, tokenizer: PreTrainedTokenizerBase, context_length: int,
                 adapters: AdapterSet, store: CompletionStore, settings: Settings):
        self.engine, self.tokenizer, self.context_length = engine, tokenizer, context_length
        self.adapters, self.store, self.settings = adapters, store, settings
        # a prompt of up to a megabyte takes a while to template and tokenise: never on the event loop, and on a
        # bounded number of threads however many arrive at once
        self._tokenizing = anyio.CapacityLimiter(settings.tokenize_threads)

    async def start(self, request: ChatCompletionRequest, *, user_id: str | None) -> PendingCompletion:
        """Validate, tokenize, pin the adapter version of each choice and submit them together; every refusal
        happens here, before streaming. The engine's refusals (``EngineError``) are left to the error mapper."""
        # the API key's identity, so that a client cannot pick its canary slice through `user`; that field only
        # identifies users of an open API (no keys configured), as liveloop.registry.user_identity counts them
        identity = user_id if user_id is not None else request.user
        request_id = new_completion_id()
        # seeded by the request's id: which choice the canary answered can be told again from what is stored
        resolved = self.adapters.resolve_choices(request.model, identity, request.n, random.Random(request_id))
        self._check_stop(request)
        prompt_ids = await anyio.to_thread.run_sync(self._prompt_ids, request, limiter=self._tokenizing)
        max_tokens = self._max_tokens(request, len(prompt_ids))
        params = [request.sampling_params(max_tokens, choice=index) for index in range(request.n)]
        streams = self.engine.submit_all([GenerationRequest(prompt_ids=prompt_ids, params=p, adapter=r.adapter)
                                          for r, p in zip(resolved, params, strict=True)])
        # one choice is its own completion under the response's id, so clients that rate by `id` keep working
        completion_ids = [request_id] if request.n == 1 else [new_completion_id() for _ in range(request.n)]
        choices = [PendingChoice(index, completion_id, choice.served_name, choice_params, stream)
                   for index, (completion_id, choice, choice_params, stream)
                   in enumerate(zip(completion_ids, resolved, params, streams, strict=True))]
        gen = PendingCompletion(request_id, request, choices, prompt_ids, user_id, time.perf_counter(),
                                int(time.time()))
        bind_log_context(completion_id=request_id, version=gen.served_name, user=identity)
        return gen

    def _check_stop(self, request: ChatCompletionRequest) -> None:
        longest = max(map(len, request.stop_strings()), default=0)
        if longest > self.settings.max_stop_chars:
            raise BadRequest(f"a stop sequence is {longest} characters; at most {self.settings.max_stop_chars} are "
                             "allowed", param="stop")

    def _prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        messages = [message.template_dict() for message in request.messages]
        try:
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # templates raise on role orders they do not support
            raise BadRequest(f"messages cannot be formatted by the model's chat template: {exc}",
                             param="messages") from exc
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def _max_tokens(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        room = self.context_length - prompt_tokens
        if room < 1:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens; the model's context length is "
                             f"{self.context_length}", param="messages")
        asked = request.requested_max_tokens()
        if asked is None:
            return min(self.settings.default_max_tokens, room)
        if asked > self.settings.max_tokens_limit:
            raise BadRequest(f"max_tokens is {asked}; at most {self.settings.max_tokens_limit} is allowed",
                             param="max_tokens")
        if asked > room:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens and max_tokens is {asked}: together they "
                             f"exceed the context length {self.context_length}", param="max_tokens")
        return asked

    async def complete(self, gen: PendingCompletion, is_disconnected: Callable[[], Awaitable[bool]]) -> ChatCompletion:
        results = await _results_unless_disconnected([choice.stream for choice in gen.choices], is_disconnected)
        await self._record(gen, list(zip(gen.choices, results, strict=True)))
        choices = [Choice(index=choice.index, message=AssistantMessage(content=result.text),
                          logprobs=self._logprobs(result.token_ids, result.logprobs) if gen.request.logprobs else None,
                          finish_reason=result.finish_reason, completion_id=choice.completion_id,
                          model=choice.served_name)
                   for choice, result in zip(gen.choices, results, strict=True)]
        return ChatCompletion(id=gen.id, created=gen.created, model=gen.served_name, choices=choices,
                              usage=_usage(results))

    async def sse(self, gen: PendingCompletion) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, the choices' chunks interleaved as their tokens come; an
        error mid-stream becomes an error event."""
        try:
            for choice in gen.choices:
                yield self._chunk(gen, ChunkChoice(index=choice.index, delta=Delta(role="assistant", content=""),
                                                   completion_id=choice.completion_id, model=choice.served_name))
            results = []
            async with aclosing(_interleaved(gen.choices)) as items:
                async for choice, item in items:
                    if isinstance(item, GenerationResult):
                        await self._record(gen, [(choice, item)])  # before the client sees this choice end
                        results.append(item)
                        yield self._chunk(gen, ChunkChoice(index=choice.index, delta=Delta(),
                                                           finish_reason=item.finish_reason))
                    elif item.text or gen.request.logprobs:
                        logprobs = self._logprobs([item.token_id], [item.logprob]) if gen.request.logprobs else None
                        yield self._chunk(gen, ChunkChoice(index=choice.index, delta=Delta(content=item.text),
                                                           logprobs=logprobs))
            if gen.request.stream_options and gen.request.stream_options.include_usage:
                chunk = ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.served_name, choices=[],
                                            usage=_usage(results))
                yield _sse(chunk.model_dump_json())
            yield _sse("[DONE]")
        except Exception as exc:
            yield _sse(json.dumps(_stream_error(gen, exc).model_dump()))
            yield _sse("[DONE]")
        finally:
            if not all(choice.stream.done for choice in gen.choices):
                log.info("client disconnected from the stream of %s", gen.id)
            for choice in gen.choices:
                choice.stream.cancel()  # no-op once finished; frees the slot when the client went away

    def _chunk(self, gen: PendingCompletion, choice: ChunkChoice) -> str:
        chunk = ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.served_name, choices=[choice])
        return _sse(chunk.model_dump_json(exclude_none=True))

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> ChoiceLogprobs:
        tokens = [self.tokenizer.decode([token_id]) for token_id in token_ids]
        return ChoiceLogprobs(content=[TokenLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                       for t, lp in zip(tokens, logprobs, strict=True)])

    async def _record(self, gen: PendingCompletion, finished: list[tuple[PendingChoice, GenerationResult]]) -> None:
        """Store the finished choices before the client sees their end, so feedback can follow at once."""
        finished_at = datetime.now(UTC)
        latency_ms = (time.perf_counter() - gen.started) * 1000
        messages = [m.template_dict() for m in gen.request.messages]
        records = [CompletionRecord(
            id=choice.completion_id, created_at=datetime.fromtimestamp(gen.created, UTC), finished_at=finished_at,
            user_id=gen.user_id, end_user=gen.request.user, requested_model=gen.request.model,
            adapter_version=result.adapter, messages=messages, prompt_token_ids=gen.prompt_ids,
            response_token_ids=result.token_ids, response_text=result.text, behaviour_logprobs=result.logprobs,
            sampling_params=choice.params.to_dict(), dtype=result.dtype, finish_reason=result.finish_reason,
            latency_ms=latency_ms, request_id=gen.id, choice_index=choice.index) for choice, result in finished]
        await asyncio.to_thread(self.store.add, *records)


async def _results_unless_disconnected(streams: list[RequestStream], is_disconnected: Callable[[], Awaitable[bool]],
                                       poll_seconds: float = 0.25) -> list[GenerationResult]:
    """Wait for every result, cancelling the generations if the client goes away meanwhile or one fails."""
    waiting = [asyncio.ensure_future(stream.result()) for stream in streams]
    try:
        while True:
            done, pending = await asyncio.wait(waiting, timeout=poll_seconds, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
            if not pending:
                return [task.result() for task in waiting]
            if await is_disconnected():
                raise ClientDisconnect()
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise
    finally:
        for task in waiting:
            task.cancel()  # no-op once done


async def _interleaved(choices: list[PendingChoice]) -> AsyncIterator[tuple[PendingChoice, TokenEvent |
                                                                            GenerationResult]]:
    """Each choice's token events and then its result, as they come, whichever choice is ahead; the first error
    of any choice is raised."""
    arrivals: asyncio.Queue[tuple[PendingChoice, TokenEvent | GenerationResult | Exception]] = asyncio.Queue()

    async def forward(choice: PendingChoice) -> None:
        try:
            async for event in choice.stream:
                arrivals.put_nowait((choice, event))
            arrivals.put_nowait((choice, await choice.stream.result()))
        except Exception as exc:
            arrivals.put_nowait((choice, exc))

    forwarders = [asyncio.ensure_future(forward(choice)) for choice in choices]
    try:
        unfinished = len(choices)
        while unfinished:
            choice, item = await arrivals.get()
            if isinstance(item, Exception):
                raise item
            unfinished -= isinstance(item, GenerationResult)
            yield choice, item
    finally:
        for forwarder in forwarders:
            forwarder.cancel()


def _stream_error(gen: PendingCompletion, exc: Exception) -> ErrorResponse:
    """The error event that ends a stream: the status the same error would have had before streaming began."""
    if isinstance(exc, EngineError):
        exc = engine_error(exc)
    if isinstance(exc, APIError):
        log.warning("stream %s ended early: %s", gen.id, exc.message)
        return ErrorResponse(**exc.body())
    log.exception("error while streaming %s", gen.id, exc_info=exc)
    return ErrorResponse(error=ErrorDetail(message="internal error while generating", type="server_error"))


def _usage(results: list[GenerationResult]) -> Usage:
    """Summed over the choices: each prefilled its prompt and generated its answer, as a request of its own."""
    prompt = sum(result.prompt_tokens for result in results)
    completion = sum(len(result.token_ids) for result in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(data: str) -> str:
    return f"data: {data}\n\n"
