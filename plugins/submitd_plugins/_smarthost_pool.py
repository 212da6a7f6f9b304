"""The smarthost plugin's run-time state: hosts marked down, idle connections, OAuth2 tokens.

The connection pool belongs to one configuration (a reload closes its idle connections). The
record of failed hosts, :class:`MarkDownTable`, lives in ``config.server_stash`` and so
survives a reload; :class:`MarkDown` reads it with the current configuration's
``host_down_time`` and routes. The OAuth2 access tokens, :class:`TokenCache`, live there too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import trio

from submitd import Secret, StashKey, logfmt

from ._smarthost_config import HostAddress, Route
from ._smarthost_oauth import Token

__all__ = ["TOKENS", "ConnectionPool", "Lease", "MarkDown", "MarkDownTable", "TokenCache"]

log = logging.getLogger("submitd.plugins.smarthost")

#: The longest a QUIT on an idle connection may take before the socket is simply closed.
CLOSE_TIMEOUT = 5.0


class Connection(Protocol):
    """What the pool needs from an SMTP client connection."""

    @property
    def usable(self) -> bool:
        """False once the connection broke or was closed."""
        ...

    async def aclose(self) -> None:
        """QUIT (best effort) and close; never raises."""
        ...


C = TypeVar("C", bound=Connection)


@dataclass(frozen=True, kw_only=True)
class Failure:
    """One host's last failure on one route: when (monotonic seconds), why, and with what."""

    at: float
    error: str
    fingerprint: str  # the route's Route.fingerprint when it failed


class MarkDownTable:
    """Recent failures keyed by route name and host; kept for the server's lifetime.

    Only the event loop writes it (:class:`MarkDown`), so a reload, which configures in a
    worker thread, merely picks up the same table.
    """

    __slots__ = ("failures",)

    def __init__(self) -> None:
        self.failures: dict[tuple[str, HostAddress], Failure] = {}


class MarkDown:
    """Hosts that failed recently, per route: skipped for ``down_time`` seconds.

    Keyed by route and host, since a refused login or a rejected client certificate is a
    failure of that route's settings on that host, not of the host for every route. A mark
    counts while the route of that name still reaches the host the same way (same
    :attr:`Route.fingerprint`); the time it lasts is the current ``down_time``, so a reload
    that shortens ``host_down_time`` shortens the marks already made. ``down_time`` 0 turns
    mark-down off. ``clock`` returns monotonic seconds.
    """

    def __init__(self, *, down_time: float, clock: Callable[[], float],
                 table: MarkDownTable | None = None) -> None:
        self.down_time = down_time
        self._clock = clock
        self.table = table if table is not None else MarkDownTable()

    def mark(self, route: Route, host: HostAddress, error: str) -> None:
        """Record that ``host`` failed on ``route`` with ``error`` (one readable line)."""
        if self.down_time <= 0:
            return
        now, failures = self._clock(), self.table.failures
        for key in [k for k, f in failures.items() if now >= f.at + self.down_time]:
            del failures[key]  # expired, or left over from hosts no longer configured
        failures[route.name, host] = Failure(at=now, error=error, fingerprint=route.fingerprint)

    def clear(self, route: Route, host: HostAddress) -> None:
        """Forget a mark (the host answered)."""
        self.table.failures.pop((route.name, host), None)

    def is_down(self, route: Route, host: HostAddress) -> bool:
        """True while ``host`` is marked down on ``route``."""
        return self._current(route, host) is not None

    def all_down(self, route: Route) -> str | None:
        """The most recent error when every host of ``route`` is marked down, else None."""
        latest: Failure | None = None
        for host in route.hosts:
            failure = self._current(route, host)
            if failure is None:
                return None
            if latest is None or failure.at > latest.at:
                latest = failure
        return latest.error if latest is not None else None

    def _current(self, route: Route, host: HostAddress) -> Failure | None:
        key = (route.name, host)
        failure = self.table.failures.get(key)
        if failure is None:
            return None
        if (self._clock() >= failure.at + self.down_time
                or failure.fingerprint != route.fingerprint):
            del self.table.failures[key]
            return None
        return failure


@dataclass(kw_only=True)
class Lease(Generic[C]):
    """One open connection while a delivery uses it: where it goes and how much it carried."""

    route: str
    host: HostAddress
    client: C
    sent: int = 0  # messages handed over on this connection
    reused: bool = False  # taken from the pool rather than opened for this delivery
    idle_since: float = 0.0


class ConnectionPool(Generic[C]):
    """Idle connections per route, reused for the next message within ``reuse_time``.

    A connection goes back to the pool only while it is usable and has carried fewer than
    ``max_messages``. Idle connections are closed (QUIT) once ``reuse_time`` has passed by a
    reaper task, and all of them by :meth:`close`, which is synchronous so that
    ``submitd_unconfigure`` can call it. The reaper is a trio system task: the plugin has no
    nursery of its own, and the task must outlive the hook call that parked the connection;
    it only ever closes connections and logs instead of raising.
    """

    def __init__(self, *, reuse_time: float, max_messages: int) -> None:
        self.reuse_time = reuse_time
        self.max_messages = max_messages
        self.closed = False
        self._idle: dict[str, list[Lease[C]]] = {}
        self._reaper: trio.lowlevel.TrioToken | None = None  # set while a reaper runs
        self._wake = trio.Event()

    def idle_count(self, route: str | None = None) -> int:
        """How many idle connections are kept (for one route, or all)."""
        if route is not None:
            return len(self._idle.get(route, ()))
        return sum(len(v) for v in self._idle.values())

    async def take(self, route: str) -> Lease[C] | None:
        """The most recently used idle connection of ``route`` that may still be used, or None.

        Connections that sat idle too long or broke meanwhile are closed on the way.
        """
        idle = self._idle.get(route)
        now = trio.current_time()
        while idle:
            lease = idle.pop()
            if lease.client.usable and now - lease.idle_since < self.reuse_time:
                lease.reused = True
                return lease
            await discard(lease)
        return None

    async def give_back(self, lease: Lease[C]) -> None:
        """Keep ``lease`` for the next message, or close it (QUIT) if it is not reusable."""
        if (self.closed or self.reuse_time <= 0 or not lease.client.usable
                or lease.sent >= self.max_messages):
            await discard(lease)
            return
        lease.idle_since = trio.current_time()
        lease.reused = False
        self._idle.setdefault(lease.route, []).append(lease)
        if self._reaper is None:
            self._reaper = trio.lowlevel.current_trio_token()
            trio.lowlevel.spawn_system_task(self._reap, name="smarthost idle reaper")
        else:
            self._poke()  # an earlier deadline may now be due

    def close(self) -> None:
        """Stop reusing; the reaper closes every idle connection (callable from any thread)."""
        self.closed = True
        token = self._reaper
        if token is None:
            return
        # When the run is over the process is ending, and the sockets end with it.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._poke)

    def _poke(self) -> None:
        self._wake.set()

    async def _reap(self) -> None:
        try:
            while not self.closed and self._idle_deadline() is not None:
                deadline = self._idle_deadline()
                assert deadline is not None
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                self._wake = trio.Event()
                now = trio.current_time()
                for route, idle in list(self._idle.items()):
                    expired = [x for x in idle if now - x.idle_since >= self.reuse_time]
                    self._idle[route] = [x for x in idle if x not in expired]
                    for lease in expired:
                        await discard(lease)
            if self.closed:
                idle_all = [x for v in self._idle.values() for x in v]
                self._idle.clear()
                for lease in idle_all:
                    await discard(lease)
        except Exception as exc:  # a system task must not raise: it would end the server
            log.error(logfmt("smarthost_reaper_failed", error=repr(exc)), exc_info=True)
        finally:
            self._reaper = None

    def _idle_deadline(self) -> float | None:
        since = [x.idle_since for v in self._idle.values() for x in v]
        return min(since) + self.reuse_time if since else None


async def discard(lease: Lease[C]) -> None:
    """Close a connection (QUIT, bounded), even while the caller is being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await lease.client.aclose()


Fetcher = Callable[[], Awaitable[Token]]


class TokenCache:
    """Tokens per key, single-flight: concurrent callers of one key share one request.

    Lives in ``config.server_stash`` (a reload keeps the tokens: the key holds the route's
    OAuth fingerprint). Only the event loop touches it.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, ...], Token] = {}
        self._locks: dict[tuple[str, ...], trio.Lock] = {}
        self.requests = 0  # token requests made (for logs and tests)
        #: The latest refresh token a provider rotated to, by the route's OAuth fingerprint.
        self.refresh_tokens: dict[str, Secret] = {}

    async def get(self, key: tuple[str, ...], fetch: Fetcher) -> tuple[Token, bool]:
        """A token for ``key`` and whether it was fetched just now (False: from the cache)."""
        token = self._tokens.get(key)
        if token is not None and not token.due(trio.current_time()):
            return token, False
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            token = self._tokens.get(key)  # another caller may have fetched it meanwhile
            if token is not None and not token.due(trio.current_time()):
                return token, False
            self.requests += 1
            token = await fetch()
            self._tokens[key] = token
            return token, True

    def invalidate(self, key: tuple[str, ...], token: Token) -> None:
        """Forget ``token`` (the server refused it), unless it was replaced already."""
        if self._tokens.get(key) is token:
            del self._tokens[key]


#: Where the token cache lives in ``config.server_stash``.
TOKENS = StashKey[TokenCache]()
