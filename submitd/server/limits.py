"""Connection caps and rates (docs/security.md §5).

A plain object with an injectable clock and no I/O, so it is tested without sockets. The
failed-login throttle is in :mod:`submitd.server.throttle`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Limits

__all__ = ["ConnectionLimiter", "Refused", "Slot"]


@dataclass(slots=True, eq=False)
class Slot:
    """One admitted connection: its address, and whether it still counts as not logged in.

    ``released`` tells whether it was given back: :meth:`ConnectionLimiter.release` may be
    called early, when the session ends, and again when the socket is closed.
    """

    ip: str
    unauthenticated: bool = True
    released: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """Why :meth:`ConnectionLimiter.acquire` turned a connection away (plain words, for the log).

    ``rate`` is True when the address connected too often (as opposed to too many at once).
    """

    reason: str
    rate: bool = False


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class ConnectionLimiter:
    """Admit or refuse new connections; count the open ones.

    Caps: ``max_total`` open connections, ``max_per_ip`` open from one address,
    ``max_unauthenticated`` open sessions that have not logged in yet, and a rate per address:
    a token bucket holding ``max_rate`` connections, refilled at ``max_rate`` per
    ``rate_window`` seconds — a burst of ``max_rate`` connections passes, then one more each
    ``rate_window / max_rate`` seconds. Only admitted connections take a token, and a
    connection that logs in gives its token back (never beyond ``max_rate``): the rate
    limits addresses that connect without logging in, not an application that reconnects once
    per message (its logins are throttled on their own, :mod:`submitd.server.throttle`, and
    its open connections capped by ``max_per_ip``). The rate table holds at most
    ``max_addresses`` addresses: when it is full, addresses whose bucket has refilled are
    forgotten first (they are as good as new), then the longest quiet half.
    """

    def __init__(
        self,
        *,
        max_total: int,
        max_per_ip: int,
        max_rate: int = 30,
        rate_window: float = 10.0,
        max_unauthenticated: int = 200,
        max_addresses: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_rate = max_rate
        self.rate_window = rate_window
        self.max_unauthenticated = max_unauthenticated
        self.max_addresses = max_addresses
        self._clock = clock
        self.total = 0
        #: Open sessions that have not logged in yet.
        self.unauthenticated = 0
        self._per_ip: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    def configure(self, limits: Limits) -> None:
        """Take the caps from ``[limits]`` (at start and on reload; open slots stay counted)."""
        self.max_total = limits.max_connections
        self.max_per_ip = limits.max_connections_per_ip
        self.max_rate = limits.max_connection_rate
        self.rate_window = limits.connection_rate_window
        self.max_unauthenticated = limits.max_unauthenticated

    @classmethod
    def from_limits(cls, limits: Limits, **kwargs: Any) -> ConnectionLimiter:
        """A limiter with the caps of ``[limits]``."""
        limiter = cls(max_total=limits.max_connections,
                      max_per_ip=limits.max_connections_per_ip, **kwargs)
        limiter.configure(limits)
        return limiter

    def acquire(self, ip: str) -> Slot | Refused:
        """Admit a new connection from ``ip`` (a :class:`Slot`), or say which cap it hit."""
        over = self.over_cap(self.total, self._per_ip.get(ip, 0), self.unauthenticated)
        if over is not None:
            return over
        if not self._take_token(ip):
            return self.rate_refusal()
        self.total += 1
        self.unauthenticated += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return Slot(ip=ip)

    def over_cap(self, total: int, from_ip: int, unauthenticated: int) -> Refused | None:
        """The cap a new connection would break with these open counts, or None."""
        if total >= self.max_total:
            return Refused(reason=f"server full (limit {self.max_total})")
        if from_ip >= self.max_per_ip:
            return Refused(reason=f"too many connections from this address "
                                  f"(limit {self.max_per_ip})")
        if unauthenticated >= self.max_unauthenticated:
            return Refused(reason=f"too many sessions that have not logged in "
                                  f"(limit {self.max_unauthenticated})")
        return None

    def rate_refusal(self) -> Refused:
        """The refusal of an address that has no connection-rate token left."""
        return Refused(rate=True, reason=f"too many new connections from this address "
                                         f"(limit {self.max_rate} per {self.rate_window:g}s)")

    @property
    def refill_per_second(self) -> float:
        """How fast an address's rate bucket refills (tokens per second)."""
        return self.max_rate / self.rate_window if self.rate_window > 0 else float("inf")

    def logged_in(self, slot: Slot) -> None:
        """The session on ``slot`` authenticated: it no longer counts as unauthenticated.

        Its address gets back the rate token the connection took (at most ``max_rate``).
        """
        if slot.unauthenticated and not slot.released:
            self._leave_unauthenticated(slot)
            bucket = self._buckets.get(slot.ip)
            if bucket is not None:  # None: forgotten since, as good as full
                bucket.tokens = min(float(self.max_rate), bucket.tokens + 1.0)

    def release(self, slot: Slot) -> None:
        """Give back ``slot`` (the session or the connection ended); later calls do nothing."""
        if slot.released:
            return
        slot.released = True
        self._leave_unauthenticated(slot)
        self.total -= 1
        left = self._per_ip[slot.ip] - 1
        if left:
            self._per_ip[slot.ip] = left
        else:
            del self._per_ip[slot.ip]

    def _leave_unauthenticated(self, slot: Slot) -> None:
        if slot.unauthenticated:
            slot.unauthenticated = False
            self.unauthenticated -= 1

    def count(self, ip: str) -> int:
        """Open connections from ``ip``."""
        return self._per_ip.get(ip, 0)

    @property
    def addresses(self) -> int:
        """Addresses the rate table remembers (bounded by ``max_addresses``)."""
        return len(self._buckets)

    def _take_token(self, ip: str) -> bool:
        now = self._clock()
        per_second = self.refill_per_second
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= self.max_addresses:
                self._prune(now, per_second)
            bucket = self._buckets[ip] = _Bucket(tokens=float(self.max_rate), stamp=now)
        else:
            refill = (now - bucket.stamp) * per_second
            bucket.tokens = min(float(self.max_rate), bucket.tokens + refill)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _prune(self, now: float, per_second: float) -> None:
        full = float(self.max_rate)
        refilled = [ip for ip, b in self._buckets.items()
                    if b.tokens + (now - b.stamp) * per_second >= full]
        for ip in refilled:
            del self._buckets[ip]
        if len(self._buckets) >= self.max_addresses:
            # Still full of busy addresses: forget the longest quiet half rather than grow.
            by_age = sorted(self._buckets.items(), key=lambda item: item[1].stamp)
            for ip, _ in by_age[: max(1, self.max_addresses // 2)]:
                del self._buckets[ip]
