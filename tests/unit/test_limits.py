"""Connection caps and the failed-AUTH throttle."""

from __future__ import annotations

from submitd.server.limits import AuthThrottle, ConnectionLimiter


def test_connection_cap_per_ip_and_total() -> None:
    lim = ConnectionLimiter(max_total=3, max_per_ip=2)
    assert lim.try_acquire("10.0.0.1")
    assert lim.try_acquire("10.0.0.1")
    assert not lim.try_acquire("10.0.0.1"), "third connection from one address refused"
    assert lim.try_acquire("10.0.0.2")
    assert not lim.try_acquire("10.0.0.3"), "total cap reached"
    lim.release("10.0.0.1")
    assert lim.try_acquire("10.0.0.3")
    assert lim.count("10.0.0.1") == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_allows_a_few_failures_then_grows_delays() -> None:
    clock = Clock()
    t = AuthThrottle(free=3, base=1.0, cap=60.0, clock=clock)
    for _ in range(2):
        t.failed("192.0.2.1", "alice")
        assert t.blocked_for("192.0.2.1", "alice") == 0
    t.failed("192.0.2.1", "alice")
    assert t.blocked_for("192.0.2.1", "alice") == 1.0
    t.failed("192.0.2.1", "alice")
    assert t.blocked_for("192.0.2.1", "alice") == 2.0
    for _ in range(20):
        t.failed("192.0.2.1", "alice")
    assert t.blocked_for("192.0.2.1", "alice") == 60.0, "capped, never a hard lockout"
    clock.now += 61
    assert t.blocked_for("192.0.2.1", "alice") == 0


def test_throttle_counts_per_account_across_addresses() -> None:
    clock = Clock()
    t = AuthThrottle(free=2, clock=clock)
    t.failed("192.0.2.1", "Bob")
    t.failed("192.0.2.2", "bob")
    assert t.blocked_for("192.0.2.3", "BOB") > 0, "spread over addresses, still one account"
    assert t.blocked_for("192.0.2.3", "carol") == 0


def test_throttle_success_clears_and_quiet_time_forgets() -> None:
    clock = Clock()
    t = AuthThrottle(free=1, forget=100, clock=clock)
    t.failed("192.0.2.1", "dave")
    assert t.blocked_for("192.0.2.1", "dave") > 0
    t.succeeded("192.0.2.1", "dave")
    assert t.blocked_for("192.0.2.1", "dave") == 0
    t.failed("192.0.2.9", "erin")
    clock.now += 101
    assert t.blocked_for("192.0.2.9", "erin") == 0


def test_throttle_memory_is_bounded() -> None:
    clock = Clock()
    t = AuthThrottle(max_keys=100, clock=clock)
    for i in range(1000):
        clock.now += 0.001
        t.failed(f"10.0.{i // 256}.{i % 256}", f"user{i}")
    assert len(t._failures) <= 100
