"""When a deferred recipient is tried again, and when it has waited too long (DESIGN.md §8).

``[queue] retry`` lists the waits after the 1st, 2nd, ... failed attempt; the last one
repeats (default 1m, 5m, 15m, 30m, 1h, then every 2h). A message older than ``max_age``
(default 5 days) whose delivery fails temporarily is given up as expired (``4.4.7``,
RFC 3463 §3.5).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import QueueConfig

__all__ = ["FALLBACK_RETRY_DELAY", "is_expired", "next_attempt_at", "retry_delay"]

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
