"""The link between the spool's owner and one worker process: JSON lines over a socketpair.

Worker to owner: ``{"op": "notify", "ids": [...]}`` (messages just committed, coalesced),
``{"op": "auth", "ok": false, "ip": ..., "login": ...}`` (a failed login, or a success that
cleared a count, for the shared throttle). Owner to worker: the same ``auth`` lines from the
other processes, ``{"op": "stop", "now": false}`` (drain as on SIGTERM; ``now``: stop at
once) and ``{"op": "reload"}`` (as on SIGHUP). No line carries a password or message data.

Sending never blocks the caller: lines wait in a bounded outbox that a task writes out. When
the owner's end closes (the owner died), the worker's :meth:`Link.receive` ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio

from .._logfmt import logfmt

__all__ = ["MAX_LINE", "MAX_PENDING", "Link"]

log = logging.getLogger("submitd.server")

#: The longest line either side accepts.
MAX_LINE = 65_536
#: Lines (or queue IDs) an outbox keeps while the peer does not read; beyond, new ones are
#: dropped (a queue ID dropped here is found by the owner's periodic rescan).
MAX_PENDING = 10_000
_IDS_PER_LINE = 1000


class Link:
    """One end of the link; start :meth:`send_loop` in a nursery, iterate :meth:`receive`."""

    def __init__(self, stream: trio.SocketStream, *, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self._lines: list[bytes] = []
        self._ids: list[str] = []
        self._wake = trio.Event()
        self._dropped = 0
        self._sent = trio.Event()
        self._sent.set()

    async def wait_sent(self) -> None:
        """Return once everything queued so far has been written (or the link broke)."""
        await self._sent.wait()

    def _queued(self) -> None:
        if self._sent.is_set():
            self._sent = trio.Event()
        self._wake.set()

    def send(self, message: Mapping[str, Any]) -> None:
        """Queue ``message`` for sending (non-blocking; dropped when the outbox is full)."""
        if len(self._lines) >= MAX_PENDING:
            self._dropped += 1
            return
        self._lines.append(json.dumps(message, ensure_ascii=True).encode("ascii") + b"\n")
        self._queued()

    def notify(self, queue_id: str) -> None:
        """Tell the owner ``queue_id`` was committed (coalesced with others; non-blocking)."""
        if len(self._ids) >= MAX_PENDING:
            self._dropped += 1
            return
        self._ids.append(queue_id)
        self._queued()

    def publish(self, ok: bool, ip: str, login: str) -> None:
        """Tell the owner about a login outcome for the shared throttle."""
        self.send({"op": "auth", "ok": ok, "ip": ip, "login": login})

    async def send_loop(self) -> None:
        """Write queued lines until the link breaks (then return quietly)."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                if self._dropped:
                    log.warning(logfmt("link_overflow", peer=self.peer, dropped=self._dropped))
                    self._dropped = 0
                lines, self._lines = self._lines, []
                ids, self._ids = self._ids, []
                for i in range(0, len(ids), _IDS_PER_LINE):
                    chunk = {"op": "notify", "ids": ids[i:i + _IDS_PER_LINE]}
                    lines.append(json.dumps(chunk).encode("ascii") + b"\n")
                if lines:
                    await self.stream.send_all(b"".join(lines))
                if not (self._lines or self._ids):
                    self._sent.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._sent.set()
            return

    async def receive(self) -> AsyncIterator[dict[str, Any]]:
        """The peer's messages, until it closes its end (or sends garbage)."""
        buffer = bytearray()
        while True:
            try:
                data = await self.stream.receive_some(MAX_LINE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                try:
                    message = json.loads(line)
                except ValueError:
                    message = None
                if isinstance(message, dict):
                    yield message
                else:
                    log.error(logfmt("link_garbage", peer=self.peer, length=len(line)))
            if len(buffer) > MAX_LINE:
                log.error(logfmt("link_garbage", peer=self.peer, length=len(buffer)))
                return
