"""The simulated users' side of the wire: liveloop's HTTP API, nothing else (chat, feedback, models, readiness,
and the admin adapter list when a token is given)."""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

ALIAS = "liveloop"


@dataclass(frozen=True)
class SamplingParams:
    """What every simulated chat and every evaluation asks for. Short answers keep a 2,000-rating run within
    an hour on a 2-core CPU; 0.7 keeps the small model coherent while leaving it room to vary."""

    max_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 1.0


@dataclass(frozen=True)
class Answer:
    """One choice of a chat response."""

    completion_id: str  # what a rating or a ranking names
    text: str
    model: str  # the version that produced it (the choice's `model`)
    finish_reason: str


@dataclass(frozen=True)
class Reply:
    id: str  # the request's id: with n = 2, what its two choices share
    answers: list[Answer]  # in choice order
    completion_tokens: int  # of all the answers


@dataclass(frozen=True)
class Routing:
    base_model: str
    live: str | None  # None: the base model is live
    canary: str | None


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class LiveloopClient:
    """One HTTP connection pool to a liveloop API; every call is a coroutine.

    With API keys configured the server knows a user by its key, so each simulated user chats and rates with
    one key of ``api_keys``, the same every time (a stable hash of its id); unnamed requests use the first.
    """

    def __init__(self, base_url: str, *, api_keys: list[str] | tuple[str, ...] = (), admin_token: str | None = None,
                 timeout_s: float = 600.0, max_retries: int = 20):
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        self.api_keys, self.admin_token, self.max_retries = list(api_keys), admin_token, max_retries

    def _auth(self, user: str | None) -> dict[str, str]:
        if not self.api_keys:
            return {}
        key = self.api_keys[zlib.crc32(user.encode()) % len(self.api_keys)] if user else self.api_keys[0]
        return {"Authorization": f"Bearer {key}"}

    async def __aenter__(self) -> LiveloopClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def chat(self, prompt: str, *, model: str, params: SamplingParams, user: str | None = None,
                   seed: int | None = None, n: int = 1) -> Reply:
        """One chat request for ``n`` answers (1, or 2 to compare)."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "n": n}
        if user is not None:
            body["user"] = user
        if seed is not None:
            body["seed"] = seed
        data = await self._post("/v1/chat/completions", body, expect=200, user=user)
        answers = [Answer(choice["completion_id"], choice["message"]["content"], choice["model"],
                          choice["finish_reason"]) for choice in sorted(data["choices"], key=lambda c: c["index"])]
        return Reply(data["id"], answers, data["usage"]["completion_tokens"])

    async def feedback(self, completion_id: str, rating: str, *, feedback_id: str, user: str | None = None) -> dict:
        """Rate a completion, as the ``user`` who received it."""
        return await self._post("/v1/feedback", {"completion_id": completion_id, "rating": rating,
                                                 "feedback_id": feedback_id}, expect=202, user=user)

    async def rank(self, ranking: list[str], *, feedback_id: str, user: str | None = None) -> dict:
        """Compare the answers of one request: their completion ids, the preferred first."""
        return await self._post("/v1/feedback", {"ranking": ranking, "feedback_id": feedback_id}, expect=202,
                                user=user)

    async def routing(self) -> Routing:
        ready = await self._get("/readyz")
        return Routing(ready["model"], ready["live_version"], ready["canary_version"])

    async def models(self) -> list[dict]:
        return (await self._get("/v1/models", headers=self._auth(None)))["data"]

    async def adapters(self) -> list[dict] | None:
        """The registry's policy versions (``GET /admin/adapters``); None without an admin token."""
        if self.admin_token is None:
            return None
        data = await self._get("/admin/adapters", headers={"Authorization": f"Bearer {self.admin_token}"})
        return data["data"]

    async def _get(self, path: str, headers: dict | None = None) -> dict:
        response = await self.http.get(path, headers=headers)
        if response.status_code != 200:
            raise ApiError(response.status_code, response.text)
        return response.json()

    async def _post(self, path: str, body: dict, *, expect: int, user: str | None) -> dict:
        """POST, waiting out 429s (``Retry-After``) and dropped connections; any other status raises."""
        for attempt in range(self.max_retries):
            try:
                response = await self.http.post(path, json=body, headers=self._auth(user))
            except httpx.TransportError as exc:
                log.warning("%s failed (%s); retrying", path, type(exc).__name__)
                await asyncio.sleep(min(2**attempt, 10))
                continue
            if response.status_code == expect:
                return response.json()
            if response.status_code != 429:
                raise ApiError(response.status_code, response.text)
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
        raise ApiError(503, f"{path}: gave up after {self.max_retries} attempts")
