"""PPO for RLHF as pure functions on tensors; ``trainer.update`` only wires them together.

Shapes: B sequences of up to T response tokens, right-padded; ``mask`` (B, T) is 1.0 on real response tokens and
0.0 on padding, and each row's real tokens are a prefix. Log-probs are of the chosen tokens, per position.

Reward (Ziegler et al., 2019; Stiennon et al., 2020): every response token is penalised by its share of the KL
to the reference, and the scalar score of the whole response arrives at its last token:

    r_t = −β · KL_t  (+ score if t is the last token),    KL_t = log π(a_t|s_t) − log π_ref(a_t|s_t)

Advantages by GAE(γ, λ) (Schulman et al., 2016) from the value head's V(s_t), whitened over the batch's response
tokens.

Decoupled PPO, for logged samples (Hilton et al., 2021; AReaL, Fu et al., 2025). A logged sample was drawn
from a behaviour policy μ: the adapter version that served it, with the request's temperature and top-p,
recorded by ``liveloop.sampling``. μ may be several versions older than the policy being trained, and top-p
makes it differ from the softmax even for the same weights. PPO's two uses of the "old" policy are therefore
split. The trust region is taken around the proximal policy π_prox, the policy at the start of this update,
recomputed without grad; the gap between π_prox and μ is corrected by a per-token importance weight, truncated
at C (truncated IS, as verl's rollout correction) and treated as a constant:

    L_pg = −mean_t[ w_t · min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t) ],  ρ_t = π_θ/π_prox,  w_t = min(π_prox/μ, C)

When μ = π_prox every w_t = 1 and this is plain PPO. Samples more than ``max_staleness`` adapter versions old are
dropped before the update (``trainer.update``), so the weights only ever correct a bounded lag.
"""

from __future__ import annotations

import torch

from trainer.config import PPOConfig


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1: a token-level mean, every response token counts once."""
    return (x * mask).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over the masked positions (0 for a single position)."""
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return (centred**2).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked positions; padding comes out 0. Keeps the mean if not shift_mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL_t = log π(a_t) − log π_ref(a_t), the k1 estimator of KL(π‖π_ref).

    For a ~ π it is unbiased, and its sum over a response is the log-likelihood ratio of the whole sequence,
    whose expectation is the sequence-level KL the penalty is about. One token's value may be negative.
    """
    return logprobs - ref_logprobs


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """r_t = −β·KL_t on every response token, plus the sequence's score (B,) on its last token. → (B, T)."""
    rewards = -beta * kl * mask  # (B, T)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses → (advantages, returns), each (B, T).

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = δ_t + γλ A_{t+1},   R_t = A_t + V(s_t)

    The response ends after its last real token: V beyond it is 0 and no advantage flows back from padding.
    """
    rewards, values = rewards * mask, values * mask  # padding contributes nothing
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def truncated_importance_weights(prox_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """w_t = min(π_prox(a_t) / μ(a_t), C): how much more likely the proximal policy makes the logged token."""
    return torch.exp(prox_logprobs - behaviour_logprobs).clamp(max=cap)


def ppo_policy_loss(logprobs: torch.Tensor, prox_logprobs: torch.Tensor, advantages: torch.Tensor,
                    is_weights: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate L_pg (module docstring), token-level mean; returns (pg_loss, stats).

    ``is_weights`` enter as constants (detached): they reweight the data, they are not part of what is learnt.
    Stats: ``approx_kl`` (k3 estimate of KL(π_prox‖π_θ)), ``clipfrac``, ``ratio_mean``, all masked means.
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


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               value_clip: float) -> torch.Tensor:
    """Clipped value loss: ½·mean_t max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)."""
    values_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) − Σ softmax(z)·z over the last dimension, without a log-softmax tensor. (..., V) → (...)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    return lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V)/Var(R) over response tokens: 1 is a perfect critic, ≤ 0 no better than a constant."""
    var_true = masked_var(y_true, mask)
    if var_true == 0:
        return float("nan")
    return float(1 - masked_var(y_true - y_pred, mask) / var_true)


class AdaptiveKLController:
    """β of the KL penalty, steered towards a target KL per sequence (Ziegler et al., 2019, eq. 2):

        e = clip(KL / KL_target − 1, −0.2, 0.2),   β ← β · (1 + e · n / horizon)

    where n is the number of sequences the KL was measured on. With no target, β stays at its initial value.
    """

    def __init__(self, init_kl_coef: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    @classmethod
    def from_config(cls, config: PPOConfig, value: float | None = None) -> AdaptiveKLController:
        """A controller with the config's target and horizon; ``value`` resumes a saved β."""
        return cls(config.init_kl_coef if value is None else value, config.target_kl, config.kl_horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
