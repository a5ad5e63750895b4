"""Chat completions: from a protocol request to engine generation to a stored completion and a response.

Built once at start-up with its engine, adapter set, store and settings; the HTTP handlers only call it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from starlette.requests import ClientDisconnect
from transformers import PreTrainedTokenizerBase

from liveloop.logs import bind_log_context
from liveloop.sampling import SamplingParams
from liveloop.settings import Settings
from serving.engine import Engine, EngineError, GenerationRequest, GenerationResult, RequestStream
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
class PendingCompletion:
    """A request accepted by the engine: what the response and the stored record are built from."""

    id: str
    request: ChatCompletionRequest
    served_name: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    user_id: str | None
    started: float
    created: int


class ChatService:
    def __init__(self, *, engine: Engine, tokenizer: PreTrainedTokenizerBase, context_length: int,
                 adapters: AdapterSet, store: CompletionStore, settings: Settings):
        self.engine, self.tokenizer, self.context_length = engine, tokenizer, context_length
        self.adapters, self.store, self.settings = adapters, store, settings
        # a prompt of up to a megabyte takes a while to template and tokenise: never on the event loop, and on a
        # bounded number of threads however many arrive at once
        self._tokenizing = anyio.CapacityLimiter(settings.tokenize_threads)

    async def start(self, request: ChatCompletionRequest, *, user_id: str | None) -> PendingCompletion:
        """Validate, tokenize, pin the adapter version and submit; every refusal happens here, before streaming.
        The engine's refusals (``EngineError``) are left to the error mapper."""
        # the API key's identity, so that a client cannot pick its canary slice through `user`; that field only
        # identifies users of an open API (no keys configured), as liveloop.registry.user_identity counts them
        resolved = self.adapters.resolve(request.model, user_id if user_id is not None else request.user)
        self._check_stop(request)
        prompt_ids = await anyio.to_thread.run_sync(self._prompt_ids, request, limiter=self._tokenizing)
        params = request.sampling_params(self._max_tokens(request, len(prompt_ids)))
        stream = self.engine.submit(GenerationRequest(prompt_ids=prompt_ids, params=params, adapter=resolved.adapter))
        completion_id = new_completion_id()
        bind_log_context(completion_id=completion_id, version=resolved.served_name,
                         user=user_id if user_id is not None else request.user)
        return PendingCompletion(completion_id, request, resolved.served_name, prompt_ids, params, stream,
                                 user_id, time.perf_counter(), int(time.time()))

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
        result = await _result_unless_disconnected(gen.stream, is_disconnected)
        await self._record(gen, result)
        logprobs = self._logprobs(result.token_ids, result.logprobs) if gen.request.logprobs else None
        choice = Choice(message=AssistantMessage(content=result.text), logprobs=logprobs,
                        finish_reason=result.finish_reason)
        return ChatCompletion(id=gen.id, created=gen.created, model=gen.served_name, choices=[choice],
                              usage=_usage(result))

    async def sse(self, gen: PendingCompletion) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format; an error mid-stream becomes an error event."""
        try:
            yield self._chunk(gen, Delta(role="assistant", content=""))
            async for event in gen.stream:
                if event.text or gen.request.logprobs:
                    logprobs = self._logprobs([event.token_id], [event.logprob]) if gen.request.logprobs else None
                    yield self._chunk(gen, Delta(content=event.text), logprobs=logprobs)
            result = await gen.stream.result()
            await self._record(gen, result)
            yield self._chunk(gen, Delta(), finish_reason=result.finish_reason)
            if gen.request.stream_options and gen.request.stream_options.include_usage:
                chunk = ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.served_name, choices=[],
                                            usage=_usage(result))
                yield _sse(chunk.model_dump_json())
            yield _sse("[DONE]")
        except Exception as exc:
            yield _sse(json.dumps(_stream_error(gen, exc).model_dump()))
            yield _sse("[DONE]")
        finally:
            if not gen.stream.done:
                log.info("client disconnected from the stream of %s", gen.id)
            gen.stream.cancel()  # no-op once finished; frees the slot when the client went away

    def _chunk(self, gen: PendingCompletion, delta: Delta, *, logprobs: ChoiceLogprobs | None = None,
               finish_reason: str | None = None) -> str:
        choice = ChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        chunk = ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.served_name, choices=[choice])
        return _sse(chunk.model_dump_json(exclude_none=True))

    def _logprobs(self, token_ids: list[int], logprobs: list[float]) -> ChoiceLogprobs:
        tokens = [self.tokenizer.decode([token_id]) for token_id in token_ids]
        return ChoiceLogprobs(content=[TokenLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                       for t, lp in zip(tokens, logprobs, strict=True)])

    async def _record(self, gen: PendingCompletion, result: GenerationResult) -> None:
        """Store the completion before the client sees its end, so feedback can follow at once."""
        finished = datetime.now(UTC)
        record = CompletionRecord(
            id=gen.id, created_at=datetime.fromtimestamp(gen.created, UTC), finished_at=finished,
            user_id=gen.user_id, end_user=gen.request.user, requested_model=gen.request.model,
            adapter_version=result.adapter, messages=[m.template_dict() for m in gen.request.messages],
            prompt_token_ids=gen.prompt_ids, response_token_ids=result.token_ids, response_text=result.text,
            behaviour_logprobs=result.logprobs, sampling_params=gen.params.to_dict(), dtype=result.dtype,
            finish_reason=result.finish_reason, latency_ms=(time.perf_counter() - gen.started) * 1000)
        await asyncio.to_thread(self.store.add, record)


async def _result_unless_disconnected(stream: RequestStream, is_disconnected: Callable[[], Awaitable[bool]],
                                      poll_seconds: float = 0.25) -> GenerationResult:
    """Wait for the result, cancelling the generation if the client goes away meanwhile."""
    result = asyncio.ensure_future(stream.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=poll_seconds)
            if done:
                return result.result()
            if await is_disconnected():
                stream.cancel()
                raise ClientDisconnect()
    finally:
        if not result.done():
            result.cancel()


def _stream_error(gen: PendingCompletion, exc: Exception) -> ErrorResponse:
    """The error event that ends a stream: the status the same error would have had before streaming began."""
    if isinstance(exc, EngineError):
        exc = engine_error(exc)
    if isinstance(exc, APIError):
        log.warning("stream %s ended early: %s", gen.id, exc.message)
        return ErrorResponse(**exc.body())
    log.exception("error while streaming %s", gen.id, exc_info=exc)
    return ErrorResponse(error=ErrorDetail(message="internal error while generating", type="server_error"))


def _usage(result: GenerationResult) -> Usage:
    completion = len(result.token_ids)
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion,
                 total_tokens=result.prompt_tokens + completion)


def _sse(data: str) -> str:
    return f"data: {data}\n\n"
