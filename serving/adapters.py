"""Which model version a request is served by.

The ``model`` field of a request names the alias (always the live version), the base model's id, or one
specific adapter version. This object owns the live pointer; the engine only knows loaded adapter names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from serving.errors import ModelNotFound
from serving.protocol import ModelCard


@dataclass(frozen=True)
class Resolved:
    adapter: str | None  # the engine's adapter name; None means the base model with adapters off
    served_name: str  # what the response's `model` field says


class AdapterSet:
    def __init__(self, *, base_model_id: str, alias: str):
        self.base_model_id = base_model_id
        self.alias = alias
        self.live: str | None = None
        self._versions: dict[str, float] = {}  # loaded version name → when it became servable
        self._created = int(time.time())

    def add_version(self, name: str) -> None:
        self._versions.setdefault(name, time.time())

    def set_live(self, name: str | None) -> None:
        if name is not None and name not in self._versions:
            raise KeyError(f"version {name!r} is not loaded")
        self.live = name  # one reference assignment: a request sees either the old or the new pointer

    def resolve(self, model: str, user: str | None = None) -> Resolved:
        if model == self.alias:
            live = self.live
            return Resolved(live, live or self.base_model_id)
        if model == self.base_model_id:
            return Resolved(None, self.base_model_id)
        if model in self._versions:
            return Resolved(model, model)
        raise ModelNotFound(f"The model '{model}' does not exist; GET /v1/models lists the servable ones.",
                            param="model")

    def model_cards(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.alias, created=self._created, state="live", version=self.live),
                 ModelCard(id=self.base_model_id, created=self._created,
                           state="live" if self.live is None else "base")]
        cards += [ModelCard(id=name, created=int(since), state="live" if name == self.live else "loaded",
                            version=name) for name, since in self._versions.items()]
        return cards
