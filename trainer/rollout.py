"""Fresh responses from the current policy, for on-policy PPO in ``reward_model`` mode.

A plain batched KV-cache decode loop: the prompts are left-padded so every row's next token lands in the same
column, one prefill computes the cache (and only the last position's logits), then one forward per new token.
Each token is drawn with ``liveloop.sampling`` — ``sampling_logprobs`` gives the distribution actually sampled
from (temperature, top-p), ``sample`` draws from it — and its log-prob under that distribution is recorded as
the behaviour log-prob, exactly as the serving engine records it. Recomputing it from a full forward over
prompt + response gives the same number; the tests check it.

A row ends at an end-of-sequence token (kept in the response: choosing to stop is an action the policy is
rewarded for) or after its ``max_tokens``. Finished rows ride along until the whole batch is done; their later
tokens are discarded. Stop strings are not applied: PPO trains on whole token sequences.

``fresh_samples`` is the whole of reward-model mode's rollout: generate with the policy, score with the reward
model (the reward adapter is switched in and back, see ``trainer.reward_model``), and return the ``Sample``s that
``trainer.update.ppo_update`` consumes, marked with the current policy version (on-policy: never stale).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import torch
from peft import PeftModel

from liveloop.sampling import SamplingParams, sample, sampling_logprobs
from trainer.policy import POLICY_ADAPTER, PolicyValueModel
from trainer.reward_model import RewardModel
from trainer.tokens import left_pad, position_ids
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
    batch_size: int = 32  # prompts decoded together; bounds the KV cache (PERF.md measured batches of 32)
    seed: int = 0  # with the policy version, seeds the sampling: the rollouts of a version are reproducible


@dataclass(frozen=True)
class Generation:
    """One prompt's fresh response and the log-prob of each response token under the distribution sampled from."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    sampling_params: SamplingParams
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_tokens reached)


@torch.no_grad()
def generate(model: PeftModel, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *,
             pad_token_id: int, eos_token_ids: Collection[int], generator: torch.Generator) -> list[Generation]:
    """Sample one response per prompt with the model's active adapter (the policy), batched.

    ``params[i]`` gives row i its temperature, top-p and max_tokens; ``generator`` (on the CPU) draws one
    uniform per row and step, so a seeded generator makes the whole batch reproducible.
    """
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
    longest = max(len(prompt) + p.max_tokens for prompt, p in zip(prompts, params, strict=True))
    if longest > model.config.max_position_embeddings or min(p.max_tokens for p in params) < 1:
        raise ValueError(f"prompt + max_tokens must be in [1, {model.config.max_position_embeddings}] tokens")
    device = model.device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_token_id))  # (B, P)
    temperature = torch.tensor([p.temperature for p in params], device=device)  # (B,)
    top_p = torch.tensor([p.top_p for p in params], device=device)  # (B,)
    max_tokens = torch.tensor([p.max_tokens for p in params], device=device)  # (B,)
    eos = torch.tensor(sorted(eos_token_ids), device=device)
    positions = position_ids(attention_mask)  # (B, P)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    next_position = positions[:, -1:] + 1  # (B, 1)
    tokens, logprobs = [], []  # per step: (B,), (B,)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # (B,)
    for step in range(int(max_tokens.max())):
        logp = sampling_logprobs(out.logits[:, -1], temperature, top_p)  # (B, V)
        token, token_logp = sample(logp, torch.rand(len(prompts), generator=generator))  # (B,), (B,)
        tokens.append(token)
        logprobs.append(token_logp)
        done |= torch.isin(token, eos) | (step + 1 >= max_tokens)
        if done.all():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1
    return _generations(prompts, params, torch.stack(tokens, 1).cpu(), torch.stack(logprobs, 1).cpu(), eos.cpu())


def _generations(prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], tokens: torch.Tensor,
                 logprobs: torch.Tensor, eos: torch.Tensor) -> list[Generation]:
    """Cut each row of tokens (B, R) and log-probs (B, R) after its end-of-sequence token or max_tokens."""
    generations = []
    for row, (prompt, sampling) in enumerate(zip(prompts, params, strict=True)):
        row_tokens = tokens[row, :sampling.max_tokens]
        stops = torch.isin(row_tokens, eos).nonzero()
        length = int(stops[0]) + 1 if len(stops) else len(row_tokens)
        generations.append(Generation(
            prompt_ids=tuple(prompt),
            response_ids=tuple(row_tokens[:length].tolist()),
            behaviour_logprobs=tuple(logprobs[row, :length].tolist()),
            sampling_params=sampling,
            finish_reason="stop" if len(stops) else "length",
        ))
    return generations


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


def fresh_samples(policy: PolicyValueModel, reward_model: RewardModel, prompts: Sequence[Sequence[int]],
                  recorded: Sequence[SamplingParams], config: RolloutConfig, *,
                  eos_token_ids: Collection[int]) -> list[Sample]:
    """Generate one response per prompt with the current policy, score it, and return PPO samples."""
    assert policy.model.active_adapter == POLICY_ADAPTER, "rollouts must sample from the policy adapter"
    params = [rollout_params(r, config, policy.config.temperature) for r in recorded]
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + policy.version)
    generations = []
    for start in range(0, len(prompts), config.batch_size):
        chunk = slice(start, start + config.batch_size)
        generations += generate(policy.model, prompts[chunk], params[chunk], pad_token_id=reward_model.pad_token_id,
                                eos_token_ids=eos_token_ids, generator=generator)
    scores = reward_model.score([g.prompt_ids for g in generations], [g.response_ids for g in generations])
    return [
        Sample(prompt_ids=g.prompt_ids, response_ids=g.response_ids, behaviour_logprobs=g.behaviour_logprobs,
               version=policy.version, score=float(score), temperature=g.sampling_params.temperature)
        for g, score in zip(generations, scores.tolist(), strict=True)
    ]
