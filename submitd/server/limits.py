"""Connection caps and the failed-AUTH throttle (docs/security.md §3, §5).

Both are plain objects with an injectable clock and no I/O, so they are tested without sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AuthThrottle", "ConnectionLimiter"]


class ConnectionLimiter:
    """Count open connections in total and per client address."""

    def __init__(self, *, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def try_acquire(self, ip: str) -> bool:
        """Take a slot for ``ip``; False when a cap is reached (the caller answers 421 4.7.0)."""
        if self.total >= self.max_total or self._per_ip.get(ip, 0) >= self.max_per_ip:
            return False
        self.total += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    def why_refused(self, ip: str) -> str:
        """In plain words, which cap :meth:`try_acquire` hit for ``ip`` (for the log)."""
        if self.total >= self.max_total:
            return f"server full (limit {self.max_total})"
        return f"too many connections from this address (limit {self.max_per_ip})"

    def release(self, ip: str) -> None:
        """Give back the slot taken for ``ip``."""
        self.total -= 1
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]

    def count(self, ip: str) -> int:
        """Open connections from ``ip``."""
        return self._per_ip.get(ip, 0)


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class AuthThrottle:
    """Growing delays after failed logins, per client address and per account.

    After ``free`` failures a key is blocked for ``base * 2**(n - free)`` seconds (capped at
    ``cap``) after its last failure; a blocked attempt is refused with ``454 4.7.0`` *before*
    any password hashing. A key forgets its failures after ``forget`` seconds of quiet, and a
    successful login clears the account and the address. There is no hard lockout: an attacker
    can slow a real user down, never lock them out for long.
    """

    def __init__(
        self,
        *,
        free: int = 5,
        base: float = 1.0,
        cap: float = 300.0,
        forget: float = 3600.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.base = base
        self.cap = cap
        self.forget = forget
        self.max_keys = max_keys
        self._clock = clock
        self._failures: dict[str, _Failures] = {}

    def _delay(self, n: int) -> float:
        if n < self.free:
            return 0.0
        return float(min(self.cap, self.base * 2 ** (n - self.free)))

    def _keys(self, ip: str, account: str) -> tuple[str, str]:
        return f"ip:{ip}", f"user:{account.lower()}"

    def blocked_for(self, ip: str, account: str) -> float:
        """Seconds until an attempt for ``account`` from ``ip`` may be verified (0: go ahead)."""
        now = self._clock()
        wait = 0.0
        for key in self._keys(ip, account):
            entry = self._failures.get(key)
            if entry is None:
                continue
            if now - entry.last > self.forget:
                del self._failures[key]
                continue
            wait = max(wait, entry.last + self._delay(entry.count) - now)
        return max(0.0, wait)

    def failed(self, ip: str, account: str) -> None:
        """Record a failed login."""
        now = self._clock()
        if len(self._failures) >= self.max_keys:
            self._prune(now)
        for key in self._keys(ip, account):
            entry = self._failures.get(key)
            if entry is None:
                self._failures[key] = _Failures(count=1, last=now)
            else:
                entry.count += 1
                entry.last = now

    def succeeded(self, ip: str, account: str) -> None:
        """Record a successful login: the address and the account start afresh."""
        for key in self._keys(ip, account):
            self._failures.pop(key, None)

    def _prune(self, now: float) -> None:
        stale = [k for k, e in self._failures.items() if now - e.last > self.forget]
        for key in stale:
            del self._failures[key]
        if len(self._failures) >= self.max_keys:
            # Still full of fresh entries: drop the oldest half rather than grow without bound.
            for key, _ in sorted(self._failures.items(), key=lambda kv: kv[1].last)[
                : self.max_keys // 2
            ]:
                del self._failures[key]
