"""Two answers to compare (n = 2) over real HTTP, through the official openai client: each choice a completion of
its own, streamed interleaved, counted twice against the queue; the live version and the canary side by side in
every comparison while a canary runs."""

from __future__ import annotations

import json
import random
import time

import httpx
import openai
import sqlalchemy as sa

from liveloop.artifacts import open_artifact_store
from liveloop.db import make_engine, make_sessionmaker
from liveloop.registry import Registry
from liveloop.tables import Completion
from serving.routing import AdapterSet
from tests.serving.test_canary_routing import names

MESSAGES = [{"role": "user", "content": "Say something about the sea."}]


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def _stored(database_url: str, request_id: str) -> list[Completion]:
    engine = make_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Completion).where(Completion.request_id == request_id)
                            .order_by(Completion.choice_index)).all()
    engine.dispose()
    return rows


def test_two_choices_are_two_stored_completions_of_one_request(serve, database_url):
    with serve(database_url=database_url) as url:
        reply = _client(url).chat.completions.create(model="liveloop", messages=MESSAGES, n=2, max_tokens=12,
                                                     temperature=0.9, seed=7, logprobs=True)
    rows = _stored(database_url, reply.id)
    assert [c.index for c in reply.choices] == [0, 1] == [row.choice_index for row in rows]
    ids = [c.completion_id for c in reply.choices]  # liveloop extras, kept by the openai client
    assert ids == [row.id for row in rows] and reply.id not in ids and len(set(ids)) == 2
    for choice, row in zip(reply.choices, rows, strict=True):
        assert choice.message.content == row.response_text and choice.model == reply.model  # the base model
        assert row.adapter_version is None and row.requested_model == "liveloop"
        assert [t.logprob for t in choice.logprobs.content] == row.behaviour_logprobs
        assert len(row.behaviour_logprobs) == len(row.response_token_ids) <= 12
        assert row.sampling_params["max_tokens"] == 12 and row.sampling_params["temperature"] == 0.9
    assert [row.sampling_params["seed"] for row in rows] == [7, 8]  # two samples, not one answer twice
    assert reply.usage.completion_tokens == sum(len(row.response_token_ids) for row in rows)
    assert reply.usage.prompt_tokens == sum(len(row.prompt_token_ids) for row in rows)


def test_one_choice_carries_the_response_id_as_its_completion_id(serve, database_url):
    with serve(database_url=database_url) as url:
        reply = _client(url).chat.completions.create(model="liveloop", messages=MESSAGES, max_tokens=4)
    [row] = _stored(database_url, reply.id)
    assert reply.choices[0].completion_id == reply.id == row.id and row.choice_index == 0


def test_two_choices_stream_interleaved_and_add_up_to_the_stored_completions(serve, make_settings):
    settings = make_settings()
    with serve() as url:
        chunks = list(_client(url).chat.completions.create(
            model="liveloop", messages=MESSAGES, n=2, max_tokens=16, stream=True,
            stream_options={"include_usage": True}))
    rows = _stored(settings.resolved_database_url, chunks[0].id)
    by_index = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk.choices:
            by_index[choice.index].append(choice)
    for index, row in enumerate(rows):
        first, *rest = by_index[index]
        assert (first.delta.role, first.completion_id, first.model) == ("assistant", row.id, chunks[0].model)
        assert "".join(c.delta.content or "" for c in by_index[index]) == row.response_text
        assert [c.finish_reason for c in by_index[index] if c.finish_reason] == [row.finish_reason]
        assert all(getattr(c, "completion_id", None) is None for c in rest)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(
        len(row.response_token_ids) for row in rows)


def test_the_stream_ends_once_with_done(serve):
    with serve() as url, httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "model": "liveloop", "messages": MESSAGES, "n": 2, "max_tokens": 6, "stream": True}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    assert sorted(c["index"] for e in events[:-1] for c in json.loads(e)["choices"] if c.get("finish_reason")) == [0, 1]


def test_two_choices_count_twice_against_the_queue(serve):
    with serve(max_queue=1) as url:
        one = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                         json={"model": "liveloop", "messages": MESSAGES, "max_tokens": 2})
        two = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                         json={"model": "liveloop", "messages": MESSAGES, "max_tokens": 2, "n": 2})
    assert one.status_code == 200
    assert two.status_code == 429 and two.headers["retry-after"] == "1" and two.json()["error"]["type"]


def test_max_tokens_bounds_each_choice(serve):
    with serve(max_tokens_limit=8) as url:
        allowed = _client(url).chat.completions.create(model="liveloop", messages=MESSAGES, n=2, max_tokens=8)
        refused = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                             json={"model": "liveloop", "messages": MESSAGES, "max_tokens": 9, "n": 2})
    assert len(allowed.choices) == 2 and allowed.usage.completion_tokens <= 2 * 8
    assert refused.status_code == 400 and "at most 8" in refused.json()["error"]["message"]


def test_the_openapi_schema_documents_n_the_choice_extras_and_the_ranking(serve):
    with serve() as url:
        schemas = httpx.get(f"{url}/openapi.json", timeout=30).json()["components"]["schemas"]
    n = schemas["ChatCompletionRequest"]["properties"]["n"]
    assert n["enum"] == [1, 2] and "counts against the queue" in n["description"]
    assert {"completion_id", "model"} <= set(schemas["Choice"]["properties"])
    assert "ranking" in schemas["FeedbackCreate"]["properties"]


def test_while_a_canary_runs_every_comparison_pits_the_live_version_against_it(serve, make_settings, make_adapter_dir):
    inside, outside = names(True, 1)[0], names(False, 1)[0]
    overrides = {"canary_fraction": 0.5, "adapter_poll_s": 0.1}
    settings = make_settings(**overrides)
    engine = make_engine(settings.resolved_database_url)
    with serve(**overrides) as url:
        registry = Registry(make_sessionmaker(engine), open_artifact_store(settings))
        for seed, name in enumerate(("live", "cand")):
            registry.register(name, make_adapter_dir(name, scale=0.05, seed=seed))
            registry.judge(name, report={"passed": True, "gates": []}, failed=[])
        registry.promote("live", actor="test", reason="x")
        registry.start_canary("cand", actor="test", reason="x")
        client = _client(url)

        def models(user: str, model: str = "liveloop") -> list[str]:
            reply = client.chat.completions.create(model=model, messages=MESSAGES, n=2, max_tokens=2, user=user)
            return [choice.model for choice in reply.choices]

        deadline = time.monotonic() + 60
        while "cand" not in models(inside):  # both loaded and routed
            assert time.monotonic() < deadline, "the replica never routed the canary"
            time.sleep(0.1)
        paired, outside_slice, pinned = models(inside), models(outside), models(inside, model="cand")
        registry.reject("cand", actor="test", reason="x")
        deadline = time.monotonic() + 60
        while "cand" in models(inside):  # the canary has ended
            assert time.monotonic() < deadline, "the replica never dropped the canary"
            time.sleep(0.1)
        after = models(inside)
    engine.dispose()
    assert sorted(paired) == sorted(outside_slice) == ["cand", "live"]  # every user's comparison is a vote
    assert pinned == ["cand", "cand"] and after == ["live", "live"]


def test_the_pair_comes_in_either_order_by_the_coin():
    adapters = AdapterSet(base_model_id="base", alias="liveloop", canary_fraction=1.0)
    for name in ("live", "cand"):
        adapters.add_version(name)
    adapters.switch(live="live", canary="cand")
    orders = {tuple(r.served_name for r in adapters.resolve_choices("liveloop", "someone", 2, random.Random(seed)))
              for seed in range(16)}
    assert orders == {("live", "cand"), ("cand", "live")}
    assert sorted(r.served_name for r in adapters.resolve_choices("liveloop", None, 2, random.Random(0))) == [
        "cand", "live"]  # anonymous users compare too
    assert [r.served_name for r in adapters.resolve_choices("liveloop", "someone", 1, random.Random(0))] == ["cand"]
