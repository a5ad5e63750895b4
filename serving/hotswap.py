"""Hot-swap: keep this replica's loaded adapters and routing in step with the registry.

``AdapterWatcher.sync`` reconciles once: it reads the policy routing (live and canary versions) from the
registry, loads each version not yet loaded (the engine hashes the weights and checks them against the
registry's sha256 and the manifest's, and the manifest's base model against its own), then switches the
``AdapterSet`` in one assignment. A version whose artifact is missing or corrupt is refused: logged, counted,
listed by ``/readyz``, and the replica keeps serving what it served; the next sync retries it.

What is loaded ahead keeps most switches to a pointer assignment: the version that was live before (a rollback
returns to it), the canary (promoted from canary), and the newest approved version, the "standby" (an engineer
promotes it). Versions outside these for ``adapter_unload_grace_s`` are unloaded (the engine frees them once no
request uses them).

Syncs run on a thread: every ``adapter_poll_s`` (so a missed event heals), at once when the ``adapter-events``
topic announces a transition (``AdapterEvents``: a hint only, the registry is the truth), and at once after a
transition made through this process's registry (the admin API), without waiting for that message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kafka import TopicPartition
from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from feedback.kafka import make_consumer
from liveloop.adapter_artifacts import AdapterArtifactError
from liveloop.registry import Kind, Registry, RegistryError
from liveloop.settings import Settings
from serving.engine import Engine
from serving.routing import AdapterSet

log = logging.getLogger(__name__)

SWAPS = Counter("liveloop_adapter_swaps_total", "Routing switches applied by this replica.")
REFUSED = Counter("liveloop_adapter_refused_total", "Adapter versions this replica could not load.", ["reason"])
REVISION = Gauge("liveloop_adapter_routing_revision", "Registry revision of the routing this replica serves.")


class AdapterWatcher:
    def __init__(self, *, registry: Registry, engine: Engine, adapters: AdapterSet, settings: Settings):
        self.registry, self.engine, self.adapters, self.settings = registry, engine, adapters, settings
        self.revision: int | None = None  # the registry revision fully applied
        self._unrouted_since: dict[str, float] = {}
        self._standby: str | None = None  # the newest approved version, loaded ahead of its promotion
        self._wake, self._stop = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self.events = AdapterEvents(settings, on_event=self.wake) if settings.kafka_bootstrap else None
        registry.on_transition(self.wake)

    def sync(self) -> None:
        """Apply the registry's current routing (see the module docstring); cheap when nothing changed."""
        routing = self.registry.routing(Kind.POLICY)
        if routing.revision == self.revision:
            return
        ready = {name: self._load(name) for name in (routing.live, routing.canary) if name is not None}
        live = routing.live if routing.live is None or ready[routing.live] else self.adapters.live
        canary = routing.canary if routing.canary is not None and ready[routing.canary] else None
        if (live, canary) != (self.adapters.live, self.adapters.canary):
            self.adapters.switch(live=live, canary=canary)
            if self.settings.merge_live_adapter:  # between decode steps, after the switch: no request waits on it
                self.engine.merge_adapter(live)
            SWAPS.inc()
            log.info("serving %s (canary %s) at registry revision %d", live or "the base model", canary,
                     routing.revision)
        self._standby = routing.standby if routing.standby is not None and self._load(routing.standby) else None
        self._unload_unrouted()
        if all(ready.values()):  # a refused standby is not retried until the registry changes
            self.revision = routing.revision
            REVISION.set(routing.revision)

    def wake(self) -> None:
        """Sync now rather than at the next poll (an adapter-events message arrived)."""
        self._wake.set()

    def start(self) -> AdapterWatcher:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, name="adapter-watcher", daemon=True)]
        if self.events is not None:
            self._threads.append(threading.Thread(target=self.events.run, args=(self._stop,), name="adapter-events",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = []

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.adapter_poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync()
            except Exception:  # the database is unreachable, say: keep serving, retry at the next poll
                log.exception("adapter sync failed; serving %s", self.adapters.live or "the base model")

    def _load(self, name: str) -> bool:
        """Make ``name`` servable; False (and the reason reported) when its artifact is refused."""
        if name in self.engine.loaded_adapters():
            self.adapters.add_version(name)
            return True
        try:
            version = self.registry.get(name)
            path = self.registry.store.path(version.uri)
            self.engine.load_adapter(name, path, version.sha256).result(timeout=self.settings.adapter_load_timeout_s)
        except (AdapterArtifactError, RegistryError, OSError, ValueError, TimeoutError) as exc:
            if name not in self.adapters.refused:
                log.error("refusing adapter %s, still serving %s: %s", name, self.adapters.live or "the base model",
                          exc)
            self.adapters.refused[name] = str(exc)
            REFUSED.labels(type(exc).__name__).inc()
            return False
        self.adapters.add_version(name)
        return True

    def _unload_unrouted(self) -> None:
        """Unload versions out of the routing (live, canary, previous, standby) for longer than the grace period:
        a request that resolved to one just before a switch has long been submitted, and so pinned, by then."""
        now, adapters = time.monotonic(), self.adapters
        routed = {adapters.live, adapters.canary, adapters.previous, self._standby}
        for name in self.engine.loaded_adapters():
            if name in routed:
                self._unrouted_since.pop(name, None)
            elif now - self._unrouted_since.setdefault(name, now) >= self.settings.adapter_unload_grace_s:
                adapters.remove_version(name)
                self.engine.unload_adapter(name)
                self._unrouted_since.pop(name)


class AdapterEvents:
    """Listens to the adapter-events topic from its end, without a consumer group (every replica hears every
    event; nothing to commit) and calls ``on_event`` for each message."""

    def __init__(self, settings: Settings, *, on_event: Callable[[], None]):
        self.settings, self.on_event = settings, on_event
        self.listening = threading.Event()  # set while positioned at the topic's end

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._listen(stop)
            except KafkaError as exc:  # the broker is down or restarting: polling the registry still works
                log.warning("adapter-events listener: %s; reconnecting", exc)
                stop.wait(self.settings.adapter_poll_s)

    def _listen(self, stop: threading.Event) -> None:
        # a short fetch wait: a promotion should reach serving in well under the default 0.5 s (~20 fetches/s idle)
        consumer = make_consumer(self.settings, group_id=None, client_id="liveloop-serving-adapter-events",
                                 fetch_max_wait_ms=50)
        try:
            topic = self.settings.adapter_events_topic
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not partitions:
                raise KafkaError(f"topic {topic} has no partitions (not created yet?)")
            consumer.assign(partitions)
            consumer.seek_to_end()  # only transitions from now on matter: the first sync read the registry
            for partition in partitions:
                consumer.position(partition)  # resolve the end offsets now, not at the first poll
            self.listening.set()
            while not stop.is_set():
                if consumer.poll(timeout_ms=250):
                    self.on_event()
        finally:
            self.listening.clear()
            consumer.close()
