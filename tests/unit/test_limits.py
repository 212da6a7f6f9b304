"""Connection caps and rates, and the read deadlines (the failed-AUTH throttle is tested in
test_throttle.py)."""

from __future__ import annotations

import logging

import pytest
import trio

from submitd.config import Limits
from submitd.server.deadlines import ReadDeadlines, Stress
from submitd.server.limits import ConnectionLimiter, Refused, Slot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admitted(lim: ConnectionLimiter, ip: str) -> Slot:
    slot = lim.acquire(ip)
    assert isinstance(slot, Slot), slot
    return slot


def test_connection_cap_per_ip_and_total() -> None:
    lim = ConnectionLimiter(max_total=3, max_per_ip=2)
    first = admitted(lim, "10.0.0.1")
    admitted(lim, "10.0.0.1")
    refused = lim.acquire("10.0.0.1")
    assert isinstance(refused, Refused) and not refused.rate
    assert refused.reason == "too many connections from this address (limit 2)"
    admitted(lim, "10.0.0.2")
    refused = lim.acquire("10.0.0.3")
    assert isinstance(refused, Refused) and refused.reason == "server full (limit 3)"
    lim.release(first)
    admitted(lim, "10.0.0.3")
    assert lim.count("10.0.0.1") == 1


def test_a_burst_from_one_address_is_stopped_at_the_rate_and_refills() -> None:
    clock = Clock()
    lim = ConnectionLimiter(max_total=1000, max_per_ip=1000, max_rate=30, rate_window=10.0,
                            clock=clock)
    outcomes = []
    for _ in range(50):  # 50 connections in half a second
        clock.now += 0.01
        slot = lim.acquire("192.0.2.7")
        outcomes.append(isinstance(slot, Slot))
        if isinstance(slot, Slot):
            lim.release(slot)
    # The bucket holds 30 and refills at 3 per second: 1.5 more over the half second.
    assert outcomes[:31] == [True] * 30 + [False]
    assert sum(outcomes) == 31
    refused = lim.acquire("192.0.2.7")
    assert isinstance(refused, Refused) and refused.rate
    assert refused.reason == "too many new connections from this address (limit 30 per 10s)"
    assert isinstance(lim.acquire("192.0.2.8"), Slot), "another address is not affected"
    clock.now += 1.0  # 3 connections' worth refilled (30 per 10 s)
    assert [isinstance(lim.acquire("192.0.2.7"), Slot) for _ in range(4)] == [True] * 3 + [False]


def test_rate_table_memory_is_bounded() -> None:
    clock = Clock()
    lim = ConnectionLimiter(max_total=10**6, max_per_ip=10, max_addresses=100, clock=clock)
    for i in range(1000):
        clock.now += 0.001
        lim.release(admitted(lim, f"10.0.{i // 256}.{i % 256}"))
    assert lim.addresses <= 100
    assert lim.total == 0 and lim.unauthenticated == 0


def test_unauthenticated_sessions_are_capped_until_they_log_in() -> None:
    lim = ConnectionLimiter(max_total=100, max_per_ip=100, max_unauthenticated=2)
    first, second = admitted(lim, "10.0.0.1"), admitted(lim, "10.0.0.2")
    refused = lim.acquire("10.0.0.3")
    assert isinstance(refused, Refused)
    assert refused.reason == "too many sessions that have not logged in (limit 2)"
    lim.logged_in(first)
    lim.logged_in(first)  # counted once
    third = admitted(lim, "10.0.0.3")
    assert lim.unauthenticated == 2
    for slot in (first, second, third):
        lim.release(slot)
    assert (lim.total, lim.unauthenticated) == (0, 0)


def test_connections_that_log_in_give_their_rate_token_back() -> None:
    # An application that reconnects once per message: 100 connections from one address in
    # one second, each logging in, all pass (the bucket holds 30 and refills 3 per second).
    clock = Clock()
    lim = ConnectionLimiter.from_limits(Limits(), clock=clock)
    for _ in range(100):
        clock.now += 0.01
        slot = admitted(lim, "192.0.2.7")
        lim.logged_in(slot)
        lim.release(slot)
    assert (lim.total, lim.unauthenticated) == (0, 0)
    # Connections that do not log in are still limited: 30 pass, the 31st is refused.
    outcomes = []
    for _ in range(31):
        outcome = lim.acquire("192.0.2.7")
        outcomes.append(outcome)
        if isinstance(outcome, Slot):
            lim.release(outcome)  # closed without logging in
    assert [isinstance(o, Slot) for o in outcomes] == [True] * 30 + [False]
    refused = outcomes[-1]
    assert isinstance(refused, Refused) and refused.rate


def test_a_refund_never_fills_the_bucket_beyond_the_rate() -> None:
    clock = Clock()
    lim = ConnectionLimiter(max_total=100, max_per_ip=100, max_rate=5, rate_window=10.0,
                            clock=clock)
    slots = [admitted(lim, "192.0.2.7") for _ in range(3)]
    clock.now += 60.0  # the bucket refills to its cap of 5 ...
    for slot in slots:  # ... and the three refunds add nothing on top
        lim.logged_in(slot)
        lim.logged_in(slot)  # counted once
    outcomes = [isinstance(lim.acquire("192.0.2.7"), Slot) for _ in range(6)]
    assert outcomes == [True] * 5 + [False]


def test_a_released_connection_gives_nothing_back_and_release_is_idempotent() -> None:
    clock = Clock()
    lim = ConnectionLimiter(max_total=100, max_per_ip=2, max_rate=2, rate_window=10.0,
                            clock=clock)
    first, second = admitted(lim, "192.0.2.7"), admitted(lim, "192.0.2.7")
    lim.release(first)  # the session ended early (before the TLS close) ...
    lim.release(first)  # ... and again when the socket closed: counted once
    assert (lim.total, lim.count("192.0.2.7"), lim.unauthenticated) == (1, 1, 1)
    lim.logged_in(first)  # too late: a released slot refunds nothing
    refused = lim.acquire("192.0.2.7")
    assert isinstance(refused, Refused) and refused.rate
    lim.logged_in(second)  # a live session that logs in does
    assert isinstance(lim.acquire("192.0.2.7"), Slot)


def test_configure_takes_the_limits_table() -> None:
    lim = ConnectionLimiter.from_limits(Limits(max_connection_rate=5, max_unauthenticated=7))
    assert (lim.max_total, lim.max_per_ip, lim.max_rate, lim.max_unauthenticated) == (
        1000, 20, 5, 7)


def deadlines(**limits: object) -> ReadDeadlines:
    lim = Limits(**limits)  # type: ignore[arg-type]
    return ReadDeadlines(lim, Stress(threshold=lim.stress_threshold,
                                     timeout=lim.stress_timeout))


def test_preauth_deadline_then_command_deadline_after_login() -> None:
    d = deadlines(command_timeout=300.0, preauth_timeout=30.0)
    before = d.next(0.0, authenticated=False, data_deadline=None)
    assert (before.at, before.phase) == (30.0, "command")
    assert before.reason == ("the client did not log in and sent nothing for 30s "
                             "(limits.preauth_timeout)")
    after = d.next(0.0, authenticated=True, data_deadline=None)
    assert after.at == 300.0
    assert after.reason == "the client sent nothing for 300s (limits.command_timeout)"


def test_command_deadline_runs_from_the_first_byte_not_per_read() -> None:
    d = deadlines(command_timeout=60.0)
    d.received(b"N", 5.0, in_data=False)
    for t in (15.0, 25.0, 35.0):  # one byte every 10 s
        d.received(b"O", t, in_data=False)
        deadline = d.next(t, authenticated=True, data_deadline=None)
        assert deadline.at == 65.0, "counted from the first byte at t=5"
    assert deadline.reason == ("the client took more than 60s to send one command "
                               "(limits.command_timeout)")
    d.received(b"P\r", 40.0, in_data=False)
    assert d.next(40.0, authenticated=True, data_deadline=None).at == 65.0, "CR alone ends nothing"
    d.received(b"\n", 41.0, in_data=False)
    assert d.next(50.0, authenticated=True, data_deadline=None).at == 110.0, "idle again"
    d.received(b"NOOP\nNOOP", 51.0, in_data=False)  # a bare LF ends no command
    assert d.next(52.0, authenticated=True, data_deadline=None).at == 111.0


def test_minimum_data_rate_after_the_grace() -> None:
    d = deadlines(command_timeout=300.0, data_timeout=600.0, min_data_rate=500)
    start, data_deadline = 100.0, 700.0
    first = d.next(start, authenticated=True, data_deadline=data_deadline)
    assert (first.at, first.phase) == (start + 10.0, "data"), "the 10 s grace"
    d.received(b"x" * 10_000, start + 1.0, in_data=True)  # 20 s worth at 500 bytes/s
    assert d.next(start + 1.0, authenticated=True, data_deadline=data_deadline).at == start + 20
    d.received(b"x" * 10, start + 19.0, in_data=True)  # a trickle does not keep it alive
    cut = d.next(start + 19.0, authenticated=True, data_deadline=data_deadline)
    assert cut.at == pytest.approx(start + 20.02)
    assert cut.reason.startswith("the message arrived slower than limits.min_data_rate "
                                 "(500 bytes/s): 10010 bytes in 20.0s")


def test_data_deadline_and_per_read_deadline_in_data() -> None:
    d = deadlines(command_timeout=5.0, data_timeout=8.0, min_data_rate=1)
    deadline = d.next(0.0, authenticated=True, data_deadline=8.0)
    assert deadline.at == 5.0
    assert deadline.reason == "the client sent nothing for 5s during DATA (limits.command_timeout)"
    d.received(b"x" * 100, 4.0, in_data=True)
    deadline = d.next(4.0, authenticated=True, data_deadline=8.0)
    assert deadline.at == 8.0
    assert deadline.reason == "the message did not arrive within limits.data_timeout (8s)"


async def test_stress_mode_shrinks_waits_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    stress = Stress(threshold=80, timeout=10.0)
    d = ReadDeadlines(Limits(), stress)
    stress.update(79, 100)
    assert not stress.active
    with trio.CancelScope(deadline=trio.current_time() + 300) as scope, stress.watch(scope, 0.0):
        stress.update(80, 100)
        stress.update(90, 100)
        assert scope.deadline == 10.0, "a wait under way shrinks"
    assert d.next(50.0, authenticated=True, data_deadline=None).at == 60.0
    assert d.send_timeout(authenticated=True) == 10.0
    stress.update(79, 100)
    assert d.next(50.0, authenticated=True, data_deadline=None).at == 350.0
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert events == ["event=stress_on", "event=stress_off"]
