"""The running batch as tensors: a KV cache that sequences join and leave between decode steps.

Rows are left-padded and right-aligned: column ``T - 1`` of the cache holds every row's latest token, so one decode
step appends one column for all rows. ``attention_mask`` marks the real (non-padding) columns and ``positions`` the
rotary position each row's next token gets, so a row's numbers do not depend on how much padding it carries.

New rows are prefilled together (left-padded, logits for the last position only) and then merged in: both caches
are right-aligned into one. Leaving rows are dropped by copying the kept rows, and leading columns that are
padding for every kept row are trimmed in the same copy. Keys and values live in preallocated slabs with spare
columns, so a decode step writes in place instead of re-concatenating the whole cache (``DynamicCache`` does).

The only thing this module knows about requests is a list of token ids per row; which adapter a row uses comes in
as forward keyword arguments (peft's ``adapter_names``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

# Spare columns allocated past the current length: a slab is reallocated every this many decode steps at most.
_SPARE_COLUMNS = 64
# Any id works for padding: padded columns are masked out of attention and never sampled from.
_PAD_ID = 0


class _SlabLayer(DynamicLayer):
    """A cache layer whose keys/values (B, H, T, D) are views into a larger preallocated buffer."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._allocate(key_states.shape[0], key_states.shape[1], key_states.shape[-1], capacity=_SPARE_COLUMNS)
        self.is_initialized = True

    def _allocate(self, rows: int, heads: int, head_dim: int, capacity: int) -> None:
        # Uninitialised: every column is written before a view covers it (``_fill`` zeroes the padding it adds).
        shape = (rows, heads, capacity, head_dim)
        self._key_slab = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._value_slab = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.keys, self.values = self._key_slab[:, :, :0], self._value_slab[:, :, :0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._key_slab.shape[-2]:
            self._fill([(self.keys, self.values)], capacity=end + _SPARE_COLUMNS)
        self._key_slab[:, :, start:end] = key_states
        self._value_slab[:, :, start:end] = value_states
        self.keys, self.values = self._key_slab[:, :, :end], self._value_slab[:, :, :end]
        return self.keys, self.values

    def _fill(self, parts: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> None:
        """Reallocate and copy ``parts`` (each (B_i, H, T_i, D)) stacked on rows, right-aligned to the longest."""
        length = max(keys.shape[-2] for keys, _ in parts)
        first = parts[0][0]
        self._allocate(sum(keys.shape[0] for keys, _ in parts), first.shape[1], first.shape[-1], capacity)
        row = 0
        for keys, values in parts:
            rows, offset = keys.shape[0], length - keys.shape[-2]
            self._key_slab[row:row + rows, :, offset:length] = keys
            self._value_slab[row:row + rows, :, offset:length] = values
            # masked out of attention, but a masked 0 weight times a garbage NaN would still be NaN
            self._key_slab[row:row + rows, :, :offset] = 0
            self._value_slab[row:row + rows, :, :offset] = 0
            row += rows
        self.keys, self.values = self._key_slab[:, :, :length], self._value_slab[:, :, :length]

    @classmethod
    def stacked(cls, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> _SlabLayer:
        layer = cls()
        layer.dtype, layer.device, layer.is_initialized = parts[0][0].dtype, parts[0][0].device, True
        layer._fill(parts, capacity=max(keys.shape[-2] for keys, _ in parts) + _SPARE_COLUMNS)
        return layer


def _new_cache(layers: list[_SlabLayer] | None = None) -> Cache:
    if layers is None:
        return Cache(layer_class_to_replicate=_SlabLayer)
    return Cache(layers=layers)


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
    def prefill(cls, model: PreTrainedModel, prompts: list[list[int]],
                **forward_kwargs) -> tuple[DecodeBatch, torch.Tensor]:
        """Run the prompts as one left-padded batch; return the batch and the next-token logits (N, V)."""
        length = max(len(p) for p in prompts)
        device = model.device
        input_ids = torch.tensor([[_PAD_ID] * (length - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, T); padding gets 0, it is masked anyway
        cache = _new_cache()
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **forward_kwargs)
        return cls(cache, mask, mask.sum(-1)), out.logits[:, -1]

    @torch.inference_mode()
    def decode(self, model: PreTrainedModel, tokens: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        """Feed one token per row (B,), extend the cache in place; return the next-token logits (B, V)."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(self.size, 1)], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=self.attention_mask, position_ids=self.positions[:, None],
                    past_key_values=self.cache, use_cache=True, **forward_kwargs)
        self.positions = self.positions + 1
        return out.logits[:, -1]

    def merge(self, other: DecodeBatch) -> DecodeBatch:
        """This batch's rows followed by ``other``'s, right-aligned into one cache."""
        length = max(self.length, other.length)
        layers = [_SlabLayer.stacked([(a.keys, a.values), (b.keys, b.values)])
                  for a, b in zip(self.cache.layers, other.cache.layers, strict=True)]
        mask = torch.cat([_left_pad(self.attention_mask, length), _left_pad(other.attention_mask, length)])
        return DecodeBatch(_new_cache(layers), mask, torch.cat([self.positions, other.positions]))

    def select(self, rows: list[int]) -> DecodeBatch:
        """Keep only ``rows`` (non-empty, in that order), dropping columns that are padding in all of them."""
        index = torch.tensor(rows, device=self.attention_mask.device)
        mask = self.attention_mask[index]
        start = int(mask.any(dim=0).int().argmax())
        layers = [_SlabLayer.stacked([(layer.keys[index, :, start:], layer.values[index, :, start:])])
                  for layer in self.cache.layers]
        return DecodeBatch(_new_cache(layers), mask[:, start:], self.positions[index])


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))
