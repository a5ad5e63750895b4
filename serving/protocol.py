"""OpenAI-compatible protocol models for the chat API (fields in the order of the OpenAI API reference).

A request converts itself into generation parameters (``sampling_params``); the handler never does. What
liveloop adds to the OpenAI shapes is grouped in one marked block per model.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from liveloop.sampling import MIN_TEMPERATURE, SEED_RANGE, SamplingParams

# JSON's \u escapes can spell a lone surrogate, which no UTF-8 response or database can hold, and NUL, which
# PostgreSQL's text cannot: a string field that held either would fail later, inside the server.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: object) -> object:
    """Check a string, or the strings of a list (the alternatives of a union are checked after it, so that an
    error names the field, not one alternative)."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str) and _UNSTORABLE.search(text):
            raise ValueError("must not contain NUL characters or lone UTF-16 surrogates")
    return value


Text = Annotated[str, AfterValidator(_storable)]
"""Every string field of a request body: text a UTF-8 response and the database can hold."""


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], AfterValidator(_storable)]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def template_dict(self) -> dict[str, str]:
        # chat templates know "system"; OpenAI's newer "developer" role means the same to them
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # unknown fields are ignored, as many OpenAI-compatible servers do, so newer clients keep working
    model_config = ConfigDict(extra="ignore")

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: Text
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="Only 0 is supported.")
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    n: int = Field(1, json_schema_extra={"enum": [1, 2]}, description=(
        "1, or 2 for two answers to compare (rate them with a `ranking` in POST /v1/feedback). Each choice is a "
        "generation of its own: it counts against the queue as a request does, max_tokens applies to each, and "
        "usage sums both. In the canary's slice the two come from the live version and the canary, in random "
        "order; otherwise both are samples of the version `model` resolves to."))
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="A 64-bit integer.")
    stop: Annotated[str | Annotated[list[str], Field(max_length=4)] | None, AfterValidator(_storable)] = Field(
        None, description="Up to 4 strings; each at most LIVELOOP_MAX_STOP_CHARS characters.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description=(
        f"0 is greedy; a temperature between 0 and {MIN_TEMPERATURE} is raised to {MIN_TEMPERATURE}, as vLLM does "
        "(far smaller ones overflow the scaled logits)."))
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    user: Text | None = Field(None, max_length=256)

    @field_validator("messages")
    @classmethod
    def _last_message_not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(message.text().strip() for message in messages):
            raise ValueError("messages contain no text")
        return messages

    @field_validator("n")
    @classmethod
    def _one_or_two_choices(cls, n: int) -> int:
        if n not in (1, 2):
            raise ValueError("n must be 1 or 2")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and any(s == "" for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop sequences must be non-empty")
        return stop

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """The parameters of choice number ``choice``. With a seed, each choice samples from its own (the seed plus
        its index, wrapping), or two choices of one version would be the same answer."""
        temperature = self.temperature and max(self.temperature, MIN_TEMPERATURE)  # 0 stays greedy
        seed = self.seed
        if seed is not None:
            low, high = SEED_RANGE
            seed = low + (seed - low + choice) % (high - low + 1)
        return SamplingParams(temperature=temperature, top_p=self.top_p, max_tokens=max_tokens, seed=seed,
                              stop=self.stop_strings())

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    # --- liveloop extras ---------------------------------------------------------------------------------
    completion_id: str = Field(description="The id to rate this choice by; with n = 1 the response's `id`.")
    model: str = Field(description="The model version that produced this choice.")


class ChatCompletion(BaseModel):
    id: str = Field(description=(
        "The request's id. With n = 1 it is also the completion's id, which feedback rates; with n = 2 each "
        "choice has its own `completion_id`, and a comparison ranks them."))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = Field(description=(
        "The model version that produced the choices; when two versions did (the live version and the canary), "
        "both, comma-separated in choice order."))
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    # --- liveloop extras, in the first chunk of each choice ------------------------------------------------
    completion_id: str | None = Field(None, description="The id to rate this choice by.")
    model: str | None = Field(None, description="The model version that produces this choice.")


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "liveloop"
    # --- liveloop extras ---------------------------------------------------------------------------------
    state: str = Field(description="'live' for the alias and the live version, else the registry state.")
    version: str | None = Field(None, description="The adapter version an alias resolves to (None: base model).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
