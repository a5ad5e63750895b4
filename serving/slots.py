"""Adapter slots: the LoRA adapters of the serving model, reused by one adapter version after another.

Loading a version into a new peft adapter (``add_adapter``) walks and changes the whole model: 0.4–1 s of Python
for SmolLM2's 210 LoRA layers, more as adapters accumulate, and it must not overlap a forward pass, so it would
stall decoding for that long on the engine thread. Copying weights into an adapter that already exists takes a
few milliseconds and touches nothing else. So a loaded version occupies a *slot* (a peft adapter named
``slot<N>``); when the version is unloaded its slot goes back to the free pool, and the next version with the
same LoRA config is copied into it.

Threads: ``create`` and ``ensure_spare`` change the model's structure and run on the engine thread, between
forward passes. ``take``, ``release`` and ``Slot.fill`` may run on any thread: a free slot is one no request is
pinned to, so no forward pass reads it while it is filled.
"""

from __future__ import annotations

import copy
import itertools
import threading
from dataclasses import dataclass, field

import torch
from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftConfig, PeftModel

from liveloop.adapter_artifacts import AdapterArtifactError


@dataclass(eq=False)
class Slot:
    name: str  # the peft adapter name, what a forward's ``adapter_names`` selects
    config: PeftConfig
    params: dict[str, torch.Tensor] = field(repr=False)  # keyed as peft saves them (without the adapter name)

    def fill(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a version's weights in, or raise AdapterArtifactError when they don't fit this config."""
        if tensors.keys() != self.params.keys():
            odd = sorted(tensors.keys() ^ self.params.keys())
            raise AdapterArtifactError(f"the weights do not match their adapter config ({len(odd)} keys differ, "
                                       f"e.g. {odd[0]})")
        for key, param in self.params.items():
            if tensors[key].shape != param.shape:
                raise AdapterArtifactError(f"{key} has shape {tuple(tensors[key].shape)}, its config "
                                           f"{tuple(param.shape)}")
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(tensors[key])  # into the serving dtype and device


class SlotPool:
    """Every slot of ``base`` (wrapped in a PeftModel at the first ``create``) and which of them are free."""

    def __init__(self, base: torch.nn.Module):
        self.base = base
        self.peft: PeftModel | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._free: list[Slot] = []

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

    def create(self, config: PeftConfig) -> Slot:
        """A new slot of ``config``, reserved for the caller (engine thread). Free slots of other configs are
        deleted, so that those of a config the trainer no longer uses do not hold memory for good."""
        name = f"slot{next(self._ids)}"
        own = copy.deepcopy(config)  # peft keeps and may amend its config; the slot's stays the one compared
        # Adapters stay in the serving dtype (no fp32 upcast): the recorded log-probs are this model's anyway.
        if self.peft is None:  # the task's class, as PeftModel.from_pretrained picks it (causal LM: its forward)
            model_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(own.task_type, PeftModel)
            self.peft = model_class(self.base, own, adapter_name=name, autocast_adapter_dtype=False)
        else:
            self.peft.add_adapter(name, own, autocast_adapter_dtype=False)
        self.peft.eval().requires_grad_(False)
        with self._lock:
            stale = [slot for slot in self._free if slot.config != config]
            self._free = [slot for slot in self._free if slot.config == config]
        for slot in stale:
            self.peft.delete_adapter(slot.name)
        marker = f".{name}."
        params = {key.replace(marker, "."): param for key, param in self.peft.named_parameters() if marker in key}
        return Slot(name, config, params)

    def ensure_spare(self, config: PeftConfig) -> None:
        """Keep a free slot of ``config`` ready (engine thread), so the next version loads without waiting for the
        engine: unless one came free meanwhile, create it now, between decode steps, off the swap path."""
        if not self.has_free(config):
            self.release(self.create(config))
