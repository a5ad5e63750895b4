"""Work other threads hand to the engine thread, run between decode steps, so a forward pass never sees the model
change under it (a new adapter slot, a log-prob spot check)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from serving.engine_errors import EngineStopped

log = logging.getLogger(__name__)


class TaskQueue:
    """Thread-safe under ``lock`` (the engine's, which also wakes the engine thread)."""

    def __init__(self, lock: threading.Condition):
        self._lock = lock
        self._tasks: deque[tuple[Callable[[], object], Future]] = deque()
        self._closed = False

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def submit(self, work: Callable[[], object], future: Future | None = None) -> Future:
        """Queue ``work``; its outcome goes to ``future`` (a new one by default)."""
        future = future or Future()
        with self._lock:
            if self._closed:
                future.set_exception(EngineStopped("the engine is shut down"))
                return future
            self._tasks.append((work, future))
            self._lock.notify_all()
        return future

    def run_pending(self) -> None:
        """Run what was queued so far (engine thread)."""
        with self._lock:
            tasks, self._tasks = list(self._tasks), deque()
        for work, future in tasks:
            settle(future, work)

    def close(self) -> None:
        """Refuse new work and cancel what is queued."""
        with self._lock:
            self._closed = True
            tasks, self._tasks = list(self._tasks), deque()
        for _, future in tasks:
            future.cancel()


def settle(future: Future, work: Callable[[], object]) -> None:
    """Run ``work`` and put its result or exception into ``future``, unless the future was cancelled."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(work())
    except Exception as exc:
        log.warning("engine work failed: %s", exc)
        future.set_exception(exc)
