"""Connection caps (the failed-AUTH throttle is tested in test_throttle.py)."""

from __future__ import annotations

from submitd.server.limits import ConnectionLimiter


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
