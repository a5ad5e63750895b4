"""The PPO math against hand-computed values and plain reference loops."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import PPOConfig
from trainer.ppo import (
    AdaptiveKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    per_token_rewards,
    ppo_policy_loss,
    truncated_importance_weights,
    value_loss,
    whiten,
)


def gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """One sequence, scalars, the textbook recursion; the episode ends after the last token."""
    advantages, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * next_value - values[t] + gamma * lam * last
        advantages[t] = last
    return advantages


def test_gae_hand_computed_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])  # row 1's last position is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ = (0.1, 0.1, 0.3) → A2 = 0.3, A1 = 0.1 + 0.5·0.3, A0 = 0.1 + 0.5·0.25
    torch.testing.assert_close(advantages, torch.tensor([[0.225, 0.25, 0.3], [0.25, 1.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.725, 0.85, 1.0], [1.25, 2.0, 0.0]]))


def test_gae_matches_reference_loop_on_ragged_batch():
    generator = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 5]
    rewards = torch.randn(4, 7, generator=generator)
    values = torch.randn(4, 7, generator=generator)  # padding holds garbage on purpose
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).float()
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for row, n in enumerate(lengths):
        expected = gae_reference(rewards[row, :n].tolist(), values[row, :n].tolist(), 0.9, 0.8)
        torch.testing.assert_close(advantages[row, :n], torch.tensor(expected))
        torch.testing.assert_close(returns[row, :n], torch.tensor(expected) + values[row, :n])
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_whiten_uses_masked_positions_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    std = math.sqrt(5 / 3)  # mean 2.5; unbiased variance of (1, 2, 3, 4)
    expected = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / std
    torch.testing.assert_close(whiten(x, mask), expected)
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), (expected + 2.5) * mask)


def test_kl_penalty_and_per_token_rewards():
    kl = kl_penalty(torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.1, -1.8, -0.8]]))
    torch.testing.assert_close(kl, torch.tensor([[0.1, -0.2, 0.3]]))
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.1, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = per_token_rewards(torch.tensor([1.0, -2.0]), kl, beta=0.5, mask=mask)
    # −β·KL everywhere, the score on the last real token, nothing on padding
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.25, -1.95, 0.0]]))


def test_adaptive_kl_controller_follows_ziegler_update():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=100)  # error 1.0, clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * 1.002)
    ctl.update(6.6, n_steps=100)  # error +0.1
    assert ctl.value == pytest.approx(0.2 * 1.002 * 1.001)
    ctl.update(0.0, n_steps=1000)  # error −1, clipped to −0.2
    assert ctl.value == pytest.approx(0.2 * 1.002 * 1.001 * 0.98)
    fixed = AdaptiveKLController.from_config(PPOConfig(target_kl=None))
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.2
    assert AdaptiveKLController.from_config(PPOConfig(), value=0.7).value == 0.7


def test_clipped_policy_loss_hand_computed():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 7.0]])  # the last position is padding
    prox = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    logprobs = (prox + ratios.log()).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    pg_loss, stats = ppo_policy_loss(logprobs, prox, advantages, torch.ones(1, 4), mask, clip_eps=0.2)
    # per token max(−A·r, −A·clip(r)): (−1.2, −0.5, 1.1)
    assert pg_loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(3.1 / 3)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-5)
    pg_loss.backward()
    # the clipped token (r = 1.5 > 1.2 with A > 0) and the padding get no gradient
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 3] == 0 and logprobs.grad[0, 1] != 0


def test_importance_weights_scale_the_loss_as_constants():
    prox = torch.tensor([[-1.0, -2.0, -0.5]])
    logprobs = (prox + torch.tensor([[1.5, 0.5, 1.1]]).log()).requires_grad_()
    advantages, mask = torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3)
    weights = torch.tensor([[2.0, 1.0, 0.5]], requires_grad=True)
    pg_loss, _ = ppo_policy_loss(logprobs, prox, advantages, weights, mask, clip_eps=0.2)
    assert pg_loss.item() == pytest.approx((-2.4 - 0.5 + 0.55) / 3)
    pg_loss.backward()
    assert weights.grad is None


def test_truncated_importance_weight_is_capped():
    prox = torch.tensor([-1.0, -2.0, -0.1, -3.0])
    behaviour = torch.tensor([-1.0, -3.0, -5.0, -2.0])
    weights = truncated_importance_weights(prox, behaviour, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, 2.0, 2.0, math.exp(-1.0)]))  # e¹ and e⁴·⁹ capped


def test_decoupled_loss_is_plain_ppo_when_behaviour_is_proximal():
    generator = torch.Generator().manual_seed(0)
    prox = -torch.rand(3, 5, generator=generator) * 3
    advantages = torch.randn(3, 5, generator=generator)
    mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4])[:, None]).float()
    logprobs = (prox + 0.3 * torch.randn(3, 5, generator=generator)).requires_grad_()
    weights = truncated_importance_weights(prox, prox, cap=2.0)
    assert torch.equal(weights, torch.ones(3, 5))
    decoupled, _ = ppo_policy_loss(logprobs, prox, advantages, weights, mask, clip_eps=0.2)
    (grad_decoupled,) = torch.autograd.grad(decoupled, logprobs)
    # plain PPO (Schulman et al., 2017), written out
    ratio = torch.exp(logprobs - prox)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
    plain = -(surrogate * mask).sum() / mask.sum()
    (grad_plain,) = torch.autograd.grad(plain, logprobs)
    torch.testing.assert_close(decoupled, plain)
    torch.testing.assert_close(grad_decoupled, grad_plain)


def test_clipped_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.6, 4.0]])
    old_values = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[0.5, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # t0: max((1−0.5)², (0.2−0.5)²) = 0.25; t1: max((0.6−1)², (0.2−1)²) = 0.64
    assert value_loss(values, old_values, returns, mask, value_clip=0.2).item() == pytest.approx(0.5 * 0.89 / 2)


def test_entropy_and_explained_variance():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0)) * 3
    log_p = torch.log_softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(log_p.exp() * log_p).sum(-1))
    assert entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(torch.zeros(1, 4), torch.ones(1, 4), mask))
