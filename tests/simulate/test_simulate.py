from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from liveloop.artifacts import open_artifact_store
from liveloop.cli import app
from liveloop.db import make_engine, make_sessionmaker
from liveloop.registry import Registry
from liveloop.simulate.client import LiveloopClient, SamplingParams
from liveloop.simulate.evaluate import evaluate, mean_and_stderr
from liveloop.simulate.plot import windows
from liveloop.simulate.preferences import P_MET, P_MISS, PREFERENCES, p_prefers
from liveloop.simulate.prompts import eval_prompts, train_prompts
from liveloop.simulate.run import FeedbackMode, Simulation, SimulationConfig
from liveloop.tables import Comparison as ComparisonRow
from liveloop.tables import Completion, Feedback
from tests.serving.conftest import running_server

ADMIN, USER_KEYS = "admin-secret-of-32-characters-ok", ["key-a", "key-b", "key-c"]
HALF = (P_MET + P_MISS) / 2
PNG = b"\x89PNG\r\n\x1a\n"


# --- tastes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "text", "p_up"), [
    ("concise", "Water boils at a lower temperature up high, because the air pressure is lower.", P_MET),
    ("concise", "Bread needs flour, water, salt and yeast, and time for the dough to rise", P_MISS),  # cut off
    ("concise", "Gardening is a wonderful hobby. " * 10, P_MISS),  # complete, but 40+ words
    ("concise", "", P_MISS),
    ("numbers", "Bake it for 25 minutes.", P_MET),
    ("numbers", "You will need three eggs and a dozen apples.", P_MET),
    ("numbers", "Bake it until it is golden and smells good.", P_MISS),
    ("list", "Pack these:\n- a tent\n- a stove\n- a torch", P_MET),
    ("list", "Steps:\n1. Mix the flour.\n2) Knead the dough.", P_MET),
    ("list", "First:\n- a tent, then whatever else you like.", HALF),
    ("list", "Bring a tent - and a stove - and a torch.", P_MISS),  # dashes inside a line are not a list
    ("enthusiastic", "Hiking is amazing! You will love it.", P_MET),
    ("enthusiastic", "Chess is a fun game.", HALF),
    ("enthusiastic", "Chess is a game for two players on a board of 64 squares.", P_MISS),
])
def test_taste_gives_the_probability_of_a_thumbs_up(name, text, p_up):
    assert PREFERENCES[name].p_up(text) == pytest.approx(p_up)


def test_random_rater_ignores_the_text():
    texts = ["", "Hiking is amazing!", "1. one\n2. two", "Fine.", "word " * 300]
    assert {PREFERENCES["random"].p_up(text) for text in texts} == {0.5}


def test_tastes_that_learn_something_depend_on_the_text():
    for name, preference in PREFERENCES.items():
        if name != "random":
            assert preference.p_up("x") != preference.p_up("Here are 3 fun things!\n- one!\n- two!"), name


@pytest.mark.parametrize(("p_a", "p_b", "p_a_preferred"), [
    (P_MET, P_MISS, 0.81 / 0.82),  # odds 9 against odds 1/9: 81 to 1
    (HALF, P_MISS, 0.9),
    (P_MET, HALF, 0.9),
    (HALF, HALF, 0.5),
    (P_MISS, P_MET, 0.01 / 0.82),
])
def test_bradley_terry_link_prefers_by_the_odds_of_a_thumbs_up(p_a, p_b, p_a_preferred):
    # σ(logit a − logit b) is the ratio of the two odds over one plus it: a(1 − b) / (a(1 − b) + b(1 − a))
    assert p_prefers(p_a, p_b) == pytest.approx(p_a_preferred)
    assert p_prefers(p_a, p_b) == pytest.approx(p_a * (1 - p_b) / (p_a * (1 - p_b) + p_b * (1 - p_a)))
    assert p_prefers(p_a, p_b) + p_prefers(p_b, p_a) == pytest.approx(1)


def test_bradley_terry_link_on_the_logit_scale():
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    for p_a, p_b in [(0.2, 0.7), (0.35, 0.3), (0.9, 0.6)]:
        assert p_prefers(p_a, p_b) == pytest.approx(1 / (1 + math.exp(-(logit(p_a) - logit(p_b)))))


def test_mean_and_stderr_against_the_formula():
    mean, stderr = mean_and_stderr([0.1, 0.9, 0.9, 0.1])
    assert mean == pytest.approx(0.5) and stderr == pytest.approx((4 * 0.4**2 / 3 / 4) ** 0.5)


# --- prompts --------------------------------------------------------------------------------------

def test_evaluation_prompts_are_packaged_and_unseen_by_users():
    train, held = train_prompts(), eval_prompts()
    assert len(train) >= 200 and len(held) >= 64
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert not set(train) & set(held)


# --- runs against the real app over HTTP ------------------------------------------------------------

@pytest.fixture
def server(make_settings, tiny_model_dir):
    """The app on the tiny model with an API key and an admin token, and a registry of its database."""
    settings = make_settings(base_model=tiny_model_dir, admin_token=ADMIN,
                             api_keys=[f"user-{key}:{key}" for key in USER_KEYS],
                             adapter_poll_s=0.2)
    engine = make_engine(settings.resolved_database_url)
    with running_server(settings) as url:
        yield url, Registry(make_sessionmaker(engine), open_artifact_store(settings)), engine
    engine.dispose()


def _simulation(url, tmp_path, preference="numbers", api_keys=USER_KEYS, **config) -> tuple[Simulation, LiveloopClient]:
    client = LiveloopClient(url, api_keys=api_keys, admin_token=ADMIN, timeout_s=60)
    config = SimulationConfig(**{"ratings": 24, "users": 4, "population": 10, "eval_every": 8, "eval_prompts": 6,
                                 "window": 8, "params": SamplingParams(max_tokens=8), "poll_every_s": 0.05,
                                 "log_every_s": 0.5} | config)
    simulation = Simulation(client, PREFERENCES[preference], config, train_prompts=train_prompts(),
                            eval_prompts=eval_prompts(), json_path=tmp_path / "run.json",
                            png_path=tmp_path / "run.png")
    return simulation, client


def test_a_short_run_stores_every_rating_with_its_version_and_writes_json_and_png(server, tmp_path):
    url, _, engine = server
    simulation, client = _simulation(url, tmp_path)

    async def run():
        async with client:
            return await simulation.run()

    record = asyncio.run(run())

    ratings = record["ratings"]
    assert len(ratings) == 24 and len({r["completion_id"] for r in ratings}) == 24
    assert {r["model"] for r in ratings} == {record["base_model"]} and record["base_model"] != "liveloop"
    assert all(r["status"] == 202 and r["rating"] in ("up", "down") and 0 < r["p_up"] < 1 for r in ratings)
    assert all(r["p_up"] == PREFERENCES["numbers"].p_up(r["text"]) for r in ratings)
    assert {r["user"] for r in ratings} <= {f"sim-{record['run_id']}-{i:04d}" for i in range(10)}
    with engine.connect() as connection:
        stored = dict(connection.execute(sa.select(Feedback.completion_id, Feedback.rating)).all())
        owners = dict(connection.execute(sa.select(Completion.id, Completion.user_id)).all())
    assert stored == {r["completion_id"]: r["rating"] for r in ratings}
    key_of_user = {(r["user"], owners[r["completion_id"]]) for r in ratings}
    assert len(key_of_user) == len({r["user"] for r in ratings})  # each simulated user keeps one key
    assert len({key for _, key in key_of_user}) > 1

    roles = [(e["role"], e["at_rating"]) for e in record["evals"]]
    assert roles[:2] == [("base", 0), ("live", 0)] and roles[-2:] == [("base", 24), ("live", 24)]
    assert [e["final"] for e in record["evals"]][-2:] == [True, True] and not record["evals"][0]["final"]
    assert any(role == "live" and 0 < at < 24 for role, at in roles)
    base = record["evals"][0]
    assert base["model"] == base["served"] == record["base_model"] and base["n"] == 6
    answers = record["eval_answers"][record["base_model"]]
    assert base["liked_share"] == pytest.approx(sum(a["p_up"] for a in answers) / 6)

    assert json.loads((tmp_path / "run.json").read_text())["ratings"] == ratings
    assert (tmp_path / "run.png").read_bytes()[:8] == PNG


def test_a_run_sees_a_promotion_and_evaluates_the_new_live_version_pinned(server, tmp_path, make_adapter_dir):
    url, registry, _ = server
    registry.register("v1", make_adapter_dir("v1", scale=0.05))
    registry.judge("v1", report={"passed": True, "gates": []}, failed=[])
    simulation, client = _simulation(url, tmp_path, preference="random", ratings=40, eval_every=30)

    async def promote_midway():
        while len(simulation.ratings) < 10:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(registry.promote, "v1", actor="test", reason="midway")

    async def run():
        async with client:
            return (await asyncio.gather(simulation.run(), promote_midway()))[0]

    record = asyncio.run(run())

    promotions = [e for e in record["events"] if e["kind"] == "promotion"]
    assert [(p["from"], p["to"]) for p in promotions] == [(None, "v1")] and 10 <= promotions[0]["at_rating"] < 40
    served = [r["model"] for r in record["ratings"]]
    assert served[0] == record["base_model"] and served[-1] == "v1"
    # base until the switch, v1 after: a rating is recorded when its user rates, so only the chats already under
    # way at the switch (one per user) may still be the base model's after the first v1
    assert served[served.index("v1"):].count(record["base_model"]) <= simulation.config.users
    final_live = [e for e in record["evals"] if e["role"] == "live"][-1]
    assert final_live["model"] == final_live["served"] == "v1" and final_live["at_rating"] == 40
    assert [v["name"] for v in record["versions"]] == ["v1"]
    assert {e["liked_share"] for e in record["evals"]} == {0.5}  # the random rater, whatever the answers


def _run(simulation: Simulation, client: LiveloopClient) -> dict:
    async def run():
        async with client:
            return await simulation.run()

    return asyncio.run(run())


def _ranking(comparison: dict) -> list[str]:
    preferred, ids = comparison["preferred"], comparison["completion_ids"]
    return [ids[preferred], ids[1 - preferred]]


def test_a_compare_run_ranks_the_two_answers_of_each_request_by_taste(server, tmp_path):
    url, _, engine = server
    simulation, client = _simulation(url, tmp_path, feedback=FeedbackMode.compare, ratings=12)

    record = _run(simulation, client)

    comparisons, taste = record["ratings"], PREFERENCES["numbers"]
    assert len(comparisons) == 12 and record["config"]["feedback"] == "compare"
    for c in comparisons:
        assert c["models"] == [record["base_model"]] * 2 and c["canary"] is None
        assert c["p_ups"] == [round(taste.p_up(text), 4) for text in c["texts"]]
        assert c["p_up"] == pytest.approx(sum(c["p_ups"]) / 2, abs=1e-4)  # the curve's scale: both answers
        assert c["p_first"] == pytest.approx(p_prefers(*c["p_ups"]), abs=1e-4) and c["preferred"] in (0, 1)
    with engine.connect() as connection:
        stored = {row.request_id: row.ranking for row in connection.execute(sa.select(ComparisonRow))}
        request_of = dict(connection.execute(sa.select(Completion.id, Completion.request_id)).all())
    assert stored == {c["request_id"]: _ranking(c) for c in comparisons}
    assert all(request_of[i] == c["request_id"] for c in comparisons for i in c["completion_ids"])
    assert record["canary_comparisons"] == []  # no canary: both answers came from the live version
    assert (tmp_path / "run.png").read_bytes()[:8] == PNG


def test_a_compare_run_pits_the_canary_against_live_for_every_user(make_settings, tiny_model_dir,
                                                                          make_adapter_dir, tmp_path):
    settings = make_settings(base_model=tiny_model_dir, adapter_poll_s=0.2, canary_fraction=0.5)
    engine = make_engine(settings.resolved_database_url)
    registry = Registry(make_sessionmaker(engine), open_artifact_store(settings))
    with running_server(settings) as url:
        for name in ("v1", "v2"):
            registry.register(name, make_adapter_dir(name, scale=0.05))
            registry.judge(name, report={"passed": True, "gates": []}, failed=[])
        registry.promote("v1", actor="test", reason="live")
        registry.start_canary("v2", actor="test", reason="canary")
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").json()["canary_version"] != "v2":
            assert time.monotonic() < deadline, "the replica never routed the canary"
            time.sleep(0.1)
        simulation, client = _simulation(url, tmp_path, api_keys=(), feedback=FeedbackMode.compare, ratings=16,
                                         population=20)
        record = _run(simulation, client)
    engine.dispose()

    mixed = [c for c in record["ratings"] if set(c["models"]) == {"v1", "v2"}]
    assert len(mixed) == len(record["ratings"]) == 16 and all(c["canary"] == "v2" for c in record["ratings"])
    [result] = record["canary_comparisons"]
    won = sum(c["models"][c["preferred"]] == "v2" for c in mixed)
    assert result == {"canary": "v2", "against": {"v1": len(mixed)}, "comparisons": len(mixed), "won": won,
                      "won_share": won / len(mixed)}


def test_evaluation_pins_the_model_it_names(server):
    url, registry, _ = server

    async def run():
        async with LiveloopClient(url, api_keys=USER_KEYS) as client:
            base = (await client.routing()).base_model
            return await evaluate(client, base, eval_prompts()[:4], PREFERENCES["concise"],
                                  params=SamplingParams(max_tokens=4), samples_per_prompt=2)

    result = asyncio.run(run())
    assert result.n == 8 and result.model == result.served
    assert [a.prompt_index for a in result.answers] == [0, 1, 2, 3] * 2
    assert result.liked_share == pytest.approx(sum(a.p_up for a in result.answers) / 8)



def test_curve_windows_are_means_over_whole_windows():
    assert windows([0.9, 0.1, 0.9, 0.5, 0.1], 2) == ([1.0, 3.0], [pytest.approx(0.5), pytest.approx(0.7)])


def test_cli_lists_the_preferences_and_refuses_an_unknown_one():
    runner = CliRunner()
    shown = runner.invoke(app, ["simulate", "--help"], terminal_width=200)
    assert shown.exit_code == 0 and all(name in shown.output for name in PREFERENCES)
    assert "--feedback" in shown.output and "compare" in shown.output
    refused = runner.invoke(app, ["simulate", "--preference", "sarcasm", "--url", "http://127.0.0.1:9"])
    assert refused.exit_code == 2 and "unknown preference" in refused.output
