"""Connection caps and the failed-login throttle across worker processes (docs/workers.md).

With ``[server] workers`` above 1 every cap of ``[limits]`` holds for the whole server:

* :class:`SharedCounts` is a small shared-memory table (an anonymous file the owner creates
  and passes to each worker). Each process writes only its own *region*: its open
  connections, its sessions not logged in yet, and its open connections per address bucket;
  the per-address connection-rate buckets are one table for all. :class:`SharedLimiter`
  admits a connection under a ``lockf`` lock on the table (held for microseconds), summing
  the regions, so ``max_connections``, ``max_unauthenticated``, ``max_connections_per_ip``
  and ``max_connection_rate`` are exact across processes. When a worker dies the owner clears
  its region, so its connections stop counting.
* Addresses map to buckets through a keyed hash (a random key per server), so nobody can
  choose addresses that share a victim's bucket; two addresses that happen to share one
  (16,384 buckets) count together, which can only refuse early, never admit more.
* :class:`SharedThrottle` keeps the failed-login counts in every process and tells the
  others of each failure (and of a success that cleared a count) through the owner, so an
  address guessing across workers is counted as if one process saw every attempt.

Plain objects around ``mmap`` and ``fcntl``; no trio here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .limits import ConnectionLimiter, Refused, Slot
from .throttle import AuthThrottle, ThrottleSettings

if TYPE_CHECKING:
    from ..config import Limits

__all__ = ["BUCKETS", "SharedCounts", "SharedLimiter", "SharedThrottle"]

#: Address buckets of the shared table.
BUCKETS = 16_384
_MAGIC = b"submitd-limits-1"
_HEADER = struct.Struct("16s16sII")  # magic, hash key, buckets, regions
_HEADER_SIZE = 64
_RATE = 16  # per bucket: tokens, stamp (float64 each)
_REGION_HEAD = 16  # open connections, not logged in (int64 each)


class SharedCounts:
    """The shared table: ``regions`` processes (region 0 is the owner), :data:`BUCKETS` buckets."""

    def __init__(self, fd: int, *, create_regions: int | None = None) -> None:
        self.fd = fd
        if create_regions is not None:
            self.regions = create_regions
            size = self._size(create_regions)
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
            self._map[:_HEADER.size] = _HEADER.pack(
                _MAGIC, secrets.token_bytes(16), BUCKETS, create_regions
            )
        else:
            head = os.pread(fd, _HEADER.size, 0)
            magic, _key, buckets, regions = _HEADER.unpack(head)
            if magic != _MAGIC or buckets != BUCKETS:
                raise ValueError("not a submitd shared limits table")
            self.regions = regions
            self._map = mmap.mmap(fd, self._size(regions))
        self._key = bytes(self._map[16:32])
        view = memoryview(self._map)
        self._rate = view[_HEADER_SIZE:_HEADER_SIZE + BUCKETS * _RATE].cast("d")
        start = _HEADER_SIZE + BUCKETS * _RATE
        step = _REGION_HEAD + BUCKETS * 4
        self._heads = [view[start + i * step:start + i * step + _REGION_HEAD].cast("q")
                       for i in range(self.regions)]
        self._counts = [view[start + i * step + _REGION_HEAD:start + (i + 1) * step].cast("i")
                        for i in range(self.regions)]

    @staticmethod
    def _size(regions: int) -> int:
        return _HEADER_SIZE + BUCKETS * _RATE + regions * (_REGION_HEAD + BUCKETS * 4)

    @classmethod
    def create(cls, regions: int) -> SharedCounts:
        """A new zeroed table in an anonymous file (inheritable by children via ``pass_fds``)."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("submitd-limits", 0)
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        return cls(fd, create_regions=regions)

    def bucket(self, ip: str) -> int:
        """The bucket of ``ip`` (keyed hash: the same in every process of this server)."""
        digest = hashlib.blake2b(ip.encode(), digest_size=4, key=self._key).digest()
        return int.from_bytes(digest, "little") % BUCKETS

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclude the other processes (a ``lockf`` record lock; held for microseconds)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def total(self) -> int:
        """Open connections, all processes."""
        return sum(head[0] for head in self._heads)

    def unauthenticated(self) -> int:
        """Sessions not logged in yet, all processes."""
        return sum(head[1] for head in self._heads)

    def at(self, bucket: int) -> int:
        """Open connections in ``bucket``, all processes."""
        return sum(counts[bucket] for counts in self._counts)

    def add(self, region: int, bucket: int, *, total: int, unauthenticated: int) -> None:
        """Change ``region``'s counts (only its own process writes a region)."""
        head = self._heads[region]
        head[0] += total
        head[1] += unauthenticated
        if total:
            self._counts[region][bucket] += total

    def take_token(self, bucket: int, capacity: float, per_second: float, now: float) -> bool:
        """Take one connection token from ``bucket`` (call under :meth:`locked`)."""
        i = 2 * bucket
        tokens, stamp = self._rate[i], self._rate[i + 1]
        tokens = capacity if stamp == 0.0 else min(capacity, tokens + (now - stamp) * per_second)
        ok = tokens >= 1.0
        self._rate[i] = tokens - 1.0 if ok else tokens
        self._rate[i + 1] = now
        return ok

    def refund_token(self, bucket: int, capacity: float) -> None:
        """Give one token back to ``bucket`` (call under :meth:`locked`)."""
        i = 2 * bucket
        self._rate[i] = min(capacity, self._rate[i] + 1.0)

    def clear(self, region: int) -> None:
        """Forget a dead process's connections (its region)."""
        head = self._heads[region]
        head[0] = head[1] = 0
        counts = self._counts[region]
        counts[:] = memoryview(bytes(BUCKETS * 4)).cast("i")


class SharedLimiter(ConnectionLimiter):
    """A :class:`ConnectionLimiter` whose counts are those of every worker process.

    ``region`` is this process's part of ``table``. ``total`` is refreshed from the table
    at each admission and release (the stress mode reads it).
    """

    def __init__(self, table: SharedCounts, region: int, limits: Limits,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_total=limits.max_connections,
                         max_per_ip=limits.max_connections_per_ip, clock=clock)
        self.configure(limits)
        self.table = table
        self.region = region
        self._monotonic = clock  # CLOCK_MONOTONIC: one clock for every process

    def acquire(self, ip: str) -> Slot | Refused:
        """Admit a new connection from ``ip`` if the whole server is within its caps."""
        table = self.table
        bucket = table.bucket(ip)
        with table.locked():
            total = table.total()
            self.total = total
            over = self.over_cap(total, table.at(bucket), table.unauthenticated())
            if over is not None:
                return over
            if not table.take_token(bucket, float(self.max_rate), self.refill_per_second,
                                    self._monotonic()):
                return self.rate_refusal()
            table.add(self.region, bucket, total=1, unauthenticated=1)
        self.total = total + 1
        return Slot(ip=ip)

    def logged_in(self, slot: Slot) -> None:
        """The session on ``slot`` authenticated: no longer counted as not logged in.

        Its address gets back the rate token the connection took, as
        :meth:`ConnectionLimiter.logged_in` does.
        """
        if slot.unauthenticated and not slot.released:
            slot.unauthenticated = False
            table = self.table
            table.add(self.region, 0, total=0, unauthenticated=-1)
            with table.locked():
                table.refund_token(table.bucket(slot.ip), float(self.max_rate))

    def release(self, slot: Slot) -> None:
        """Give back ``slot`` (the session or the connection ended); later calls do nothing."""
        if slot.released:
            return
        slot.released = True
        unauthenticated = -1 if slot.unauthenticated else 0
        slot.unauthenticated = False
        self.table.add(self.region, self.table.bucket(slot.ip), total=-1,
                       unauthenticated=unauthenticated)
        self.total = self.table.total()

    def count(self, ip: str) -> int:
        """Open connections from ``ip``'s bucket, all processes."""
        return self.table.at(self.table.bucket(ip))


class SharedThrottle(AuthThrottle):
    """An :class:`AuthThrottle` that tells the other processes about what it counts.

    ``publish(ok, ip, login)`` is called for each failure and for each success that cleared a
    count here; :meth:`apply` takes in what another process published. Other keyword
    arguments (``max_keys``, ``clock``) are :class:`AuthThrottle`'s.
    """

    def __init__(self, settings: ThrottleSettings, publish: Callable[[bool, str, str], None],
                 **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._publish = publish

    def failed(self, ip: str, login: str) -> None:
        """Count a failed login here and in every other process."""
        super().failed(ip, login)
        self._publish(False, ip, login)

    def succeeded(self, ip: str, login: str) -> None:
        """Clear the ``ip + login`` count here and, if there was one, everywhere."""
        before = len(self)
        super().succeeded(ip, login)
        if len(self) < before:
            self._publish(True, ip, login)

    def apply(self, ok: bool, ip: str, login: str) -> None:
        """What another process counted: the same change here, not published again."""
        if ok:
            super().succeeded(ip, login)
        else:
            super().failed(ip, login)
