"""The failed-login throttle: growing delays that slow guessing without locking users out.

Failed logins (``535``) are counted under three keys:

* the client address and the login together (``ip + login``),
* the client address alone (``ip``: one address guessing at many logins),
* the login alone (``login``: many addresses guessing at one login).

The first two *refuse*: once a key has used its allowance, an attempt it covers is refused
(``454 4.7.0``, before any password hash runs) until ``2 ** (n - allowance)`` seconds after
the key's last failure, capped at ``max_delay``. The allowance is ``limit`` failures for an
address and login, and :data:`ADDRESS_SHARE` times that for an address (several users may
share one address behind NAT). Only failures from that address count, so nobody can get a
real user refused at an address the attacker does not share.

The login-wide key is a *brake*: it never refuses, it only makes an attempt wait (at most
:data:`BRAKE_MAX` seconds) before it is verified. Guessing at one login from many addresses
is slowed; the real user, typing the right password at an address with no failures, waits a
few seconds at worst and gets in.

A successful login clears its own ``ip + login`` key and nothing else: the address keeps its
count (one valid account must not let the same address guess at every other one), and so
does the login-wide brake. A key forgets its failures once ``window`` seconds pass without a
new one. The table is bounded: expired keys are pruned as failures come in, and beyond
``max_keys`` the keys whose last failure is oldest are dropped first (their delays, at most
``max_delay``, have long run out). A login name is stored hashed when it is long, so a key's
size does not depend on what the client sent.

Plain object, no I/O; the clock is ``trio.current_time`` unless one is injected. See
docs/security.md §3.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..config import Limits

__all__ = ["ADDRESS_SHARE", "BRAKE_MAX", "Admission", "AuthThrottle", "ThrottleSettings"]

#: The longest the login-wide brake makes an attempt wait (seconds): well under the time a mail
#: client gives a server to answer AUTH, so a slowed user is never timed out.
BRAKE_MAX = 10.0

#: An address may have this many times ``limit`` failures (across its logins) before its
#: attempts wait: several users may share one address, and each has ``limit`` of their own.
ADDRESS_SHARE = 4

#: Login names longer than this (in UTF-8 bytes) are keyed by a digest.
_MAX_NAME = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottleSettings:
    """The throttle's numbers, from ``[limits]`` ``auth_fail_*``."""

    limit: int = 5
    max_delay: float = 300.0
    window: float = 3600.0

    @classmethod
    def from_limits(cls, limits: Limits) -> ThrottleSettings:
        """The settings a configuration's ``[limits]`` table gives."""
        return cls(
            limit=limits.auth_fail_limit,
            max_delay=limits.auth_fail_max_delay,
            window=limits.auth_fail_window,
        )

    @property
    def address_limit(self) -> int:
        """The failures an address may have, across its logins, before its attempts wait."""
        return ADDRESS_SHARE * self.limit

    def delay(self, failures: int, allowance: int) -> float:
        """How long after its last failure a key with ``failures`` failures waits."""
        if failures < allowance:
            return 0.0
        # Past ~2**30 the cap has long been reached; keep the exponent (and the float) small.
        return float(min(self.max_delay, 2.0 ** min(failures - allowance, 30)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """What the throttle says about one login attempt, before its password is checked."""

    #: > 0: refuse the attempt now (``454 4.7.0``); seconds until this address may try again.
    refused_for: float = 0.0
    #: Seconds to wait before verifying (the login-wide brake); 0 when not braked.
    slowed_for: float = 0.0


@dataclass(slots=True)
class _Entry:
    count: int
    last: float


class AuthThrottle:
    """Failed-login counters per ``ip + login``, per ``ip`` and per login (see the module)."""

    def __init__(
        self,
        settings: ThrottleSettings | None = None,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        #: The numbers in force; :meth:`configure` replaces them on reload (counts are kept).
        self.settings = settings or ThrottleSettings()
        self.max_keys = max_keys
        self._clock = clock
        # Ordered by last failure, oldest first: pruning and eviction pop from the front.
        self._table: dict[str, _Entry] = {}

    @property
    def free(self) -> int:
        """Failures a key may have before its attempts wait (``auth_fail_limit``)."""
        return self.settings.limit

    def configure(self, settings: ThrottleSettings) -> None:
        """Use new numbers from now on (a reload); the failures counted so far stay."""
        self.settings = settings

    def __len__(self) -> int:
        """The number of keys held (for tests and memory checks)."""
        return len(self._table)

    def check(self, ip: str, login: str) -> Admission:
        """Whether an attempt for ``login`` from ``ip`` may be verified now, or after a pause."""
        now = self._clock()
        pair, addr, user = _keys(ip, login)
        limit = self.settings.limit
        refused = max(self._wait(pair, now, limit),
                      self._wait(addr, now, self.settings.address_limit))
        if refused > 0:
            return Admission(refused_for=refused)
        brake = min(self._wait(user, now, limit), BRAKE_MAX)
        return Admission(slowed_for=brake)

    def failed(self, ip: str, login: str) -> None:
        """Count a failed login (a ``535``) under all three keys."""
        now = self._clock()
        for key in _keys(ip, login):
            entry = self._table.pop(key, None)
            if entry is None or now - entry.last > self.settings.window:
                entry = _Entry(count=0, last=now)
            entry.count += 1
            entry.last = now
            self._table[key] = entry  # re-inserted: now the newest
        self._prune(now)

    def succeeded(self, ip: str, login: str) -> None:
        """A successful login clears its own ``ip + login`` key, and only that one."""
        self._table.pop(_keys(ip, login)[0], None)

    def _wait(self, key: str, now: float, allowance: int) -> float:
        entry = self._table.get(key)
        if entry is None or now - entry.last > self.settings.window:
            return 0.0
        return max(0.0, entry.last + self.settings.delay(entry.count, allowance) - now)

    def _prune(self, now: float) -> None:
        table = self._table
        window = self.settings.window
        while table:
            oldest = next(iter(table))
            if now - table[oldest].last <= window and len(table) <= self.max_keys:
                break
            del table[oldest]


def _keys(ip: str, login: str) -> tuple[str, str, str]:
    """The ``ip + login``, ``ip`` and ``login`` keys of one attempt."""
    name = login.casefold()
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) > _MAX_NAME:
        name = "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()
    # An address never contains a space, so "p <ip> <login>" cannot collide across fields.
    return f"p {ip} {name}", f"a {ip}", f"u {name}"
