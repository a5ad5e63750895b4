"""Fresh responses from the current policy, for on-policy PPO in ``reward_model`` mode.

The responses come from ``liveloop.engine.offline.generate``, the decode loop serving runs, with the policy
adapter active: each token's behaviour log-prob is recorded under the distribution sampled from (temperature,
top-p), and recomputing it from a full forward over prompt + response gives the same number (the tests check it).

``fresh_samples`` is the whole of reward-model mode's rollout: generate k responses per prompt with the policy,
score them with the reward model (the reward adapter is switched in and back, see ``trainer.reward_model``), and
return the ``Sample``s that ``trainer.update.ppo_update`` consumes, grouped by prompt for the RLOO baseline.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import torch

from liveloop.engine.offline import generate
from liveloop.sampling import SamplingParams
from trainer.policy import POLICY_ADAPTER, Policy
from trainer.reward_model import RewardModel
from trainer.update import Sample


@dataclass(frozen=True)
class RolloutConfig:
    """How reward-model mode samples fresh responses from the prompts of a feedback batch."""

    max_tokens: int = 128  # cap on each fresh response (a prompt's own smaller max_tokens still applies); the
    # update's cost grows with it, and 128 is the response length bench/ppo.py measures
    temperature: float | None = None  # None: each prompt's recorded temperature, so the policy is improved
    # where it is used (greedy requests are sampled at PPOConfig.temperature: PPO needs exploration); a number
    # overrides it for every prompt
    top_p: float | None = 1.0  # 1: the full distribution, which is what PPO's training-side log-prob models,
    # so the importance weights stay 1 on fresh samples; None: each prompt's recorded top-p
    samples_per_prompt: int = 4  # k responses per prompt, each judged against the mean of the other k − 1 (RLOO);
    # RLOO with k = 4 beat PPO with a critic on one sample per prompt (Ahmadian et al., 2024)
    prompts_per_update: int = 16  # prompts an update samples for, drawn from the batch's: bounds the update's cost
    batch_size: int = 32  # sequences decoded together; bounds the KV cache (PERF.md measured batches of 32)
    seed: int = 0  # with the policy version, seeds the sampling: the rollouts of a version are reproducible


def rollout_params(recorded: SamplingParams, config: RolloutConfig, greedy_temperature: float) -> SamplingParams:
    """The sampling parameters of a fresh rollout for a prompt that was served with ``recorded``."""
    temperature = recorded.temperature if config.temperature is None else config.temperature
    return replace(
        recorded,
        temperature=temperature if temperature > 0 else greedy_temperature,
        top_p=recorded.top_p if config.top_p is None else config.top_p,
        max_tokens=min(recorded.max_tokens, config.max_tokens),
        seed=None,  # the trainer's generator draws: a served seed would only replay the served response
        stop=(),
    )


def fresh_samples(policy: Policy, reward_model: RewardModel, prompts: Sequence[Sequence[int]],
                  recorded: Sequence[SamplingParams], config: RolloutConfig, *,
                  eos_token_ids: Collection[int]) -> list[Sample]:
    """``samples_per_prompt`` responses of the current policy to each of up to ``prompts_per_update`` of the
    prompts (a seeded random choice when there are more), scored by the reward model's normalised reward; the
    responses to one prompt share a group, so the update judges each against the others (RLOO)."""
    assert policy.model.active_adapter == POLICY_ADAPTER, "rollouts must sample from the policy adapter"
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + policy.version)
    chosen = torch.randperm(len(prompts), generator=generator)[:config.prompts_per_update].tolist()
    rows = [i for i in chosen for _ in range(config.samples_per_prompt)]
    row_prompts = [prompts[i] for i in rows]
    params = [rollout_params(recorded[i], config, policy.config.temperature) for i in rows]
    generations = []
    for start in range(0, len(rows), config.batch_size):
        chunk = slice(start, start + config.batch_size)
        with policy.autocast():  # the behaviour log-probs are those of the distribution sampled, in its precision
            generations += generate(policy.model, row_prompts[chunk], params[chunk],
                                    eos_token_ids=eos_token_ids, generator=generator)
    scores = reward_model.reward([g.prompt_ids for g in generations], [g.response_ids for g in generations])
    return [
        Sample(prompt_ids=g.prompt_ids, response_ids=g.response_ids, behaviour_logprobs=g.behaviour_logprobs,
               score=float(score), temperature=g.sampling_params.temperature, group=group)
        for g, score, group in zip(generations, scores.tolist(), rows, strict=True)
    ]
