"""One PPO update of the policy adapter on a batch of scored samples: ``ppo_update(policy, samples)``.

1. The samples are checked (a bad sample raises ValueError before anything changes). None is dropped for its
   age: an older behaviour policy is corrected by the importance weights.
2. They are right-padded and the frozen layers below the adapter run once (``Policy.encode``).
3. Without grad: the reference's final states (adapter off) and the proximal log-probs (the policy as it is
   now); each response's advantage against its baseline (``trainer.ppo.outcome_advantages``), then the running
   moments take in the new scores; truncated importance weights min(π_prox/μ, C) against the behaviour
   log-probs μ.
4. ``ppo_epochs`` passes over shuffled minibatches: pg_loss + β·KL(π_θ‖π_ref) − ent_coef·entropy, gradient-norm
   clipping, one Adam step each.
5. A non-finite loss, gradient norm or weight discards the whole update: weights, optimizer state and moments
   are restored, the version stays, and the metrics say ``discarded``. Otherwise β adapts towards the target
   per-token KL, measured during the last epoch, and the version advances.

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

from trainer.policy import PaddedBatch, Policy
from trainer.ppo import masked_mean, outcome_advantages, ppo_policy_loss, truncated_importance_weights

log = logging.getLogger(__name__)

# The fixed metric set of every update, under the names the exporter and the gates read. Means over response
# tokens unless said otherwise; the training statistics are averaged over every minibatch of every epoch.
METRIC_NAMES = (
    "reward_mean",  # mean score of the trained samples
    "baseline",  # the running mean of scores the lone samples were judged against, before this batch
    "kl",  # mean per-token exact KL(π_θ‖π_ref) at T = 1 over the last epoch: what β is steered by
    "beta",  # the β this update's loss used
    "pg_loss", "kl_loss", "entropy",  # the loss terms (entropy of π_θ at each sample's temperature)
    "approx_kl",  # k3 estimate of KL(π_prox‖π_θ): how far the epochs moved the policy
    "clipfrac",  # share of tokens with |ρ − 1| > ε
    "ratio_mean",  # mean ρ = π_θ/π_prox
    "is_weight_mean",  # mean truncated importance weight min(π_prox/μ, C); 1 on fresh on-policy samples
    "grad_norm",  # before clipping
    "samples",  # sequences trained on
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
    score: float  # the scalar reward of the whole response
    temperature: float  # the temperature it was sampled at; 0 for greedy
    group: int = -1  # responses to one prompt share a group id ≥ 0 (RLOO baseline); −1: a lone, logged response


@dataclass
class _Rollout:
    """What the update holds fixed, per sequence or response position, computed once without grad."""

    ref_states: torch.Tensor  # (B, T, H) the reference's final states at the response positions
    prox_logprobs: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B, 1), shared by every token of a response
    is_weights: torch.Tensor  # (B, T)

    def rows(self, index: torch.Tensor) -> _Rollout:
        return _Rollout(*(getattr(self, f.name)[index] for f in fields(self)))


def ppo_update(policy: Policy, samples: Sequence[Sample]) -> dict[str, float]:
    """Run one PPO update in place; return the metrics (``METRIC_NAMES``; NaN where nothing was measured)."""
    started = time.perf_counter()
    check_samples(policy, samples)
    metrics = dict.fromkeys(METRIC_NAMES, math.nan) | {
        "samples": float(len(samples)), "applied": 0.0, "discarded": 0.0, "beta": policy.kl_ctl.value,
        "baseline": policy.moments.mean,
    }
    batch = _pad(policy, samples)
    lower = policy.encode(batch.input_ids)  # (B, L, H)
    snapshot = _snapshot(policy)
    rollout, rollout_metrics = _rollout(policy, lower, batch, samples)
    metrics |= rollout_metrics
    train_metrics = _train(policy, lower, batch, rollout)
    if train_metrics is None:
        _restore(policy, snapshot)
        log.error("PPO update on %d samples produced a non-finite value; discarded, version stays %d",
                  len(samples), policy.version)
        return metrics | {"discarded": 1.0}
    policy.kl_ctl.update(train_metrics["kl"])
    policy.version += 1
    tokens = int(batch.lengths.sum()) * policy.config.ppo_epochs
    return metrics | train_metrics | {"applied": 1.0, "tokens_per_s": tokens / (time.perf_counter() - started)}


def check_samples(policy: Policy, samples: Sequence[Sample]) -> None:
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
        }
        problems += [f"sample {i}: {rule}" for rule, ok in rules.items() if not ok]
    if not samples:
        problems.append("no samples")
    if problems:
        raise ValueError("bad PPO batch: " + "; ".join(problems))


def _pad(policy: Policy, samples: Sequence[Sample]) -> PaddedBatch:
    # greedy samples have no temperature of their own; the config says which one the policy is trained at
    temperature = [s.temperature if s.temperature > 0 else policy.config.temperature for s in samples]
    # the padding id is never attended to (it follows every real token), so any valid id does
    batch = PaddedBatch.from_tokens([list(s.prompt_ids) for s in samples], [list(s.response_ids) for s in samples],
                                    temperature, pad_token_id=0)
    return batch.to(policy.causal_lm.device)


@torch.no_grad()
def _rollout(policy: Policy, lower: torch.Tensor, batch: PaddedBatch,
             samples: Sequence[Sample]) -> tuple[_Rollout, dict[str, float]]:
    """Reference states, proximal log-probs, advantages and importance weights for the whole batch."""
    config, mask = policy.config, batch.mask  # mask (B, T)
    ref_states, prox = [], []
    for index in torch.arange(len(samples)).split(config.minibatch_size(len(samples))):
        rows = batch.rows(index)
        ref_states.append(policy.states(lower[index], rows, reference=True))
        prox.append(policy.token_outputs(policy.states(lower[index], rows), rows).logprobs)
    ref_states, prox_logprobs = torch.cat(ref_states), torch.cat(prox)  # (B, T, H), (B, T)
    behaviour = _padded([s.behaviour_logprobs for s in samples], mask)
    scores = torch.tensor([s.score for s in samples], dtype=torch.float32)  # (B,)
    groups = torch.tensor([s.group for s in samples])
    advantages = outcome_advantages(scores, groups, policy.moments).to(mask.device)[:, None]  # (B, 1)
    policy.moments.update(scores.tolist())  # after: a score is never its own baseline
    is_weights = truncated_importance_weights(prox_logprobs, behaviour, config.is_weight_cap) * mask
    return _Rollout(ref_states, prox_logprobs, advantages, is_weights), {
        "reward_mean": scores.mean().item(),
        "is_weight_mean": masked_mean(is_weights, mask).item(),
    }


def _padded(rows: Sequence[Sequence[float]], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(mask.device)


def _train(policy: Policy, lower: torch.Tensor, batch: PaddedBatch, rollout: _Rollout) -> dict[str, float] | None:
    """Epochs × shuffled minibatches; the mean of each statistic (``kl`` over the last epoch), or None at the first
    non-finite value."""
    config, size = policy.config, len(batch.lengths)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + policy.version)
    stats = defaultdict(list)
    last_epoch_kl: list[float] = []
    for _ in range(config.ppo_epochs):
        last_epoch_kl = []
        for mb_index in torch.randperm(size, generator=generator).split(config.minibatch_size(size)):
            mb_index = mb_index.to(lower.device)
            step = _minibatch_step(policy, lower[mb_index], batch.rows(mb_index), rollout.rows(mb_index))
            if step is None:
                return None
            last_epoch_kl.append(step.pop("kl"))
            for name, value in step.items():
                stats[name].append(value)
    if not all(torch.isfinite(p).all() for p in policy.trainable_parameters()):
        return None
    return {name: sum(values) / len(values) for name, values in stats.items()} | {
        "kl": sum(last_epoch_kl) / len(last_epoch_kl)}


def _minibatch_step(policy: Policy, mb_lower: torch.Tensor, mb: PaddedBatch,
                    mb_rollout: _Rollout) -> dict[str, float] | None:
    config, mask = policy.config, mb.mask
    out = policy.token_outputs(policy.states(mb_lower, mb), mb, mb_rollout.ref_states)
    pg_loss, pg_stats = ppo_policy_loss(out.logprobs, mb_rollout.prox_logprobs, mb_rollout.advantages,
                                        mb_rollout.is_weights, mask, config.clip_eps)
    kl = masked_mean(out.kl, mask)
    entropy = masked_mean(out.entropy, mask)
    loss = pg_loss + policy.kl_ctl.value * kl - config.ent_coef * entropy
    if not torch.isfinite(loss):
        return None
    policy.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(policy.trainable_parameters(), config.max_grad_norm)
    if not torch.isfinite(grad_norm):
        return None
    policy.optimizer.step()
    return {"pg_loss": pg_loss.item(), "kl_loss": policy.kl_ctl.value * kl.item(), "kl": kl.item(),
            "entropy": entropy.item(), "grad_norm": grad_norm.item(),
            **{name: value.item() for name, value in pg_stats.items()}}


def _snapshot(policy: Policy) -> tuple[list[torch.Tensor], dict, tuple]:
    moments = (policy.moments.count, policy.moments.mean, policy.moments.var)
    return ([p.detach().clone() for p in policy.trainable_parameters()], copy.deepcopy(policy.optimizer.state_dict()),
            moments)


def _restore(policy: Policy, snapshot: tuple[list[torch.Tensor], dict, tuple]) -> None:
    weights, optimizer_state, (policy.moments.count, policy.moments.mean, policy.moments.var) = snapshot
    with torch.no_grad():
        for param, saved in zip(policy.trainable_parameters(), weights, strict=True):
            param.copy_(saved)
    policy.optimizer.load_state_dict(optimizer_state)
    policy.optimizer.zero_grad(set_to_none=True)
