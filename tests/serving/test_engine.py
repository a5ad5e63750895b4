"""The generation engine on real models: batching, streaming, stopping, adapters, failures, and the log-prob invariant.

Most tests drive ``engine.step()`` by hand, so what happens in each step is deterministic; the thread and the
asyncio side are tested on their own. ``alone(...)`` runs a copy of a request by itself: the reference for what
batching must not change.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from liveloop.adapter_artifacts import AdapterArtifactError, default_lora_config, save_adapter
from liveloop.engine.offline import generate
from liveloop.model import LoadedModel, load_base_model
from liveloop.sampling import SamplingParams, sequence_logprobs
from serving.engine import (
    Engine,
    EngineFull,
    EngineStopped,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    RequestStream,
    StepStats,
    UnknownAdapter,
)

MIXED = [  # different prompts and sampling parameters in one batch
    ("Tell me a story about a dragon.", SamplingParams(temperature=0.0, max_tokens=12)),
    ("What is 2+2?", SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=1)),
    ("hi", SamplingParams(temperature=1.2, max_tokens=9, seed=2)),
    ("Write a long poem about the sea, the sky and the wind.", SamplingParams(temperature=0.5, top_p=0.5,
                                                                             max_tokens=14, seed=3)),
]


@pytest.fixture
def tiny_base(make_settings, tiny_model_dir) -> LoadedModel:
    """A fresh tiny base per test: loading an adapter wraps the model in place."""
    return load_base_model(make_settings(base_model=tiny_model_dir))


@pytest.fixture
def make_engine(tiny_base):
    engines = []

    def make(base: LoadedModel | None = None, **options) -> Engine:
        options = {"max_batch_size": 8, "max_queue": 16, **options}
        engines.append(Engine(base or tiny_base, **options))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown()


def chat(base: LoadedModel, content: str) -> list[int]:
    return base.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                              return_dict=False)


def request(base: LoadedModel, content: str, adapter: str | None = None, **params) -> GenerationRequest:
    return GenerationRequest(chat(base, content), SamplingParams(**params), adapter=adapter)


def run(engine: Engine, streams: list[RequestStream], max_steps: int = 2000) -> list[GenerationResult]:
    """Step the engine until every stream is done."""
    for _ in range(max_steps):
        if all(s.done for s in streams):
            return [s.wait(0) for s in streams]
        engine.step()
    raise AssertionError(f"not finished after {max_steps} steps")


def alone(engine: Engine, req: GenerationRequest) -> GenerationResult:
    return run(engine, [engine.submit(replace(req, request_id=req.request_id + "-alone"))])[0]


def assert_same_generation(got: GenerationResult, want: GenerationResult, tol: float = 1e-4) -> None:
    assert got.token_ids == want.token_ids and got.text == want.text and got.finish_reason == want.finish_reason
    assert got.logprobs == pytest.approx(want.logprobs, abs=tol)


# --- batching ------------------------------------------------------------------------------------------------------

def test_batched_requests_get_the_tokens_they_get_alone(make_engine, tiny_base):
    engine = make_engine()
    requests = [GenerationRequest(chat(tiny_base, content), params) for content, params in MIXED]
    results = run(engine, [engine.submit(r) for r in requests])
    for req, result in zip(requests, results, strict=True):
        assert_same_generation(result, alone(engine, req))
        assert len(result.token_ids) == len(result.logprobs) == req.params.max_tokens  # the tiny model never stops
        assert result.prompt_tokens == len(req.prompt_ids) and result.dtype == "float32"
    assert len({tuple(r.token_ids) for r in results}) == len(results)


def test_seed_makes_sampling_reproducible_and_other_seeds_differ(make_engine, tiny_base):
    engine = make_engine()
    seeded = request(tiny_base, "Once upon a time", temperature=1.0, max_tokens=12, seed=5)
    first, again = alone(engine, seeded), alone(engine, seeded)
    other = alone(engine, replace(seeded, params=replace(seeded.params, seed=6)))
    unseeded = [alone(engine, replace(seeded, params=replace(seeded.params, seed=None))) for _ in range(2)]
    assert first.token_ids == again.token_ids and first.logprobs == again.logprobs
    assert other.token_ids != first.token_ids and unseeded[0].token_ids != unseeded[1].token_ids


def test_a_request_joins_the_running_batch_at_the_next_step_and_finished_rows_leave(make_engine, tiny_base):
    engine = make_engine()
    long_one = engine.submit(request(tiny_base, "Tell me everything.", temperature=0.0, max_tokens=10))
    short_one = engine.submit(request(tiny_base, "Yes?", temperature=0.0, max_tokens=2))
    assert engine.step() == StepStats(admitted=2, decoded=2)  # prefill gives token 1, the decode step token 2
    assert short_one.done and not long_one.done
    assert engine.step() == StepStats(admitted=0, decoded=1)
    joining = engine.submit(request(tiny_base, "A late question about cats", temperature=0.7, max_tokens=6, seed=4))
    assert engine.step() == StepStats(admitted=1, decoded=2)
    run(engine, [long_one, joining])
    for stream in (long_one, short_one, joining):
        assert_same_generation(stream.wait(0), alone(engine, stream.request))


def test_prefill_budget_admits_a_burst_over_several_steps(make_engine, tiny_base):
    prompt = chat(tiny_base, "Count to ten.")
    engine = make_engine(max_prefill_tokens=2 * len(prompt))
    streams = [engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=4, seed=i))) for i in range(5)]
    assert [engine.step().admitted for _ in range(3)] == [2, 2, 1]
    run(engine, streams)


# --- cancel, back-pressure, invalid input ---------------------------------------------------------------------------

def test_cancel_frees_the_slot_for_the_next_request(make_engine, tiny_base):
    engine = make_engine(max_batch_size=1)
    running = engine.submit(request(tiny_base, "Go on forever.", max_tokens=400, seed=0))
    waiting = engine.submit(request(tiny_base, "My turn?", max_tokens=3, seed=0))
    queued_then_cancelled = engine.submit(request(tiny_base, "Never mind.", max_tokens=3))
    assert engine.step() == StepStats(admitted=1, decoded=1)
    running.cancel()
    queued_then_cancelled.cancel()
    assert engine.step() == StepStats(admitted=1, decoded=1)
    cancelled = running.wait(0)
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) == len(cancelled.logprobs) == 2
    assert queued_then_cancelled.wait(0).finish_reason == "cancelled"
    assert queued_then_cancelled.wait(0).token_ids == []
    assert run(engine, [waiting])[0].finish_reason == "length"


def test_full_queue_refuses_new_requests_until_one_is_admitted(make_engine, tiny_base):
    engine = make_engine(max_batch_size=1, max_queue=2)
    streams = [engine.submit(request(tiny_base, f"Question {i}", max_tokens=2)) for i in range(2)]
    with pytest.raises(EngineFull):
        engine.submit(request(tiny_base, "One too many", max_tokens=2))
    engine.step()
    streams.append(engine.submit(request(tiny_base, "Now there is room", max_tokens=2)))
    assert [r.finish_reason for r in run(engine, streams)] == ["length"] * 3


def test_requests_submitted_together_are_queued_all_or_none(make_engine, tiny_base):
    engine = make_engine(max_batch_size=1, max_queue=2)
    first = engine.submit(request(tiny_base, "Question", max_tokens=2))
    with pytest.raises(EngineFull):  # two choices of one chat request: both count, and only one place is left
        engine.submit_all([request(tiny_base, f"Choice {i}", max_tokens=2) for i in range(2)])
    last = engine.submit(request(tiny_base, "Still room for one", max_tokens=2))  # the pair left nothing behind
    assert [r.finish_reason for r in run(engine, [first, last])] == ["length"] * 2


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ([], {}, "empty"),
    ([1] * 512, {}, "context"),
    ([1, 10**6], {}, "prompt ids"),
    ([1, 2], {"max_tokens": 0}, "max_tokens"),
    ([1, 2], {"temperature": -1.0}, "temperature"),
    ([1, 2], {"temperature": 1e-40}, "temperature"),
    ([1, 2], {"temperature": float("nan")}, "temperature"),
    ([1, 2], {"temperature": float("inf")}, "temperature"),
    ([1, 2], {"seed": 2**70}, "seed"),
    ([1, 2], {"top_p": 0.0}, "top_p"),
    ([1, 2], {"stop": ("",)}, "stop"),
])
def test_invalid_requests_are_refused_with_a_reason(make_engine, prompt, params, message):
    engine = make_engine()
    with pytest.raises(InvalidRequest, match=message):
        engine.submit(GenerationRequest(prompt, SamplingParams(**params)))


# --- stopping -------------------------------------------------------------------------------------------------------

def test_stop_string_ends_the_completion_and_is_cut_from_the_text(make_engine, tiny_base):
    engine = make_engine()
    req = request(tiny_base, "Say many words.", temperature=0.0, max_tokens=24)
    full = alone(engine, req)
    assert len(full.text) > 12
    stop = full.text[6:10]
    cut = full.text.index(stop)
    stream = engine.submit(replace(req, params=replace(req.params, stop=("never appears", stop))))
    stopped = run(engine, [stream])[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
    assert "".join(e.text for e in stream.events) == stopped.text
    # the tokens up to and including the one that completed the stop string are kept, with their log-probs
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)] and len(stopped.token_ids) < len(full.token_ids)
    assert tiny_base.tokenizer.decode(stopped.token_ids).startswith(full.text[:cut] + stop)


def test_eos_token_stops_and_is_kept_without_text(make_engine, tiny_base):
    req = request(tiny_base, "Say many words.", temperature=0.0, max_tokens=24)
    full = alone(make_engine(), req)
    eos = full.token_ids[3]
    tiny_base.model.generation_config.eos_token_id = [eos]
    stopped = alone(make_engine(), req)
    first = full.token_ids.index(eos)
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:first + 1]
    assert stopped.text == tiny_base.tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)


def test_generation_stops_at_the_context_length(make_engine, tiny_base):
    engine = make_engine()
    context = tiny_base.context_length
    result = alone(engine, GenerationRequest([1] * (context - 3), SamplingParams(max_tokens=50, seed=0)))
    assert result.finish_reason == "length" and len(result.token_ids) == 3


# --- adapters -------------------------------------------------------------------------------------------------------

def load(engine: Engine, name: str, path: Path) -> None:
    future = engine.load_adapter(name, path)
    engine.step()
    future.result(timeout=0)


def test_rows_with_different_adapters_in_one_batch_each_get_their_own(make_engine, tiny_base, make_adapter_dir):
    engine = make_engine()
    base_before_any_adapter = alone(engine, request(tiny_base, "Who are you?", temperature=0.0, max_tokens=10))
    load(engine, "a", make_adapter_dir("a", scale=0.5, seed=1))
    load(engine, "b", make_adapter_dir("b", scale=0.5, seed=2))
    assert engine.loaded_adapters() == ["a", "b"]
    requests = [request(tiny_base, "Who are you?", adapter, temperature=0.0, max_tokens=10)
                for adapter in (None, "a", "b", "a")]
    results = run(engine, [engine.submit(r) for r in requests])
    for req, result in zip(requests, results, strict=True):
        assert result.adapter == req.adapter
        assert_same_generation(result, alone(engine, req))
    assert_same_generation(results[0], base_before_any_adapter)  # "__base__" rows are the plain model
    assert len({tuple(r.token_ids) for r in results[:3]}) == 3


def test_offline_generate_runs_the_engines_step_and_gets_its_tokens(make_engine, tiny_base, make_adapter_dir):
    """The trainer's rollouts and the gates generate with ``liveloop.engine.offline.generate``: the same seeded
    requests on the same adapter give exactly the tokens, log-probs and finish reasons the engine serves."""
    engine = make_engine()
    load(engine, "a", make_adapter_dir("a", scale=0.5))
    requests = [GenerationRequest(chat(tiny_base, content), params, adapter="a") for content, params in MIXED]
    served = run(engine, [engine.submit(r) for r in requests])
    offline = generate(engine.model, [r.prompt_ids for r in requests], [r.params for r in requests],
                       eos_token_ids=tiny_base.eos_token_ids, generator=torch.Generator(),
                       adapter=engine.adapter_slot("a"))
    for result, generation in zip(served, offline, strict=True):
        assert list(generation.response_ids) == result.token_ids
        assert list(generation.behaviour_logprobs) == result.logprobs
        assert generation.finish_reason == result.finish_reason


def test_prompts_sharing_the_system_prompt_are_prefilled_from_its_kept_prefix_and_get_the_same_tokens(
        make_engine, tiny_base, make_adapter_dir):
    """The chat template's system prompt is kept after two prompts shared it; later prompts, served and merged ones
    among them, prefill from it and get the tokens and log-probs a whole prefill gives (offline generation has no
    prefix cache)."""
    engine = make_engine()
    load(engine, "a", make_adapter_dir("a", scale=0.5))
    engine.merge_adapter("a")
    requests = [GenerationRequest(chat(tiny_base, content), replace(params, temperature=0.0), adapter=adapter)
                for (content, params), adapter in zip(MIXED * 2, ["a", None] * 4, strict=True)]
    hits = REGISTRY.get_sample_value("liveloop_prefix_cache_hits_total") or 0.0
    served = [alone(engine, r) for r in requests]  # one at a time: each later prefill can find the kept prefix
    # the system prompt, under the merged version and the base, then whole repeated prompts
    assert (REGISTRY.get_sample_value("liveloop_prefix_cache_hits_total") or 0.0) - hits >= 4 * 24
    for request_, result in zip(requests, served, strict=True):
        [generation] = generate(engine.model, [request_.prompt_ids], [request_.params],
                                eos_token_ids=tiny_base.eos_token_ids, generator=torch.Generator(),
                                adapter=engine.adapter_slot(request_.adapter))
        assert list(generation.response_ids) == result.token_ids
        assert list(generation.behaviour_logprobs) == pytest.approx(result.logprobs, abs=1e-4)
    engine.merge_adapter(None)
    engine.step()
    cache = engine._runner.prefix_cache
    assert cache.lookup("__base__", requests[1].prompt_ids) is None  # the weights changed: nothing kept holds


def test_adapter_loads_between_steps_while_requests_run(make_engine, tiny_base, make_adapter_dir):
    engine = make_engine()
    running = [engine.submit(request(tiny_base, f"Story number {i}", temperature=0.9, max_tokens=12, seed=i))
               for i in range(3)]
    engine.step()
    future = engine.load_adapter("v1", make_adapter_dir("v1", scale=0.5))
    engine.step()
    assert future.done() and future.exception() is None and not any(s.done for s in running)
    with_adapter = engine.submit(request(tiny_base, "And now?", "v1", temperature=0.0, max_tokens=5))
    run(engine, [*running, with_adapter])
    for stream in running:  # wrapping the model in peft mid-flight changed nothing for them
        assert_same_generation(stream.wait(0), alone(engine, stream.request))
    assert with_adapter.wait(0).adapter == "v1"
    with pytest.raises(ValueError, match="immutable"):
        engine.load_adapter("v1", make_adapter_dir("v1-again"))


def test_unload_waits_until_no_request_uses_the_adapter(make_engine, tiny_base, make_adapter_dir):
    engine = make_engine()
    load(engine, "a", make_adapter_dir("a", scale=0.5))
    req = request(tiny_base, "Pinned", "a", temperature=0.0, max_tokens=6)
    want = alone(engine, req)
    pinned = engine.submit(req)
    engine.step()
    engine.unload_adapter("a")
    assert engine.loaded_adapters() == []
    with pytest.raises(UnknownAdapter):
        engine.submit(request(tiny_base, "Too late", "a"))
    engine.step()
    for seed, name in enumerate(["b", "c"], start=1):  # more loads than free slots: none may take a's
        load(engine, name, make_adapter_dir(name, scale=0.5, seed=seed))
    assert not pinned.done
    assert_same_generation(run(engine, [pinned])[0], want)
    with pytest.raises(UnknownAdapter):
        engine.unload_adapter("a")
    slots = len(engine.model.peft_config)
    load(engine, "d", make_adapter_dir("d", scale=0.5, seed=3))
    engine.step()
    assert len(engine.model.peft_config) == slots  # a's slot was freed, and d (or the spare) took it


def test_a_version_routed_again_while_it_unloads_serves_again_from_its_slot(make_engine, tiny_base,
                                                                            make_adapter_dir):
    """The hot-swap unloads a version out of the routing and may route it again (a standby that became the newest
    approved once more) before a pinned request lets its slot go: the load revives it instead of refusing it."""
    engine = make_engine()
    load(engine, "a", make_adapter_dir("a", scale=0.5))
    req = request(tiny_base, "Pinned", "a", temperature=0.0, max_tokens=6)
    want = alone(engine, req)
    pinned = engine.submit(req)
    engine.step()
    engine.unload_adapter("a")
    assert engine.loaded_adapters() == []
    future = engine.load_adapter("a", make_adapter_dir("a2", scale=0.5, seed=7))
    assert future.done() and future.exception() is None and engine.loaded_adapters() == ["a"]
    assert_same_generation(run(engine, [pinned])[0], want)
    engine.step()  # nothing waits to be unloaded: a keeps its slot and its weights
    assert_same_generation(run(engine, [engine.submit(req)])[0], want)


def test_a_version_loads_into_a_free_slot_without_waiting_for_a_step(make_engine, tiny_base, make_adapter_dir):
    engine = make_engine()
    load(engine, "a", make_adapter_dir("a", scale=0.5))  # the first slot is added by the engine thread
    running = engine.submit(request(tiny_base, "Keep going", "a", temperature=0.0, max_tokens=8))
    engine.step()  # also adds a spare slot
    future = engine.load_adapter("b", make_adapter_dir("b", scale=0.5, seed=1))
    assert future.done() and future.exception() is None and engine.loaded_adapters() == ["a", "b"]
    assert_same_generation(run(engine, [running])[0], alone(engine, running.request))


def test_a_reused_slot_serves_the_new_version_s_weights(make_engine, make_settings, tiny_model_dir, tiny_base,
                                                        make_adapter_dir):
    engine = make_engine()
    for seed, name in enumerate(["a", "b", "c"]):  # each unloaded before the next: slots are recycled
        load(engine, name, make_adapter_dir(name, scale=0.5, seed=seed))
        engine.unload_adapter(name)
        engine.step()
    assert len(engine.model.peft_config) == 2  # the first slot and one spare, reused ever since
    load(engine, "d", make_adapter_dir("d", scale=0.5, seed=3))
    fresh = make_engine(load_base_model(make_settings(base_model=tiny_model_dir)))
    load(fresh, "d", make_adapter_dir("d-again", scale=0.5, seed=3))
    req = request(tiny_base, "Who are you?", "d", temperature=0.0, max_tokens=10)
    assert_same_generation(alone(engine, req), alone(fresh, req))


def test_a_version_of_another_lora_config_gets_slots_of_its_own_and_free_old_ones_go(make_engine, tiny_base,
                                                                                    tiny_model_dir, make_adapter_dir,
                                                                                    tmp_path):
    engine = make_engine()
    load(engine, "r4", make_adapter_dir("r4", scale=0.5))
    engine.step()  # a spare r4 slot
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), default_lora_config(r=8, alpha=16),
                           adapter_name="policy")
    save_adapter(model, "policy", tmp_path / "r8", base_model_id=tiny_model_dir.name)
    load(engine, "r8", tmp_path / "r8")
    engine.step()  # a spare r8 slot
    # a slot has twice its versions' rank (serving.slots: room for the merged version's difference); r4's spare went
    assert sorted(config.r for config in engine.model.peft_config.values()) == [8, 16, 16]
    for adapter in ("r4", "r8"):
        assert alone(engine, request(tiny_base, "Hello", adapter, max_tokens=4)).adapter == adapter


# --- the merged live version ---------------------------------------------------------------------------------------

def test_a_merged_version_runs_without_an_adapter_and_every_row_gets_what_it_got_unmerged(make_engine, tiny_base,
                                                                                          make_adapter_dir):
    engine = make_engine()
    load(engine, "live", make_adapter_dir("live", scale=0.5, seed=1))
    load(engine, "canary", make_adapter_dir("canary", scale=0.5, seed=2))
    # greedy: merged weights round differently (log-probs move by ~1e-6), which can flip a sampled token of this
    # random tiny model, whose next-token distributions are nearly flat
    requests = [request(tiny_base, content, adapter, temperature=0.0, max_tokens=12)
                for (content, _), adapter in zip(MIXED, ["live", "canary", None, "live"], strict=True)]
    unmerged = run(engine, [engine.submit(r) for r in requests])
    engine.merge_adapter("live")
    engine.step()
    assert engine.adapter_slot("live") is None  # its rows pay no adapter cost
    assert engine.adapter_slot(None) not in (None, "__base__")  # the base's rows take the merged version off
    merged = run(engine, [engine.submit(r) for r in requests])
    for got, want in zip(merged, unmerged, strict=True):
        assert_same_generation(got, want)
    assert len({tuple(r.token_ids) for r in merged[:3]}) == 3
    peft_forward = engine.model.forward
    engine.model.forward = None  # a batch of the merged version alone runs the plain model, past peft's forward
    try:
        live_only = run(engine, [engine.submit(requests[i]) for i in (0, 3)])
    finally:
        engine.model.forward = peft_forward
    for got, want in zip(live_only, [unmerged[0], unmerged[3]], strict=True):
        assert_same_generation(got, want)


def test_merging_another_version_or_none_leaves_no_trace_of_the_last_in_the_weights(make_engine, tiny_base,
                                                                                    make_adapter_dir):
    engine = make_engine()
    base_request = request(tiny_base, "Who are you?", temperature=1.0, max_tokens=10, seed=3)
    before = alone(engine, base_request)
    weights = [(param, param.detach().clone()) for param in tiny_base.model.parameters()]  # peft keeps the objects
    for name, seed in (("a", 1), ("b", 2)):
        load(engine, name, make_adapter_dir(name, scale=0.5, seed=seed))
    for name in ("a", "b", None):
        engine.merge_adapter(name)
        engine.step()
        assert alone(engine, base_request).token_ids == before.token_ids
    assert engine.adapter_slot(None) is None
    assert all(torch.equal(param, before) for param, before in weights)  # W₀ exactly, not W₀ + ΔA − ΔA + ΔB − ΔB
    assert_same_generation(alone(engine, base_request), before, tol=0.0)


def test_a_request_in_flight_when_the_merged_version_changes_gets_the_tokens_it_gets_alone(make_engine, tiny_base,
                                                                                           make_adapter_dir):
    engine = make_engine()
    for name, seed in (("a", 1), ("b", 2)):
        load(engine, name, make_adapter_dir(name, scale=0.5, seed=seed))
    requests = [request(tiny_base, f"Story number {i}", adapter, temperature=0.0, max_tokens=12)
                for i, adapter in enumerate(["a", "b", None])]
    want = [alone(engine, r) for r in requests]
    streams = [engine.submit(r) for r in requests]
    for merged in ("a", "b", None, "b"):  # a new merge between every two steps
        engine.merge_adapter(merged)
        engine.step()
    for got, expected in zip(run(engine, streams), want, strict=True):
        assert_same_generation(got, expected)


def test_unloading_the_merged_version_unmerges_it_once_no_request_uses_it(make_engine, tiny_base, make_adapter_dir):
    engine = make_engine()
    base_request = request(tiny_base, "Who are you?", temperature=0.0, max_tokens=8)
    before = alone(engine, base_request)
    load(engine, "live", make_adapter_dir("live", scale=0.5))
    pinned_request = request(tiny_base, "Pinned", "live", temperature=0.0, max_tokens=6)
    want = alone(engine, pinned_request)
    engine.merge_adapter("live")
    pinned = engine.submit(pinned_request)
    engine.step()
    engine.unload_adapter("live")
    engine.step()
    assert engine.adapter_slot(None) not in (None, "__base__")  # still merged: a request uses it
    assert_same_generation(run(engine, [pinned])[0], want)
    engine.step()
    assert engine.adapter_slot(None) is None
    assert_same_generation(alone(engine, base_request), before, tol=0.0)


def test_corrupt_or_foreign_adapter_is_refused_and_serving_goes_on(make_engine, tiny_base, make_adapter_dir, tmp_path):
    engine = make_engine()
    good = make_adapter_dir("good", scale=0.5)
    corrupt = shutil.copytree(good, tmp_path / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    foreign = shutil.copytree(good, tmp_path / "foreign")
    manifest = json.loads((foreign / "liveloop.json").read_text())
    (foreign / "liveloop.json").write_text(json.dumps({**manifest, "base_model_id": "another-model"}))
    misfit = shutil.copytree(good, tmp_path / "misfit")  # intact weights, but a config of another rank
    config = json.loads((misfit / "adapter_config.json").read_text())
    (misfit / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    running = engine.submit(request(tiny_base, "Keep going", temperature=0.0, max_tokens=8))
    for name, path, reason in [("corrupt", corrupt, "sha256"), ("foreign", foreign, "another-model"),
                               ("misfit", misfit, "shape")]:
        future = engine.load_adapter(name, path)
        engine.step()
        with pytest.raises(AdapterArtifactError, match=reason):
            future.result(timeout=0)
    assert engine.loaded_adapters() == [] and not running.done
    assert_same_generation(run(engine, [running])[0], alone(engine, running.request))
    load(engine, "corrupt", good)  # a refused name is free again
    assert engine.loaded_adapters() == ["corrupt"]
    with pytest.raises(UnknownAdapter):
        engine.submit(request(tiny_base, "Hello", "foreign"))


# --- the thread, asyncio, failures ----------------------------------------------------------------------------------

def test_async_streams_from_the_engine_thread(make_engine, tiny_base, make_adapter_dir):
    engine = make_engine()
    assert not engine.is_running()
    engine.start()
    assert engine.is_running()
    requests = [GenerationRequest(chat(tiny_base, content), params) for content, params in MIXED]

    async def consume(stream: RequestStream) -> tuple[list, GenerationResult]:
        return [event async for event in stream], await stream.result()

    async def main():
        load = asyncio.wrap_future(engine.load_adapter("a", make_adapter_dir("a", scale=0.5)))
        outcomes = await asyncio.gather(*(consume(engine.submit(r)) for r in requests))
        await load
        endless = engine.submit(request(tiny_base, "Talk on", "a", max_tokens=400, seed=0))
        seen = []
        async for event in endless:
            seen.append(event)
            if len(seen) == 3:
                endless.cancel()
        return outcomes, seen, await endless.result()

    outcomes, seen, cancelled = asyncio.run(main())
    engine.shutdown()
    assert not engine.is_running()
    for (events, result), req in zip(outcomes, requests, strict=True):
        assert [e.token_id for e in events] == result.token_ids and [e.logprob for e in events] == result.logprobs
        assert "".join(e.text for e in events) == result.text and len(result.token_ids) == req.params.max_tokens
    assert cancelled.finish_reason == "cancelled" and cancelled.token_ids == [e.token_id for e in seen]
    assert 3 <= len(seen) < 400 and cancelled.adapter == "a"


def test_a_failing_forward_fails_its_requests_and_the_engine_serves_on(make_engine, tiny_base):
    engine = make_engine()
    running = engine.submit(request(tiny_base, "Before the fault", max_tokens=50, seed=0))
    engine.step()

    def fault(module, args):  # what an out-of-memory inside a layer looks like to the engine
        raise RuntimeError("simulated fault in the forward pass")

    hook = engine.model.model.layers[0].register_forward_pre_hook(fault)
    arriving = engine.submit(request(tiny_base, "During the fault", max_tokens=5))
    assert engine.step() == StepStats(admitted=0, decoded=0)
    hook.remove()
    for stream in (running, arriving):
        with pytest.raises(RuntimeError, match="simulated fault"):
            stream.wait(0)
    with pytest.raises(RuntimeError, match="simulated fault"):
        asyncio.run(running.result())
    assert run(engine, [engine.submit(request(tiny_base, "After", max_tokens=4))])[0].finish_reason == "length"


def test_shutdown_ends_every_request_with_an_error_instead_of_a_hang(make_engine, tiny_base, make_adapter_dir):
    engine = make_engine(max_batch_size=1)
    running = engine.submit(request(tiny_base, "Running", max_tokens=100))
    engine.step()
    queued = engine.submit(request(tiny_base, "Queued", max_tokens=100))
    load = engine.load_adapter("a", make_adapter_dir("a"))
    engine.shutdown()

    async def drain(stream: RequestStream) -> list:
        return [event async for event in stream]

    for stream in (running, queued):
        with pytest.raises(EngineStopped):
            asyncio.run(drain(stream))
    assert load.cancelled()
    with pytest.raises(EngineStopped):
        engine.submit(request(tiny_base, "Late"))


def test_metrics_count_what_the_engine_did(make_engine, tiny_base):
    def sample(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {name: sample(name) for name in ("liveloop_generation_tokens_total",
                                              "liveloop_time_to_first_token_seconds_count",
                                              "liveloop_prompt_tokens_total",
                                              "liveloop_time_per_output_token_seconds_count",
                                              "liveloop_e2e_request_latency_seconds_count")}
    length_before = sample("liveloop_engine_requests_finished_total", finish_reason="length")
    decode_steps_before = sample("liveloop_engine_step_seconds_count", phase="decode")
    engine = make_engine()
    requests = [GenerationRequest(chat(tiny_base, content), params) for content, params in MIXED]
    results = run(engine, [engine.submit(r) for r in requests])
    assert sample("liveloop_generation_tokens_total") - before["liveloop_generation_tokens_total"] == sum(
        len(r.token_ids) for r in results)
    assert sample("liveloop_prompt_tokens_total") - before["liveloop_prompt_tokens_total"] == sum(
        len(r.prompt_ids) for r in requests)
    assert sample("liveloop_time_to_first_token_seconds_count") - before[
        "liveloop_time_to_first_token_seconds_count"] == len(requests)
    assert sample("liveloop_time_per_output_token_seconds_count") - before[
        "liveloop_time_per_output_token_seconds_count"] == sum(len(r.token_ids) - 1 for r in results)
    assert sample("liveloop_e2e_request_latency_seconds_count") - before[
        "liveloop_e2e_request_latency_seconds_count"] == len(requests)
    assert sample("liveloop_engine_requests_finished_total", finish_reason="length") - length_before == len(requests)
    assert sample("liveloop_engine_step_seconds_count", phase="decode") - decode_steps_before == max(
        r.params.max_tokens for r in requests) - 1
    assert sample("liveloop_num_requests_running") == 0 and sample("liveloop_num_requests_waiting") == 0


# --- the behaviour log-prob invariant -------------------------------------------------------------------------------
# The engine records log π_behaviour(token) from batched, padded, cached decoding; the trainer recomputes it with
# one full forward (sequence_logprobs). In float32 the two agree to ~1e-5 nats (measured max 2e-5, mean 2e-6 on
# SmolLM2). bfloat16 forwards of different shapes round differently: mean ~0.03, max ~0.2 nats, and now and then
# a greedy argmax or a top-p boundary flips, so the recompute puts the sampled token outside its support (-inf).
# Those tolerances are what PPO's clipped, truncated importance ratio has to absorb when serving in bf16.

INVARIANT = [  # (prompt, temperature, top_p, uses the adapter)
    ("What is the capital of France?", 0.0, 1.0, False),
    ("Write a haiku about snow.", 0.7, 0.9, True),
    ("Name three fruits.", 1.0, 1.0, False),
    ("Explain gravity briefly.", 1.3, 0.8, True),
    ("Tell me a joke.", 0.7, 0.9, False),
    ("What is 7*8?", 1.0, 1.0, True),
]


def generate_mixed(engine: Engine, base: LoadedModel, adapter: str, max_tokens: int) -> list[tuple]:
    """INVARIANT's requests, half of them joining mid-run; returns (request, result) pairs. Plain prompts without
    the chat template's system prompt keep the prefill (slow in bf16 on CPUs without bf16 units) short."""
    requests = [GenerationRequest(base.tokenizer.encode(content),
                                  SamplingParams(temperature=t, top_p=p, max_tokens=max_tokens, seed=i),
                                  adapter=adapter if with_adapter else None)
                for i, (content, t, p, with_adapter) in enumerate(INVARIANT)]
    streams = [engine.submit(r) for r in requests[:3]]
    engine.step()
    engine.step()
    streams += [engine.submit(r) for r in requests[3:]]
    return list(zip(requests, run(engine, streams), strict=True))


def mismatches(engine: Engine, generations: list[tuple]) -> list[float]:
    return [abs(recorded - recomputed) for req, result in generations
            for recorded, recomputed in zip(result.logprobs, sequence_logprobs(
                engine.model, req.prompt_ids, result.token_ids, req.params,
                adapter=engine.adapter_slot(req.adapter)), strict=True)]


def test_spot_check_recomputes_the_recorded_logprobs(make_engine, tiny_base, make_adapter_dir):
    engine = make_engine()
    load(engine, "live", make_adapter_dir("live", scale=0.5))
    checked_before = REGISTRY.get_sample_value("liveloop_logprob_mismatch_nats_count") or 0.0
    generations = generate_mixed(engine, tiny_base, "live", max_tokens=10)
    futures = [engine.spot_check(req, result) for req, result in generations]
    tampered = replace(generations[1][1], logprobs=[lp - 0.5 for lp in generations[1][1].logprobs])
    futures.append(engine.spot_check(generations[1][0], tampered))
    engine.step()
    found = [f.result(timeout=0) for f in futures]
    assert max(found[:-1]) < 1e-4 and found[-1] == pytest.approx(0.5, abs=1e-4)
    assert REGISTRY.get_sample_value("liveloop_logprob_mismatch_nats_count") - checked_before == len(futures)
    assert REGISTRY.get_sample_value("liveloop_logprob_mismatch_last_nats") == found[-1]


@pytest.fixture(scope="module")
def packaged_adapter_dir(packaged_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An r16 LoRA on all seven projections of SmolLM2, small random B: it changes the output, not the language."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(packaged_model_dir), default_lora_config(),
                           adapter_name="policy")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    dest = tmp_path_factory.mktemp("packaged-adapter") / "v1"
    save_adapter(model, "policy", dest, base_model_id=packaged_model_dir.name)
    return dest


@pytest.mark.slow
def test_packaged_model_batched_equals_alone(make_engine, make_settings, packaged_model_dir):
    base = load_base_model(make_settings())
    engine = make_engine(base)
    requests = [GenerationRequest(chat(base, content), replace(params, max_tokens=12)) for content, params in MIXED]
    for req, result in zip(requests, run(engine, [engine.submit(r) for r in requests]), strict=True):
        assert_same_generation(result, alone(engine, req))


@pytest.mark.slow
def test_logprob_invariant_float32(make_engine, make_settings, packaged_adapter_dir):
    base = load_base_model(make_settings())
    engine = make_engine(base)
    load(engine, "v1", packaged_adapter_dir)
    diffs = mismatches(engine, generate_mixed(engine, base, "v1", max_tokens=16))
    assert max(diffs) < 1e-3 and statistics.mean(diffs) < 1e-4


@pytest.mark.slow
def test_logprob_invariant_bfloat16_within_its_looser_tolerance(make_engine, make_settings, packaged_adapter_dir):
    base = load_base_model(make_settings(dtype="bfloat16"))
    engine = make_engine(base)
    load(engine, "v1", packaged_adapter_dir)
    generations = generate_mixed(engine, base, "v1", max_tokens=12)
    assert all(result.dtype == "bfloat16" for _, result in generations)
    diffs = mismatches(engine, generations)
    finite = [d for d in diffs if d != float("inf")]
    assert len(diffs) - len(finite) <= len(diffs) // 20  # support flips (greedy argmax, top-p edge) are rare
    assert statistics.mean(finite) < 0.1 and max(finite) < 1.0
