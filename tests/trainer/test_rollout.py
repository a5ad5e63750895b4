"""Fresh rollouts: the recorded behaviour log-probs are those of liveloop.sampling's distribution."""

from __future__ import annotations

import pytest
import torch

from liveloop.sampling import SamplingParams, sampling_logprobs
from trainer.rollout import Generation, generate

PAD, EOS = 2, {2}
PROMPTS = [(1, 17, 400, 9), (1, 30), (1, 5, 6, 7, 8, 9, 10), (1, 600, 601)]
PARAMS = [  # mixed in one batch: tempered + nucleus, plain, a narrow nucleus, greedy
    SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12),
    SamplingParams(temperature=1.0, top_p=1.0, max_tokens=5),
    SamplingParams(temperature=1.3, top_p=0.5, max_tokens=12),
    SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8),
]


def recomputed_logprobs(model, generation: Generation) -> torch.Tensor:
    """log-probs (R,) of the response tokens from one full forward over prompt + response, no cache."""
    ids = torch.tensor([[*generation.prompt_ids, *generation.response_ids]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(generation.prompt_ids) - 1:-1]  # (R, V)
    n = len(generation.response_ids)
    params = generation.sampling_params
    logp = sampling_logprobs(logits, torch.full((n,), params.temperature), torch.full((n,), params.top_p))
    return logp.gather(1, torch.tensor(generation.response_ids)[:, None]).squeeze(1)


def test_recorded_logprobs_equal_a_full_forward_recomputation(tiny_peft_model):
    generations = generate(tiny_peft_model, PROMPTS, PARAMS, pad_token_id=PAD, eos_token_ids=EOS,
                           generator=torch.Generator().manual_seed(0))
    assert [g.prompt_ids for g in generations] == PROMPTS
    assert [len(g.response_ids) for g in generations] == [p.max_tokens for p in PARAMS]  # a random model: no EOS
    for generation in generations:
        recorded = torch.tensor(generation.behaviour_logprobs)
        assert torch.isfinite(recorded).all()
        torch.testing.assert_close(recorded, recomputed_logprobs(tiny_peft_model, generation), rtol=0, atol=1e-5)
    assert generations[3].behaviour_logprobs == (0.0,) * 8  # greedy: a point mass on each chosen token


def test_rollouts_use_the_active_policy_adapter(tiny_peft_model):
    greedy = [SamplingParams(temperature=0.0, max_tokens=6)] * len(PROMPTS)
    kwargs = {"pad_token_id": PAD, "eos_token_ids": EOS, "generator": torch.Generator()}
    with_policy = generate(tiny_peft_model, PROMPTS, greedy, **kwargs)
    with tiny_peft_model.disable_adapter():
        without = generate(tiny_peft_model, PROMPTS, greedy, **kwargs)
    assert [g.response_ids for g in with_policy] != [g.response_ids for g in without]


def test_rows_end_at_an_end_token_or_max_tokens(tiny_peft_model):
    # half the vocabulary counts as an end token, so rows stop after a step or two, at different steps
    ends = set(range(0, tiny_peft_model.config.vocab_size, 2))
    params = [SamplingParams(temperature=1.0, max_tokens=1 + i % 6) for i in range(24)]
    generations = generate(tiny_peft_model, [(1, 17 + i) for i in range(24)], params, pad_token_id=PAD,
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
        return generate(tiny_peft_model, PROMPTS, PARAMS, pad_token_id=PAD, eos_token_ids=EOS,
                        generator=torch.Generator().manual_seed(7))

    assert run() == run()


def test_requests_beyond_the_context_are_refused(tiny_peft_model):
    too_long = [SamplingParams(max_tokens=tiny_peft_model.config.max_position_embeddings)]
    with pytest.raises(ValueError, match="prompt \\+ max_tokens"):
        generate(tiny_peft_model, [(1, 2)], too_long, pad_token_id=PAD, eos_token_ids=EOS,
                 generator=torch.Generator())
