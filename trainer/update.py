"""One PPO update of the policy adapter on a batch of scored samples: ``ppo_update(policy, samples)``.

1. Samples more than ``max_staleness`` adapter versions older than the policy are dropped; the rest are checked
   (a bad sample raises ValueError before anything changes).
2. They are right-padded and the frozen layers below the adapter run once (``PolicyValueModel.encode``).
3. Without grad: reference log-probs (adapter off), proximal log-probs and values (adapter on, the policy as it
   is now); per-token rewards −β·KL (+ score at the last token), GAE, advantages whitened over the batch's
   response tokens, and truncated importance weights min(π_prox/μ, C) against the behaviour log-probs μ.
4. ``ppo_epochs`` passes over shuffled minibatches: pg_loss + vf_coef·v_loss − ent_coef·entropy, gradient-norm
   clipping, one Adam step each.
5. A non-finite loss, gradient norm or weight discards the whole update: weights and optimizer state are
   restored, the version stays, and the metrics say ``discarded``. Otherwise β adapts and the version advances.

The math is in ``trainer.ppo``; the decoupled, off-policy objective is described there.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from trainer.policy import PaddedBatch, PolicyValueModel
from trainer.ppo import (
    compute_gae,
    explained_variance,
    kl_penalty,
    masked_mean,
    per_token_rewards,
    ppo_policy_loss,
    truncated_importance_weights,
    value_loss,
    whiten,
)

log = logging.getLogger(__name__)

# The fixed metric set of every update, under the names the exporter and the gates read. Means over response
# tokens unless said otherwise; the training statistics are averaged over every minibatch of every epoch.
METRIC_NAMES = (
    "reward_mean",  # mean score of the trained samples
    "kl",  # Σ_t KL_t(π_prox‖π_ref) per sequence, batch mean: what the adaptive β steers
    "beta",  # the β this update's rewards were computed with
    "pg_loss", "v_loss", "entropy",  # the loss terms (entropy of π_θ at each sample's temperature)
    "approx_kl",  # k3 estimate of KL(π_prox‖π_θ): how far the epochs moved the policy
    "clipfrac",  # share of tokens with |ρ − 1| > ε
    "ratio_mean",  # mean ρ = π_θ/π_prox
    "explained_variance",  # of the returns by the old values; NaN when the returns are constant
    "is_weight_mean",  # mean truncated importance weight min(π_prox/μ, C); 1 on fresh on-policy samples
    "grad_norm",  # before clipping
    "samples", "dropped_stale",  # sequences trained on / dropped as staler than max_staleness
    "tokens_per_s",  # (prompt + response) tokens × epochs per second of the whole update
    "applied",  # 1 when the weights changed and the version advanced
    "discarded",  # 1 when a non-finite value threw the update away (weights restored)
)
# A recorded log-prob may exceed 0 by float32 rounding, never by more.
_LOGPROB_SLACK = 1e-4


@dataclass(frozen=True)
class Sample:
    """One scored response, as served (direct mode) or freshly generated (reward-model mode)."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    behaviour_logprobs: Sequence[float]  # log μ(a_t) as recorded by liveloop.sampling when a_t was drawn
    version: int  # the policy version that generated it (PolicyValueModel.version; the base model is 0)
    score: float  # the scalar reward of the whole response
    temperature: float  # the temperature it was sampled at; 0 for greedy


@dataclass
class _Rollout:
    """What the update holds fixed, per response position (B, T), computed once without grad."""

    prox_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor
    is_weights: torch.Tensor

    def rows(self, index: torch.Tensor) -> _Rollout:
        return _Rollout(*(getattr(self, f.name)[index] for f in fields(self)))


def ppo_update(policy: PolicyValueModel, samples: Sequence[Sample]) -> dict[str, float]:
    """Run one PPO update in place; return the metrics (``METRIC_NAMES``; NaN where nothing was measured)."""
    started = time.perf_counter()
    check_samples(policy, samples)
    fresh = [s for s in samples if policy.version - s.version <= policy.config.max_staleness]
    metrics = dict.fromkeys(METRIC_NAMES, math.nan) | {
        "samples": float(len(fresh)), "dropped_stale": float(len(samples) - len(fresh)), "applied": 0.0,
        "discarded": 0.0, "beta": policy.kl_ctl.value,
    }
    if len(fresh) < len(samples):
        log.info("dropped %d samples staler than %d versions", len(samples) - len(fresh), policy.config.max_staleness)
    if not fresh:
        return metrics
    batch = _pad(policy, fresh)
    lower = policy.encode(batch.input_ids)  # (B, L, H)
    rollout, rollout_metrics = _rollout(policy, lower, batch, fresh)
    metrics |= rollout_metrics
    snapshot = _snapshot(policy)
    train_metrics = _train(policy, lower, batch, rollout)
    if train_metrics is None:
        _restore(policy, snapshot)
        log.error("PPO update on %d samples produced a non-finite value; discarded, version stays %d",
                  len(fresh), policy.version)
        return metrics | {"discarded": 1.0}
    policy.kl_ctl.update(metrics["kl"], len(fresh))
    policy.version += 1
    tokens = int(batch.lengths.sum()) * policy.config.ppo_epochs
    return metrics | train_metrics | {"applied": 1.0, "tokens_per_s": tokens / (time.perf_counter() - started)}


def check_samples(policy: PolicyValueModel, samples: Sequence[Sample]) -> None:
    """Raise ValueError naming every malformed sample; the policy is untouched."""
    vocab = policy.causal_lm.get_output_embeddings().weight.shape[0]
    context = policy.causal_lm.config.max_position_embeddings
    problems = []
    for i, s in enumerate(samples):
        tokens = [*s.prompt_ids, *s.response_ids]
        rules = {
            "empty prompt or response": bool(s.prompt_ids) and bool(s.response_ids),
            f"{len(s.behaviour_logprobs)} behaviour log-probs for {len(s.response_ids)} response tokens":
                len(s.behaviour_logprobs) == len(s.response_ids),
            "behaviour log-probs must be finite and <= 0":
                all(math.isfinite(x) and x <= _LOGPROB_SLACK for x in s.behaviour_logprobs),
            f"token ids outside [0, {vocab})": all(0 <= t < vocab for t in tokens),
            f"{len(tokens)} tokens exceed the context of {context}": len(tokens) <= context,
            "score must be finite": math.isfinite(s.score),
            "temperature must be finite and >= 0": math.isfinite(s.temperature) and s.temperature >= 0,
            f"version {s.version} is not in [0, {policy.version}]": 0 <= s.version <= policy.version,
        }
        problems += [f"sample {i}: {rule}" for rule, ok in rules.items() if not ok]
    if not samples:
        problems.append("no samples")
    if problems:
        raise ValueError("bad PPO batch: " + "; ".join(problems))


def _pad(policy: PolicyValueModel, samples: Sequence[Sample]) -> PaddedBatch:
    # greedy samples have no temperature of their own; the config says which one the policy is trained at
    temperature = [s.temperature if s.temperature > 0 else policy.config.temperature for s in samples]
    # the padding id is never attended to (it follows every real token), so any valid id does
    batch = PaddedBatch.from_tokens([list(s.prompt_ids) for s in samples], [list(s.response_ids) for s in samples],
                                    temperature, pad_token_id=0)
    return batch.to(policy.causal_lm.device)


@torch.no_grad()
def _rollout(policy: PolicyValueModel, lower: torch.Tensor, batch: PaddedBatch,
             samples: Sequence[Sample]) -> tuple[_Rollout, dict[str, float]]:
    """Reference and proximal passes, rewards, advantages and importance weights for the whole batch."""
    config, mask = policy.config, batch.mask  # mask (B, T)
    ref, prox = [], []
    for index in torch.arange(len(samples)).split(config.minibatch_size(len(samples))):
        ref.append(policy.heads(lower[index], batch.rows(index), reference=True))
        prox.append(policy.heads(lower[index], batch.rows(index)))
    ref_logprobs = torch.cat([out.logprobs for out in ref])  # (B, T)
    prox_logprobs = torch.cat([out.logprobs for out in prox])
    values = torch.cat([out.values for out in prox])
    behaviour = _padded([s.behaviour_logprobs for s in samples], mask)
    scores = torch.tensor([s.score for s in samples], dtype=torch.float32, device=mask.device)  # (B,)
    kl = kl_penalty(prox_logprobs, ref_logprobs) * mask
    rewards = per_token_rewards(scores, kl, policy.kl_ctl.value, mask)
    advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)
    is_weights = truncated_importance_weights(prox_logprobs, behaviour, config.is_weight_cap) * mask
    rollout = _Rollout(prox_logprobs, values, whiten(advantages, mask), returns, is_weights)
    return rollout, {
        "reward_mean": scores.mean().item(),
        "kl": kl.sum(1).mean().item(),  # per sequence, as the KL target is
        "explained_variance": explained_variance(values, returns, mask),
        "is_weight_mean": masked_mean(is_weights, mask).item(),
    }


def _padded(rows: Sequence[Sequence[float]], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(mask.device)


def _train(policy: PolicyValueModel, lower: torch.Tensor, batch: PaddedBatch,
           rollout: _Rollout) -> dict[str, float] | None:
    """Epochs × shuffled minibatches; the mean of each statistic, or None at the first non-finite value."""
    config, size = policy.config, len(batch.lengths)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + policy.version)
    stats = defaultdict(list)
    for _ in range(config.ppo_epochs):
        for mb_index in torch.randperm(size, generator=generator).split(config.minibatch_size(size)):
            mb_index = mb_index.to(lower.device)
            step = _minibatch_step(policy, lower[mb_index], batch.rows(mb_index), rollout.rows(mb_index))
            if step is None:
                return None
            for name, value in step.items():
                stats[name].append(value)
    if not all(torch.isfinite(p).all() for p in policy.trainable_parameters()):
        return None
    return {name: sum(values) / len(values) for name, values in stats.items()}


def _minibatch_step(policy: PolicyValueModel, mb_lower: torch.Tensor, mb: PaddedBatch,
                    mb_rollout: _Rollout) -> dict[str, float] | None:
    config, mask = policy.config, mb.mask
    out = policy.heads(mb_lower, mb)
    pg_loss, pg_stats = ppo_policy_loss(out.logprobs, mb_rollout.prox_logprobs, mb_rollout.advantages,
                                        mb_rollout.is_weights, mask, config.clip_eps)
    v_loss = value_loss(out.values, mb_rollout.old_values, mb_rollout.returns, mask, config.value_clip)
    entropy = masked_mean(out.entropy, mask)
    loss = pg_loss + config.vf_coef * v_loss - config.ent_coef * entropy
    if not torch.isfinite(loss):
        return None
    policy.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(policy.trainable_parameters(), config.max_grad_norm)
    if not torch.isfinite(grad_norm):
        return None
    policy.optimizer.step()
    return {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "entropy": entropy.item(),
            "grad_norm": grad_norm.item(), **{name: value.item() for name, value in pg_stats.items()}}


def _snapshot(policy: PolicyValueModel) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in policy.trainable_parameters()], copy.deepcopy(policy.optimizer.state_dict())


def _restore(policy: PolicyValueModel, snapshot: tuple[list[torch.Tensor], dict]) -> None:
    weights, optimizer_state = snapshot
    with torch.no_grad():
        for param, saved in zip(policy.trainable_parameters(), weights, strict=True):
            param.copy_(saved)
    policy.optimizer.load_state_dict(optimizer_state)
    policy.optimizer.zero_grad(set_to_none=True)
