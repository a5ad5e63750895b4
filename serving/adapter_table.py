"""The adapter versions an engine serves: the slot that holds each, those loading or unloading, and their pins.

A version is loaded into a slot (``serving.slots``): the thread that loads it reads, hashes and checks the files
and copies the weights into a free slot, without waiting for a decode step; only when no slot is free does the
engine thread add one between steps. After each load a spare slot is added if none is left, so the next version
finds one.

Every queued or running request pins its version. ``unload`` makes a version unservable at once, and the engine
thread frees its slot only once no request pins it, between steps: a version is never unloaded while a request
uses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path

from peft import PeftModel
from torch import nn

from liveloop.adapter_artifacts import AdapterWeights, read_adapter
from liveloop.sampling import BASE_ADAPTER
from serving import metrics
from serving.engine_errors import UnknownAdapter
from serving.slots import Slot, SlotPool
from serving.tasks import TaskQueue, settle

log = logging.getLogger(__name__)


class AdapterTable:
    """Thread-safe under ``lock`` (the engine's); structural changes to the model run through ``tasks`` on the
    engine thread."""

    def __init__(self, model: nn.Module, *, base_model_id: str, lock: threading.Condition, tasks: TaskQueue):
        self.base_model_id = base_model_id
        self._slots = SlotPool(model)
        self._lock, self._tasks = lock, tasks
        self._loaded: set[str] = set()  # servable or unloading
        self._slot_of: dict[str, Slot] = {}  # loaded version → the slot holding it
        self._loading: dict[str, Future] = {}
        self._unloading: set[str] = set()
        self._pins: Counter[str] = Counter()  # version → queued and running requests using it

    @property
    def peft(self) -> PeftModel | None:
        """The PeftModel wrapping the base model since the first load, or None."""
        return self._slots.peft

    def __len__(self) -> int:
        return len(self._loaded)

    def servable(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded - self._unloading)

    def is_loaded(self, name: str | None) -> bool:
        """``name`` still has its slot (None, the base, always has)."""
        with self._lock:
            return name is None or name in self._loaded

    @property
    def forward_names(self) -> dict[str | None, str]:
        """A row's slot (None: the base) → the adapter its forward runs under, where that differs (a merged
        version); changed only on the engine thread, between forward passes."""
        return self._slots.forward_names

    def weights_epoch(self) -> int:
        """Advances whenever what a forward under some adapter name computes changes (``SlotPool``)."""
        return self._slots.weights_epoch

    def adapters_off(self) -> AbstractContextManager[nn.Module]:
        """The model with its adapters off, for a forward in which no row uses one (``SlotPool.adapters_off``)."""
        return self._slots.adapters_off()

    def slot(self, name: str | None) -> str | None:
        """The peft adapter a forward runs the loaded version ``name`` (None: the base model) under; None: no
        adapter (the base model, or the version merged into its weights)."""
        with self._lock:
            slot = None if name is None else self._slot_of[name].name
            forward = self._slots.forward_names.get(slot, slot)
            return None if forward == BASE_ADAPTER else forward

    def require_servable(self, name: str | None) -> None:
        with self._lock:
            if name is not None and (name not in self._loaded or name in self._unloading):
                raise UnknownAdapter(f"adapter {name!r} is not loaded")

    def pin(self, name: str | None) -> str | None:
        """Count a request using ``name`` (or raise UnknownAdapter); return the slot it runs under."""
        with self._lock:
            self.require_servable(name)
            if name is None:
                return None
            self._pins[name] += 1
            return self._slot_of[name].name

    def unpin(self, name: str | None) -> None:
        if name is not None:
            with self._lock:
                self._pins[name] -= 1
                self._lock.notify_all()

    # --- loading -------------------------------------------------------------------------------------------------

    def load(self, name: str, path: Path, sha256: str | None = None) -> Future:
        """Load an adapter directory under a new name (see the module docstring). The future resolves to None once
        requests may use ``name``, or raises (AdapterArtifactError for a corrupt or foreign directory, or weights
        whose sha256 is not ``sha256``, the registry's record, when given)."""
        with self._lock:
            if name in self._unloading:  # routed again before its slot was freed: the same immutable weights
                self._unloading.discard(name)  # (checked against their sha256 when first loaded) serve again
                future = Future()
                future.set_result(None)
                return future
            pending = self._loading.get(name)
            if not name or name == BASE_ADAPTER or name in self._loaded or (pending and not pending.done()):
                raise ValueError(f"adapter name {name!r} is taken: versions are immutable, load under a new name")
            future: Future = Future()
            self._loading[name] = future
        try:  # the checked sha256 is that of the bytes loaded: read_adapter parses the very bytes it hashed
            adapter = read_adapter(Path(path), base_model_id=self.base_model_id, sha256=sha256)
        except Exception as exc:
            with self._lock:
                self._loading.pop(name, None)
            future.set_exception(exc)
            return future
        slot = self._slots.take(adapter.config)
        if slot is not None:
            settle(future, lambda: self._install(name, adapter, slot))
        else:
            self._tasks.submit(lambda: self._install(name, adapter, None), future)
        return future

    def _install(self, name: str, adapter: AdapterWeights, slot: Slot | None) -> None:
        """Copy the weights into ``slot`` (None: a slot this engine-thread call takes or creates) and make
        ``name`` servable."""
        config = adapter.config
        try:
            slot = slot or self._slots.take(config) or self._slots.create(config)
            try:
                self._slots.fill(slot, adapter.tensors)
            except BaseException:
                self._slots.release(slot)
                raise
            with self._lock:
                self._slot_of[name] = slot
                self._loaded.add(name)
                metrics.ADAPTERS_LOADED.set(len(self._loaded))
                if not self._slots.has_free(config):
                    self._tasks.submit(lambda: self._slots.ensure_spare(config))
        finally:
            with self._lock:
                self._loading.pop(name, None)
        log.info("adapter %s loaded into %s", name, slot.name)

    # --- merging -------------------------------------------------------------------------------------------------

    def merge(self, name: str | None) -> None:
        """Merge the loaded version ``name`` into the base weights, or none (engine thread; ``serving.slots``)."""
        with self._lock:
            slot = self._slot_of.get(name) if name in self._loaded and name not in self._unloading else None
        started = time.perf_counter()
        self._slots.merge(slot)
        log.info("base weights now hold %s (%.0f ms)", name if slot is not None else "no version",
                 (time.perf_counter() - started) * 1000)

    # --- unloading -----------------------------------------------------------------------------------------------

    def unload(self, name: str) -> None:
        """Stop accepting requests for ``name`` now; free it once no queued or running request uses it."""
        with self._lock:
            self.require_servable(name)
            self._unloading.add(name)
            self._lock.notify_all()

    def has_unused(self) -> bool:
        """Some version waits to be unloaded and no request uses it any more."""
        with self._lock:
            return any(self._pins[name] == 0 for name in self._unloading)

    def unload_unused(self) -> None:
        """Free the slots of unloaded versions no request uses (engine thread, between forward passes)."""
        with self._lock:
            unused = [name for name in self._unloading if self._pins[name] == 0]
            if any(self._slot_of[name] is self._slots.merged for name in unused):
                self._slots.merge(None)
            for name in unused:
                self._slots.release(self._slot_of.pop(name))
                self._loaded.discard(name)
                self._unloading.discard(name)
            metrics.ADAPTERS_LOADED.set(len(self._loaded))
        for name in unused:
            log.info("adapter %s unloaded", name)
