"""The waiting queue and who joins the running batch next.

Requests wait first come, first served, at most ``max_queue`` of them. Each step admits as many as free rows
(``max_batch_size``) and the prefill budget allow: ``max_prefill_tokens`` padded prompt tokens at most in one
prefill bounds the stall a burst of arrivals causes the running rows; one request is always admitted, however long.
"""

from __future__ import annotations

import threading
from collections import deque

from serving import metrics
from serving.engine_errors import EngineFull
from serving.sequence import ServedSequence


class Scheduler:
    """Thread-safe under ``lock`` (the engine's, shared with its other parts)."""

    def __init__(self, *, max_batch_size: int, max_queue: int, max_prefill_tokens: int,
                 lock: threading.Condition):
        self.max_batch_size, self.max_queue, self.max_prefill_tokens = max_batch_size, max_queue, max_prefill_tokens
        self._lock = lock
        self._waiting: deque[ServedSequence] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, *sequences: ServedSequence) -> None:
        """Queue the sequences, all or none: EngineFull when they do not all fit."""
        with self._lock:
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.extend(sequences)
            metrics.WAITING.set(len(self._waiting))
            self._lock.notify_all()

    def admit(self, running: int) -> list[ServedSequence]:
        """Pop the sequences that join a batch of ``running`` rows this step (at least one, if any wait)."""
        taken: list[ServedSequence] = []
        longest = 0
        with self._lock:
            while self._waiting and running + len(taken) < self.max_batch_size:
                longest = max(longest, len(self._waiting[0].prompt_ids))
                if taken and longest * (len(taken) + 1) > self.max_prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
            metrics.WAITING.set(len(self._waiting))
        return taken

    def remove_cancelled(self) -> list[ServedSequence]:
        """Take the waiting sequences whose client cancelled them out of the queue."""
        with self._lock:
            cancelled = [s for s in self._waiting if s.stream.cancel_requested]
            if cancelled:
                self._waiting = deque(s for s in self._waiting if not s.stream.cancel_requested)
        return cancelled

    def drain(self) -> list[ServedSequence]:
        """Empty the queue (the engine stops); return what waited."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        return waiting
