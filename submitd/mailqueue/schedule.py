"""When a deferred recipient is tried again, and when it has waited too long (RFC 5321 §4.5.4.1).

``[queue] retry`` lists the waits after the 1st, 2nd, ... failed attempt; the last one
repeats (default 1m, 5m, 15m, 30m, 1h, then every 2h). A message older than ``max_age``
(default 5 days) whose delivery fails temporarily is given up as expired (``4.4.7``,
RFC 3463 §3.5).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from ..config import QueueConfig

__all__ = ["FALLBACK_RETRY_DELAY", "DueTimes", "is_expired", "next_attempt_at", "retry_delay"]

#: The wait used when ``retry`` is empty (the config loader should not allow it).
FALLBACK_RETRY_DELAY = 300.0


def retry_delay(retry: Sequence[float], attempts: int) -> float:
    """Return the wait after ``attempts`` failed attempts (1 = the first); the last repeats."""
    if not retry:
        return FALLBACK_RETRY_DELAY
    index = min(max(attempts, 1), len(retry)) - 1
    return max(float(retry[index]), 0.0)


def next_attempt_at(config: QueueConfig, *, attempts: int, now: float) -> float:
    """Return the wall-clock time of the next attempt after ``attempts`` failed ones."""
    return now + retry_delay(config.retry, attempts)


def is_expired(config: QueueConfig, *, created: float, now: float) -> bool:
    """Tell whether a message created at ``created`` has outlived ``max_age`` at ``now``."""
    return now - created > config.max_age


class DueTimes:
    """Queue IDs by due time: a heap with lazy invalidation.

    :meth:`set` pushes a new entry and remembers it as the ID's current one; :meth:`discard`
    only forgets the ID. Entries that are no longer current stay in the heap until they reach
    its top, where :meth:`earliest` and :meth:`pop_due` drop them, so every operation costs
    O(log n) however many messages wait; a full rebuild happens only when stale entries
    outnumber live ones.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._current: dict[str, tuple[float, int]] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._current)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._current

    def ids(self) -> list[str]:
        """Every scheduled queue ID (in no particular order)."""
        return list(self._current)

    def due(self, queue_id: str) -> float | None:
        """When ``queue_id`` is due, or None if it is not scheduled."""
        entry = self._current.get(queue_id)
        return None if entry is None else entry[0]

    def set(self, queue_id: str, due: float) -> None:
        """Schedule ``queue_id`` at ``due``, replacing any earlier schedule of it."""
        seq = next(self._counter)
        self._current[queue_id] = (due, seq)
        heapq.heappush(self._heap, (due, seq, queue_id))
        if len(self._heap) > 2 * len(self._current) + 64:
            self._heap = [(d, s, q) for q, (d, s) in self._current.items()]
            heapq.heapify(self._heap)

    def discard(self, queue_id: str) -> None:
        """Unschedule ``queue_id`` (no error if it was not scheduled)."""
        self._current.pop(queue_id, None)

    def earliest(self) -> float | None:
        """The earliest due time, or None when nothing is scheduled."""
        heap = self._heap
        while heap:
            due, seq, queue_id = heap[0]
            if self._current.get(queue_id) == (due, seq):
                return due
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> str | None:
        """Remove and return the ID due earliest if it is due at ``now``; else None."""
        earliest = self.earliest()
        if earliest is None or earliest > now:
            return None
        _, _, queue_id = heapq.heappop(self._heap)
        del self._current[queue_id]
        return queue_id
