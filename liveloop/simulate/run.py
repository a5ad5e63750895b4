"""The simulation driver: N concurrent users chat with the live alias and rate each answer by their hidden taste
(a thumb), or ask for two answers and rank them (a comparison), while a monitor follows the routing (promotions,
canaries), logs progress and evaluates versions pinned.

Users are drawn from a population of ids larger than the number of concurrent users, so the server's canary
slice (a hash of the user id) holds some of them whatever its fraction. Each rating is recorded with the
version that served it, and the whole run is written as JSON (rewritten after every evaluation, so a long run
that stops early leaves its data) and drawn as a PNG.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import httpx

from liveloop.simulate.client import ALIAS, ApiError, LiveloopClient, Routing, SamplingParams
from liveloop.simulate.evaluate import Evaluation, evaluate
from liveloop.simulate.preferences import Preference, p_prefers

log = logging.getLogger(__name__)


class FeedbackMode(StrEnum):
    thumbs = "thumbs"  # one answer per chat, a thumb up or down
    compare = "compare"  # two answers per chat (n = 2), the preferred one ranked first


@dataclass(frozen=True)
class SimulationConfig:
    ratings: int = 2000  # the run ends after this many stored ratings (a comparison is one rating)
    feedback: FeedbackMode = FeedbackMode.thumbs
    users: int = 8  # concurrent users, each one chat then one rating at a time
    population: int = 200  # distinct user ids the concurrent users take turns being
    eval_every: int = 250  # ratings between pinned evaluations of the live version
    eval_prompts: int | None = None  # the first N evaluation prompts; None: all of them
    candidates: tuple[str, ...] = ()  # versions also evaluated at the end (and the canary, if any)
    window: int = 50  # ratings per point of the liked-share curve
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    log_every_s: float = 10.0
    poll_every_s: float = 2.0
    max_errors: int = 50  # failed chats or ratings before the run gives up


@dataclass
class Rating:
    index: int
    t: float  # seconds since the start of the run
    time: str
    user: str
    prompt_index: int
    completion_id: str
    model: str  # the version that served the answer
    p_up: float
    rating: str
    status: int
    latency_s: float
    finish_reason: str
    completion_tokens: int
    text: str


@dataclass
class Comparison:
    """One chat for two answers and the user's ranking of them; lists are in choice order."""

    index: int
    t: float  # seconds since the start of the run
    time: str
    user: str
    prompt_index: int
    request_id: str
    completion_ids: list[str]
    models: list[str]  # the version that produced each answer
    canary: str | None  # the canary at the time, as /readyz showed it
    p_ups: list[float]  # each answer's hidden P(up)
    p_up: float  # their mean: what was served, on the same scale as a thumbs run's answers
    p_first: float  # P(the first ≻ the second), the Bradley–Terry link
    preferred: int  # the choice the user ranked first
    status: int
    latency_s: float
    finish_reasons: list[str]
    completion_tokens: int  # of both answers
    texts: list[str]


class Simulation:
    def __init__(self, client: LiveloopClient, preference: Preference, config: SimulationConfig, *,
                 train_prompts: list[str], eval_prompts: list[str], json_path: Path, png_path: Path | None):
        self.client, self.preference, self.config = client, preference, config
        self.train_prompts = train_prompts
        self.eval_prompts = eval_prompts[: config.eval_prompts] if config.eval_prompts else eval_prompts
        self.json_path, self.png_path = json_path, png_path
        self.run_id = uuid.uuid4().hex[:8]
        self.ratings: list[Rating | Comparison] = []  # what the users gave, as config.feedback says
        self.evals: list[dict] = []
        self.events: list[dict] = []  # promotions and canary changes, as /readyz showed them
        self.errors: list[str] = []
        self.by_model: dict[str, Evaluation] = {}
        self.routing: Routing | None = None
        self.base_model = ""
        self.claimed = 0
        self.evaluation: asyncio.Task | None = None  # the periodic evaluation in flight
        self.versions: list[dict] | None = None  # GET /admin/adapters at the end, with an admin token
        self.started = self.users_started = time.monotonic()
        self.started_at = datetime.now(UTC).isoformat()

    async def run(self) -> dict:
        self.started, self.started_at = time.monotonic(), datetime.now(UTC).isoformat()
        self.routing = await self.client.routing()
        self.base_model = await base_model_id(self.client)
        log.info("simulating %d ratings by %d users who like %s answers; base %s, live %s, canary %s",
                 self.config.ratings, self.config.users, self.preference.name, self.base_model,
                 self.routing.live, self.routing.canary)
        await self._evaluate_live(at_rating=0)
        self.users_started = time.monotonic()
        users = [asyncio.create_task(self._user(i)) for i in range(self.config.users)]
        monitor = asyncio.create_task(self._monitor())
        try:
            await asyncio.gather(*users)
        finally:
            for task in users:
                task.cancel()
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        if self.evaluation is not None:
            await self.evaluation
        self._log_progress()
        await self._final_evaluations()
        record = self.record()
        self.save(record)
        return record

    # --- users ------------------------------------------------------------------------------------

    async def _user(self, worker: int) -> None:
        rng = random.Random(f"{self.config.seed}-{worker}")
        while self.claimed < self.config.ratings:
            self.claimed += 1
            try:
                self.ratings.append(await self._rate_one(rng))
            except ApiError as exc:
                self.claimed -= 1
                self.errors.append(str(exc))
                log.warning("user %d: %s", worker, exc)
                if len(self.errors) > self.config.max_errors:
                    raise RuntimeError(f"{len(self.errors)} failed requests; last: {exc}") from exc
                await asyncio.sleep(1.0)

    async def _rate_one(self, rng: random.Random) -> Rating | Comparison:
        user = f"sim-{self.run_id}-{rng.randrange(self.config.population):04d}"
        prompt_index = rng.randrange(len(self.train_prompts))
        if self.config.feedback == FeedbackMode.compare:
            return await self._compare(rng, user, prompt_index)
        return await self._thumb(rng, user, prompt_index)

    async def _thumb(self, rng: random.Random, user: str, prompt_index: int) -> Rating:
        sent = time.monotonic()
        reply = await self.client.chat(self.train_prompts[prompt_index], model=ALIAS, params=self.config.params,
                                       user=user)
        latency, answer = time.monotonic() - sent, reply.answers[0]
        p_up = self.preference.p_up(answer.text)
        rating = "up" if rng.random() < p_up else "down"
        await self.client.feedback(answer.completion_id, rating, feedback_id=f"sim-{answer.completion_id}", user=user)
        return Rating(len(self.ratings), round(time.monotonic() - self.started, 3), datetime.now(UTC).isoformat(),
                      user, prompt_index, answer.completion_id, answer.model, round(p_up, 4), rating, 202,
                      round(latency, 3), answer.finish_reason, reply.completion_tokens, answer.text)

    async def _compare(self, rng: random.Random, user: str, prompt_index: int) -> Comparison:
        canary = self.routing.canary if self.routing else None
        sent = time.monotonic()
        reply = await self.client.chat(self.train_prompts[prompt_index], model=ALIAS, params=self.config.params,
                                       user=user, n=2)
        latency, (first, second) = time.monotonic() - sent, reply.answers
        p_ups = [self.preference.p_up(first.text), self.preference.p_up(second.text)]
        p_first = p_prefers(*p_ups)
        preferred = 0 if rng.random() < p_first else 1
        ranking = [reply.answers[preferred].completion_id, reply.answers[1 - preferred].completion_id]
        await self.client.rank(ranking, feedback_id=f"sim-{reply.id}", user=user)
        return Comparison(len(self.ratings), round(time.monotonic() - self.started, 3), datetime.now(UTC).isoformat(),
                          user, prompt_index, reply.id, [first.completion_id, second.completion_id],
                          [first.model, second.model], canary, [round(p, 4) for p in p_ups],
                          round(sum(p_ups) / 2, 4), round(p_first, 4), preferred, 202, round(latency, 3),
                          [first.finish_reason, second.finish_reason], reply.completion_tokens,
                          [first.text, second.text])

    # --- monitor: routing, progress, evaluations ----------------------------------------------------

    async def _monitor(self) -> None:
        next_log, next_eval_at = 0.0, self.config.eval_every
        while True:
            await asyncio.sleep(self.config.poll_every_s)
            await self._poll_routing()
            if time.monotonic() >= next_log:
                self._log_progress()
                next_log = time.monotonic() + self.config.log_every_s
            done = len(self.ratings)
            if done >= next_eval_at and (self.evaluation is None or self.evaluation.done()):
                self.evaluation = asyncio.create_task(self._evaluate_live(at_rating=done))
                next_eval_at = (done // self.config.eval_every + 1) * self.config.eval_every

    async def _poll_routing(self) -> None:
        try:
            routing = await self.client.routing()
        except (ApiError, httpx.HTTPError) as exc:
            log.warning("/readyz: %s", exc)
            return
        previous = self.routing
        self.routing = routing
        if previous is None:
            return
        at = {"t": round(time.monotonic() - self.started, 3), "at_rating": len(self.ratings)}
        if routing.live != previous.live:
            self.events.append({"kind": "promotion", "from": previous.live, "to": routing.live, **at})
            log.info("promotion seen at rating %d: %s -> %s", len(self.ratings), previous.live, routing.live)
        if routing.canary != previous.canary:
            self.events.append({"kind": "canary", "from": previous.canary, "to": routing.canary, **at})
            log.info("canary at rating %d: %s", len(self.ratings), routing.canary)

    def _log_progress(self) -> None:
        done, elapsed = len(self.ratings), time.monotonic() - self.users_started
        recent = self.ratings[-self.config.window:]
        liked = sum(r.p_up for r in recent) / len(recent) if recent else float("nan")
        live = self.routing.live if self.routing else None
        log.info("ratings %d/%d (%.2f/s), liked (mean P(up)) %.2f over the last %d, live %s, canary %s, %d errors",
                 done, self.config.ratings, done / elapsed if elapsed else 0.0, liked, len(recent),
                 live or self.base_model, self.routing.canary if self.routing else None, len(self.errors))

    # --- pinned evaluations -----------------------------------------------------------------------

    async def _evaluate(self, model: str, role: str, at_rating: int, *, final: bool = False) -> None:
        """Evaluate ``model`` pinned (once per run: answers are seeded) and record it as ``role`` at a rating."""
        if model not in self.by_model:
            log.info("evaluating %s pinned on %d unseen prompts", model, len(self.eval_prompts))
            try:
                self.by_model[model] = await evaluate(self.client, model, self.eval_prompts, self.preference,
                                                      params=self.config.params, concurrency=self.config.users)
            except ApiError as exc:
                log.warning("could not evaluate %s: %s", model, exc)
                return
        result = self.by_model[model]
        entry = {"role": role, "at_rating": at_rating, "final": final,
                 "t": round(time.monotonic() - self.started, 3), **result.summary()}
        self.evals.append(entry)
        log.info("eval at rating %d: %s %s liked %.3f ± %.3f (n %d)", at_rating, role, model, result.liked_share,
                 result.stderr, result.n)

    async def _evaluate_live(self, at_rating: int) -> None:
        if at_rating == 0:
            await self._evaluate(self.base_model, "base", at_rating)
        live = self.routing.live if self.routing else None
        await self._evaluate(live or self.base_model, "live", at_rating)
        await asyncio.to_thread(self.save, self.record())  # drawing would stall the users for a second

    async def _final_evaluations(self) -> None:
        self.routing = await self.client.routing()
        at = len(self.ratings)
        await self._evaluate(self.base_model, "base", at, final=True)
        await self._evaluate(self.routing.live or self.base_model, "live", at, final=True)
        if self.routing.canary:
            await self._evaluate(self.routing.canary, "canary", at, final=True)
        newest = await newest_version(self.client)  # what the trainer has made of the ratings, promoted or not
        if newest not in (None, self.routing.live, self.routing.canary):
            await self._evaluate(newest, "newest", at, final=True)
        for name in self.config.candidates:
            await self._evaluate(name, "candidate", at, final=True)
        try:
            self.versions = await self.client.adapters()
        except ApiError as exc:
            log.warning("/admin/adapters: %s", exc)

    # --- output -----------------------------------------------------------------------------------

    def record(self) -> dict:
        return {
            "run_id": self.run_id, "started_at": self.started_at, "seconds": round(time.monotonic() - self.started, 1),
            "preference": {"name": self.preference.name, "description": self.preference.description},
            "config": asdict(self.config), "base_model": self.base_model,
            "eval_prompts": len(self.eval_prompts), "train_prompts": len(self.train_prompts),
            "ratings": [asdict(r) for r in self.ratings], "canary_comparisons": canary_comparisons(self.ratings),
            "evals": self.evals, "events": self.events,
            "eval_answers": {model: [asdict(a) for a in e.answers] for model, e in self.by_model.items()},
            "versions": self.versions, "errors": self.errors,
        }

    def save(self, record: dict) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(record, indent=1))
        if self.png_path is not None:
            from liveloop.simulate.plot import plot_run

            plot_run(record, self.png_path)


def canary_comparisons(ratings: list[Rating | Comparison]) -> list[dict]:
    """Per canary, the comparisons of its answer against another version's (live's) and how many it won: the
    users' own A/B test of the canary, besides the server's. Thumbs runs have none."""
    results: dict[str, dict] = {}
    for c in ratings:
        if isinstance(c, Comparison) and c.canary in c.models and len(set(c.models)) == 2:
            result = results.setdefault(c.canary, {"canary": c.canary, "against": {}, "comparisons": 0, "won": 0})
            result["comparisons"] += 1
            result["won"] += c.models[c.preferred] == c.canary
            other = c.models[1 - c.models.index(c.canary)]
            result["against"][other] = result["against"].get(other, 0) + 1
    return [r | {"won_share": r["won"] / r["comparisons"]} for r in results.values()]


async def newest_version(client: LiveloopClient) -> str | None:
    """The most recently created adapter version serving has loaded (it loads the newest approved one ahead)."""
    cards = [card for card in await client.models() if card.get("version") is not None]
    return max(cards, key=lambda card: card["created"])["id"] if cards else None


async def base_model_id(client: LiveloopClient) -> str:
    """The base model's id: the card of ``/v1/models`` that is neither the alias nor an adapter version."""
    for card in await client.models():
        if card["id"] != ALIAS and card.get("version") is None:
            return card["id"]
    raise ApiError(500, "/v1/models lists no base model")
