"""The spool: the durable queue between "250 queued" and delivery.

The session streams a message into an :class:`IncomingMessage` (``tmp/ID.msg``), asks for
its header section (:meth:`IncomingMessage.finish`), runs the filters, then commits: the
message file is fsynced (rewritten first when filters edited headers), the envelope sidecar
is written and fsynced, the message is renamed to ``msg/ID`` and its directory fsynced, then
the sidecar to ``env/ID.json`` and its directory fsynced. The sidecar's rename is the commit
point; only after it, and the fsync of ``env/`` that follows, may the server say 250
(RFC 5321 §4.2.5). Any failure raises :class:`SpoolError` and leaves nothing to deliver.

Group commit: the directory fsyncs of concurrent commits (and of :meth:`Spool.save` and
:meth:`Spool.remove`) are shared through one :class:`submitd.durable.DirectorySync` per spool.
Each caller's own files are still fsynced by its own worker thread, and each caller returns
only after fsyncs of ``msg/`` and ``env/`` that started after its renames succeeded; a failed
directory fsync fails every caller it may concern, each of which removes its own files.

One server works on a spool at a time: :meth:`Spool.lock` takes ``<dir>/lock`` before
recovery. Every blocking call runs in a worker thread (``trio.to_thread.run_sync``, or
:func:`submitd.durable.run_blocking` on the paths taken per message): the event loop never waits
for disk.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import trio

from .. import durable as _durable
from ..errors import SpoolError
from ..message import MessageHandle
from ..views import Envelope
from ._batch import TripBatch
from ._decode import decode_record
from ._edits import bounded_header_section
from ._ids import is_queue_id, new_queue_id
from ._incoming import WRITE_BUFFER_SIZE, IncomingMessage
from ._layout import Layout
from ._lock import SpoolLocked, acquire_lock, release_lock
from ._records import Origin, QueuedMessage, QueueRecord, encode_record
from ._recovery import move_aside, recover_spool

__all__ = [
    "WRITE_BUFFER_SIZE",
    "IncomingMessage",
    "QueueEntryCorrupt",
    "QueueEntryMissing",
    "Spool",
    "SpoolLocked",
]

_DEFAULT_HEADER_LIMIT = 262_144
_LOCK_RETRY_INTERVAL = 0.1
_FRESH_HEADER_LIMIT = 16 * 1024  # bytes of header section a remembered commit may hold


class QueueEntryMissing(SpoolError):
    """No committed message has this queue ID (never queued, delivered, or deleted)."""


class QueueEntryCorrupt(SpoolError):
    """The message's sidecar or file cannot be read; :meth:`Spool.quarantine` moves it aside."""


class _Busy:
    """The queue IDs whose files this process is writing right now (recovery skips them)."""

    def __init__(self) -> None:
        self.incoming: set[str] = set()
        self.saving: set[str] = set()

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self.incoming or queue_id in self.saving


class Spool:
    """The on-disk queue under ``directory`` (``[queue] dir``).

    ``clock`` gives the wall-clock time recorded as a message's creation time when the
    envelope carries none. ``max_header_size`` bounds how much of a message :meth:`load`
    reads to parse its header section.
    """

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        max_header_size: int = _DEFAULT_HEADER_LIMIT,
    ) -> None:
        self.directory = Path(directory)
        self.layout = Layout(base=self.directory)
        self._clock = clock
        self._max_header_size = max_header_size
        self._busy = _Busy()
        self._layout_ready = False
        self._dirsync = _durable.DirectorySync()
        # Concurrent removals (the runner's, after deliveries that ended together) share a
        # worker-thread trip and the fsync of env/.
        self._removals: TripBatch[str, None] = TripBatch(self._remove_sync)
        # Messages just committed, as load() would read them (see remember_commits).
        self._fresh: OrderedDict[str, QueuedMessage] = OrderedDict()
        self._fresh_limit = 0
        self._recover_lock = trio.Lock()
        self._lock_fd: int | None = None

    def remember_commits(self, limit: int) -> None:
        """Keep up to ``limit`` just-committed messages in memory for their first :meth:`load`.

        The queue runner loads each message right after the session committed it; with this,
        that first load costs no worker-thread trip and no disk read. Only messages whose
        header section is small are kept, the oldest go first, and :meth:`save`,
        :meth:`remove`, :meth:`quarantine` and recovery forget what they touch, so a load
        never returns a state older than the spool's. ``0`` (the default) keeps none.
        """
        self._fresh_limit = max(0, limit)
        while len(self._fresh) > self._fresh_limit:
            self._fresh.popitem(last=False)

    def _remember(self, queued: QueuedMessage) -> None:
        if self._fresh_limit == 0 or len(queued.header_section) > _FRESH_HEADER_LIMIT:
            return
        self._fresh[queued.queue_id] = queued
        while len(self._fresh) > self._fresh_limit:
            self._fresh.popitem(last=False)

    @property
    def max_header_size(self) -> int:
        """How many bytes of a message :meth:`load` reads for its header section."""
        return self._max_header_size

    # --- start-up -------------------------------------------------------------------------

    async def lock(self, *, wait: float = 0.0) -> None:
        """Take the spool's lock (``<dir>/lock``, our pid inside); creates the directories.

        ``wait`` is how long to keep trying while another process holds it: an operator's
        ``submitd queue hold`` on a stopped server holds the lock for a moment, and a server
        starting in that moment should wait for it rather than refuse. Raises
        :class:`SpoolLocked` (naming the directory and the holder's pid) when the lock is
        still held after ``wait``, :class:`SpoolError` when it cannot be taken. Taking it twice
        in one Spool is an error; release it with :meth:`unlock`.
        """
        if self._lock_fd is not None:
            raise SpoolError(f"the spool {self.directory} is already locked by this server")
        deadline = trio.current_time() + wait
        while True:
            try:
                self._lock_fd = await trio.to_thread.run_sync(self._lock_sync)
                return
            except SpoolLocked:
                if trio.current_time() >= deadline:
                    raise
            except OSError as exc:
                raise SpoolError(f"cannot lock the spool {self.directory}: {exc}") from exc
            await trio.sleep(_LOCK_RETRY_INTERVAL)

    def _lock_sync(self) -> int:
        self.layout.create()
        self._layout_ready = True
        return acquire_lock(self.directory)

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (no-op when not held). Does not block."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            release_lock(fd)

    @property
    def locked(self) -> bool:
        """True while this Spool holds the spool's lock."""
        return self._lock_fd is not None

    async def recover(self) -> list[str]:
        """Create the directories, remove fragments, move unreadable sidecars to ``corrupt/``.

        Returns the committed queue IDs, oldest first. Safe to call while messages are being
        received: files of messages in progress in this process are left alone.
        """
        return list(await self.recover_due())

    async def recover_due(self) -> dict[str, float]:
        """Recover as :meth:`recover` does; return each committed ID with its due time.

        Each sidecar is read once. A held message is due at ``math.inf``.
        """
        async with self._recover_lock:
            self._fresh.clear()
            try:
                due = await trio.to_thread.run_sync(
                    partial(
                        recover_spool, self.layout, active=self._busy, check=self._check_sync
                    )
                )
            except OSError as exc:
                raise SpoolError(f"spool recovery failed in {self.directory}: {exc}") from exc
        self._layout_ready = True
        return due

    def _check_sync(self, queue_id: str) -> float | None:
        try:
            record = self._read_record_sync(queue_id)
        except QueueEntryMissing:
            return None
        except SpoolError as exc:
            raise ValueError(str(exc)) from exc
        return math.inf if record.held else record.next_attempt

    # --- receiving --------------------------------------------------------------------------

    async def open_incoming(self) -> IncomingMessage:
        """Start receiving a message: a new queue ID, its file to be created in ``tmp/``.

        Does not block or touch the disk: the exclusive file is created by the first worker-
        thread trip that writes to it, and a failure then raises :class:`SpoolError` from
        that call (:meth:`IncomingMessage.write`, ``finish`` or ``commit``).
        """
        queue_id = new_queue_id()
        self._busy.incoming.add(queue_id)
        return IncomingMessage(
            layout=self.layout,
            busy=self._busy.incoming,
            clock=self._clock,
            queue_id=queue_id,
            path=self.layout.tmp / f"{queue_id}.msg",
            prepare_layout=self._prepare_layout_sync,
            dirsync=self._dirsync,
            loaded=self._with_message_sync if self._fresh_limit else None,
            remember=self._remember,
        )

    def _prepare_layout_sync(self) -> None:
        if not self._layout_ready:
            self.layout.create()
            self._layout_ready = True

    # --- reading ----------------------------------------------------------------------------

    async def queued_ids(self) -> list[str]:
        """List the committed queue IDs, oldest first (reads ``env/`` in a worker thread)."""
        try:
            names = await trio.to_thread.run_sync(os.listdir, self.layout.env)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SpoolError(f"cannot list {self.layout.env}: {exc}") from exc
        return sorted(
            n.removesuffix(".json")
            for n in names
            if n.endswith(".json") and is_queue_id(n.removesuffix(".json"))
        )

    async def load_record(self, queue_id: str) -> QueueRecord:
        """Read the sidecar of ``queue_id`` (envelope and per-recipient state).

        Raises :class:`QueueEntryMissing` or :class:`QueueEntryCorrupt` (both SpoolError).
        """
        return await _durable.run_blocking(self._read_record_sync, queue_id)

    async def load(self, queue_id: str) -> QueuedMessage:
        """Read ``queue_id``: its record and a read-only :class:`MessageHandle` on ``msg/ID``.

        Raises :class:`QueueEntryMissing` or :class:`QueueEntryCorrupt` (both SpoolError).
        A message this spool just committed is answered from memory the first time
        (:meth:`remember_commits`).
        """
        fresh = self._fresh.pop(queue_id, None)
        if fresh is not None:
            await trio.lowlevel.checkpoint()
            return fresh
        return await _durable.run_blocking(self._load_sync, queue_id)

    async def list_records(
        self, *, on_unreadable: Callable[[str, str], None] | None = None
    ) -> list[tuple[str, QueueRecord]]:
        """Every committed message with its record, oldest first (one worker-thread trip).

        Each sidecar is read once. Messages removed while listing are left out, and so are
        unreadable ones (the runner moves those to ``corrupt/`` when it reaches them);
        ``on_unreadable(queue_id, reason)`` hears about each of those, from the worker thread.
        """
        return await trio.to_thread.run_sync(self._list_records_sync, on_unreadable)

    def _list_records_sync(
        self, on_unreadable: Callable[[str, str], None] | None
    ) -> list[tuple[str, QueueRecord]]:
        try:
            names = os.listdir(self.layout.env)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SpoolError(f"cannot list {self.layout.env}: {exc}") from exc
        out: list[tuple[str, QueueRecord]] = []
        for name in sorted(names):
            queue_id = name.removesuffix(".json")
            if not name.endswith(".json") or not is_queue_id(queue_id):
                continue
            try:
                out.append((queue_id, self._read_record_sync(queue_id)))
            except QueueEntryMissing:
                continue  # delivered or deleted while listing
            except SpoolError as exc:
                if on_unreadable is not None:
                    on_unreadable(queue_id, str(exc))
        return out

    def _read_record_sync(self, queue_id: str) -> QueueRecord:
        if not is_queue_id(queue_id):
            raise QueueEntryMissing(f"not a queue ID: {queue_id!r}")
        try:
            data = self.layout.env_path(queue_id).read_bytes()
        except FileNotFoundError as exc:
            raise QueueEntryMissing(f"no queued message {queue_id}") from exc
        except OSError as exc:
            raise SpoolError(f"cannot read the sidecar of {queue_id}: {exc}") from exc
        try:
            return decode_record(data, queue_id=queue_id)
        except (ValueError, TypeError, RecursionError, OverflowError) as exc:
            raise QueueEntryCorrupt(f"unreadable sidecar of {queue_id}: {exc}") from exc

    def _load_sync(self, queue_id: str) -> QueuedMessage:
        return self._with_message_sync(self._read_record_sync(queue_id))

    def _with_message_sync(self, record: QueueRecord) -> QueuedMessage:
        queue_id = record.queue_id
        path = self.layout.msg_path(queue_id)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(min(size, self._max_header_size))
        except FileNotFoundError as exc:
            raise QueueEntryCorrupt(f"message file of {queue_id} is missing") from exc
        except OSError as exc:
            raise SpoolError(f"cannot read the message {queue_id}: {exc}") from exc
        fields, body_offset, parsed = bounded_header_section(head, complete=len(head) >= size)
        handle = MessageHandle(
            path=path,
            size=size,
            headers=fields,
            body_offset=body_offset,
            queue_id=queue_id,
            editable=False,
        )
        return QueuedMessage(record=record, message=handle, header_section=parsed[:body_offset])

    # --- reports ----------------------------------------------------------------------------

    async def enqueue(
        self,
        envelope: Envelope,
        data: bytes,
        session_info: Mapping[str, str],
        *,
        origin: Origin = Origin.BOUNCE,
    ) -> str:
        """Queue a message this server wrote (a bounce or delay warning); return its ID.

        ``data`` is the whole message (CRLF line ends); it is committed exactly as a submitted
        message is (durable before this returns), writing included in one worker-thread trip.
        Raises :class:`SpoolError`.
        """
        incoming = await self.open_incoming()
        try:
            await incoming.write(data)  # buffered: written in the commit's trip if small
            return await incoming.commit_unfinished(
                envelope, session_info=session_info, origin=origin
            )
        finally:
            await incoming.abort()  # a no-op after the commit

    # --- updating ---------------------------------------------------------------------------

    async def save(self, record: QueueRecord) -> None:
        """Atomically replace the sidecar of ``record.queue_id`` (tmp, fsync, rename, fsync).

        The fsync of ``env/`` is shared with concurrent commits, saves and removals.

        Raises :class:`QueueEntryMissing` if the message was removed meanwhile (it is not
        brought back), :class:`SpoolError` on any I/O failure (the old sidecar stays).
        """
        queue_id = record.queue_id
        self._fresh.pop(queue_id, None)
        self._busy.saving.add(queue_id)
        try:
            await _durable.run_blocking(self._save_sync, record)
        except OSError as exc:
            raise SpoolError(f"cannot update the sidecar of {queue_id}: {exc}") from exc
        finally:
            self._busy.saving.discard(queue_id)

    def _save_sync(self, record: QueueRecord) -> None:
        target = self.layout.env_path(record.queue_id)
        if not target.exists():
            raise QueueEntryMissing(f"no queued message {record.queue_id}")
        tmp = self.layout.tmp / f"{record.queue_id}.json.{secrets.token_hex(4)}"
        _durable.write_file_durably(tmp, encode_record(record))
        mark = self._dirsync.mark(self.layout.env)
        try:
            os.replace(tmp, target)
        except BaseException:
            _durable.unlink_quietly(tmp)
            raise
        self._dirsync.sync(self.layout.env, since=mark)

    async def remove(self, queue_id: str) -> None:
        """Delete ``queue_id``: the sidecar first (no longer queued), then the message file.

        Only the sidecar's removal is made durable (an fsync of ``env/``, shared with
        concurrent removals, saves and commits; concurrent removals also share one
        worker-thread trip) before the message file goes: a message file
        without its sidecar is a fragment that recovery removes, so fsyncing ``msg/`` would
        buy nothing. Removing a message that is already gone is not an error.
        """
        if not is_queue_id(queue_id):
            raise QueueEntryMissing(f"not a queue ID: {queue_id!r}")
        self._fresh.pop(queue_id, None)
        try:
            await self._removals.call(queue_id)
        except OSError as exc:
            raise SpoolError(f"cannot remove {queue_id}: {exc}") from exc

    def _remove_sync(self, queue_ids: list[str]) -> list[OSError | None]:
        """Remove a batch of messages in one trip: their sidecars, one fsync, their files."""
        # The sidecars' removal must be durable before the message files go: a crash in
        # between must never leave a sidecar pointing at nothing.
        env = self.layout.env
        results: list[OSError | None] = [None] * len(queue_ids)
        unlinked: list[int] = []
        mark = self._dirsync.mark(env)
        for index, queue_id in enumerate(queue_ids):
            try:
                self.layout.env_path(queue_id).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                results[index] = exc
            else:
                unlinked.append(index)
        if unlinked:
            try:
                self._dirsync.sync(env, since=mark)
            except OSError as exc:
                for index in unlinked:
                    results[index] = OSError(exc.errno, exc.strerror, exc.filename)
        for index, queue_id in enumerate(queue_ids):
            if results[index] is None:
                try:
                    self.layout.msg_path(queue_id).unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    results[index] = exc
        return results

    async def quarantine(self, queue_id: str, reason: str) -> None:
        """Move ``queue_id``'s files to ``corrupt/`` and log ``reason`` (no longer queued)."""
        if not is_queue_id(queue_id):
            raise QueueEntryMissing(f"not a queue ID: {queue_id!r}")
        self._fresh.pop(queue_id, None)
        try:
            await trio.to_thread.run_sync(move_aside, self.layout, queue_id, reason)
        except OSError as exc:
            raise SpoolError(f"cannot move {queue_id} aside: {exc}") from exc
