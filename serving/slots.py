"""Adapter slots: the LoRA adapters of the serving model, reused by one adapter version after another, and the
one version merged into the base weights.

Loading a version into a new peft adapter (``add_adapter``) walks and changes the whole model: 0.4–1 s of Python
for SmolLM2's 210 LoRA layers, more as adapters accumulate, and it must not overlap a forward pass, so it would
stall decoding for that long on the engine thread. Copying weights into an adapter that already exists takes a
few milliseconds and touches nothing else. So a loaded version occupies a *slot* (a peft adapter named
``slot<N>``); when the version is unloaded its slot goes back to the free pool, and the next version with the
same LoRA config is copied into it.

Merging. Most rows run the live version, and an unmerged LoRA costs them decode speed (peft's mixed batch
gathers each adapter's rows and runs two small matmuls per projection: bench/serving.py). So the live version
M is merged into the base weights, W = W₀ + ΔM, and its rows run with no adapter at all. Every other row must
still see W₀ + its own ΔV (the base: ΔV = 0), so a slot has twice the version's rank and holds ΔV − ΔM: its
first half the version's (A, s·B), its second half (A_M, −s_M·B_M); a ``negative`` slot holds −ΔM alone, for
the base's rows. ``forward_names`` maps a row's slot to the adapter its forward uses: M's slot to none, the base
to ``negative``. W₀ is kept (``_pristine``), so W is always W₀ + ΔM computed afresh, never drifting over swaps;
that copy is the price of merging in memory (the adapted projections once more).

Threads: ``create``, ``ensure_spare`` and ``merge`` change the model and run on the engine thread, between
forward passes. ``take``, ``release`` and ``fill`` may run on any thread: a free slot is one no request is
pinned to, so no forward pass reads it while it is filled.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer

from liveloop.adapter_artifacts import AdapterArtifactError
from liveloop.sampling import BASE_ADAPTER

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot:
    name: str  # the peft adapter name, what a forward's ``adapter_names`` selects
    config: PeftConfig  # the config of the versions it holds (its peft adapter has twice their rank)
    layers: dict[str, LoraLayer] = field(repr=False)  # the LoRA layers by module name (as peft saves them)

    def halves(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The version's half and the merged version's half of the weight saved under ``key``."""
        module, _, kind = key.removesuffix(".weight").rpartition(".")
        layer = self.layers[module]
        if kind == "lora_A":  # (2r, in): rows
            weight = layer.lora_A[self.name].weight
            return weight[:self.config.r], weight[self.config.r:]
        weight = layer.lora_B[self.name].weight  # (out, 2r): columns
        return weight[:, :self.config.r], weight[:, self.config.r:]


class SlotPool:
    """Every slot of ``base`` (wrapped in a PeftModel at the first ``create``), which of them are free, and the
    merged version."""

    def __init__(self, base: torch.nn.Module):
        self.base = base
        self.peft: PeftModel | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._free: list[Slot] = []
        self._slots: list[Slot] = []  # every slot, free or not
        self.merged: Slot | None = None  # the slot whose version is merged into the base weights
        self._negative: Slot | None = None  # −ΔM in its second half, for the base's rows while M is merged
        self._pristine: dict[str, torch.Tensor] = {}  # W₀ of each adapted projection, kept from the first merge
        self._lora_layers: list[LoraLayer] = []  # every LoRA layer of the model, whatever slots it holds
        self.weights_epoch = 0  # advances whenever what some adapter name computes changes (a fill, a merge)
        # a row's slot (None: the base) → the adapter its forward runs under; read by the model runner
        self.forward_names: dict[str | None, str] = {}

    def take(self, config: PeftConfig) -> Slot | None:
        """A free slot of ``config``, now reserved for the caller; None when there is none."""
        with self._lock:
            for slot in self._free:
                if slot.config == config:
                    self._free.remove(slot)
                    return slot
        return None

    def release(self, slot: Slot) -> None:
        """``slot`` is free again: no request is pinned to the version it held."""
        with self._lock:
            self._free.append(slot)

    def has_free(self, config: PeftConfig) -> bool:
        with self._lock:
            return any(slot.config == config for slot in self._free)

    def fill(self, slot: Slot, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a version's weights into ``slot`` (taken, so no forward reads it), or raise AdapterArtifactError
        when they don't fit its config."""
        keys = {f"{module}.{kind}.weight" for module in slot.layers for kind in ("lora_A", "lora_B")}
        if tensors.keys() != keys:
            odd = sorted(tensors.keys() ^ keys)
            raise AdapterArtifactError(f"the weights do not match their adapter config ({len(odd)} keys differ, "
                                       f"e.g. {odd[0]})")
        for key in keys:
            own, _ = slot.halves(key)
            if tensors[key].shape != own.shape:
                raise AdapterArtifactError(f"{key} has shape {tuple(tensors[key].shape)}, its config "
                                           f"{tuple(own.shape)}")
        scaling = _scaling(slot.config)
        with torch.no_grad(), self._lock:  # the lock: the merged half is not rewritten meanwhile
            for key in keys:
                own, merged = slot.halves(key)
                own.copy_(tensors[key] * (scaling if key.endswith("lora_B.weight") else 1))
                merged.copy_(self._negative_half(key))
            self.weights_epoch += 1

    def create(self, config: PeftConfig) -> Slot:
        """A new slot of ``config``, reserved for the caller (engine thread). Free slots of other configs are
        deleted, so that those of a config the trainer no longer uses do not hold memory for good; a version of
        another config than the merged one's unmerges it."""
        if self.merged is not None and self.merged.config != config:
            self.merge(None)
        slot = self._add_adapter(config)
        with self._lock:
            stale = [slot for slot in self._free if slot.config != config]
            self._free = [slot for slot in self._free if slot.config == config]
            self._slots = [slot for slot in self._slots if slot not in stale] + [slot]
        for stale_slot in stale:
            self.peft.delete_adapter(stale_slot.name)
        if self._negative is not None and self._negative.config != config:
            self.peft.delete_adapter(self._negative.name)
            self._negative = None
        return slot

    def ensure_spare(self, config: PeftConfig) -> None:
        """Keep a free slot of ``config`` ready (engine thread), so the next version loads without waiting for the
        engine: unless one came free meanwhile, create it now, between decode steps, off the swap path."""
        if not self.has_free(config):
            self.release(self.create(config))

    def merge(self, slot: Slot | None) -> None:
        """Merge ``slot``'s version into the base weights (None: serve W₀ again); engine thread, between forward
        passes. Only a version whose config every slot shares can be merged; otherwise nothing is."""
        if slot is not None and any(other.config != slot.config for other in self._slots):
            log.info("not merging %s: versions of another LoRA config are loaded", slot.name)
            slot = None
        if slot is self.merged:
            return
        if slot is not None and self._negative is None:  # its own half stays zero: the base adds nothing
            self._negative = self._add_adapter(slot.config)
        with torch.no_grad(), self._lock:
            layers = slot.layers if slot is not None else self.merged.layers
            for module, layer in layers.items():
                weight = layer.get_base_layer().weight
                pristine = self._pristine.setdefault(module, weight.detach().clone())
                if slot is None:
                    weight.copy_(pristine)
                else:
                    a, _ = slot.halves(f"{module}.lora_A.weight")
                    b, _ = slot.halves(f"{module}.lora_B.weight")
                    weight.copy_(torch.addmm(pristine.float(), b.float(), a.float()))
            self.merged = slot
            for each in [*self._slots, *([self._negative] if self._negative else [])]:
                for key in (f"{module}.{kind}.weight" for module in each.layers for kind in ("lora_A", "lora_B")):
                    each.halves(key)[1].copy_(self._negative_half(key))
            self.weights_epoch += 1
            self.forward_names.clear()
            if slot is not None:
                self.forward_names.update({slot.name: BASE_ADAPTER, None: self._negative.name})

    @contextmanager
    def adapters_off(self) -> Iterator[torch.nn.Module]:
        """The model with every LoRA layer running its base layer alone, for a batch in which no row uses an
        adapter (engine thread, around one forward pass). PeftModel's forward with ``adapter_names`` registers and
        removes a hook on each of the 210 LoRA layers per forward, ~10 % of a decode step at 32 rows; its
        ``disable_adapter()`` walks the model twice and resets requires_grad. This flips each layer's own switch
        (peft's ``BaseTunerLayer._disable_adapters``) and calls the wrapped model directly."""
        for layer in self._lora_layers:
            layer._disable_adapters = True
        try:
            yield self.peft.get_base_model()
        finally:
            for layer in self._lora_layers:
                layer._disable_adapters = False

    def _negative_half(self, key: str) -> torch.Tensor:
        """What the second half of a slot holds under ``key``: the merged version's (A, −s·B), or zeros."""
        if self.merged is None:
            return torch.zeros(())
        own, _ = self.merged.halves(key)
        return own if key.endswith("lora_A.weight") else -own

    def _add_adapter(self, config: PeftConfig) -> Slot:
        """A new peft adapter of twice ``config``'s rank, scaling 1 (a version's scaling goes into its B)."""
        name = f"slot{next(self._ids)}"
        own = copy.deepcopy(config)  # peft keeps and may amend its config; the slot's stays the one compared
        own.r, own.lora_alpha, own.use_rslora = 2 * config.r, 2 * config.r, False
        # Adapters stay in the serving dtype (no fp32 upcast): the recorded log-probs are this model's anyway.
        if self.peft is None:  # the task's class, as PeftModel.from_pretrained picks it (causal LM: its forward)
            model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(own.task_type, PeftModel)
            self.peft = model_class(self.base, own, adapter_name=name, autocast_adapter_dtype=False)
        else:
            self.peft.add_adapter(name, own, autocast_adapter_dtype=False)
        self.peft.eval().requires_grad_(False)
        self._lora_layers = [layer for layer in self.peft.modules() if isinstance(layer, LoraLayer)]
        layers = {module: layer for module, layer in self.peft.named_modules()
                  if isinstance(layer, LoraLayer) and name in layer.lora_A}
        slot = Slot(name, config, layers)
        with torch.no_grad():
            for layer in layers.values():  # an empty slot adds nothing (peft initialises A at random)
                layer.lora_A[name].weight.zero_()
                layer.lora_B[name].weight.zero_()
        return slot


def _scaling(config: PeftConfig) -> float:
    """peft's LoRA scaling: alpha / r, or alpha / √r with rsLoRA."""
    return config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)
