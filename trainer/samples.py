"""Feedback events as logged PPO samples, and the check that the trainer can use one.

The schema (``feedback.events``) says an event is well formed; this says the policy can learn from it: its
sampling parameters are in range, and as a sample it passes ``check_samples`` (tokens inside the vocabulary and
the context, one finite log-prob ≤ 0 per response token, a finite score). An event that fails goes to the
dead-letter topic with the reason, rather than failing the update of its whole batch at every restart.
"""

from __future__ import annotations

import math

from feedback.events import FeedbackEvent, UntrainableEvent
from liveloop.sampling import MIN_TEMPERATURE, SamplingParams
from trainer.policy import Policy
from trainer.update import Sample, check_samples


def logged_sample(event: FeedbackEvent) -> Sample:
    """The served response as a PPO sample, scored by its rating."""
    return Sample(prompt_ids=event.prompt_token_ids, response_ids=event.response_token_ids,
                  behaviour_logprobs=event.behaviour_logprobs, score=event.reward,
                  temperature=float(event.sampling_params.get("temperature", 1.0)))


def check_trainable(event: FeedbackEvent, policy: Policy) -> None:
    """Raise UntrainableEvent, saying why, when ``policy`` cannot be trained on ``event``."""
    try:
        _check_sampling(SamplingParams.from_dict(event.sampling_params))
        check_samples(policy, [logged_sample(event)])
    except (TypeError, ValueError) as exc:  # TypeError: a sampling parameter SamplingParams does not have
        raise UntrainableEvent(f"not trainable: {exc}") from None


def _check_sampling(params: SamplingParams) -> None:
    if not (_finite(params.temperature) and (params.temperature == 0 or params.temperature >= MIN_TEMPERATURE)):
        raise ValueError(f"temperature {params.temperature!r} is neither 0 nor a number >= {MIN_TEMPERATURE}")
    if not (_finite(params.top_p) and 0 < params.top_p <= 1):
        raise ValueError(f"top_p {params.top_p!r} is not in (0, 1]")
    if not (isinstance(params.max_tokens, int) and params.max_tokens >= 1):
        raise ValueError(f"max_tokens {params.max_tokens!r} is not a positive integer")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
