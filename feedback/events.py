"""The feedback events, as the trainer reads them from the feedback topic: a rating of one completion, or a
comparison (a ranking) of the choices of one chat request.

Each is self-contained on purpose: a trainer turns each completion it names into a logged PPO sample (prompt,
response, behaviour log-probs under the sampling parameters actually used, the adapter version that produced
them) and a reward without calling back into the API or its database.

Compatibility: adding an optional field keeps ``schema_version``; removing, renaming or changing the meaning of
a field is a new version. A consumer sends versions it does not know to the dead-letter topic.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1


def as_utc(moment: datetime) -> datetime:
    """Times are UTC throughout; SQLite hands them back without a zone, so a naive time is read as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


UTCDatetime = Annotated[datetime, AfterValidator(as_utc)]


class _Message(BaseModel):
    # NaN and ±inf are no reward or log-prob (JSON has no spelling for them; orjson would write null)
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class LoggedSample(_Message):
    """A completion as served: everything PPO needs to train on it as a logged sample, in every kind of event."""

    messages: list[dict]
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float] = Field(description="Per response token, under sampling_params, at serve time.")
    adapter_version: str | None = Field(description="None: the base model served it.")
    sampling_params: dict = Field(description="liveloop.sampling.SamplingParams.to_dict() of the request.")
    dtype: str = Field(description="Compute dtype the behaviour log-probs were recorded in.")
    completion_created_at: UTCDatetime

    @model_validator(mode="after")
    def _one_logprob_per_token(self) -> LoggedSample:
        if len(self.behaviour_logprobs) != len(self.response_token_ids):
            raise ValueError(f"{len(self.behaviour_logprobs)} behaviour log-probs for "
                             f"{len(self.response_token_ids)} response tokens")
        return self


class FeedbackEvent(LoggedSample):
    """One rating (thumb) of one completion."""

    schema_version: Literal[1] = SCHEMA_VERSION
    # optional so that events written before comparisons existed still read as ratings
    event_type: Literal["rating"] = "rating"
    event_id: str = Field(description="Unique per event; consumers drop repeats (delivery is at least once).")
    feedback_id: str
    completion_id: str = Field(description="Also the Kafka key: the ratings of one completion stay in order.")
    revision: int = Field(ge=1, description="1 for a completion's first rating, +1 per change of mind.")
    rating: Literal["up", "down"]
    reward: float
    supersedes: str | None = Field(description="The feedback id this rating replaces; never train on both.")
    comment: str | None = None
    user_id: str | None = None
    rated_at: UTCDatetime


class ComparedCompletion(LoggedSample):
    """One of the choices a comparison ranks."""

    completion_id: str


class ComparisonEvent(_Message):
    """One ranking, best first, of the choices of one chat request (a preferred answer and the other is a ranking
    of two). The choices share their prompt and their user; each may come from another adapter version."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_type: Literal["comparison"] = "comparison"
    event_id: str = Field(description="Unique per event; consumers drop repeats (delivery is at least once).")
    feedback_id: str = Field(description="The comparison's id.")
    request_id: str = Field(description="Also the Kafka key: the comparisons of one request stay in order.")
    revision: int = Field(ge=1, description="1 for a request's first comparison, +1 per change of mind.")
    supersedes: str | None = Field(description="The comparison this one replaces; never train on both.")
    comment: str | None = None
    user_id: str | None = None
    rated_at: UTCDatetime
    ranking: list[ComparedCompletion] = Field(min_length=2, description="The ranked choices, best first.")

    @model_validator(mode="after")
    def _each_choice_once(self) -> ComparisonEvent:
        ids = [choice.completion_id for choice in self.ranking]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a completion is ranked twice: {ids}")
        return self


class InvalidEvent(ValueError):
    """A message on the feedback topic that this consumer cannot use; ``reason`` goes to the dead-letter topic."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MalformedEvent(InvalidEvent):
    pass


class UnknownSchemaVersion(InvalidEvent):
    pass


class UntrainableEvent(InvalidEvent):
    """A valid event the consumer's caller cannot use (the trainer: tokens outside its vocabulary, say)."""


def describe(exc: ValidationError, most: int = 3) -> str:
    """The first ``most`` problems of a validation error as 'field.path: message' (a response of NaN log-probs
    has one per token), and how many more there are."""
    problems = [f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors()]
    more = f"; and {len(problems) - most} more" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


EVENT_TYPES: dict[str, type[FeedbackEvent | ComparisonEvent]] = {"rating": FeedbackEvent,
                                                                  "comparison": ComparisonEvent}


def parse_event(raw: bytes | None) -> FeedbackEvent | ComparisonEvent:
    """The event in ``raw`` (a Kafka message value), or a typed error that says what is wrong with it. An event
    without ``event_type`` is a rating, as every event was before comparisons."""
    if raw is None:
        raise MalformedEvent("message has no value")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedEvent(f"not a JSON object but a {type(data).__name__}")
    if "schema_version" not in data:
        raise MalformedEvent("no schema_version")
    version = data["schema_version"]
    if version != SCHEMA_VERSION:
        raise UnknownSchemaVersion(f"unknown schema_version {version!r}; this consumer reads {SCHEMA_VERSION}")
    event_type = data.get("event_type", "rating")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise MalformedEvent(f"unknown event_type {event_type!r}; this consumer reads {', '.join(EVENT_TYPES)}")
    try:
        return EVENT_TYPES[event_type].model_validate(data)
    except ValidationError as exc:
        raise MalformedEvent(f"invalid version {SCHEMA_VERSION} event: {describe(exc)}") from None
