"""PPO for RLHF from thumbs, as pure functions on tensors; ``trainer.update`` only wires them together.

Shapes: B sequences of up to T response tokens, right-padded; ``mask`` (B, T) is 1.0 on real response tokens and
0.0 on padding, and each row's real tokens are a prefix. Log-probs are of the chosen tokens, per position.

Advantages are the outcome's, shared by every token of a response (as GRPO and RLOO do). One thumb, or one
reward-model score, judges the whole response, and a critic trained from a few thousand of them cannot say which
tokens earned it; a learned value per token would mostly add noise, and with a sparse reward at the last token
it gives early tokens little credit, or credit of the wrong sign. A score is judged against a baseline:

    A_i = (s_i − b_i) / σ

- RLOO (Ahmadian et al., 2024): for k responses to one prompt, each scored by the reward model, b_i is the mean
  score of the other k − 1 — an unbiased baseline that needs no model;
- one logged response per prompt (a served completion and its thumb): b is the running mean of recent scores
  (``RunningMoments``), so a thumbs-up counts for more when thumbs-up are rare;
- σ is the running standard deviation of the scores, so a learning rate means the same whatever the scale.

KL to the reference is a loss term, not a reward: β · KL(π_θ(·|s_t) ‖ π_ref(·|s_t)), the exact KL over the
whole vocabulary at each sampled position (``trainer.lm_head``), averaged over response tokens. The usual
single-sample estimate log π(a_t) − log π_ref(a_t) is unbiased only for a_t ~ π; on served samples (an older
version, a temperature, a top-p) it measures something else and can be negative. The exact KL at the visited
states is non-negative and has no sampling noise. β adapts towards a per-token target (``AdaptiveKLController``).

Decoupled PPO, for logged samples (Hilton et al., 2021; AReaL, Fu et al., 2025). A logged sample was drawn
from a behaviour policy μ: the adapter version that served it, with the request's temperature and top-p,
recorded by ``liveloop.sampling``. μ may be several versions older than the policy being trained, and top-p
makes it differ from the softmax even for the same weights. PPO's two uses of the "old" policy are therefore
split. The trust region is taken around the proximal policy π_prox, the policy at the start of this update,
recomputed without grad; the gap between π_prox and μ is corrected by a per-token importance weight, truncated
at C (truncated IS, as verl's rollout correction) and treated as a constant:

    L_pg = −mean_t[ w_t · min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t) ],  ρ_t = π_θ/π_prox,  w_t = min(π_prox/μ, C)

When μ = π_prox every w_t = 1 and this is plain PPO. No sample is dropped for its age: tokens an older version
liked and the current policy does not simply weigh little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.config import PPOConfig


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1: a token-level mean, every response token counts once."""
    return (x * mask).sum() / mask.sum()


@dataclass
class RunningMoments:
    """Mean and variance of recent scores: an exponential average over about ``window`` scores (exact while
    fewer have been seen). Saved with every policy version, so a restart keeps its baseline."""

    window: int
    count: int = 0
    mean: float = 0.0
    var: float = 1.0

    def update(self, scores: list[float]) -> None:
        for score in scores:
            self.count += 1
            rate = 1 / min(self.count, self.window)
            delta = score - self.mean
            self.mean += rate * delta
            # West's weighted update; with rate = 1/n it is Welford's population variance
            self.var = (1 - rate) * (self.var + rate * delta * delta) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        """The scale advantages are divided by; 1 until two different scores have been seen."""
        return math.sqrt(self.var) if self.var > 1e-6 else 1.0


def outcome_advantages(scores: torch.Tensor, groups: torch.Tensor, moments: RunningMoments) -> torch.Tensor:
    """A_i = (s_i − b_i) / σ per sequence (B,) — see the module docstring.

    scores (B,); groups (B,) long, rows with the same non-negative id are responses to one prompt (RLOO
    baseline: the mean of the others); −1 marks a row alone, judged against the running mean.
    """
    baseline = torch.full_like(scores, moments.mean)
    for group in groups.unique():
        rows = (groups == group).nonzero().squeeze(1)
        if group < 0 or len(rows) < 2:
            continue
        total = scores[rows].sum()
        baseline[rows] = (total - scores[rows]) / (len(rows) - 1)
    return (scores - baseline) / moments.std


def truncated_importance_weights(prox_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """w_t = min(π_prox(a_t) / μ(a_t), C): how much more likely the proximal policy makes the logged token."""
    return torch.exp(prox_logprobs - behaviour_logprobs).clamp(max=cap)


def ppo_policy_loss(logprobs: torch.Tensor, prox_logprobs: torch.Tensor, advantages: torch.Tensor,
                    is_weights: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate L_pg (module docstring), token-level mean; returns (pg_loss, stats).

    ``advantages`` (B, T) or (B, 1), broadcast over tokens. ``is_weights`` enter as constants (detached): they
    reweight the data, they are not part of what is learnt. Stats: ``approx_kl`` (k3 estimate of
    KL(π_prox‖π_θ)), ``clipfrac``, ``ratio_mean``, all masked means.
    """
    log_ratio = logprobs - prox_logprobs  # (b, T)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    pg_loss = masked_mean(is_weights.detach() * torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return pg_loss, stats


class AdaptiveKLController:
    """β of the KL term, steered towards a target per-token KL (Ziegler et al., 2019, eq. 2, per update):

        e = clip(KL / KL_target − 1, −1, 1),   β ← max(β · (1 + rate · e), β_min)

    With no target, β stays at its initial value.
    """

    def __init__(self, init_kl_coef: float, target: float | None, rate: float, minimum: float = 0.0) -> None:
        self.value, self.target, self.rate, self.minimum = init_kl_coef, target, rate, minimum

    @classmethod
    def from_config(cls, config: PPOConfig, value: float | None = None) -> AdaptiveKLController:
        """A controller with the config's target, rate and floor; ``value`` resumes a saved β."""
        return cls(config.init_kl_coef if value is None else value, config.target_kl, config.kl_adapt_rate,
                   config.min_kl_coef)

    def update(self, current_kl: float) -> None:
        if self.target is None or not math.isfinite(current_kl):
            return
        proportional_error = min(max(current_kl / self.target - 1, -1.0), 1.0)
        self.value = max(self.value * (1 + self.rate * proportional_error), self.minimum)
