"""What worker processes share: the caps table, the login throttle, the spool locks, the link.

Two limiters on one table stand for two processes (each has its own region, as each worker
has); the table is the same shared memory the processes map.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd.config import Limits
from submitd.errors import SpoolError
from submitd.mailqueue._lock import (
    WritersActive,
    acquire_lock,
    admit_writers,
    join_writers,
    leave_writers,
    release_lock,
)
from submitd.server._link import Link
from submitd.server.limits import Refused, Slot
from submitd.server.shared import SharedCounts, SharedLimiter, SharedThrottle
from submitd.server.throttle import ThrottleSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair(limits: Limits, clock: Clock | None = None) -> tuple[SharedLimiter, SharedLimiter]:
    """The owner's limiter and a worker's, on the same table (the worker maps the owner's)."""
    owner_table = SharedCounts.create(2)
    worker_table = SharedCounts(owner_table.fd)
    tick = clock or Clock()
    return (SharedLimiter(owner_table, 0, limits, clock=tick),
            SharedLimiter(worker_table, 1, limits, clock=tick))


def admitted(result: Slot | Refused) -> Slot:
    assert isinstance(result, Slot), result
    return result


def test_the_per_address_cap_counts_every_process() -> None:
    owner, worker = pair(Limits(max_connections_per_ip=3))
    admitted(owner.acquire("192.0.2.1"))
    admitted(worker.acquire("192.0.2.1"))
    slot = admitted(worker.acquire("192.0.2.1"))
    refused = owner.acquire("192.0.2.1")
    assert isinstance(refused, Refused) and "limit 3" in refused.reason
    assert owner.count("192.0.2.1") == worker.count("192.0.2.1") == 3
    admitted(owner.acquire("198.51.100.7"))  # another address is not affected
    worker.release(slot)
    admitted(owner.acquire("192.0.2.1"))


def test_the_total_and_the_not_logged_in_caps_count_every_process() -> None:
    owner, worker = pair(Limits(max_connections=3, max_unauthenticated=2))
    first = admitted(owner.acquire("192.0.2.1"))
    admitted(worker.acquire("192.0.2.2"))
    refused = owner.acquire("192.0.2.3")
    assert isinstance(refused, Refused) and "not logged in" in refused.reason
    owner.logged_in(first)  # one of the two logged in: room for one more
    admitted(owner.acquire("192.0.2.3"))
    assert owner.total == 3  # what the stress mode reads: the whole server
    full = worker.acquire("192.0.2.4")
    assert isinstance(full, Refused) and full.reason == "server full (limit 3)"


def test_the_connection_rate_is_one_bucket_for_every_process() -> None:
    clock = Clock()
    owner, worker = pair(Limits(max_connection_rate=4, connection_rate_window=10.0), clock)
    for limiter in (owner, worker, owner, worker):
        limiter.release(admitted(limiter.acquire("192.0.2.1")))
    refused = worker.acquire("192.0.2.1")
    assert isinstance(refused, Refused) and refused.rate
    clock.now += 2.5  # one token back (4 per 10 s)
    admitted(owner.acquire("192.0.2.1"))
    assert isinstance(worker.acquire("192.0.2.1"), Refused)


def test_a_dead_workers_connections_stop_counting() -> None:
    owner, worker = pair(Limits(max_connections_per_ip=2, max_connections=2))
    admitted(worker.acquire("192.0.2.1"))
    admitted(worker.acquire("192.0.2.1"))
    assert isinstance(owner.acquire("192.0.2.1"), Refused)
    owner.table.clear(1)  # what the owner does when worker 1 dies
    admitted(owner.acquire("192.0.2.1"))
    assert owner.table.total() == 1


def test_addresses_map_to_the_same_bucket_in_every_process_but_not_across_servers() -> None:
    owner, worker = pair(Limits())
    other, _ = pair(Limits())
    addresses = [f"192.0.2.{i}" for i in range(64)]
    assert [owner.table.bucket(a) for a in addresses] == [worker.table.bucket(a)
                                                           for a in addresses]
    assert [owner.table.bucket(a) for a in addresses] != [other.table.bucket(a)
                                                           for a in addresses]


def test_a_worker_refuses_a_table_that_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\0" * 4096)
    with path.open("rb") as f, pytest.raises(ValueError, match="not a submitd"):
        SharedCounts(f.fileno())


def test_a_failed_login_in_one_process_counts_in_the_others() -> None:
    settings = ThrottleSettings(limit=2, max_delay=300.0, window=3600.0)
    clock = Clock()
    throttles: list[SharedThrottle] = []

    def relay(source: int) -> Callable[[bool, str, str], None]:
        def publish(ok: bool, ip: str, login: str) -> None:
            for i, throttle in enumerate(throttles):
                if i != source:
                    throttle.apply(ok, ip, login)
        return publish

    throttles += [SharedThrottle(settings, relay(0), clock=clock),
                  SharedThrottle(settings, relay(1), clock=clock)]
    throttles[0].failed("192.0.2.1", "alice")
    throttles[1].failed("192.0.2.1", "alice")
    # Two failures in all, one in each process: both now refuse the third attempt.
    assert throttles[0].check("192.0.2.1", "alice").refused_for > 0
    assert throttles[1].check("192.0.2.1", "alice").refused_for > 0
    # A success clears the pair everywhere (the address keeps its own count).
    throttles[1].succeeded("192.0.2.1", "alice")
    assert throttles[0].check("192.0.2.1", "alice").refused_for == 0


def test_only_a_success_that_cleared_a_count_is_published() -> None:
    published: list[tuple[bool, str, str]] = []
    throttle = SharedThrottle(ThrottleSettings(),
                              lambda ok, ip, login: published.append((ok, ip, login)),
                              clock=Clock())
    throttle.succeeded("192.0.2.1", "alice")
    assert published == []
    throttle.failed("192.0.2.1", "alice")
    throttle.succeeded("192.0.2.1", "alice")
    assert published == [(False, "192.0.2.1", "alice"), (True, "192.0.2.1", "alice")]


# --- the spool's locks ----------------------------------------------------------------------


def test_no_worker_may_commit_before_the_owner_admits_writers(tmp_path: Path) -> None:
    owner = acquire_lock(tmp_path)  # what the runner does before recovery
    try:
        with pytest.raises(SpoolError, match="being recovered"):
            join_writers(tmp_path)
        assert admit_writers(tmp_path)  # recovery done
        writer = join_writers(tmp_path)
        second = join_writers(tmp_path)
        leave_writers(second)
    finally:
        release_lock(owner)
    try:
        # The owner died, its worker still commits: a new owner may not recover yet.
        with pytest.raises(WritersActive, match="worker processes"):
            acquire_lock(tmp_path)
    finally:
        leave_writers(writer)
    release_lock(acquire_lock(tmp_path))


def test_a_writer_can_never_take_the_owners_lock(tmp_path: Path) -> None:
    release_lock(acquire_lock(tmp_path))
    fd = acquire_lock(tmp_path)
    admit_writers(tmp_path)
    release_lock(fd)
    writer = join_writers(tmp_path)
    try:
        # Even in the writer's own process: the spool can not be recovered while it commits.
        with pytest.raises(WritersActive):
            acquire_lock(tmp_path)
    finally:
        leave_writers(writer)


def test_admitting_writers_without_the_lock_does_nothing(tmp_path: Path) -> None:
    assert not admit_writers(tmp_path)


# --- the link -------------------------------------------------------------------------------


def links() -> tuple[Link, Link]:
    a, b = socket.socketpair()
    return (Link(trio.SocketStream(trio.socket.from_stdlib_socket(a)), peer="worker 1"),
            Link(trio.SocketStream(trio.socket.from_stdlib_socket(b)), peer="owner"))


async def test_notifications_are_coalesced_and_the_owner_hears_every_id() -> None:
    owner, worker = links()
    ids = [f"01M91QQGSM89F{i:03d}" for i in range(2500)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.send_loop)
        for queue_id in ids:
            worker.notify(queue_id)  # never blocks the session
        worker.publish(False, "192.0.2.1", "alice")
        await worker.wait_sent()
        await worker.stream.aclose()
        got: list[str] = []
        messages = []
        async for message in owner.receive():
            messages.append(message)
            got += message.get("ids", [])
        nursery.cancel_scope.cancel()
    await owner.stream.aclose()
    assert got == ids
    notify_lines = [m for m in messages if m["op"] == "notify"]
    assert len(notify_lines) == 3  # 1000 IDs a line at most, not one line each
    assert {"op": "auth", "ok": False, "ip": "192.0.2.1", "login": "alice"} in messages


async def test_the_receiver_ends_when_the_peer_is_gone() -> None:
    owner, worker = links()
    owner.send({"op": "reload"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner.send_loop)
        await owner.wait_sent()
        await owner.stream.aclose()  # the owner died
        received = [m async for m in worker.receive()]
        nursery.cancel_scope.cancel()
    await worker.stream.aclose()
    assert received == [{"op": "reload"}]


def test_a_login_gives_the_rate_token_back_in_every_process() -> None:
    clock = Clock()
    owner, worker = pair(Limits(max_connection_rate=2, connection_rate_window=10.0), clock)
    first = admitted(owner.acquire("192.0.2.1"))
    admitted(worker.acquire("192.0.2.1"))
    assert isinstance(worker.acquire("192.0.2.1"), Refused)
    owner.logged_in(first)  # an application reconnecting per message is not rate-limited
    admitted(worker.acquire("192.0.2.1"))


def test_a_slot_is_given_back_once() -> None:
    owner, worker = pair(Limits(max_connections_per_ip=1))
    slot = admitted(worker.acquire("192.0.2.1"))
    worker.release(slot)
    worker.release(slot)  # the session ended, then the socket closed
    assert worker.table.total() == 0 and worker.table.unauthenticated() == 0
    admitted(owner.acquire("192.0.2.1"))
    assert isinstance(worker.acquire("192.0.2.1"), Refused)
