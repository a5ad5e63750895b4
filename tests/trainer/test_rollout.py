"""Fresh rollouts: the recorded behaviour log-probs are those of liveloop.sampling's distribution, and the
samples they make go straight into a PPO update."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from liveloop.engine.offline import Generation, generate
from liveloop.sampling import SamplingParams, sequence_logprobs
from trainer.config import PPOConfig
from trainer.policy import POLICY_ADAPTER, Policy
from trainer.reward_model import RewardModel
from trainer.rollout import RolloutConfig, fresh_samples, rollout_params
from trainer.update import ppo_update

PAD, EOS = 2, {2}
PROMPTS = [(1, 17, 400, 9), (1, 30), (1, 5, 6, 7, 8, 9, 10), (1, 600, 601)]
PARAMS = [  # mixed in one batch: tempered + nucleus, plain, a narrow nucleus, greedy
    SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12),
    SamplingParams(temperature=1.0, top_p=1.0, max_tokens=5),
    SamplingParams(temperature=1.3, top_p=0.5, max_tokens=12),
    SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8),
]


def recomputed_logprobs(model, generation: Generation) -> torch.Tensor:
    """log-probs (R,) of the response tokens from one full forward over prompt + response, no cache.

    Equal to the recorded ones up to float32 summation order (~1e-6 relative); a wrong temperature or nucleus
    is off by orders of magnitude more.
    """
    return torch.tensor(sequence_logprobs(model, list(generation.prompt_ids), list(generation.response_ids),
                                          generation.sampling_params, adapter=POLICY_ADAPTER))


def test_recorded_logprobs_equal_a_full_forward_recomputation(tiny_peft_model):
    generations = generate(tiny_peft_model, PROMPTS, PARAMS, eos_token_ids=EOS,
                           generator=torch.Generator().manual_seed(0))
    assert [g.prompt_ids for g in generations] == PROMPTS
    assert [len(g.response_ids) for g in generations] == [p.max_tokens for p in PARAMS]  # a random model: no EOS
    for generation in generations:
        recorded = torch.tensor(generation.behaviour_logprobs)
        assert torch.isfinite(recorded).all()
        torch.testing.assert_close(recorded, recomputed_logprobs(tiny_peft_model, generation), rtol=1e-5, atol=1e-5)
    assert generations[3].behaviour_logprobs == (0.0,) * 8  # greedy: a point mass on each chosen token


def test_rollouts_use_the_active_policy_adapter(tiny_peft_model):
    greedy = [SamplingParams(temperature=0.0, max_tokens=6)] * len(PROMPTS)
    kwargs = {"eos_token_ids": EOS, "generator": torch.Generator()}
    with_policy = generate(tiny_peft_model, PROMPTS, greedy, **kwargs)
    with tiny_peft_model.disable_adapter():
        without = generate(tiny_peft_model, PROMPTS, greedy, **kwargs)
    assert [g.response_ids for g in with_policy] != [g.response_ids for g in without]


def test_rows_end_at_an_end_token_or_max_tokens(tiny_peft_model):
    # half the vocabulary counts as an end token, so rows stop after a step or two, at different steps
    ends = set(range(0, tiny_peft_model.config.vocab_size, 2))
    params = [SamplingParams(temperature=1.0, max_tokens=1 + i % 6) for i in range(24)]
    generations = generate(tiny_peft_model, [(1, 17 + i) for i in range(24)], params,
                           eos_token_ids=ends, generator=torch.Generator().manual_seed(3))
    for generation in generations:
        *body, last = generation.response_ids
        assert not ends & set(body) and len(generation.behaviour_logprobs) == len(generation.response_ids)
        if generation.finish_reason == "stop":
            assert last in ends
        else:
            assert last not in ends and len(generation.response_ids) == generation.sampling_params.max_tokens
    assert {g.finish_reason for g in generations} == {"stop", "length"}
    assert len({len(g.response_ids) for g in generations if g.finish_reason == "stop"}) > 1


def test_a_seeded_generator_reproduces_the_batch(tiny_peft_model):
    def run() -> list[Generation]:
        return generate(tiny_peft_model, PROMPTS, PARAMS, eos_token_ids=EOS,
                        generator=torch.Generator().manual_seed(7))

    assert run() == run()


def test_requests_beyond_the_context_are_refused(tiny_peft_model):
    too_long = [SamplingParams(max_tokens=tiny_peft_model.config.max_position_embeddings)]
    with pytest.raises(ValueError, match="prompt \\+ max_tokens"):
        generate(tiny_peft_model, [(1, 2)], too_long, eos_token_ids=EOS,
                 generator=torch.Generator())


def test_rollout_params_take_the_recorded_sampling_unless_configured():
    recorded = SamplingParams(temperature=0.7, top_p=0.8, max_tokens=300, seed=5, stop=("\n",))
    assert rollout_params(recorded, RolloutConfig(max_tokens=64, top_p=None), 1.0) == SamplingParams(0.7, 0.8, 64)
    assert rollout_params(recorded, RolloutConfig(temperature=1.2), 1.0) == SamplingParams(1.2, 1.0, 128)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    assert rollout_params(greedy, RolloutConfig(), 0.9) == SamplingParams(0.9, 1.0, 16)  # PPO must explore


@pytest.mark.parametrize("bf16", [False, True])
def test_fresh_samples_are_k_scored_policy_rollouts_per_prompt_that_ppo_updates_on(tiny_model_dir, bf16):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = Policy.create(base, PPOConfig(num_minibatches=2, bf16_autocast=bf16), base_model_id="tiny")
    tolerance = 2e-2 if bf16 else 1e-5  # bf16 keeps 8 bits of mantissa: the same math, rounded differently
    policy.model.eval()  # as Policy.load leaves it: sequence_logprobs' adapter_names needs eval mode
    reward_model = RewardModel.create(policy.model, base_model_id="tiny", pad_token_id=PAD)
    reward_model.normalizer = (0.3, 2.0)
    prompts = [*PROMPTS, (1, 44)]
    recorded = [*PARAMS, SamplingParams(temperature=0.5, max_tokens=64)]
    config = RolloutConfig(max_tokens=10, batch_size=4, samples_per_prompt=2, prompts_per_update=3)
    samples = fresh_samples(policy, reward_model, prompts, recorded, config, eos_token_ids=EOS)

    assert len(samples) == 6  # 3 of the 4 prompts, 2 responses each, in two decode batches
    groups = [s.group for s in samples]
    assert groups[::2] == groups[1::2] and len(set(groups)) == 3
    for sample in samples:  # each group: responses to its own prompt, at that prompt's recorded temperature
        assert tuple(sample.prompt_ids) == tuple(prompts[sample.group])
        assert sample.temperature == rollout_params(recorded[sample.group], config, 1.0).temperature
    assert any(samples[i].response_ids != samples[i + 1].response_ids for i in (0, 2, 4))  # k draws, not k copies
    raw = reward_model.score([s.prompt_ids for s in samples], [s.response_ids for s in samples])
    torch.testing.assert_close(torch.tensor([s.score for s in samples]), (raw - 0.3) / 2.0)  # the normalised reward
    for sample in samples:
        generation = Generation(tuple(sample.prompt_ids), tuple(sample.response_ids), sample.behaviour_logprobs,
                                rollout_params(recorded[sample.group], config, 1.0), "length")
        with policy.autocast():  # the precision the rollouts were sampled in
            recomputed = recomputed_logprobs(policy.model, generation)
        torch.testing.assert_close(torch.tensor(sample.behaviour_logprobs), recomputed, rtol=tolerance, atol=tolerance)
    assert policy.model.active_adapter == POLICY_ADAPTER
    metrics = ppo_update(policy, samples)
    assert metrics["applied"] == 1.0
    assert metrics["is_weight_mean"] == pytest.approx(1.0, abs=tolerance)  # on-policy, full distribution: μ = π
