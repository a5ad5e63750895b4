"""Feedback events as logged PPO samples, and the check that the trainer can use one.

The schema (``feedback.events``) says an event is well formed; this says the policy can learn from it: its
sampling parameters are in range, and as a sample it passes ``check_samples`` (tokens inside the vocabulary and
the context, one finite log-prob ≤ 0 per response token, a finite score). A comparison is checked answer by
answer. An event that fails goes to the dead-letter topic with the reason, rather than failing the update of its
whole batch at every restart.
"""

from __future__ import annotations

import math

from feedback.events import ComparisonEvent, LoggedSample, UntrainableEvent
from feedback.ledger import Event
from liveloop.sampling import MIN_TEMPERATURE, SamplingParams
from trainer.policy import Policy
from trainer.update import Sample, check_samples


def served(event: Event) -> list[LoggedSample]:
    """The served completions an event is about: a rating's one, a comparison's ranked ones (best first)."""
    return list(event.ranking) if isinstance(event, ComparisonEvent) else [event]


def logged_sample(completion: LoggedSample, score: float, group: int = -1) -> Sample:
    """The served response as a PPO sample with ``score``; ``group`` as in ``Sample``."""
    return Sample(prompt_ids=completion.prompt_token_ids, response_ids=completion.response_token_ids,
                  behaviour_logprobs=completion.behaviour_logprobs, score=score,
                  temperature=float(completion.sampling_params.get("temperature", 1.0)), group=group)


def compared_samples(event: ComparisonEvent, group: int, centre: float) -> list[Sample]:
    """A comparison in ``direct`` mode: its answers as logged samples of one RLOO group, the preferred one scored
    ``centre`` + 1 and every other ``centre`` − 1. Each is judged against the others of its request, so the
    preferred answer gains what the others lose: a comparison says which answer is better, not whether either is
    good, and judged against the running baseline of thumbs (mostly down) a preferred answer would count as a
    thumb up. ``centre`` (the running mean of scores) keeps the pair from moving that baseline."""
    return [logged_sample(c, centre + (1.0 if i == 0 else -1.0), group) for i, c in enumerate(event.ranking)]


def check_trainable(event: Event, policy: Policy) -> None:
    """Raise UntrainableEvent, saying why, when ``policy`` cannot be trained on ``event``."""
    try:
        for completion in served(event):
            _check_sampling(SamplingParams.from_dict(completion.sampling_params))
        check_samples(policy, compared_samples(event, 0, 0.0) if isinstance(event, ComparisonEvent)
                      else [logged_sample(event, event.reward)])
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
