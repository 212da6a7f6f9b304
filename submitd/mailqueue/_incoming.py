"""Receiving one message into the spool and committing it (see :mod:`.spool` for the rules).

The commit runs as one worker-thread call, so a cancellation can never stop it half-way:
either every step ran (fsynced message, fsynced sidecar, both renamed, directories fsynced)
or the files it made are removed again and :class:`SpoolError` is raised.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

import trio

from .. import durable as _durable
from .._logfmt import logfmt
from ..errors import SpoolError
from ..message import HeaderEdits, MessageHandle
from ..views import Envelope
from ._edits import bounded_header_section, edited_header_section
from ._layout import Layout
from ._records import Origin, QueueRecord, RecipientRecord, encode_record

__all__ = ["WRITE_BUFFER_SIZE", "IncomingMessage"]

log = logging.getLogger("submitd.queue")

#: Bytes of message data held in memory before they are written out in a worker thread.
WRITE_BUFFER_SIZE = 256 * 1024


def _write_and_read_prefix(fd: int, data: bytearray, limit: int) -> bytes:
    if data:
        _durable.write_all(fd, data)
    return _durable.read_prefix(fd, limit)


class _Phase(enum.Enum):
    """Where an incoming message stands; only RECEIVING and FINISHED can still commit."""

    RECEIVING = "receiving"
    FINISHED = "finished"
    COMMITTED = "committed"
    DISCARDED = "discarded"


class IncomingMessage:
    """A message being received into ``tmp/``; created by :meth:`Spool.open_incoming`.

    Call :meth:`write` with the unstuffed DATA chunks, :meth:`finish` once the terminator
    arrived, then :meth:`commit` or :meth:`abort`. Always call :meth:`abort` when giving up
    (it is idempotent and harmless after a commit). After any :class:`SpoolError` the temp
    files are already gone and every further call raises SpoolError.
    """

    def __init__(
        self,
        *,
        layout: Layout,
        busy: set[str],
        clock: Callable[[], float],
        queue_id: str,
        path: Path,
        fd: int,
    ) -> None:
        self.queue_id = queue_id
        self._layout = layout
        self._busy = busy  # the spool's set of IDs being received; we leave it when done
        self._clock = clock
        self._path = path
        self._fd: int | None = fd
        self._buffer = bytearray()
        self._size = 0
        self._phase = _Phase.RECEIVING

    @property
    def size(self) -> int:
        """Bytes received so far."""
        return self._size

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; buffered in memory, written out in a thread every 256 KiB."""
        self._expect(_Phase.RECEIVING)
        self._buffer += chunk
        self._size += len(chunk)
        if len(self._buffer) >= WRITE_BUFFER_SIZE:
            await self._flush()

    async def finish(self, *, max_header_size: int) -> MessageHandle:
        """Mark the message complete: write out the buffer and parse the header section.

        Reads at most ``max_header_size`` bytes. Returns an editable :class:`MessageHandle`
        on the temp file for ``submitd_data_filter``.
        """
        self._expect(_Phase.RECEIVING)
        limit = min(self._size, max_header_size)
        data, self._buffer = self._buffer, bytearray()
        try:
            # One trip to a worker thread: write what is left, read the header section back.
            head = await trio.to_thread.run_sync(_write_and_read_prefix, self._open_fd(), data,
                                                 limit)
        except OSError as exc:
            await self._fail("write", exc)
        fields, body_offset, _ = bounded_header_section(head, complete=limit >= self._size)
        self._phase = _Phase.FINISHED
        return MessageHandle(
            path=self._path,
            size=self._size,
            headers=fields,
            body_offset=body_offset,
            queue_id=self.queue_id,
            editable=True,
        )

    async def commit(
        self,
        envelope: Envelope,
        message: MessageHandle,
        *,
        session_info: Mapping[str, str],
        origin: Origin = Origin.SMTP,
    ) -> str:
        """Make the message durable and queued; return its queue ID.

        Applies ``message.edits`` (removed fields dropped, prepended fields first), fsyncs the
        message and the sidecar, renames both into the queue and fsyncs the directories.
        ``session_info`` (session id, peer, TLS version...) is stored for logs; ``origin``
        says whether a client submitted the message or this server wrote it. Raises
        :class:`SpoolError`; then nothing is queued and the temp files are gone.
        """
        if self._phase is _Phase.RECEIVING:
            await self._flush()
        self._expect(_Phase.RECEIVING, _Phase.FINISHED)
        if not envelope.recipients:
            await self.abort()
            raise SpoolError("a message without recipients cannot be queued")
        created = envelope.received_at or self._clock()
        record = QueueRecord(
            queue_id=self.queue_id,
            created=created,
            size=self._size,
            sender=envelope.sender,
            params=envelope.params,
            username=envelope.username,
            session=MappingProxyType({str(k): str(v) for k, v in session_info.items()}),
            recipients=tuple(
                RecipientRecord(address=r.address, params=r.params, next_attempt=created)
                for r in envelope.recipients
            ),
            next_attempt=created,
            origin=origin,
        )
        edits = HeaderEdits(prepend=list(message.edits.prepend), remove=set(message.edits.remove))
        try:
            record = await trio.to_thread.run_sync(
                self._commit_sync, record, edits, message.body_offset
            )
        except BaseException as exc:
            # _commit_sync has already removed every file it made: nothing is queued.
            self._phase = _Phase.DISCARDED
            self._busy.discard(self.queue_id)
            if not isinstance(exc, OSError | ValueError):
                raise
            log.error(logfmt("commit_failed", queue_id=self.queue_id, error=exc))
            raise SpoolError(f"cannot queue {self.queue_id}: {exc}") from exc
        self._phase = _Phase.COMMITTED
        self._busy.discard(self.queue_id)
        # The session logs the acceptance (with user and sender); this is the spool's detail.
        log.debug(
            logfmt(
                "queued",
                queue_id=self.queue_id,
                size=record.size,
                nrcpt=len(record.recipients),
                session_id=record.session.get("session_id"),
            )
        )
        return self.queue_id

    async def abort(self) -> None:
        """Discard the message and its temp files (idempotent; a no-op after commit)."""
        if self._phase in (_Phase.COMMITTED, _Phase.DISCARDED):
            return
        self._phase = _Phase.DISCARDED
        fd, self._fd = self._fd, None
        self._buffer = bytearray()
        # Shielded: abort runs in cleanup paths, often while the session is being cancelled.
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self._discard_sync, fd)
            finally:
                self._busy.discard(self.queue_id)

    # --- internals --------------------------------------------------------------------------

    def _expect(self, *phases: _Phase) -> None:
        if self._phase not in phases:
            raise SpoolError(f"message {self.queue_id} is {self._phase.value}")

    def _open_fd(self) -> int:
        if self._fd is None:
            raise SpoolError(f"the spool file of {self.queue_id} is closed")
        return self._fd

    async def _flush(self) -> None:
        if not self._buffer:
            return
        data, self._buffer = self._buffer, bytearray()
        try:
            await trio.to_thread.run_sync(_durable.write_all, self._open_fd(), data)
        except OSError as exc:
            await self._fail("write", exc)

    async def _fail(self, what: str, exc: OSError) -> NoReturn:
        log.error(logfmt("spool_failed", queue_id=self.queue_id, op=what, error=exc))
        await self.abort()
        raise SpoolError(f"cannot {what} the spool file of {self.queue_id}: {exc}") from exc

    def _discard_sync(self, fd: int | None) -> None:
        _durable.close_quietly(fd)
        layout = self._layout
        for suffix in (".msg", ".edited", ".json"):
            _durable.unlink_quietly(layout.tmp / f"{self.queue_id}{suffix}")

    def _commit_sync(
        self, record: QueueRecord, edits: HeaderEdits, body_offset: int
    ) -> QueueRecord:
        layout = self._layout
        queue_id = self.queue_id
        fd, self._fd = self._fd, None
        if fd is None:
            raise ValueError("the spool file is closed")
        leftovers = [self._path]  # temp files to remove if anything fails
        placed: list[Path] = []  # files already renamed into the queue, sidecar first
        try:
            if edits:
                head = _durable.read_prefix(fd, body_offset + 1)
                header = edited_header_section(head, body_offset, edits)
                msg_tmp = layout.tmp / f"{queue_id}.edited"
                out = _durable.open_exclusive(msg_tmp)
                leftovers.append(msg_tmp)
                try:
                    _durable.write_all(out, header)
                    _durable.copy_to_end(fd, body_offset, out)
                    os.fsync(out)
                    size = os.fstat(out).st_size
                finally:
                    _durable.close_quietly(out)
                # Forget the descriptor before closing: after a failed close() its number
                # may already belong to another file, which close_quietly must not touch.
                closing, fd = fd, None
                os.close(closing)
                _durable.unlink_quietly(self._path)
                leftovers.remove(self._path)
            else:
                msg_tmp = self._path
                os.fsync(fd)
                size = os.fstat(fd).st_size
                closing, fd = fd, None
                os.close(closing)
            record = replace(record, size=size)
            env_tmp = layout.tmp / f"{queue_id}.json"
            _durable.write_file_durably(env_tmp, encode_record(record))
            leftovers.append(env_tmp)
            os.rename(msg_tmp, layout.msg_path(queue_id))
            leftovers.remove(msg_tmp)
            placed.append(layout.msg_path(queue_id))
            _durable.fsync_dir(layout.msg)
            os.rename(env_tmp, layout.env_path(queue_id))  # the commit point
            leftovers.remove(env_tmp)
            placed.insert(0, layout.env_path(queue_id))
            _durable.fsync_dir(layout.env)
        except BaseException:
            # Never fsync the same descriptor again after a failure: drop it and the files.
            _durable.close_quietly(fd)
            for path in leftovers:
                _durable.unlink_quietly(path)
            for path in placed:
                if _durable.unlink_quietly(path):
                    with contextlib.suppress(OSError):
                        _durable.fsync_dir(path.parent)
            raise
        return record
