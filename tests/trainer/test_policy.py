"""The policy on the tiny Llama: the split trunk, the reference and the KL to it, checkpoints."""

from __future__ import annotations

import pytest
import torch

from liveloop.adapter_artifacts import AdapterArtifactError, verify_adapter
from liveloop.model import load_base_model
from trainer.config import PPOConfig
from trainer.policy import PaddedBatch, Policy

PROMPTS = [[1, 20, 30], [4, 50, 60, 70, 80], [9]]
RESPONSES = [[11, 12, 13, 14], [15, 16], [17, 18, 19]]
TEMPERATURES = [1.0, 0.7, 1.3]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def make_base(make_settings, tiny_model_dir):
    """A fresh copy of the tiny base each call: a policy adapter is injected into the model it wraps."""
    return lambda: load_base_model(make_settings(base_model=tiny_model_dir))


def perturb(policy: Policy, seed: int = 0) -> None:
    """Random LoRA weights, so the policy differs from the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def full_forward_logprobs(model, prompt, response, temperature):
    """log π(response | prompt) from the model's own forward and a full log-softmax."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0]  # (L, V)
    log_p = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, dim=-1)
    return log_p.gather(1, torch.tensor(response)[:, None]).squeeze(1)


def outputs(policy: Policy, *, reference: bool = False, with_kl: bool = False):
    batch = PaddedBatch.from_tokens(PROMPTS, RESPONSES, TEMPERATURES, pad_token_id=0)
    with torch.no_grad():
        lower = policy.encode(batch.input_ids)
        ref_states = policy.states(lower, batch, reference=True) if with_kl else None
        states = policy.states(lower, batch, reference=reference)
        return policy.token_outputs(states, batch, ref_states), batch.mask


def test_split_trunk_matches_the_models_own_forward(make_base):
    base = make_base()
    policy = Policy.create(base.model, PPOConfig(bf16_autocast=False), base_model_id=base.model_id)
    perturb(policy)
    out, mask = outputs(policy)
    ref, _ = outputs(policy, reference=True)
    with torch.no_grad():
        for row, (prompt, response, t) in enumerate(zip(PROMPTS, RESPONSES, TEMPERATURES, strict=True)):
            n = len(response)
            torch.testing.assert_close(out.logprobs[row, :n], full_forward_logprobs(policy.model, prompt, response, t))
            with policy.model.disable_adapter():
                expected_ref = full_forward_logprobs(policy.model, prompt, response, t)
            torch.testing.assert_close(ref.logprobs[row, :n], expected_ref)
            assert not torch.allclose(out.logprobs[row, :n], ref.logprobs[row, :n])  # the adapter does something
    assert (out.logprobs * (1 - mask)).abs().sum() == 0
    assert out.entropy is None and out.kl is None  # no grad, no reference states: log-probs only


def test_kl_to_the_reference_is_the_exact_kl_of_the_models_own_distributions(make_base):
    base = make_base()
    policy = Policy.create(base.model, PPOConfig(bf16_autocast=False), base_model_id=base.model_id)
    perturb(policy)
    out, mask = outputs(policy, with_kl=True)
    with torch.no_grad():
        for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
            tokens = torch.tensor([prompt + response])
            log_p = torch.log_softmax(policy.model(input_ids=tokens).logits[0, len(prompt) - 1:-1], -1)
            with policy.model.disable_adapter():
                log_q = torch.log_softmax(policy.model(input_ids=tokens).logits[0, len(prompt) - 1:-1], -1)
            expected = (log_p.exp() * (log_p - log_q)).sum(-1)  # at temperature 1, whatever the row's
            torch.testing.assert_close(out.kl[row, :len(response)], expected, rtol=1e-4, atol=1e-6)
    assert (out.kl * (1 - mask)).abs().sum() == 0 and (out.kl * mask).sum() > 0


def test_fresh_policy_is_the_reference_with_lora_on_the_upper_layers_only(make_base):
    base = make_base()
    policy = Policy.create(base.model, PPOConfig(lora_layers_fraction=0.5), base_model_id=base.model_id)
    lora_layers = {name.split(".layers.")[1].split(".")[0] for name, _ in policy.model.named_parameters()
                   if "lora_" in name}
    assert lora_layers == {"1"} and policy.split == 1  # 2 layers: the top one carries the adapter
    out, mask = outputs(policy)
    ref, _ = outputs(policy, reference=True)
    torch.testing.assert_close(out.logprobs, ref.logprobs)
    assert outputs(policy, with_kl=True)[0].kl.abs().max() < 1e-5  # LoRA B = 0: no KL to the reference


def test_gradients_reach_the_adapter_only(make_base):
    base = make_base()
    policy = Policy.create(base.model, PPOConfig(ent_coef=0.01), base_model_id=base.model_id)
    perturb(policy)
    batch = PaddedBatch.from_tokens(PROMPTS, RESPONSES, TEMPERATURES, pad_token_id=0)
    lower = policy.encode(batch.input_ids)
    out = policy.token_outputs(policy.states(lower, batch), batch, policy.states(lower, batch, reference=True))
    (out.logprobs.sum() + out.kl.sum() + out.entropy.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert [n for n, p in policy.model.named_parameters() if p.requires_grad and id(p) not in trainable] == []


def test_checkpoint_round_trip_restores_weights_version_beta_and_baseline(make_base, tmp_path):
    base = make_base()
    policy = Policy.create(base.model, PPOConfig(), base_model_id=base.model_id)
    perturb(policy)
    policy.version, policy.kl_ctl.value = 3, 0.31
    policy.moments.update([1.0, -1.0, -1.0])
    policy.save(tmp_path / "v3", metadata={"lineage": {"parent": "v2"}})

    manifest = verify_adapter(tmp_path / "v3", base_model_id=base.model_id)
    assert manifest["metadata"]["lineage"] == {"parent": "v2"}
    assert manifest["metadata"]["ppo"]["config"] == PPOConfig().to_dict()
    fresh = make_base()
    loaded = Policy.load(fresh.model, tmp_path / "v3", PPOConfig(), base_model_id=fresh.model_id)
    assert (loaded.version, loaded.kl_ctl.value) == (3, 0.31)
    assert loaded.moments == policy.moments
    before, _ = outputs(policy)
    after, _ = outputs(loaded)
    torch.testing.assert_close(after.logprobs, before.logprobs)
    assert all(p.requires_grad for p in loaded.trainable_parameters())


def test_load_refuses_another_adapter_shape_or_base(make_base, tmp_path):
    base = make_base()
    Policy.create(base.model, PPOConfig(), base_model_id=base.model_id).save(tmp_path / "v1")
    with pytest.raises(ValueError, match="lora_r"):
        Policy.load(make_base().model, tmp_path / "v1", PPOConfig(lora_r=8), base_model_id=base.model_id)
    with pytest.raises(AdapterArtifactError, match="trained on base"):
        Policy.load(make_base().model, tmp_path / "v1", PPOConfig(), base_model_id="another-base")
