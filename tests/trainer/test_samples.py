"""Feedback events as PPO samples: a comparison's answers judged against each other."""

from __future__ import annotations

import torch

from feedback.events import ComparedCompletion, ComparisonEvent
from liveloop.tables import utcnow
from trainer.ppo import RunningMoments, outcome_advantages
from trainer.samples import compared_samples


def comparison(*responses: list[int]) -> ComparisonEvent:
    answers = [ComparedCompletion(completion_id=f"c{i}", messages=[], prompt_token_ids=[1, 2], response_token_ids=r,
                                  behaviour_logprobs=[-0.5] * len(r), adapter_version=None,
                                  sampling_params={"temperature": 0.7}, dtype="float32",
                                  completion_created_at=utcnow()) for i, r in enumerate(responses)]
    return ComparisonEvent(event_id="e", feedback_id="f", request_id="r", revision=1, supersedes=None,
                           rated_at=utcnow(), ranking=answers)


def test_a_comparison_pushes_its_preferred_answer_up_by_what_the_other_loses():
    moments = RunningMoments(window=256, count=100, mean=-0.6, var=0.64)  # mostly thumbs down so far
    samples = compared_samples(comparison([5, 6], [7]), group=3, centre=moments.mean)
    assert [s.response_ids for s in samples] == [[5, 6], [7]] and {s.group for s in samples} == {3}
    assert [s.score for s in samples] == [0.4, -1.6] and [s.temperature for s in samples] == [0.7, 0.7]
    advantages = outcome_advantages(torch.tensor([s.score for s in samples]), torch.tensor([3, 3]), moments)
    torch.testing.assert_close(advantages, torch.tensor([2.0, -2.0]) / 0.8)  # against each other, not the baseline
    moments.update([s.score for s in samples])
    assert abs(moments.mean + 0.6) < 0.01  # the pair leaves the thumbs' baseline where it was
