"""Read deadlines of one session, and the server's stress mode (docs/security.md §5).

A session waits for its client under one deadline at a time, chosen before each read:

- waiting for a command: ``command_timeout`` once logged in, ``preauth_timeout`` before;
- inside a command (its first byte arrived, its CRLF not yet): the same number of seconds,
  counted from the command's first byte, not from the last read — a client that sends one
  byte every few seconds is cut as surely as a silent one;
- in DATA: the same per-read deadline, the whole-DATA deadline (``data_timeout``), and the
  minimum data rate: after a grace of :data:`DATA_RATE_GRACE` seconds (``command_timeout``
  when shorter), the bytes received since the ``354`` must keep up with ``min_data_rate``
  bytes per second on average;
- under stress (the server holds ``stress_threshold`` percent of ``max_connections`` or
  more) the per-read deadline shrinks to ``stress_timeout``, for waits already under way too.

The times are trio clock values; nothing here reads or writes a socket.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import trio

from .._logfmt import logfmt
from ..config import Limits

__all__ = ["DATA_RATE_GRACE", "Deadline", "ReadDeadlines", "Stress"]

log = logging.getLogger("submitd.connection")

#: Seconds at the start of DATA during which the minimum data rate is not checked (a client
#: may pause that long between reads anyway); ``command_timeout`` when that is shorter.
DATA_RATE_GRACE = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Deadline:
    """When the next read gives up, and what to log if it does.

    ``started`` is where the per-read window began (a command's first byte, or now): stress
    mode moves ``at`` to ``started + stress_timeout`` when that is earlier, and then
    ``stress_reason`` is the one to log.
    """

    at: float
    started: float
    phase: str
    reason: str
    stress_reason: str


class Stress:
    """Postfix-style stress mode, shared by every listener of one server.

    :meth:`update` turns it on when the open connections reach ``threshold`` percent of the
    cap and off again below; turning on shortens every wait registered with :meth:`watch`.
    """

    def __init__(self, *, threshold: int, timeout: float) -> None:
        self.threshold = threshold
        self.timeout = timeout
        self.active = False
        self._waits: dict[trio.CancelScope, float] = {}

    def configure(self, limits: Limits) -> None:
        """Take ``stress_threshold`` and ``stress_timeout`` from ``[limits]``."""
        self.threshold = limits.stress_threshold
        self.timeout = limits.stress_timeout

    def update(self, connections: int, cap: int) -> None:
        """Re-evaluate after a connection opened or closed; log a change of state."""
        active = connections * 100 >= self.threshold * cap
        if active == self.active:
            return
        self.active = active
        if active:
            log.warning(logfmt("stress_on", connections=connections, max_connections=cap,
                               threshold=f"{self.threshold}%", timeout=f"{self.timeout:g}s",
                               reason="the server is near its connection cap: every wait "
                                      "for a client is cut to limits.stress_timeout"))
            for scope, started in self._waits.items():
                scope.deadline = min(scope.deadline, started + self.timeout)
        else:
            log.info(logfmt("stress_off", connections=connections, max_connections=cap,
                            threshold=f"{self.threshold}%"))

    def watch(self, scope: trio.CancelScope, started: float) -> _Watch:
        """Register a wait whose per-read window began at ``started`` while it runs.

        Use it as a context manager (``with stress.watch(scope, started):``); it is entered
        on every read, so it is a small class rather than a generator.
        """
        return _Watch(self._waits, scope, started)


class _Watch:
    """One registered wait of :meth:`Stress.watch`, for the ``with`` block."""

    __slots__ = ("_scope", "_started", "_waits")

    def __init__(self, waits: dict[trio.CancelScope, float], scope: trio.CancelScope,
                 started: float) -> None:
        self._waits = waits
        self._scope = scope
        self._started = started

    def __enter__(self) -> None:
        self._waits[self._scope] = self._started

    def __exit__(self, *exc_info: object) -> None:
        del self._waits[self._scope]


class ReadDeadlines:
    """What one session's next read may take; fed with every chunk the client sends."""

    def __init__(self, limits: Limits, stress: Stress) -> None:
        self.limits = limits
        self.stress = stress
        #: When the first byte of a command not yet ended by CRLF arrived (None: between).
        self.command_started: float | None = None
        self._tail = b""
        #: When the current DATA phase began (the 354), and the bytes received since.
        self.data_started: float | None = None
        self.data_bytes = 0

    def received(self, data: bytes, now: float, *, in_data: bool) -> None:
        """Account for a chunk from the client (decrypted bytes)."""
        if not data:
            return
        if in_data:
            self.data_bytes += len(data)
        if self.command_started is None:
            self.command_started = now
        if (self._tail + data[-2:]).endswith(b"\r\n"):
            self.command_started = None  # everything received so far ends at a line end
        self._tail = data[-1:]

    def restart(self) -> None:
        """TLS started: the plaintext read before it is gone."""
        self.command_started = None
        self._tail = b""

    def _base(self, authenticated: bool) -> tuple[float, str]:
        lim = self.limits
        if authenticated or lim.command_timeout <= lim.preauth_timeout:
            return lim.command_timeout, "limits.command_timeout"
        return lim.preauth_timeout, "limits.preauth_timeout"

    def send_timeout(self, authenticated: bool) -> float:
        """How long a reply may take to go out: the read deadline between commands."""
        seconds = self._base(authenticated)[0]
        return min(seconds, self.stress.timeout) if self.stress.active else seconds

    def next(self, now: float, *, authenticated: bool, data_deadline: float | None) -> Deadline:
        """The deadline of the next read; ``data_deadline`` is the whole-DATA one, if in DATA."""
        seconds, key = self._base(authenticated)
        if data_deadline is not None:
            return self._data(now, seconds, key, data_deadline)
        self.data_started = None
        started = now if self.command_started is None else self.command_started
        reason = _command_reason(self.command_started is not None, seconds, key)
        stress_reason = _command_reason(self.command_started is not None, self.stress.timeout,
                                        _STRESS_KEY)
        if self.stress.active and self.stress.timeout < seconds:
            seconds, reason = self.stress.timeout, stress_reason
        return Deadline(at=started + seconds, started=started, phase="command", reason=reason,
                        stress_reason=stress_reason)

    def _data(self, now: float, seconds: float, key: str, data_deadline: float) -> Deadline:
        lim = self.limits
        stress = self.stress.timeout
        if self.data_started is None:
            self.data_started = data_deadline - lim.data_timeout
            self.data_bytes = 0
        stress_why = _data_idle_reason(stress, _STRESS_KEY)
        idle, idle_key = seconds, key
        if self.stress.active and stress < seconds:
            idle, idle_key = stress, _STRESS_KEY
        # Only the earliest candidate's reason is formatted (this runs on every read).
        at, why = now + idle, 0
        if data_deadline < at:
            at, why = data_deadline, 1
        if lim.min_data_rate > 0:
            grace = min(DATA_RATE_GRACE, lim.command_timeout)
            rate_at = self.data_started + max(grace, self.data_bytes / lim.min_data_rate)
            if rate_at < at:
                at, why = rate_at, 2
        if why == 0:
            reason = _data_idle_reason(idle, idle_key)
        elif why == 1:
            reason = (f"the message did not arrive within limits.data_timeout "
                      f"({lim.data_timeout:g}s)")
        else:
            reason = (f"the message arrived slower than limits.min_data_rate "
                      f"({lim.min_data_rate} bytes/s): {self.data_bytes} bytes in "
                      f"{at - self.data_started:.1f}s")
        return Deadline(at=at, started=now, phase="data", reason=reason, stress_reason=stress_why)


@lru_cache(maxsize=64)
def _data_idle_reason(seconds: float, key: str) -> str:
    return f"the client sent nothing for {seconds:g}s during DATA ({key})"


_STRESS_KEY = "limits.stress_timeout: the server is near its connection cap"


@lru_cache(maxsize=64)  # a few (seconds, key) pairs per configuration; formatted every read
def _command_reason(in_command: bool, seconds: float, key: str) -> str:
    if in_command:
        return f"the client took more than {seconds:g}s to send one command ({key})"
    if key == "limits.preauth_timeout":
        return f"the client did not log in and sent nothing for {seconds:g}s ({key})"
    return f"the client sent nothing for {seconds:g}s ({key})"
