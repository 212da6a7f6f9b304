"""The runner's schedule: retry waits, expiry, and the due-time heap that stays fast when full."""

from __future__ import annotations

import math
import random
from pathlib import Path

from submitd.config import QueueConfig
from submitd.mailqueue import DueTimes, is_expired, next_attempt_at, retry_delay


def test_retry_waits_follow_the_list_and_the_last_repeats() -> None:
    retry = (60.0, 300.0, 900.0)
    assert [retry_delay(retry, n) for n in (1, 2, 3, 4, 10)] == [60, 300, 900, 900, 900]
    config = QueueConfig(dir=Path("spool"), retry=retry, max_age=1000.0)
    assert next_attempt_at(config, attempts=2, now=100.0) == 400.0
    assert not is_expired(config, created=0.0, now=1000.0)
    assert is_expired(config, created=0.0, now=1000.5)


def test_due_times_pop_in_order_and_only_when_due() -> None:
    due = DueTimes()
    for queue_id, at in (("C", 30.0), ("A", 10.0), ("B", 20.0)):
        due.set(queue_id, at)
    assert (len(due), due.earliest()) == (3, 10.0)
    assert due.pop_due(5.0) is None
    assert [due.pop_due(25.0), due.pop_due(25.0), due.pop_due(25.0)] == ["A", "B", None]
    assert "C" in due and "A" not in due
    assert due.ids() == ["C"]


def test_rescheduling_and_discarding_leave_no_stale_entry_behind() -> None:
    due = DueTimes()
    due.set("A", 10.0)
    due.set("A", 50.0)  # rescheduled later: the old entry at 10 is stale
    due.set("B", 20.0)
    due.discard("B")
    assert due.earliest() == 50.0
    assert due.pop_due(30.0) is None
    due.set("A", -math.inf)  # notify(): due now
    assert due.pop_due(0.0) == "A"
    assert due.pop_due(math.inf) is None
    assert len(due) == 0 and due.earliest() is None


def test_heap_stays_small_under_constant_rescheduling() -> None:
    due = DueTimes()
    rng = random.Random(7)
    for i in range(1000):
        due.set(f"M{i}", rng.uniform(0, 100))
    for _ in range(20):
        for i in range(1000):
            due.set(f"M{i}", rng.uniform(0, 100))
    assert len(due) == 1000
    assert len(due._heap) <= 2 * 1000 + 64  # stale entries are compacted away
    popped = [due.pop_due(100.0) for _ in range(1000)]
    assert sorted(popped) == sorted(f"M{i}" for i in range(1000))  # type: ignore[type-var]
    assert due.pop_due(100.0) is None
