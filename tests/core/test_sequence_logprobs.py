"""sequence_logprobs: one full forward gives what a token-by-token recompute gives, under the right adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from liveloop.sampling import SamplingParams, sampling_logprobs, sequence_logprobs

PROMPT = [1, 504, 3185, 28, 1001, 17]
RESPONSE = [803, 12, 4410, 2, 99]


def _plain(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def _step_by_step(model, params: SamplingParams, **forward_kwargs) -> list[float]:
    """The reference: one forward per response token over everything before it."""
    out = []
    for t, token in enumerate(RESPONSE):
        logits = model(input_ids=torch.tensor([PROMPT + RESPONSE[:t]]), **forward_kwargs).logits[:, -1]
        logp = sampling_logprobs(logits, torch.tensor([params.temperature]), torch.tensor([params.top_p]))
        out.append(float(logp[0, token]))
    return out


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_p=0.999),
                                    SamplingParams(temperature=0.0)])
def test_full_forward_matches_token_by_token_recompute(tiny_model_dir, params):
    model = _plain(tiny_model_dir)
    got = sequence_logprobs(model, PROMPT, RESPONSE, params)
    want = _step_by_step(model, params)
    assert len(got) == len(RESPONSE)
    assert got == pytest.approx(want, abs=1e-5)


def test_adapter_is_selected_per_call_and_none_means_the_base(tiny_model_dir, make_adapter_dir):
    params = SamplingParams(temperature=0.9)
    base_logprobs = sequence_logprobs(_plain(tiny_model_dir), PROMPT, RESPONSE, params)
    model = PeftModel.from_pretrained(_plain(tiny_model_dir), make_adapter_dir("a", scale=0.5), adapter_name="a")
    model.load_adapter(make_adapter_dir("b", scale=0.5, seed=1), adapter_name="b")
    model.eval()
    model.set_adapter("b")  # the active adapter must not matter
    with_a = sequence_logprobs(model, PROMPT, RESPONSE, params, adapter="a")
    model.set_adapter("a")
    assert with_a == pytest.approx(_step_by_step(model, params), abs=1e-5)
    assert sequence_logprobs(model, PROMPT, RESPONSE, params) == pytest.approx(base_logprobs, abs=1e-5)
    assert with_a != pytest.approx(base_logprobs, abs=1e-2)


def test_unknown_adapter_is_refused(tiny_model_dir, make_adapter_dir):
    plain = _plain(tiny_model_dir)
    with pytest.raises(ValueError, match="has no adapters"):
        sequence_logprobs(plain, PROMPT, RESPONSE, SamplingParams(), adapter="a")
    model = PeftModel.from_pretrained(plain, make_adapter_dir("a"), adapter_name="a").eval()
    with pytest.raises(ValueError, match="not loaded"):
        sequence_logprobs(model, PROMPT, RESPONSE, SamplingParams(), adapter="b")
    assert sequence_logprobs(model, PROMPT, [], SamplingParams()) == []
