"""``liveloop simulate``: simulated users with a hidden taste rate a running liveloop over HTTP; learning curves.

Also ``liveloop simulate-base-rates`` (every taste's liked share of one model's answers) and
``liveloop simulate-plot`` (redraw a run's PNG from its JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import typer

from liveloop.simulate.preferences import P_MET, P_MISS, PREFERENCES
from liveloop.simulate.run import FeedbackMode

app = typer.Typer()
log = logging.getLogger(__name__)

_TASTES = (f"P(up) is {P_MET} where the taste is met, {P_MISS} where not. "
           + " | ".join(f"{name}: {p.description.rstrip('.')}" for name, p in PREFERENCES.items()))
_DEFAULT_OUT = Path("var/simulate")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _preference(name: str):
    if name not in PREFERENCES:
        raise typer.BadParameter(f"unknown preference {name!r}; one of {', '.join(PREFERENCES)}")
    return PREFERENCES[name]


@app.command()
def simulate(
    preference: str = typer.Option(..., "--preference", "-p", help=f"The users' hidden taste. {_TASTES}."),
    ratings: int = typer.Option(2000, min=1, help="Stop after this many stored ratings (a comparison is one)."),
    feedback: FeedbackMode = typer.Option(FeedbackMode.thumbs, help=(
        "thumbs: one answer per chat, rated up or down. compare: two answers per chat (n = 2), the one preferred "
        "ranked first, picked by a Bradley-Terry link on the taste: P(a > b) = sigmoid(logit P(up|a) - "
        "logit P(up|b)).")),
    users: int = typer.Option(8, min=1, help="Concurrent users (each: one chat, then its rating)."),
    population: int = typer.Option(200, min=1, help="Distinct user ids the concurrent users take turns being "
                                                    "(the server picks the canary slice by user id)."),
    url: str = typer.Option("http://127.0.0.1:8000", help="The liveloop API."),
    api_key: list[str] = typer.Option([], help="An end-user API key, sent as 'Authorization: Bearer' (repeatable: "
                                              "with keys the server knows users by key, each user keeps one)."),
    admin_token: str = typer.Option(None, envvar="LIVELOOP_ADMIN_TOKEN",
                                    help="Optional: also record GET /admin/adapters at the end."),
    eval_every: int = typer.Option(250, min=1, help="Ratings between pinned evaluations of the live version."),
    eval_prompts: int = typer.Option(None, min=2, help="Evaluate on the first N evaluation prompts (default all)."),
    candidate: list[str] = typer.Option([], help="A version to evaluate at the end too (repeatable)."),
    window: int = typer.Option(50, min=1, help="Ratings per point of the liked-share curve."),
    max_tokens: int = typer.Option(48, min=1, help="max_tokens of every chat and evaluation."),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0, help="Sampling temperature of every request."),
    seed: int = typer.Option(0, help="Seeds the users' choices of prompts and their thumbs."),
    out: Path = typer.Option(None, help="The JSON record (default var/simulate/<preference>-<time>.json); "
                                        "the PNG is written beside it."),
) -> None:
    """Drive simulated users against a running liveloop and write the run as JSON and a PNG learning curve."""
    from datetime import UTC, datetime

    from liveloop.simulate.client import LiveloopClient, SamplingParams
    from liveloop.simulate.prompts import eval_prompts as load_eval_prompts
    from liveloop.simulate.prompts import train_prompts
    from liveloop.simulate.run import Simulation, SimulationConfig

    _logging()
    taste = _preference(preference)
    out = out or _DEFAULT_OUT / f"{preference}-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    config = SimulationConfig(ratings=ratings, feedback=feedback, users=users, population=population,
                              eval_every=eval_every, eval_prompts=eval_prompts, candidates=tuple(candidate),
                              window=window,
                              params=SamplingParams(max_tokens=max_tokens, temperature=temperature), seed=seed)

    async def main() -> dict:
        async with LiveloopClient(url, api_keys=api_key, admin_token=admin_token) as client:
            simulation = Simulation(client, taste, config, train_prompts=train_prompts(),
                                    eval_prompts=load_eval_prompts(), json_path=out, png_path=out.with_suffix(".png"))
            return await simulation.run()

    record = asyncio.run(main())
    for entry in (e for e in record["evals"] if e["final"]):
        typer.echo(f"{entry['role']:>9} {entry['model']}: liked {entry['liked_share']:.3f} ± {entry['stderr']:.3f}")
    typer.echo(f"{len(record['ratings'])} ratings; {out} and {out.with_suffix('.png')}")


@app.command("simulate-base-rates")
def simulate_base_rates(
    url: str = typer.Option("http://127.0.0.1:8000", help="The liveloop API."),
    model: str = typer.Option(None, help="The model to pin (default: the base model)."),
    api_key: str = typer.Option(None, help="An end-user API key, sent as 'Authorization: Bearer'."),
    samples: int = typer.Option(1, min=1, help="Answers per evaluation prompt."),
    max_tokens: int = typer.Option(48, min=1),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0),
    out: Path = typer.Option(None, help="Also write the answers and rates as JSON."),
) -> None:
    """Every taste's liked share (mean P(up) ± s.e.) of one model's answers to the evaluation prompts."""
    from liveloop.simulate.client import LiveloopClient, SamplingParams
    from liveloop.simulate.evaluate import evaluate, mean_and_stderr
    from liveloop.simulate.prompts import eval_prompts
    from liveloop.simulate.run import base_model_id

    _logging()
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)

    async def main():
        async with LiveloopClient(url, api_keys=[api_key] if api_key else []) as client:
            pinned = model or await base_model_id(client)
            return pinned, await evaluate(client, pinned, eval_prompts(), PREFERENCES["random"], params=params,
                                          samples_per_prompt=samples)

    pinned, result = asyncio.run(main())
    rates = {}
    for name, taste in PREFERENCES.items():
        liked, stderr = mean_and_stderr([taste.p_up(a.text) for a in result.answers])
        rates[name] = {"liked_share": liked, "stderr": stderr, "n": result.n}
        typer.echo(f"{name:>13}: {liked:.3f} ± {stderr:.3f}  (n {result.n}, {pinned}, max_tokens {max_tokens}, "
                   f"temperature {temperature})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": pinned, "max_tokens": max_tokens, "temperature": temperature,
                                   "rates": rates, "answers": [a.text for a in result.answers]}, indent=1))


@app.command("simulate-plot")
def simulate_plot(record: Path = typer.Argument(..., exists=True, help="A run's JSON record."),
                  png: Path = typer.Option(None, help="Default: beside the JSON.")) -> None:
    """Redraw a simulation run's learning curve from its JSON."""
    from liveloop.simulate.plot import plot_run

    png = png or record.with_suffix(".png")
    plot_run(json.loads(record.read_text()), png)
    typer.echo(str(png))
