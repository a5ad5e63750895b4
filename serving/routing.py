"""Which model version a request is served by.

The ``model`` field of a request names the alias (the live version, or the canary for users in the canary
slice), the base model's id, or one specific loaded adapter version. This object owns the routing; the engine
only knows loaded adapter names, and ``serving.hotswap`` keeps both in step with the registry.

The routing is one immutable snapshot replaced by a single reference assignment, so a request resolves against
either the old or the new routing, never a mix; once resolved, the engine pins the version to the request, so
it finishes on the version it started with.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

from liveloop.promotion import in_canary
from serving.errors import ModelNotFound
from serving.protocol import ModelCard


@dataclass(frozen=True)
class Resolved:
    adapter: str | None  # the engine's adapter name; None means the base model with adapters off
    served_name: str  # what the response's `model` field says


@dataclass(frozen=True)
class _Routing:
    live: str | None = None  # None: the base model
    canary: str | None = None
    previous: str | None = None  # the live version before the last switch, kept loaded for a rollback
    loaded: frozenset[str] = frozenset()  # versions servable by name
    live_since: float = field(default_factory=time.time)  # when ``live`` became live here (Unix time)


class AdapterSet:
    def __init__(self, *, base_model_id: str, alias: str, canary_fraction: float = 0.0):
        self.base_model_id, self.alias, self.canary_fraction = base_model_id, alias, canary_fraction
        self._routing = _Routing()
        self._since: dict[str, float] = {}  # loaded version → when it became servable
        self.refused: dict[str, str] = {}  # version → why this replica could not load it (shown by /readyz)
        self._created = int(time.time())

    @property
    def live(self) -> str | None:
        return self._routing.live

    @property
    def canary(self) -> str | None:
        return self._routing.canary

    @property
    def previous(self) -> str | None:
        return self._routing.previous

    @property
    def live_since(self) -> float:
        return self._routing.live_since

    def add_version(self, name: str) -> None:
        self._since.setdefault(name, time.time())
        self._routing = replace(self._routing, loaded=self._routing.loaded | {name})
        self.refused.pop(name, None)

    def remove_version(self, name: str) -> None:
        routing = self._routing
        if name in (routing.live, routing.canary):
            raise ValueError(f"version {name!r} is routed to; switch away from it first")
        self._routing = replace(routing, loaded=routing.loaded - {name},
                                previous=None if routing.previous == name else routing.previous)
        self._since.pop(name, None)

    def switch(self, *, live: str | None, canary: str | None) -> None:
        """Route the alias to ``live`` (None: the base model) and the canary slice to ``canary``, atomically."""
        routing = self._routing
        for name in (live, canary):
            if name is not None and name not in routing.loaded:
                raise KeyError(f"version {name!r} is not loaded")
        if live == routing.live:
            self._routing = replace(routing, canary=canary)
        else:
            self._routing = replace(routing, live=live, canary=canary, previous=routing.live, live_since=time.time())

    def set_live(self, name: str | None) -> None:
        self.switch(live=name, canary=self.canary)

    def resolve(self, model: str, identity: str | None = None) -> Resolved:
        """What serves ``model``. Only the alias is routed by ``identity`` (the caller's API-key identity, or the
        request's ``user`` on an open API; None never gets the canary): a request that names a version or the
        base model is pinned to it, and the canary and rollback statistics leave it out."""
        return self._resolve(self._routing, model, identity)

    def resolve_choices(self, model: str, identity: str | None, n: int, coin: random.Random) -> list[Resolved]:
        """What serves each of ``n`` choices. While a canary runs, the two choices of an alias request are the
        live version and the canary, in the order ``coin`` draws, whoever asks: every comparison is then a paired
        vote between them, which halves the ratings a canary decision needs (bench/canary.py; pairing only the
        canary's slice of users needed as many as thumbs), and a user sees the canary only beside a live answer.
        Otherwise every choice is served by what ``resolve`` picks."""
        routing = self._routing  # one read: the whole resolution sees one routing
        resolved = self._resolve(routing, model, identity)
        if n != 2 or model != self.alias or routing.canary is None:
            return [resolved] * n
        pair = [Resolved(routing.live, routing.live or self.base_model_id), Resolved(routing.canary, routing.canary)]
        coin.shuffle(pair)
        return pair

    def _resolve(self, routing: _Routing, model: str, identity: str | None) -> Resolved:
        if model == self.alias:
            chosen = routing.live
            if routing.canary is not None and in_canary(identity, routing.canary, self.canary_fraction):
                chosen = routing.canary
            return Resolved(chosen, chosen or self.base_model_id)
        if model == self.base_model_id:
            return Resolved(None, self.base_model_id)
        if model in routing.loaded:
            return Resolved(model, model)
        raise ModelNotFound(f"The model '{model}' does not exist; GET /v1/models lists the servable ones.",
                            param="model")

    def model_cards(self) -> list[ModelCard]:
        routing = self._routing
        cards = [ModelCard(id=self.alias, created=self._created, state="live", version=routing.live),
                 ModelCard(id=self.base_model_id, created=self._created,
                           state="live" if routing.live is None else "base")]
        cards += [ModelCard(id=name, created=int(self._since.get(name, self._created)), version=name,
                            state=_card_state(name, routing)) for name in sorted(routing.loaded)]
        return cards


def _card_state(name: str, routing: _Routing) -> str:
    return {routing.live: "live", routing.canary: "canary", routing.previous: "previous"}.get(name, "loaded")
