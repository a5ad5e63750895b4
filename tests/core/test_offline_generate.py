"""liveloop.engine.offline.generate, the decode loop the trainer's rollouts and the gates run (serving runs the same
step, see tests/serving/test_engine.py): behaviour log-probs that a full forward recomputes, under the adapter named,
and rows that do not depend on what else is in the batch."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from liveloop.engine.offline import generate
from liveloop.sampling import SamplingParams, sequence_logprobs

EOS = {2}
PROMPTS = [(1, 17, 400, 9), (1, 30), (1, 5, 6, 7, 8, 9, 10), (1, 600, 601), (1, 44, 45)]
PARAMS = [  # mixed in one batch: tempered + nucleus, plain, a narrow nucleus, greedy, hot
    SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, seed=1),
    SamplingParams(temperature=1.0, top_p=1.0, max_tokens=5, seed=2),
    SamplingParams(temperature=1.3, top_p=0.5, max_tokens=12, seed=3),
    SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8, seed=4),
    SamplingParams(temperature=1.5, top_p=1.0, max_tokens=9, seed=5),
]


@pytest.fixture
def two_adapter_model(tiny_model_dir, make_adapter_dir) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, make_adapter_dir("a", scale=0.5, seed=1), adapter_name="a")
    model.load_adapter(make_adapter_dir("b", scale=0.5, seed=2), adapter_name="b")
    return model.eval()


@pytest.mark.parametrize("adapter", ["a", None])
def test_recorded_logprobs_equal_a_full_forward_recomputation(two_adapter_model, adapter):
    two_adapter_model.set_adapter("b")  # the active adapter must not matter when one is named
    generations = generate(two_adapter_model, PROMPTS, PARAMS, eos_token_ids=EOS, generator=torch.Generator(),
                           adapter=adapter)
    assert [g.prompt_ids for g in generations] == PROMPTS and [g.sampling_params for g in generations] == PARAMS
    for generation in generations:
        recomputed = sequence_logprobs(two_adapter_model, list(generation.prompt_ids), list(generation.response_ids),
                                       generation.sampling_params, adapter=adapter)
        assert len(generation.response_ids) == len(generation.behaviour_logprobs) > 0
        assert list(generation.behaviour_logprobs) == pytest.approx(recomputed, rel=1e-5, abs=1e-5)
    assert generations[3].behaviour_logprobs == (0.0,) * len(generations[3].response_ids)  # greedy: a point mass


def test_the_adapter_named_is_the_one_sampled_from(two_adapter_model):
    greedy = [SamplingParams(temperature=0.0, max_tokens=8)] * len(PROMPTS)
    responses = {adapter: [g.response_ids for g in generate(two_adapter_model, PROMPTS, greedy, eos_token_ids=EOS,
                                                            generator=torch.Generator(), adapter=adapter)]
                 for adapter in ("a", "b", None)}
    two_adapter_model.set_adapter("a")
    active = [g.response_ids for g in generate(two_adapter_model, PROMPTS, greedy, eos_token_ids=EOS,
                                               generator=torch.Generator())]
    assert active == responses["a"] and len({tuple(map(tuple, r)) for r in responses.values()}) == 3


def test_seeded_rows_get_the_same_tokens_whatever_the_batch_size(two_adapter_model):
    def run(max_batch_size: int | None):
        return generate(two_adapter_model, PROMPTS, PARAMS, eos_token_ids=EOS, generator=torch.Generator(),
                        adapter="a", max_batch_size=max_batch_size)

    together, two_at_a_time = run(None), run(2)  # rows join the running batch as others finish
    for a, b in zip(together, two_at_a_time, strict=True):
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        assert list(a.behaviour_logprobs) == pytest.approx(list(b.behaviour_logprobs), abs=1e-4)


def test_requests_it_cannot_generate_are_refused(two_adapter_model):
    kwargs = {"eos_token_ids": EOS, "generator": torch.Generator()}
    with pytest.raises(ValueError, match="not loaded"):
        generate(two_adapter_model, PROMPTS[:1], PARAMS[:1], adapter="c", **kwargs)
    with pytest.raises(ValueError, match="prompts but"):
        generate(two_adapter_model, PROMPTS, PARAMS[:1], **kwargs)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(two_adapter_model, [()], [SamplingParams(max_tokens=4)], **kwargs)
