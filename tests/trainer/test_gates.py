from __future__ import annotations

import json
import math
import uuid
from dataclasses import replace

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from liveloop.adapter_artifacts import default_lora_config, save_adapter
from liveloop.engine.offline import generate
from liveloop.sampling import SamplingParams
from liveloop.tables import Completion, Feedback
from trainer.gates import (
    CANDIDATE,
    Gates,
    HeldOut,
    LoggedSample,
    adapter_active,
    importance_weighted_rate,
    judge_candidate,
    kl_bound,
    load_heldout,
    rate_difference,
    repetition_rate,
)
from trainer.heldout import GATES_SPLIT, heldout_key, is_heldout

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
    settings = make_settings(gate_prompts=2, gate_max_new_tokens=8, ppo={"target_kl": 0.05})
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
    context = model.disable_adapter() if adapter is None else adapter_active(model, adapter)
    with context:
        generations = generate(model, prompts, params,
                               eos_token_ids={tokenizer.eos_token_id}, generator=torch.Generator().manual_seed(seed))
    return [LoggedSample(f"{seed}-{i}", g.prompt_ids, g.response_ids, g.behaviour_logprobs, g.sampling_params,
                         thumbs_up) for i, g in enumerate(generations)]


@pytest.mark.parametrize("candidate_liked", [True, False])
def test_direct_reward_estimate_follows_the_thumbs_of_samples_the_candidate_would_write(
        make_gates, tiny_peft_model, tokenizer, make_adapter_dir, candidate_liked):
    """Samples the candidate itself wrote are rated one way, samples of the live base the other way: the
    importance-weighted estimate must favour the candidate exactly when its own samples were liked."""
    candidate = make_adapter_dir("drifted", scale=2.0)
    prompts = [(1, 2, 3, 4 + i) for i in range(24)]
    tiny_peft_model.load_adapter(candidate, adapter_name="sampler")
    rated = logged(tiny_peft_model, tokenizer, "sampler", prompts, candidate_liked, seed=1) + \
        logged(tiny_peft_model, tokenizer, None, prompts, not candidate_liked, seed=2)
    tiny_peft_model.delete_adapter("sampler")
    # the tiny random model's adapters move it little: compare directions, at a loose confidence
    gates = make_gates(gate_reward_epsilon=0.0, gate_reward_min_ess=4, gate_reward_confidence=0.5)
    gate = by_name(gates.evaluate(candidate, live=None, heldout=HeldOut(prompts=[], rated=rated)))["reward"]
    assert gate.details["mode"] == "direct" and gate.details["samples"] == 48
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
    heldout = load_heldout(registry_db.sessions, fraction=0.2, prompts=1000, rated=1000, rated_tokens=10**6)
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


# --- the reward gate's evidence: effective sample size and confidence interval -----------------------------


def test_rate_difference_interval_covers_a_known_difference_on_synthetic_logged_data():
    """Thumbs of four answers logged under a uniform behaviour policy; candidate and live prefer other answers,
    so their true thumbs-up rates are known: the 90 % interval covers candidate − live about 90 % of the time."""
    generator = torch.Generator().manual_seed(0)
    p_up = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)  # each answer's chance of a thumbs-up
    behaviour = torch.full((4,), 0.25, dtype=torch.float64)
    candidate = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    live = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    truth = float(candidate @ p_up - live @ p_up)  # 0.27
    trials, covered, widths = 400, 0, []
    for _ in range(trials):
        answers = torch.multinomial(behaviour, 200, replacement=True, generator=generator)
        thumbs = (torch.rand(200, generator=generator, dtype=torch.float64) < p_up[answers]).double()
        estimate = rate_difference(candidate[answers].log() - behaviour[answers].log(),
                                   live[answers].log() - behaviour[answers].log(), thumbs, confidence=0.9)
        covered += estimate.ci_low <= truth <= estimate.ci_high
        widths.append(estimate.ci_high - estimate.ci_low)
        assert 150 < estimate.ess <= 200
    assert 0.86 <= covered / trials <= 0.94
    assert 0 < sum(widths) / trials < truth  # and narrow enough that zero is outside it


def test_rate_difference_of_identical_versions_is_exactly_zero():
    log_ratio = torch.tensor([0.3, -0.2, 0.1, -1.0], dtype=torch.float64)
    estimate = rate_difference(log_ratio, log_ratio, torch.tensor([1.0, 0.0, 1.0, 0.0]), confidence=0.9)
    assert (estimate.difference, estimate.ci_low, estimate.ci_high) == (0.0, 0.0, 0.0)
    assert rate_difference(torch.tensor([-math.inf]), torch.tensor([0.0]), torch.tensor([1.0]), 0.9) is None


def test_reward_gate_needs_an_effective_sample_size_not_a_count(make_gates, tiny_peft_model, tokenizer,
                                                                 make_adapter_dir):
    """40 rated samples: enough when every weight is 1 (a fresh adapter is the base that served them), not when
    one sample carries all the weight — then the gate passes as skipped, with a null interval."""
    prompts = [(1, 2, 3, 4 + i) for i in range(40)]
    rated = [replace(x, thumbs_up=i % 2 == 0)
             for i, x in enumerate(logged(tiny_peft_model, tokenizer, None, prompts, True, seed=3))]
    gates, fresh = make_gates(gate_reward_min_ess=30), make_adapter_dir("fresh")
    gate = by_name(gates.evaluate(fresh, live=None, heldout=HeldOut(prompts=[], rated=rated)))["reward"]
    assert gate.passed and "skipped" not in gate.details
    assert gate.details["ess"] == pytest.approx(40) and gate.value == pytest.approx(0, abs=1e-9)
    assert gate.details["ci_low"] == pytest.approx(0, abs=1e-9) == gate.details["ci_high"]

    # behaviour log-prob 0 (probability 1) makes a weight ≈ π(y) ≈ 0; one tiny one makes it W_MAX
    degenerate = [replace(x, behaviour_logprobs=(-1000.0 if i == 0 else 0.0,) * len(x.response_ids))
                  for i, x in enumerate(rated)]
    gate = by_name(gates.evaluate(fresh, live=None, heldout=HeldOut(prompts=[], rated=degenerate)))["reward"]
    assert gate.passed and gate.value is None and gate.details["samples"] == 40
    assert gate.details["ess"] < 2 and gate.details["skipped"].startswith("insufficient evidence")
    assert gate.details["ci_low"] is None and gate.details["ci_high"] is None
    json.loads(json.dumps(gate.details, allow_nan=False))


def test_reward_model_mode_gates_on_heldout_thumbs_not_on_the_reward_model(make_gates, tiny_peft_model, tokenizer,
                                                                           make_adapter_dir):
    """The reward model the candidate was optimised against loves its answers; the held-out thumbs do not, and
    they decide. The reward model's opinion is reported beside them, ungated."""
    candidate = make_adapter_dir("drifted", scale=2.0)
    prompts = [(1, 2, 3, 4 + i) for i in range(24)]
    tiny_peft_model.load_adapter(candidate, adapter_name="sampler")
    rated = logged(tiny_peft_model, tokenizer, "sampler", prompts, False, seed=1) + \
        logged(tiny_peft_model, tokenizer, None, prompts, True, seed=2)
    tiny_peft_model.delete_adapter("sampler")
    scored = []

    def optimised_against(prompts, responses) -> torch.Tensor:  # the first call scores the candidate's answers
        scored.append(len(responses))
        return torch.full((len(responses),), 1.0 if len(scored) == 1 else -1.0)

    settings = {"gate_reward_epsilon": 0.0, "gate_reward_min_ess": 4, "gate_reward_confidence": 0.5,
                "reward_source": "reward_model"}
    gates = make_gates(**settings)
    gates.scorer = optimised_against
    gate = by_name(gates.evaluate(candidate, live=None, heldout=HeldOut(prompts=[], rated=rated)))["reward"]
    assert gate.details["mode"] == "reward_model" and gate.details["evidence"] == "held-out thumbs"
    assert gate.details["reward_model_delta"] == 2.0 and scored == [4, 4]
    assert not gate.passed and gate.details["ci_high"] < 0
    unscored = by_name(make_gates(**settings).evaluate(candidate, live=None,
                                                       heldout=HeldOut(prompts=[], rated=rated)))["reward"]
    assert unscored.value == gate.value and unscored.passed == gate.passed


# --- the KL gate: the training target's quantity, against a bound derived from it -------------------------


def test_kl_gate_bound_is_a_multiple_of_the_training_target(make_gates, make_settings, make_adapter_dir):
    gates = make_gates(ppo={"target_kl": 0.05}, gate_kl_target_multiple=3.0)
    gate = by_name(gates.evaluate(make_adapter_dir("fresh"), live=None, heldout=NO_DATA))["kl"]
    assert gate.threshold == pytest.approx(0.15) and gate.passed
    assert gate.details["target_kl"] == 0.05 and gate.details["positions"] == "greedy"
    assert kl_bound(make_settings(ppo={"target_kl": None}, gate_max_kl=0.2)) == (0.2, None)  # a fixed β


def test_kl_gate_is_the_mean_exact_per_token_kl_of_a_plain_loop(gates, tiny_peft_model, make_adapter_dir):
    """Against the definition, one sequence and one position at a time: Σ_v p log(p / q) at T = 1."""
    model, prompts = tiny_peft_model, [(1, 2, 3), (5, 6, 7, 8, 9), (10,)]
    with torch.no_grad(), gates._loaded(make_adapter_dir("drifted", scale=1.0), CANDIDATE):
        model.eval()
        with gates._adapter(CANDIDATE):
            responses = gates._generate(prompts)
        measured = gates._kl(responses)
        total, count = 0.0, 0
        for g in responses:
            ids = torch.tensor([[*g.prompt_ids, *g.response_ids]])
            with gates._adapter(CANDIDATE):
                p = model(input_ids=ids).logits[0].log_softmax(-1)
            with gates._adapter(None):
                q = model(input_ids=ids).logits[0].log_softmax(-1)
            for t in range(len(g.prompt_ids) - 1, ids.shape[1] - 1):
                total += float((p[t].exp() * (p[t] - q[t])).sum())
                count += 1
    assert measured.details["tokens"] == count and count > len(prompts)
    assert measured.value == pytest.approx(total / count, rel=1e-4) and measured.value > 0


# --- bounded cost: a fixed sample, generated once for the base, live log-probs reused ----------------------


def test_a_second_run_reuses_the_base_generations_and_the_live_logprobs(make_gates, tiny_peft_model, tokenizer,
                                                                        make_adapter_dir):
    rated = logged(tiny_peft_model, tokenizer, None, [(1, 2, 3, 4 + i) for i in range(8)], True, seed=4)
    gates = make_gates(gate_reward_min_ess=4)
    generated, recomputed = [], []
    generate, sequence_logprobs = gates._generate, gates._sequence_logprobs
    gates._generate = lambda prompts: generated.append(len(prompts)) or generate(prompts)
    gates._sequence_logprobs = lambda adapter, samples: recomputed.append(len(samples)) or \
        sequence_logprobs(adapter, samples)
    live, heldout = make_adapter_dir("live", seed=1), HeldOut(prompts=[], rated=rated)
    gates.evaluate(make_adapter_dir("first", scale=0.1, seed=2), live=live, heldout=heldout)
    assert generated == [4, 4] and recomputed == [8, 8]  # base and candidate; candidate and live
    gates.evaluate(make_adapter_dir("second", scale=0.1, seed=3), live=live, heldout=heldout)
    assert generated == [4, 4, 4] and recomputed == [8, 8, 8]  # the candidate only
    gates.evaluate(make_adapter_dir("third", scale=0.1, seed=4), live=None, heldout=heldout)
    assert recomputed == [8, 8, 8, 8, 8]  # a new live version (here the base) is recomputed once


def test_heldout_sample_is_fixed_by_the_split_hash_and_bounded_in_tokens(registry_db):
    sessions = registry_db.sessions
    ids = [f"c{i}" for i in range(200)]
    with sessions.begin() as session:
        for i, cid in enumerate(ids):
            add_completion(session, cid, [i], ["up"])
    bottom = sorted((cid for cid in ids if is_heldout(cid, 0.5, split=GATES_SPLIT)),
                    key=lambda cid: heldout_key(cid, split=GATES_SPLIT))
    sample = load_heldout(sessions, fraction=0.5, prompts=3, rated=10, rated_tokens=10**6)
    assert [s.completion_id for s in sample.rated] == bottom[:10]
    assert sample.prompts == [(ids.index(cid),) for cid in bottom[:3]]
    with sessions.begin() as session:  # newer completions enter the sample only where their hash beats it
        for i in range(200, 260):
            add_completion(session, f"c{i}", [i], ["down"])
    again = load_heldout(sessions, fraction=0.5, prompts=3, rated=10, rated_tokens=10**6)
    kept = [s.completion_id for s in again.rated if s.completion_id in ids]
    assert kept == bottom[:len(kept)] and len(kept) >= 5
    # each sample is 1 prompt + 2 response tokens: a budget of 16 holds five, and stops at the sixth
    assert len(load_heldout(sessions, fraction=0.5, prompts=3, rated=10, rated_tokens=16).rated) == 5


def test_reward_gate_stops_recomputing_once_the_effective_sample_size_cannot_reach_the_minimum(
        make_gates, tiny_peft_model, tokenizer, make_adapter_dir, monkeypatch):
    """One weight of W_MAX among many near zero: after the first forward, the remaining samples (each adding at
    most 1) cannot lift the ESS to the minimum, so neither version's log-probs are computed further."""
    monkeypatch.setattr("trainer.gates._FORWARD_TOKENS", 64)  # a few samples per forward
    rated = logged(tiny_peft_model, tokenizer, None, [(1, 2, 3, 4 + i) for i in range(40)], True, seed=5)
    rated = [replace(x, behaviour_logprobs=(-1000.0 if i == 0 else 0.0,) * len(x.response_ids))
             for i, x in enumerate(rated)]
    gates, recomputed = make_gates(gate_reward_min_ess=30), []
    sequence_logprobs = gates._sequence_logprobs
    gates._sequence_logprobs = lambda adapter, samples: recomputed.append(len(samples)) or \
        sequence_logprobs(adapter, samples)
    gate = by_name(gates.evaluate(make_adapter_dir("fresh"), live=None, heldout=HeldOut(prompts=[], rated=rated)))
    assert gate["reward"].passed and gate["reward"].details["ess"] is None and sum(recomputed) < 20
