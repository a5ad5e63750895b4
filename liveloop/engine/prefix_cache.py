"""The keys and values of prompt prefixes many prompts share (a chat template's system prompt), kept so that a
prompt starting with one is prefilled from its end: vLLM's automatic prefix caching, in small.

Prompts are cut into blocks of ``block`` tokens. Every whole-block prefix of a prefilled prompt is counted; one
seen a second time is kept (its keys and values copied out of the prefill), so prompts that share nothing with
others cost nothing here. A prefix is looked up by the adapter the row's forward runs under and its tokens; at
least one token of a prompt is always prefilled, for the logits of its first new token. At most ``capacity``
prefixes are kept, the least recently used going first.

A prefix's keys and values are those of the weights its adapter name ran under: ``clear`` when those change (a
version merged into the base weights, a slot refilled with another version). Serving does that through
``weights_epoch``, a counter its adapter table advances on every such change, checked before each lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prefix:
    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: keys, values (H, length, D)


class PrefixCache:
    def __init__(self, *, capacity: int = 32, block: int = 8, weights_epoch: Callable[[], int] = lambda: 0):
        self.capacity, self.block, self.weights_epoch = capacity, block, weights_epoch
        self._epoch = weights_epoch()
        self._kept: OrderedDict[tuple, Prefix] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()  # prefixes met once, most recent last
        self.queried_tokens = self.hit_tokens = 0  # for the hit rate

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        self._kept.clear()
        self._seen.clear()

    def lookup(self, adapter: str, prompt: Sequence[int]) -> Prefix | None:
        """The longest kept prefix of ``prompt`` for ``adapter`` that leaves at least one token to prefill."""
        if self.weights_epoch() != self._epoch:
            self.clear()
            self._epoch = self.weights_epoch()
        self.queried_tokens += len(prompt)
        for blocks in range((len(prompt) - 1) // self.block, 0, -1):
            key = (adapter, tuple(prompt[:blocks * self.block]))
            if key in self._kept:
                self._kept.move_to_end(key)
                self.hit_tokens += blocks * self.block
                return self._kept[key]
        return None

    def worth_keeping(self, adapter: str, prompt: Sequence[int], cached: int) -> int:
        """Count ``prompt``'s whole-block prefixes as seen; the length of the longest one met before and longer
        than ``cached`` (what the prompt was prefilled from), or 0."""
        found = 0
        for blocks in range((len(prompt) - 1) // self.block, 0, -1):
            length = blocks * self.block
            key = (adapter, tuple(prompt[:length]))
            if key in self._seen:
                self._seen.move_to_end(key)
                if not found and length > cached and key not in self._kept:
                    found = length
            else:
                self._seen[key] = None
        while len(self._seen) > 64 * self.capacity:
            self._seen.popitem(last=False)
        return found

    def keep(self, adapter: str, prompt: Sequence[int], prefix: Prefix) -> None:
        self._kept[(adapter, tuple(prompt[:prefix.length]))] = prefix
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
