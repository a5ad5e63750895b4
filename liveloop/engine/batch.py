"""The running batch as tensors: a KV cache that sequences join and leave between decode steps.

Rows are left-padded and right-aligned: column ``T - 1`` of the cache holds every row's latest token, so one decode
step appends one column for all rows. ``attention_mask`` marks the real (non-padding) columns and ``positions`` the
rotary position each row's next token gets, so a row's numbers do not depend on how much padding it carries.

Keys and values live in preallocated slabs with spare rows and columns; the cache is a view of them, rows
``[0, B)`` and columns ``[start, end)``. Nothing that happens every few steps copies the whole cache (at 32 rows
of 120 tokens in fp32 it is ~180 MB for SmolLM2-135M, as long to copy as a third of a decode step):
- a decode step writes one column in place;
- a leaving row is overwritten by the rows after it, each moving up one (a copy of those rows only);
- a joining batch (prefilled together, left-padded, logits for the last position only) is written into the
  spare rows, right-aligned to the running rows' latest column;
- leading columns that became padding in every row are trimmed by moving ``start``.
Only when a slab runs out of columns (every ``_SPARE_COLUMNS`` decode steps at most) or rows is it reallocated and
the cache copied once.

The only thing this module knows about requests is a list of token ids per row; which adapter a row uses comes in
as forward keyword arguments (peft's ``adapter_names``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from liveloop.engine.prefix_cache import Prefix

# Spare columns allocated past the current length: a slab is reallocated every this many decode steps at most.
_SPARE_COLUMNS = 64
# Any id works for padding: padded columns are masked out of attention and never sampled from.
_PAD_ID = 0


class _SlabLayer(DynamicLayer):
    """A cache layer whose keys/values (B, H, T, D) are the view ``[:rows, :, start:end]`` of larger buffers."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.rows, self.start, self.end = key_states.shape[0], 0, 0
        self._allocate(key_states.shape[0], key_states.shape[1], key_states.shape[-1], _SPARE_COLUMNS)
        self._view()
        self.is_initialized = True

    @classmethod
    def right_aligned(cls, rows: list[tuple[torch.Tensor, torch.Tensor] | None], width: int) -> _SlabLayer:
        """A layer ``width`` columns wide holding each row's keys and values (H, L, D) right-aligned: zeros before
        them, and in the rows given as None."""
        keys = next(row for row in rows if row is not None)[0]
        layer = cls()
        layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
        layer.rows, layer.start, layer.end = len(rows), 0, width
        layer._allocate(len(rows), keys.shape[0], keys.shape[-1], width + _SPARE_COLUMNS)
        layer._key_slab[:, :, :width] = 0
        layer._value_slab[:, :, :width] = 0
        for index, row in enumerate(rows):
            if row is not None:
                length = row[0].shape[-2]
                layer._key_slab[index, :, width - length:width] = row[0]
                layer._value_slab[index, :, width - length:width] = row[1]
        layer._view()
        return layer

    def _allocate(self, rows: int, heads: int, head_dim: int, columns: int) -> None:
        # Uninitialised: every column a view covers is written first, or zeroed where it is padding (a masked 0
        # attention weight times a garbage NaN would still be NaN).
        shape = (rows, heads, columns, head_dim)
        self._key_slab = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._value_slab = torch.empty(shape, dtype=self.dtype, device=self.device)

    def _view(self) -> None:
        self.keys = self._key_slab[:self.rows, :, self.start:self.end]
        self.values = self._value_slab[:self.rows, :, self.start:self.end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        columns = key_states.shape[-2]
        if self.end + columns > self._key_slab.shape[-2]:
            width = self.end - self.start
            self._relocate(self._key_slab.shape[0], start=0, columns=width + columns + _SPARE_COLUMNS)
        self._key_slab[:self.rows, :, self.end:self.end + columns] = key_states
        self._value_slab[:self.rows, :, self.end:self.end + columns] = value_states
        self.end += columns
        self._view()
        return self.keys, self.values

    def _relocate(self, rows: int, *, start: int, columns: int) -> None:
        """Copy the cache into new slabs of ``rows`` rows and ``columns`` columns, from column ``start`` on."""
        keys, values, width = self.keys, self.values, self.end - self.start
        self._allocate(rows, keys.shape[1], keys.shape[-1], columns)
        self._key_slab[:self.rows, :, start:start + width] = keys
        self._value_slab[:self.rows, :, start:start + width] = values
        self.start, self.end = start, start + width
        self._view()

    def move_row(self, source: int, dest: int) -> None:
        self._key_slab[dest, :, self.start:self.end] = self._key_slab[source, :, self.start:self.end]
        self._value_slab[dest, :, self.start:self.end] = self._value_slab[source, :, self.start:self.end]

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor, columns: int) -> None:
        """Add the rows of ``keys``/``values`` (N, H, L, D), right-aligned, making the cache ``columns`` wide
        (at least its width and L)."""
        new, length = keys.shape[0], keys.shape[-2]
        if self.rows + new > self._key_slab.shape[0] or self.end < columns:  # no room: copy once, room to spare
            rows = max(self.rows + new, 2 * self._key_slab.shape[0])
            self._relocate(rows, start=columns - (self.end - self.start), columns=columns + _SPARE_COLUMNS)
        start = self.end - columns
        if start < self.start:  # the columns revealed on the left are padding for the rows already here
            self._key_slab[:self.rows, :, start:self.start] = 0
            self._value_slab[:self.rows, :, start:self.start] = 0
            self.start = start
        rows = slice(self.rows, self.rows + new)
        self._key_slab[rows, :, self.start:self.end - length] = 0
        self._value_slab[rows, :, self.start:self.end - length] = 0
        self._key_slab[rows, :, self.end - length:self.end] = keys
        self._value_slab[rows, :, self.end - length:self.end] = values
        self.rows += new
        self._view()

    def keep_rows(self, rows: int, trim: int) -> None:
        """Keep the first ``rows`` rows and drop the first ``trim`` columns (bookkeeping only)."""
        self.rows, self.start = rows, self.start + trim
        self._view()


@dataclass
class DecodeBatch:
    """KV cache, attention mask and next positions of the sequences being decoded, one row each."""

    cache: Cache
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    positions: torch.Tensor  # (B,) long, the position of each row's next input token

    @property
    def size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model: PreTrainedModel, prompts: list[list[int]], prefixes: list[Prefix | None] | None = None,
                **forward_kwargs) -> tuple[DecodeBatch, torch.Tensor]:
        """Run the prompts as one left-padded batch; return the batch and the next-token logits (N, V).

        A row with a ``prefixes`` entry (``liveloop.engine.prefix_cache``: the keys and values of its prompt's
        first tokens) runs only the rest of its prompt: its row is [padding | prefix | padding | the rest]."""
        prefixes = prefixes or [None] * len(prompts)
        cached = [prefix.length if prefix else 0 for prefix in prefixes]
        rests = [prompt[length:] for prompt, length in zip(prompts, cached, strict=True)]
        width, length = max(cached), max(len(rest) for rest in rests)
        device = model.device
        input_ids = torch.tensor([[_PAD_ID] * (length - len(r)) + list(r) for r in rests], device=device)
        mask = torch.tensor([[0] * (width - c) + [1] * c + [0] * (length - len(r)) + [1] * len(r)
                             for c, r in zip(cached, rests, strict=True)], device=device)
        # (N, T): each token's position in its own prompt; padding gets 0, it is masked anyway
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, width:]
        cache = _prefix_cache(prefixes, width) if width else Cache(layer_class_to_replicate=_SlabLayer)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **forward_kwargs)
        return cls(cache, mask, mask.sum(-1)), out.logits[:, -1]

    def prefix(self, row: int, length: int) -> Prefix:
        """The keys and values of the first ``length`` tokens of ``row``, copied out (to keep in a prefix cache)."""
        columns = self.attention_mask[row].nonzero().squeeze(1)[:length]
        return Prefix(length, [(layer.keys[row][:, columns].clone(), layer.values[row][:, columns].clone())
                               for layer in self.cache.layers])

    @torch.inference_mode()
    def decode(self, model: PreTrainedModel, tokens: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        """Feed one token per row (B,), extend the cache in place; return the next-token logits (B, V)."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(self.size, 1)], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=self.attention_mask, position_ids=self.positions[:, None],
                    past_key_values=self.cache, use_cache=True, **forward_kwargs)
        self.positions = self.positions + 1
        return out.logits[:, -1]

    @torch.inference_mode()
    def merge(self, other: DecodeBatch) -> DecodeBatch:
        """Add ``other``'s rows after this batch's, right-aligned into its cache (in place); return this batch."""
        length = max(self.length, other.length)
        for layer, joining in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.append_rows(joining.keys, joining.values, length)
        self.attention_mask = torch.cat([_left_pad(self.attention_mask, length),
                                         _left_pad(other.attention_mask, length)])
        self.positions = torch.cat([self.positions, other.positions])
        return self

    @torch.inference_mode()
    def drop(self, rows: list[int]) -> list[int]:
        """Remove ``rows`` (not all of them) in place, the rows after each moving up, and trim columns that are
        padding in every row left; return the old index of each row now in the batch, in order (ascending: rows
        keep their order, so a generator shared by the rows hands out its draws as it always did)."""
        dropped = set(rows)
        order = [row for row in range(self.size) if row not in dropped]
        for dest, source in enumerate(order):
            if source != dest:
                for layer in self.cache.layers:
                    layer.move_row(source, dest)
        index = torch.tensor(order, device=self.attention_mask.device)
        mask = self.attention_mask[index]
        trim = int(mask.any(dim=0).int().argmax())  # leading columns now padding in every row
        for layer in self.cache.layers:
            layer.keep_rows(len(order), trim)
        self.attention_mask, self.positions = mask[:, trim:], self.positions[index]
        return order


def _prefix_cache(prefixes: list[Prefix | None], width: int) -> Cache:
    """A cache of ``width`` columns holding each row's prefix right-aligned (zeros before it, and in rows
    without one)."""
    layers = len(next(prefix for prefix in prefixes if prefix is not None).layers)
    return Cache(layers=[_SlabLayer.right_aligned([prefix.layers[index] if prefix else None for prefix in prefixes],
                                                  width) for index in range(layers)])


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))
