"""The PPO math against hand-computed values and plain reference loops."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import PPOConfig
from trainer.ppo import (
    AdaptiveKLController,
    RunningMoments,
    outcome_advantages,
    ppo_policy_loss,
    truncated_importance_weights,
)


def test_running_moments_are_exact_within_the_window_and_exponential_beyond():
    moments = RunningMoments(window=4)
    assert (moments.mean, moments.std) == (0.0, 1.0)  # nothing seen: no shift, no scaling
    moments.update([1.0, -1.0, -1.0])
    assert moments.mean == pytest.approx(-1 / 3)
    assert moments.var == pytest.approx(torch.tensor([1.0, -1.0, -1.0]).var(unbiased=False).item())
    for _ in range(200):  # beyond the window, old scores fade: the moments follow the recent ones
        moments.update([1.0])
    assert moments.mean == pytest.approx(1.0, abs=1e-6) and moments.std == 1.0  # a constant: no scaling
    assert moments.count == 203


def test_outcome_advantages_use_the_leave_one_out_mean_in_a_group_and_the_running_mean_alone():
    moments = RunningMoments(window=100)
    moments.update([1.0, -1.0, -1.0, -1.0])  # mean −0.5, std √0.75
    scores = torch.tensor([1.0, -1.0, 2.0, 0.0, 4.0, 5.0])
    groups = torch.tensor([-1, -1, 0, 0, 0, 1])  # two lone ratings, a group of three, a group of one
    advantages = outcome_advantages(scores, groups, moments)
    sigma = math.sqrt(0.75)
    expected = [1.5, -0.5, 2 - 2, 0 - 3, 4 - 1, 5 + 0.5]  # lone and singleton: s − mean; RLOO: s − mean(others)
    torch.testing.assert_close(advantages, torch.tensor(expected) / sigma)


def test_every_token_of_a_response_shares_its_advantage_sign():
    """Outcome advantages give early tokens the sign of the outcome: a liked answer is never pushed down."""
    moments = RunningMoments(window=100)
    moments.update([-1.0] * 8 + [1.0] * 2)  # thumbs-up are rare
    advantages = outcome_advantages(torch.tensor([1.0, 1.0, -1.0]), torch.tensor([-1, -1, -1]), moments)
    assert (advantages[:2] > 0).all() and advantages[2] < 0
    assert advantages[0] > -advantages[2]  # a rare thumbs-up counts for more than a common thumbs-down


def test_adaptive_kl_controller_moves_beta_each_update():
    ctl = AdaptiveKLController(0.1, target=0.05, rate=0.2)
    ctl.update(0.2)  # error +3, clipped to +1: β × 1.2
    assert ctl.value == pytest.approx(0.12)
    ctl.update(0.055)  # error +0.1
    assert ctl.value == pytest.approx(0.12 * 1.02)
    ctl.update(0.0)  # error −1: β × 0.8
    assert ctl.value == pytest.approx(0.12 * 1.02 * 0.8)
    ctl.update(float("nan"))  # nothing measured: β stays
    assert ctl.value == pytest.approx(0.12 * 1.02 * 0.8)
    for _ in range(20):  # a policy far over its target for 20 updates: β rises 38-fold, it is not stuck
        ctl.update(1.0)
    assert ctl.value > 30 * 0.12 * 1.02 * 0.8
    floored = AdaptiveKLController(0.1, target=0.05, rate=0.2, minimum=0.01)
    for _ in range(50):  # far under target for long: β stops at its floor, ready to rise again
        floored.update(0.0)
    assert floored.value == 0.01
    fixed = AdaptiveKLController.from_config(PPOConfig(target_kl=None))
    fixed.update(100.0)
    assert fixed.value == PPOConfig().init_kl_coef
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
