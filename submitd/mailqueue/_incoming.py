"""Receiving one message into the spool and committing it (see :mod:`.spool` for the rules).

The temp file is created by the first worker-thread trip that writes (a small message: the
one in :meth:`IncomingMessage.finish`), not by :meth:`Spool.open_incoming`. The commit runs as
one worker-thread call, so a cancellation can never stop it half-way: either every step ran
(fsynced message, fsynced sidecar, both renamed, directories fsynced) or the files it made are
removed again and :class:`SpoolError` is raised. In that call the message's own files are
fsynced by its own thread; the two directory fsyncs are shared with the commits running at
the same time (group commit, :class:`submitd.durable.DirectorySync`).

A large message is written out while the rest of it is still being received: every
:data:`WRITE_BUFFER_SIZE` octets go to a worker thread in the background and the task goes on
reading, so at most two buffers are held (one being written, one filling). The next write,
:meth:`IncomingMessage.finish`, commit or abort first waits for the write in flight, and a
write that failed surfaces there as :class:`SpoolError`.
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
from ._decode import decode_record
from ._edits import bounded_header_section, edited_header_section
from ._layout import Layout
from ._records import Origin, QueuedMessage, QueueRecord, RecipientRecord, encode_record
from ._writer import WRITEBACK_INTERVAL, BackgroundWrite, start_writeback

__all__ = ["WRITEBACK_INTERVAL", "WRITE_BUFFER_SIZE", "IncomingMessage"]

log = logging.getLogger("submitd.queue")

#: Bytes of message data held in memory before they are written out in a worker thread.
WRITE_BUFFER_SIZE = 256 * 1024


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
        prepare_layout: Callable[[], None],
        dirsync: _durable.DirectorySync,
        loaded: Callable[[QueueRecord], QueuedMessage | None] | None = None,
        remember: Callable[[QueuedMessage], None] | None = None,
    ) -> None:
        self.queue_id = queue_id
        self._layout = layout
        self._busy = busy  # the spool's set of IDs being received; we leave it when done
        self._clock = clock
        self._path = path
        self._prepare_layout = prepare_layout  # blocking: creates the directories once
        self._dirsync = dirsync  # the spool's group commit of directory fsyncs
        # After the commit, in its worker thread: the message as Spool.load would return it,
        # handed to ``remember`` so that the runner's first load needs no trip of its own.
        self._loaded = loaded
        self._remember = remember
        self._fd: int | None = None  # created by the first write in a worker thread
        self._created = False
        self._written = 0  # bytes already in the file
        self._writeback_from = 0  # bytes before this offset are already being written back
        self._commit_started = False
        self._buffer = bytearray()
        self._writing: BackgroundWrite | None = None  # the write in flight, if any
        self._size = 0
        self._phase = _Phase.RECEIVING

    @property
    def size(self) -> int:
        """Bytes received so far."""
        return self._size

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; buffered in memory, written out in a thread every 256 KiB.

        The write-out runs in the background: this returns once the previous one is done
        (raising :class:`SpoolError` if it failed) and the new one has started.
        """
        self._expect(_Phase.RECEIVING)
        if self._writing is not None and self._writing.done:
            await self._settle()  # report a failed write as soon as it is known
        self._size += len(chunk)
        if not self._buffer and len(chunk) >= WRITE_BUFFER_SIZE:
            await self._flush(chunk)  # a whole chunk goes out as it is, without a copy
            return
        self._buffer += chunk
        if len(self._buffer) >= WRITE_BUFFER_SIZE:
            await self._flush(None)

    async def finish(self, *, max_header_size: int) -> MessageHandle:
        """Mark the message complete: write out the buffer and parse the header section.

        Reads at most ``max_header_size`` bytes. Returns an editable :class:`MessageHandle`
        on the temp file for ``submitd_data_filter``.
        """
        self._expect(_Phase.RECEIVING)
        await self._settle()
        limit = min(self._size, max_header_size)
        data, self._buffer = self._buffer, bytearray()
        try:
            # One trip to a worker thread: create the file if no write did yet, write what is
            # left, and read the header section back unless it is all in memory already.
            head = await _durable.run_blocking(self._finish_sync, data, limit)
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
        return await self._commit(record, edits, message.body_offset)

    async def commit_unfinished(
        self, envelope: Envelope, *, session_info: Mapping[str, str], origin: Origin
    ) -> str:
        """Commit a message written by this server without :meth:`finish` (no header edits).

        Writing what is buffered, the fsyncs and the renames share one worker-thread trip
        (:meth:`Spool.enqueue`). Raises :class:`SpoolError` as :meth:`commit` does.
        """
        self._expect(_Phase.RECEIVING)
        return await self.commit(
            envelope,
            MessageHandle(path=self._path, size=self._size, headers=[], body_offset=0,
                          queue_id=self.queue_id, editable=False),
            session_info=session_info,
            origin=origin,
        )

    async def _commit(self, record: QueueRecord, edits: HeaderEdits, body_offset: int) -> str:
        await self._settle()
        data, self._buffer = self._buffer, bytearray()  # still buffered when not finished
        try:
            record, view = await _durable.run_blocking(
                self._commit_sync, record, edits, body_offset, data
            )
        except BaseException as exc:
            if not self._commit_started:
                raise  # cancelled before the worker thread ran: abort() removes the file
            # _commit_sync has already removed every file it made: nothing is queued.
            self._phase = _Phase.DISCARDED
            self._busy.discard(self.queue_id)
            if not isinstance(exc, OSError | ValueError):
                raise
            log.error(logfmt("commit_failed", queue_id=self.queue_id, error=exc))
            raise SpoolError(f"cannot queue {self.queue_id}: {exc}") from exc
        self._phase = _Phase.COMMITTED
        self._busy.discard(self.queue_id)
        if view is not None and self._remember is not None:
            self._remember(view)
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
        self._buffer = bytearray()
        writing, self._writing = self._writing, None
        if writing is None and not self._created:
            self._busy.discard(self.queue_id)  # nothing was written: no file to remove
            return
        # Shielded: abort runs in cleanup paths, often while the session is being cancelled.
        # A write in flight still uses the descriptor: it finishes (its error does not
        # matter now) before the descriptor is closed and the files removed.
        with trio.CancelScope(shield=True):
            try:
                if writing is not None:
                    await writing.wait()
                fd, self._fd = self._fd, None
                if self._created:
                    await _durable.run_blocking(self._discard_sync, fd)
            finally:
                self._busy.discard(self.queue_id)

    # --- internals --------------------------------------------------------------------------

    def _expect(self, *phases: _Phase) -> None:
        if self._phase not in phases:
            raise SpoolError(f"message {self.queue_id} is {self._phase.value}")

    async def _flush(self, chunk: bytes | None) -> None:
        """Start writing the buffer (or ``chunk``, when the buffer is empty) in the background.

        The previous write must be done first; at most one is in flight.
        """

        def take() -> bytes | bytearray:
            if chunk is not None:
                return chunk
            data, self._buffer = self._buffer, bytearray()
            return data

        try:
            await self._settle()
            self._writing = await BackgroundWrite.start(self._write_sync, take)
        except trio.Cancelled:
            if chunk is not None:
                self._buffer += chunk  # not taken (that happens without a checkpoint): keep it
            raise

    async def _settle(self) -> None:
        """Wait for the write in flight; a failed one fails the message (SpoolError)."""
        writing = self._writing
        if writing is None:
            return
        await writing.wait()  # if cancelled here, the write stays in flight for abort()
        self._writing = None
        error = writing.error
        if isinstance(error, OSError):
            await self._fail("write", error)
        if error is not None:
            raise error

    # Blocking parts, run in a worker thread, one at a time: a background write (``_writing``)
    # is always waited for before the next one starts and before finish, commit or abort.

    def _write_sync(self, data: bytes | bytearray) -> int:
        """Append ``data`` to the temp file, creating it first; return its descriptor."""
        fd = self._fd
        if fd is None:
            if self._created:
                raise ValueError("the spool file is closed")
            self._prepare_layout()
            fd = self._fd = _durable.open_exclusive(self._path)
            self._created = True
        if data:
            _durable.write_all(fd, data)
            self._written += len(data)
            start = self._writeback_from
            if self._written - start >= WRITEBACK_INTERVAL and start_writeback is not None:
                start_writeback(fd, start, self._written - start)
                self._writeback_from = self._written
        return fd

    def _finish_sync(self, data: bytearray, limit: int) -> bytes:
        in_memory = self._written == 0
        fd = self._write_sync(data)
        if in_memory:
            return bytes(memoryview(data)[:limit])  # the whole message was in the buffer
        return _durable.read_prefix(fd, limit)

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
        self, record: QueueRecord, edits: HeaderEdits, body_offset: int, data: bytearray
    ) -> tuple[QueueRecord, QueuedMessage | None]:
        self._commit_started = True
        layout = self._layout
        queue_id = self.queue_id
        if data or self._fd is None:
            try:
                self._write_sync(data)
            except BaseException:
                _durable.close_quietly(self._fd)
                self._fd = None
                if self._created:
                    _durable.unlink_quietly(self._path)
                raise
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
            sidecar = encode_record(record)
            _durable.write_file_durably(env_tmp, sidecar)
            leftovers.append(env_tmp)
            # Each directory fsync is shared with the commits running alongside: it returns
            # once an fsync of the directory that started after our rename has succeeded.
            mark = self._dirsync.mark(layout.msg)
            os.rename(msg_tmp, layout.msg_path(queue_id))
            leftovers.remove(msg_tmp)
            placed.append(layout.msg_path(queue_id))
            self._dirsync.sync(layout.msg, since=mark)
            mark = self._dirsync.mark(layout.env)
            os.rename(env_tmp, layout.env_path(queue_id))  # the commit point
            leftovers.remove(env_tmp)
            placed.insert(0, layout.env_path(queue_id))
            self._dirsync.sync(layout.env, since=mark)
        except BaseException:
            # Never fsync the same descriptor again after a failure: drop it and the files,
            # the sidecar first (a message file without one is a fragment recovery removes).
            _durable.close_quietly(fd)
            for path in leftovers:
                _durable.unlink_quietly(path)
            for path in placed:
                if _durable.unlink_quietly(path) and path.parent == layout.env:
                    with contextlib.suppress(OSError):
                        self._dirsync.sync(layout.env)
            raise
        # Committed: from here on nothing may fail the commit. The view is an optimisation;
        # it is built from the sidecar's bytes exactly as a load would read them.
        view = None
        if self._loaded is not None:
            with contextlib.suppress(Exception):
                view = self._loaded(decode_record(sidecar, queue_id=queue_id))
        return record, view
