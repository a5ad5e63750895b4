"""ppo_update end to end on small models, with the default hyper-parameters: it learns a toy preference in both
reward modes from thumbs of responses an older version served, and handles off-policy and bad data.

The toy preference (reward 1 when the response contains token 7) runs on a 2-layer Llama over a 64-token
vocabulary built here, not on ``tiny_model_dir``: with 49,152 tokens, a random model's RMS-normed final state
and 0.02-scale embeddings bound any one token's probability near 1/49,152 whatever the adapter does, so no
preference for a single token could ever be learnt or sampled. Here the rewarded token turns up in about one
response in eight at first (one in nine measured), and PPO can make it likely.

In reward_model mode the reward is a reward model's score, learnt from thumbs on the toy preference; the test
measures the preference itself on fresh samples. Its liked token is in about one response in four at first and
never in a prompt, so the reward model need only learn whether the token is there, not where.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from liveloop.engine.offline import Generation, generate
from liveloop.sampling import SamplingParams
from trainer.config import PPOConfig
from trainer.policy import Policy
from trainer.reward_model import RatedResponse, RewardModel
from trainer.rollout import RolloutConfig, fresh_samples
from trainer.update import METRIC_NAMES, Sample, ppo_update

REWARDED_TOKEN, EOS = 7, 2
LIKED_TOKEN = 30  # reward_model mode's toy preference: a thumb up when the response contains it
SERVED = SamplingParams(temperature=1.0, max_tokens=8)
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def toy_policy(**config) -> Policy:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=EOS,
    )).eval()
    model.requires_grad_(False)
    return Policy.create(model, PPOConfig(**config), base_model_id="toy")


def rollouts(policy: Policy, n: int, seed: int) -> list[Sample]:
    """n responses of 8 tokens sampled from the policy, given a thumb by the toy preference (+1 / −1)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 64, (5,), generator=generator).tolist() for _ in range(n)]
    generations = generate(policy.model, prompts, [SamplingParams(temperature=1.0, max_tokens=8)] * n,
                           eos_token_ids={EOS}, generator=generator)
    return [Sample(g.prompt_ids, g.response_ids, g.behaviour_logprobs, score=thumb(REWARDED_TOKEN in g.response_ids),
                   temperature=1.0) for g in generations]


def thumb(up: bool) -> float:
    return 1.0 if up else -1.0


def liked(samples: list[Sample]) -> float:
    return sum(s.score > 0 for s in samples) / len(samples)


def trainable_state(policy: Policy) -> list[torch.Tensor]:
    return [p.detach().clone() for p in policy.trainable_parameters()]


def test_default_ppo_learns_a_toy_preference_from_thumbs_on_samples_of_an_older_version():
    """Direct mode as the loop runs it: the thumbs of responses served by a version that lags the policy by up
    to eight updates (the canary takes hundreds of ratings to decide), every one of them trained on."""
    policy = toy_policy()
    before = liked(rollouts(policy, 256, seed=1000))
    served: list[Sample] = []
    for update in range(96):  # the toy's one adapted layer starts slowly (LoRA B = 0); SmolLM2 moves within 6
        if update % 8 == 0:  # a promotion: serving now runs the policy as it is
            served = rollouts(policy, 256, seed=update)
        metrics = ppo_update(policy, served[(update % 8) * 32:(update % 8 + 1) * 32])
        assert metrics["applied"] == 1.0 and metrics["samples"] == 32
    after = liked(rollouts(policy, 256, seed=1000))
    assert policy.version == 96
    assert after > before + 0.15, (before, after)  # measured: 0.09 → 0.38


def prompts_without_liked_token(n: int, generator: torch.Generator) -> list[list[int]]:
    prompts = []
    while len(prompts) < n:
        prompt = torch.randint(3, 64, (5,), generator=generator).tolist()
        if LIKED_TOKEN not in prompt:
            prompts.append(prompt)
    return prompts


def served(policy: Policy, n: int, seed: int) -> list[Generation]:
    """n responses of the policy to prompts without the liked token, as serving samples them."""
    generator = torch.Generator().manual_seed(seed)
    return generate(policy.model, prompts_without_liked_token(n, generator), [SERVED] * n,
                    eos_token_ids={EOS}, generator=generator)


def liked_share(policy: Policy) -> float:
    """The true reward: the share of 256 fresh responses (fixed prompts and draws) that contain the liked token."""
    return sum(LIKED_TOKEN in g.response_ids for g in served(policy, 256, seed=10_000)) / 256


def test_default_reward_model_mode_learns_a_toy_preference_from_thumbs_of_an_older_version():
    """reward_model mode as the trainer runs it, with the default hyper-parameters: batches of thumbs on responses
    the base model served train the reward model (``add``, ``train_increment``); once it is usable, each batch
    also scores k fresh rollouts per prompt of the current policy (``fresh_samples``) for a PPO update. The
    liked share is measured by the preference itself, not by the reward model."""
    policy = toy_policy()
    reward_model = RewardModel.create(policy.model, base_model_id="toy", pad_token_id=0)
    before = liked_share(policy)
    ratings = served(policy, 2048, seed=500)
    generator = torch.Generator().manual_seed(0)
    updates = 0
    for start in range(0, len(ratings), 32):  # the trainer's batches: LIVELOOP_TRAIN_BATCH_MIN 16 to MAX 64
        reward_model.add(RatedResponse(f"chatcmpl-{start + i}", g.prompt_ids, g.response_ids,
                                       LIKED_TOKEN in g.response_ids) for i, g in enumerate(ratings[start:start + 32]))
        if not reward_model.train_increment().usable:
            continue
        samples = fresh_samples(policy, reward_model, prompts_without_liked_token(16, generator), [SERVED] * 16,
                                RolloutConfig(), eos_token_ids={EOS})
        assert len(samples) == 64 and ppo_update(policy, samples)["applied"] == 1.0
        updates += 1
    after = liked_share(policy)
    assert reward_model.last_metrics.heldout_balanced_accuracy > 0.8, reward_model.last_metrics
    assert updates >= 8 and policy.version == updates
    assert after > before + 0.15, (before, after)  # measured: 55 updates, 0.24 → 0.72


def test_a_reward_model_at_chance_never_drives_the_policy():
    """Random thumbs: the reward model's held-out accuracy stays at chance and it is never usable."""
    policy = toy_policy()
    reward_model = RewardModel.create(policy.model, base_model_id="toy", pad_token_id=0)
    coin = torch.Generator().manual_seed(3)
    ratings = served(policy, 1024, seed=501)
    usable = []
    for start in range(0, len(ratings), 64):
        reward_model.add(RatedResponse(f"chatcmpl-{start + i}", g.prompt_ids, g.response_ids,
                                       bool(torch.rand(1, generator=coin) < 0.3))
                         for i, g in enumerate(ratings[start:start + 64]))
        usable.append(reward_model.train_increment().usable)
    assert not any(usable), reward_model.last_metrics


def test_metrics_are_the_fixed_set_and_finite():
    policy = toy_policy()
    metrics = ppo_update(policy, rollouts(policy, 8, seed=0))
    assert tuple(metrics) == METRIC_NAMES
    assert all(math.isfinite(metrics[name]) for name in METRIC_NAMES), metrics
    assert metrics["beta"] == PPOConfig().init_kl_coef and metrics["samples"] == 8 and metrics["kl"] >= 0


def test_beta_follows_the_measured_kl_and_the_moments_the_scores():
    policy = toy_policy(target_kl=1e-9)  # any KL the epochs reach is over target: β rises by kl_adapt_rate
    samples = rollouts(policy, 16, seed=0)
    config = PPOConfig()
    for update in (1, 2):
        ppo_update(policy, samples)
        assert policy.kl_ctl.value == pytest.approx(config.init_kl_coef * (1 + config.kl_adapt_rate) ** update)
    assert policy.moments.count == 32
    assert policy.moments.mean == pytest.approx(sum(s.score for s in samples) / 16)


def test_non_finite_update_is_discarded_and_weights_restored():
    policy = toy_policy(learning_rate=1e30)  # the first Adam steps overflow the next forward
    before = trainable_state(policy)
    samples = [Sample(s.prompt_ids, s.response_ids, s.behaviour_logprobs, (-1.0) ** i, s.temperature)
               for i, s in enumerate(rollouts(policy, 8, seed=0))]
    metrics = ppo_update(policy, samples)
    assert (metrics["applied"], metrics["discarded"]) == (0.0, 1.0)
    assert policy.version == 0 and policy.kl_ctl.value == PPOConfig().init_kl_coef
    assert policy.moments.count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_state(policy), strict=True))
    assert policy.optimizer.state_dict()["state"] == {}


def test_samples_of_any_age_are_trained_on_with_capped_importance_weights():
    samples = rollouts(toy_policy(), 8, seed=0)  # sampled in fp32: π_prox = μ exactly only in the same precision
    on_policy = ppo_update(toy_policy(is_weight_cap=2.0, bf16_autocast=False), samples)
    assert on_policy["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    # a behaviour policy that found every token e⁵ times less likely than π_prox does: weights e⁵, capped at 2
    older = [Sample(s.prompt_ids, s.response_ids, [lp - 5 for lp in s.behaviour_logprobs], s.score, s.temperature)
             for s in samples]
    off_policy = ppo_update(toy_policy(is_weight_cap=2.0, bf16_autocast=False), older)
    assert off_policy["is_weight_mean"] == pytest.approx(2.0)
    assert off_policy["samples"] == 8 and off_policy["applied"] == 1.0  # none dropped for its age


def test_bad_samples_are_refused_by_name_and_change_nothing():
    policy = toy_policy()
    good = rollouts(policy, 2, seed=0)[0]
    before = trainable_state(policy)
    bad = [
        good,
        Sample(good.prompt_ids, good.response_ids, good.behaviour_logprobs[:-1], 1.0, 1.0),
        Sample(good.prompt_ids, good.response_ids, good.behaviour_logprobs, 1.0, float("inf")),
        Sample(good.prompt_ids, [64], [-1.0], float("nan"), 1.0),
    ]
    with pytest.raises(ValueError) as error:
        ppo_update(policy, bad)
    message = str(error.value)
    n = len(good.response_ids)
    assert f"sample 1: {n - 1} behaviour log-probs for {n} response tokens" in message
    assert "sample 2: temperature must be finite and >= 0" in message
    assert "sample 3: token ids outside [0, 64)" in message and "sample 3: score must be finite" in message
    assert "sample 0" not in message
    assert policy.version == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_state(policy), strict=True))
