from __future__ import annotations

import json
import math
import uuid

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from liveloop.adapter_artifacts import default_lora_config, save_adapter
from liveloop.engine.offline import generate
from liveloop.sampling import SamplingParams
from liveloop.tables import Completion, Feedback
from trainer.gates import (
    Gates,
    HeldOut,
    LoggedSample,
    importance_weighted_rate,
    judge_candidate,
    load_heldout,
    repetition_rate,
)
from trainer.heldout import GATES_SPLIT, is_heldout
from trainer.reward_model import adapter_active

NO_DATA = HeldOut(prompts=[], rated=[])
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def make_gates(tiny_peft_model, tokenizer, make_settings):
    def make(**overrides) -> Gates:
        settings = make_settings(**{"gate_prompts": 4, "gate_max_new_tokens": 8, **overrides})
        return Gates(tiny_peft_model, tokenizer, eos_token_ids={tokenizer.eos_token_id}, settings=settings)

    return make


@pytest.fixture
def gates(make_gates) -> Gates:
    return make_gates()


def by_name(report) -> dict:
    return {r.name: r for r in report.results}


def test_a_freshly_initialised_lora_passes_every_gate(gates, make_adapter_dir):
    report = gates.evaluate(make_adapter_dir("fresh"), live=None, heldout=NO_DATA)
    assert report.passed, report.to_dict()
    gate = by_name(report)
    assert gate["kl"].value == pytest.approx(0.0, abs=1e-6) and gate["weights"].value == 0.0
    assert gate["perplexity"].value == pytest.approx(gate["perplexity"].details["base"], rel=1e-5)
    assert "skipped" in gate["reward"].details  # no rated held-out samples yet
    assert list(gate) == ["reward", "kl", "perplexity", "empty_outputs", "repetition", "length_limit_hits",
                          "weights"]
    json.loads(json.dumps(report.to_dict(), allow_nan=False))  # storable as JSON on PostgreSQL


def test_an_adapter_with_large_random_weights_is_rejected(gates, make_adapter_dir):
    report = gates.evaluate(make_adapter_dir("wild", scale=1.0), live=None, heldout=NO_DATA)
    assert not report.passed and "weights" in report.failed
    assert by_name(report)["weights"].value > 10 * by_name(report)["weights"].threshold


@pytest.mark.slow
def test_on_the_real_model_a_wild_adapter_fails_kl_and_perplexity_and_a_fresh_one_passes(packaged_model_dir,
                                                                                         make_settings, tmp_path):
    """The tiny random model's outputs are near-uniform whatever its adapter; SmolLM2's are not."""
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir)
    base = AutoModelForCausalLM.from_pretrained(packaged_model_dir, dtype=torch.float32)
    model = get_peft_model(base, default_lora_config(), adapter_name="policy")
    save_adapter(model, "policy", tmp_path / "fresh", base_model_id="SmolLM2")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    save_adapter(model, "policy", tmp_path / "wild", base_model_id="SmolLM2")
    settings = make_settings(gate_prompts=2, gate_max_new_tokens=8)
    gates = Gates(model, tokenizer, eos_token_ids={tokenizer.eos_token_id}, settings=settings)
    assert gates.evaluate(tmp_path / "fresh", live=None, heldout=NO_DATA).passed
    wild = gates.evaluate(tmp_path / "wild", live=None, heldout=NO_DATA)
    assert {"kl", "perplexity", "weights"} <= set(wild.failed), wild.to_dict()


def test_non_finite_weights_fail_and_the_other_gates_are_skipped(gates, tiny_peft_model, tiny_model_dir, tmp_path):
    with torch.no_grad():
        next(p for n, p in tiny_peft_model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    save_adapter(tiny_peft_model, "policy", tmp_path / "nan", base_model_id=tiny_model_dir.name)
    report = gates.evaluate(tmp_path / "nan", live=None, heldout=NO_DATA)
    assert report.failed == [r.name for r in report.results]
    assert by_name(report)["weights"].details["finite"] is False
    assert by_name(report)["kl"].details == {"skipped": "weights are not finite"}


def test_gates_leave_the_trainers_model_as_they_found_it(gates, tiny_peft_model, make_adapter_dir):
    model = tiny_peft_model
    model.train()
    probe = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before_logits = model(input_ids=probe).logits
    before = (model.active_adapter, set(model.peft_config), {n: p.requires_grad for n, p in model.named_parameters()})
    gates.evaluate(make_adapter_dir("fresh"), live=make_adapter_dir("live", seed=1), heldout=NO_DATA)
    after = (model.active_adapter, set(model.peft_config), {n: p.requires_grad for n, p in model.named_parameters()})
    assert after == before and model.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, before_logits)


def test_importance_weighted_rate_matches_hand_computed_values():
    log_ratio = torch.tensor([1.0, 2.0, 0.5, 40.0]).log()  # the last weight is truncated to W_MAX = 20
    rate, ess = importance_weighted_rate(log_ratio, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert rate == pytest.approx((1 + 0.5 + 20) / 23.5)
    assert ess == pytest.approx(23.5**2 / (1 + 4 + 0.25 + 400))
    assert importance_weighted_rate(torch.tensor([-math.inf]), torch.tensor([1.0])) == (None, 0.0)


def test_repetition_rate_counts_repeated_trigrams():
    assert repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(0.25)
    assert repetition_rate([5, 5, 5, 5, 5]) == pytest.approx(2 / 3)
    assert repetition_rate([1, 2]) == 0.0


def logged(model, tokenizer, adapter, prompts, thumbs_up: bool, seed: int) -> list[LoggedSample]:
    """Samples drawn at temperature 1 from ``adapter`` (None: the base), all rated ``thumbs_up``."""
    params = [SamplingParams(temperature=1.0, max_tokens=8)] * len(prompts)
    context = model.disable_adapter() if adapter is None else adapter_active(model, adapter, trainable=False)
    with context:
        generations = generate(model, prompts, params, eos_token_ids={tokenizer.eos_token_id},
                               generator=torch.Generator().manual_seed(seed))
    return [LoggedSample(g.prompt_ids, g.response_ids, g.behaviour_logprobs, g.sampling_params, thumbs_up)
            for g in generations]


@pytest.mark.parametrize("candidate_liked", [True, False])
def test_direct_reward_estimate_follows_the_thumbs_of_samples_the_candidate_would_write(
        make_gates, tiny_peft_model, tokenizer, make_adapter_dir, candidate_liked):
    """Samples the candidate itself wrote are rated one way, samples of the live base the other way: the
    importance-weighted estimate must favour the candidate exactly when its own samples were liked."""
    candidate = make_adapter_dir("drifted", scale=0.5)
    prompts = [(1, 2, 3, 4 + i) for i in range(12)]
    tiny_peft_model.load_adapter(candidate, adapter_name="sampler")
    rated = logged(tiny_peft_model, tokenizer, "sampler", prompts, candidate_liked, seed=1) + \
        logged(tiny_peft_model, tokenizer, None, prompts, not candidate_liked, seed=2)
    tiny_peft_model.delete_adapter("sampler")
    gates = make_gates(gate_reward_epsilon=0.0)  # the tiny model's adapters move it little: compare directions
    gate = by_name(gates.evaluate(candidate, live=None, heldout=HeldOut(prompts=[], rated=rated)))["reward"]
    assert gate.details["mode"] == "direct" and gate.details["samples"] == 24
    assert gate.passed is candidate_liked
    assert (gate.details["candidate"] > gate.details["live"]) is candidate_liked


def add_completion(session, cid: str, prompt: list[int], ratings: list[str]) -> None:
    session.add(Completion(
        id=cid, requested_model="liveloop", adapter_version=None, messages=[], prompt_token_ids=prompt,
        response_token_ids=[7, 8], response_text="ab", behaviour_logprobs=[-1.0, -2.0],
        sampling_params=SamplingParams(temperature=0.7).to_dict(), dtype="float32", finish_reason="stop",
        prompt_tokens=len(prompt), completion_tokens=2, latency_ms=1.0))
    session.flush()
    for revision, rating in enumerate(ratings, start=1):
        session.add(Feedback(id=uuid.uuid4().hex, completion_id=cid, revision=revision, rating=rating,
                             reward=1.0 if rating == "up" else -1.0))
        session.flush()


def test_heldout_data_comes_only_from_the_heldout_split_with_current_ratings(registry_db):
    ids = [f"c{i}" for i in range(300)]
    with registry_db.sessions.begin() as session:
        for i, cid in enumerate(ids):
            add_completion(session, cid, [i], [] if i % 3 == 0 else ["up", "down"] if i % 3 == 1 else ["up"])
    heldout = load_heldout(registry_db.sessions, fraction=0.2, prompts=1000, rated=1000)
    held = [i for i, cid in enumerate(ids) if is_heldout(cid, 0.2, split=GATES_SPLIT)]
    assert held and sorted(p[0] for p in heldout.prompts) == held
    assert sorted((s.prompt_ids[0], s.thumbs_up) for s in heldout.rated) == [
        (i, i % 3 == 2) for i in held if i % 3 != 0]
    assert heldout.rated[0].sampling.temperature == 0.7


def test_judge_candidate_records_the_report_and_rejects_a_bad_adapter(gates, registry_db, make_adapter_dir,
                                                                      tiny_model_dir):
    registry = registry_db.registry
    registry.register("good", make_adapter_dir("good"))
    registry.register("bad", make_adapter_dir("bad", scale=1.0, seed=1))
    for name in ("good", "bad"):
        judge_candidate(registry, gates, registry_db.sessions, name, base_model_id=tiny_model_dir.name)
    good, bad = registry.get("good"), registry.get("bad")
    assert (good.state, bad.state) == ("approved", "rejected")
    assert good.gate_report["passed"] and len(good.gate_report["gates"]) == 7
    assert registry.audit("bad")[0].reason == "failed gates: weights"
