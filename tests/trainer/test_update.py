"""ppo_update end to end on small models: it learns a toy preference, and handles stale, off-policy and bad data.

The toy preference (reward 1 when the response contains token 7) runs on a 2-layer Llama over a 64-token
vocabulary built here, not on ``tiny_model_dir``: with 49,152 tokens, a random model's RMS-normed final state
and 0.02-scale embeddings bound any one token's probability near 1/49,152 whatever the adapter does, so no
preference for a single token could ever be learnt or sampled. Here the rewarded token turns up in about one
response in eight at first (one in nine measured), and PPO can make it likely.

In reward_model mode the reward is a reward model's score, learnt from thumbs on the toy preference; the test
measures the preference itself on fresh samples. Its liked token is in about one response in four at first and
never in a prompt, so the reward model need only learn whether the token is there, not where. From 2,048 ratings
it does within one or two increments (held-out balanced accuracy 0.96–1.0 over seeds 0–9); from 512 or 1,024 it
overfits them and ranks fresh responses at AUC ≈ 0.7, too weak a reward to steer PPO reliably.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from liveloop.engine.offline import Generation, generate
from liveloop.sampling import SamplingParams
from trainer.config import PPOConfig
from trainer.policy import PolicyValueModel
from trainer.reward_model import RatedResponse, RewardModel, RewardModelConfig
from trainer.rollout import RolloutConfig, fresh_samples
from trainer.update import METRIC_NAMES, Sample, ppo_update

REWARDED_TOKEN, EOS = 7, 2
LIKED_TOKEN = 30  # reward_model mode's toy preference: a thumb up when the response contains it
SERVED = SamplingParams(temperature=1.0, max_tokens=8)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def toy_policy(**config) -> PolicyValueModel:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=EOS,
    )).eval()
    model.requires_grad_(False)
    return PolicyValueModel.create(model, PPOConfig(**config), base_model_id="toy")


def rollouts(policy: PolicyValueModel, n: int, seed: int) -> list[Sample]:
    """n responses of 8 tokens sampled from the policy, scored by the toy preference."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 64, (5,), generator=generator).tolist() for _ in range(n)]
    generations = generate(policy.model, prompts, [SamplingParams(temperature=1.0, max_tokens=8)] * n,
                           eos_token_ids={EOS}, generator=generator)
    return [Sample(g.prompt_ids, g.response_ids, g.behaviour_logprobs, version=policy.version,
                   score=float(REWARDED_TOKEN in g.response_ids), temperature=1.0) for g in generations]


def mean_score(samples: list[Sample]) -> float:
    return sum(s.score for s in samples) / len(samples)


def trainable_state(policy: PolicyValueModel) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.trainable_parameters()]


def test_ppo_raises_the_reward_of_a_toy_preference():
    policy = toy_policy(learning_rate=5e-3, init_kl_coef=0.05)
    before = mean_score(rollouts(policy, 128, seed=1000))
    for update in range(16):
        metrics = ppo_update(policy, rollouts(policy, 16, seed=update))
        assert metrics["applied"] == 1.0
        assert metrics["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)  # fresh samples: μ is π_prox
    after = mean_score(rollouts(policy, 128, seed=1000))
    assert policy.version == 16
    assert after > before + 0.3, (before, after)  # measured: 0.12 → 0.7


def prompts_without_liked_token(n: int, generator: torch.Generator) -> list[list[int]]:
    prompts = []
    while len(prompts) < n:
        prompt = torch.randint(3, 64, (5,), generator=generator).tolist()
        if LIKED_TOKEN not in prompt:
            prompts.append(prompt)
    return prompts


def served(policy: PolicyValueModel, n: int, seed: int) -> list[Generation]:
    """n responses of the policy to prompts without the liked token, as serving samples them."""
    generator = torch.Generator().manual_seed(seed)
    return generate(policy.model, prompts_without_liked_token(n, generator), [SERVED] * n, eos_token_ids={EOS},
                    generator=generator)


def liked_share(policy: PolicyValueModel) -> float:
    """The true reward: the share of 256 fresh responses (fixed prompts and draws) that contain the liked token."""
    return sum(LIKED_TOKEN in g.response_ids for g in served(policy, 256, seed=10_000)) / 256


@pytest.mark.parametrize("seed", [0])  # seeds 0–9 all pass, measured
def test_ppo_on_a_learnt_reward_model_raises_the_true_reward_of_a_toy_preference(seed):
    """reward_model mode through the trainer's own calls: thumbs train the reward model (``add``,
    ``train_increment``), then each update scores fresh rollouts of the current policy with it
    (``fresh_samples``) and runs PPO on them (``ppo_update``)."""
    policy = toy_policy(learning_rate=5e-3, init_kl_coef=0.05, seed=seed)
    reward_model = RewardModel.create(policy.model, base_model_id="toy", pad_token_id=0,
                                      config=RewardModelConfig(lr=3e-3, batch_size=32, seed=seed))
    reward_model.add(RatedResponse(f"chatcmpl-{seed}-{i}", g.prompt_ids, g.response_ids, LIKED_TOKEN in g.response_ids)
                     for i, g in enumerate(served(policy, 2048, seed=500 + seed)))
    for _ in range(3):
        rm = reward_model.train_increment()
        if rm.heldout_balanced_accuracy >= 0.95:
            break
    # balanced: a reward model that always says "down" scores 0.5, not the share of unliked responses (about 0.77)
    assert rm.heldout_balanced_accuracy >= 0.95 and rm.n_heldout >= 150, rm

    before = liked_share(policy)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(8):
        samples = fresh_samples(policy, reward_model, prompts_without_liked_token(16, generator), [SERVED] * 16,
                                RolloutConfig(max_tokens=8, seed=seed), eos_token_ids={EOS})
        assert ppo_update(policy, samples)["applied"] == 1.0
    after = liked_share(policy)
    assert policy.version == 8
    # measured, seeds 0–9: 0.23 → 0.69–0.91; with an untrained reward model 0.15–0.36
    assert after > before + 0.3, (before, after)


def test_metrics_are_the_fixed_set_and_finite():
    policy = toy_policy()
    metrics = ppo_update(policy, rollouts(policy, 8, seed=0))
    assert tuple(metrics) == METRIC_NAMES
    measured = [name for name in METRIC_NAMES if name != "explained_variance"]  # NaN when returns are constant
    assert all(math.isfinite(metrics[name]) for name in measured), metrics
    assert metrics["beta"] == 0.2 and metrics["samples"] == 8 and metrics["dropped_stale"] == 0


def test_non_finite_update_is_discarded_and_weights_restored():
    policy = toy_policy(learning_rate=1e30)  # the first Adam steps overflow the next forward
    before = trainable_state(policy)
    samples = [Sample(s.prompt_ids, s.response_ids, s.behaviour_logprobs, s.version, (-1.0) ** i, s.temperature)
               for i, s in enumerate(rollouts(policy, 8, seed=0))]
    metrics = ppo_update(policy, samples)
    assert (metrics["applied"], metrics["discarded"]) == (0.0, 1.0)
    assert policy.version == 0 and policy.kl_ctl.value == 0.2
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_state(policy), strict=True))
    assert policy.optimizer.state_dict()["state"] == {}


def test_stale_samples_are_dropped_before_the_update():
    policy = toy_policy(max_staleness=4)
    samples = rollouts(policy, 4, seed=0)
    policy.version = 6  # as if six updates had happened since these were generated
    versions = [0, 1, 2, 6]  # staleness 6 and 5 are dropped; 4 and 0 are kept
    batch = [Sample(s.prompt_ids, s.response_ids, s.behaviour_logprobs, v, s.score, s.temperature)
             for s, v in zip(samples, versions, strict=True)]
    metrics = ppo_update(policy, batch)
    assert (metrics["dropped_stale"], metrics["samples"], metrics["applied"]) == (2, 2, 1.0)
    assert policy.version == 7

    before = trainable_state(policy)
    metrics = ppo_update(policy, batch[:2])  # everything stale: no update at all
    assert (metrics["dropped_stale"], metrics["samples"], metrics["applied"]) == (2, 0, 0.0)
    assert math.isnan(metrics["pg_loss"]) and policy.version == 7
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_state(policy), strict=True))


def test_importance_weight_is_one_on_policy_and_truncated_at_the_cap():
    samples = rollouts(toy_policy(), 8, seed=0)
    on_policy = ppo_update(toy_policy(is_weight_cap=2.0), samples)
    assert on_policy["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    # a behaviour policy that found every token e⁵ times less likely than π_prox does: weights e⁵, capped at 2
    older = [Sample(s.prompt_ids, s.response_ids, [lp - 5 for lp in s.behaviour_logprobs], s.version, s.score,
                    s.temperature) for s in samples]
    off_policy = ppo_update(toy_policy(is_weight_cap=2.0), older)
    assert off_policy["is_weight_mean"] == pytest.approx(2.0)


def test_bad_samples_are_refused_by_name_and_change_nothing():
    policy = toy_policy()
    good = rollouts(policy, 2, seed=0)[0]
    before = trainable_state(policy)
    bad = [
        good,
        Sample(good.prompt_ids, good.response_ids, good.behaviour_logprobs[:-1], 0, 1.0, 1.0),
        Sample(good.prompt_ids, good.response_ids, good.behaviour_logprobs, 3, 1.0, 1.0),
        Sample(good.prompt_ids, [64], [-1.0], 0, float("nan"), 1.0),
    ]
    with pytest.raises(ValueError) as error:
        ppo_update(policy, bad)
    message = str(error.value)
    n = len(good.response_ids)
    assert f"sample 1: {n - 1} behaviour log-probs for {n} response tokens" in message
    assert "sample 2: version 3 is not in [0, 0]" in message
    assert "sample 3: token ids outside [0, 64)" in message and "sample 3: score must be finite" in message
    assert "sample 0" not in message
    assert policy.version == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_state(policy), strict=True))

