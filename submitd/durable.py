"""Blocking, durable file operations: the spool, the users file, plugins (public API).

Call them from a worker thread (``trio.to_thread.run_sync``, or the cheaper
:func:`run_blocking`), never on the event loop.

The rules (docs/security.md §6): a file counts as stored only after ``fsync`` on its descriptor
and ``fsync`` on the directory that received its name. A failed ``fsync`` is never retried
on the same descriptor: after an error the kernel may have dropped the dirty pages and a
second ``fsync`` can report success for data that is gone (the 2018 "fsyncgate" finding).

One ``fsync`` of a directory makes durable every change to its names made before that fsync
started, whoever made them: :class:`DirectorySync` lets concurrent writers share it (group
commit) instead of paying one directory fsync each.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio
from trio.lowlevel import (
    Abort,
    current_task,
    current_trio_token,
    reschedule,
    start_thread_soon,
    wait_task_rescheduled,
)

_T = TypeVar("_T")

__all__ = [
    "WRITEBACK_INTERVAL",
    "DirectorySync",
    "close_quietly",
    "copy_to_end",
    "fsync_dir",
    "open_exclusive",
    "read_prefix",
    "run_blocking",
    "start_writeback",
    "unlink_quietly",
    "write_all",
    "write_file_durably",
]

_COPY_CHUNK = 1 << 20
# copy_file_range refusing this pair of files (not an I/O error): fall back to read/write.
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


async def run_blocking(function: Callable[..., _T], *args: Any) -> _T:
    """Run ``function(*args)`` in a worker thread and return (or raise) what it did.

    Like ``trio.to_thread.run_sync(function, *args)`` with its defaults, cancellation
    included: the call waits for the thread even when cancelled, so the caller always learns
    how the blocking work ended. It skips what the disk work here never needs and what costs
    a third of a trip on every call: naming the worker thread (two system calls), the
    default thread limiter, a copy of the caller's context variables (``function`` runs
    without them), ``trio.from_thread``. Callers bound their own concurrency.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    task = current_task()
    token = current_trio_token()

    def deliver(result: outcome.Outcome[_T]) -> None:
        # A finished run has no task left to tell (it cannot finish while we wait).
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(reschedule, task, result)

    start_thread_soon(lambda: function(*args), deliver)
    result: _T = await wait_task_rescheduled(lambda _raise_cancel: Abort.FAILED)
    return result


#: While a large file is written (a message received, a body copied), the disk is asked to
#: start writing what has been written so far every this many octets, so the fsync that
#: follows finds little left to write.
WRITEBACK_INTERVAL = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _find_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``, or None.

    Only a hint that starts writeback early: durability still comes from the fsync of the
    commit, which is never skipped.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, nbytes: int) -> None:
        function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a failure changes nothing

    return start_writeback


#: Start writeback of ``nbytes`` at ``offset`` of a descriptor (None where unavailable).
start_writeback = _find_sync_file_range()


def open_exclusive(path: Path) -> int:
    """Create ``path`` (owner-only, failing if it exists) and return a read-write descriptor."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` at the descriptor's position (``os.write`` may be short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_prefix(fd: int, limit: int) -> bytes:
    """Read up to ``limit`` bytes from the start of the file without moving its position."""
    parts: list[bytes] = []
    offset = 0
    while offset < limit:
        chunk = os.pread(fd, min(limit - offset, _COPY_CHUNK), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def copy_to_end(src_fd: int, offset: int, dst_fd: int) -> None:
    """Append the bytes of ``src_fd`` from ``offset`` to its end onto ``dst_fd``.

    Copies inside the kernel (``copy_file_range``) where it can, without passing the bytes
    through this process; otherwise, or on a file system that refuses, reads and writes.
    """
    copy_range = getattr(os, "copy_file_range", None)
    hinted = written = os.lseek(dst_fd, 0, os.SEEK_CUR)  # writeback hints, as the spool's

    def copied(count: int) -> None:
        nonlocal hinted, written
        written += count
        if written - hinted >= WRITEBACK_INTERVAL and start_writeback is not None:
            start_writeback(dst_fd, hinted, written - hinted)
            hinted = written

    if copy_range is not None:
        try:
            while count := copy_range(src_fd, dst_fd, WRITEBACK_INTERVAL, offset):
                offset += count
                copied(count)
            return
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            # Nothing was copied by the failing call: go on from ``offset`` the slow way.
    while chunk := os.pread(src_fd, _COPY_CHUNK, offset):
        write_all(dst_fd, chunk)
        offset += len(chunk)
        copied(len(chunk))


def fsync_dir(path: str | Path) -> None:
    """Make the names in directory ``path`` durable (renames, creations, removals)."""
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` and fsync it; on failure nothing is left behind."""
    fd = open_exclusive(path)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        close_quietly(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


def close_quietly(fd: int | None) -> None:
    """Close ``fd`` ignoring errors (cleanup after a failure that is already being reported)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def unlink_quietly(path: Path) -> bool:
    """Remove ``path`` if it exists, ignoring errors; True if a file was removed."""
    try:
        path.unlink()
    except OSError:
        return False
    return True


class _Round:
    """One fsync of a directory: done once it returned, with its error if it failed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: OSError | None = None


class _Directory:
    """The fsync rounds of one directory: at most one running, at most one gathering."""

    __slots__ = ("changed", "failures", "gathering", "last_error", "running")

    def __init__(self, lock: threading.Lock) -> None:
        self.changed = threading.Condition(lock)
        self.running: _Round | None = None
        self.gathering: _Round | None = None
        self.failures = 0  # fsyncs of this directory that failed so far
        self.last_error: OSError | None = None


class DirectorySync:
    """Group commit of directory fsyncs: concurrent callers share one ``fsync`` per batch.

    Everything here blocks: call it from worker threads, like the rest of this module. The
    pattern, for each change of a name in a directory (rename, create, unlink)::

        mark = dirsync.mark(directory)     # before the change
        os.rename(tmp, directory / name)
        dirsync.sync(directory, since=mark)  # durable once this returns

    :meth:`sync` returns only after an fsync of the directory that *started after the call*
    has succeeded, so every change made before the call is durable. Callers arriving while
    an fsync runs form the next batch; the first of them to see the running one end does the
    batch's fsync (on a new descriptor) for all of them while the others wait. N concurrent
    callers thus cost about two fsyncs, not N.

    Failure: when an fsync fails, every caller waiting for it gets an :class:`OSError`, and
    so does every caller whose change may have been written back by it: with ``since``,
    every caller that took its mark before that failure ended (without ``since``, those that
    called while it ran). After a failed fsync the kernel may have dropped what it could not
    write and a later fsync may report success anyway (the "fsyncgate" finding), so those
    changes can never be confirmed; the fsync is never retried on the descriptor that failed,
    and callers that marked after the failure get a fresh fsync. A caller told the fsync
    failed must treat its change as not durable (undo it, report the failure).

    One instance may serve any number of directories (keyed by the path as given: a
    :class:`str` and a :class:`~pathlib.Path` naming one directory are two keys). It holds
    no thread and no open file between calls, and is safe to use from many threads and from
    several trio runs at once. Callers only share fsyncs through the same instance.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._directories: dict[str | Path, _Directory] = {}

    def _state(self, directory: str | Path) -> _Directory:
        state = self._directories.get(directory)
        if state is None:
            state = self._directories[directory] = _Directory(self._lock)
        return state

    def mark(self, directory: str | Path) -> int:
        """Return a mark to pass to :meth:`sync` as ``since``; take it before the change."""
        with self._lock:
            return self._state(directory).failures

    def sync(self, directory: str | Path, *, since: int | None = None) -> None:
        """Block until an fsync of ``directory`` started after this call has succeeded.

        Raises :class:`OSError` (with the fsync's errno) when that fsync failed, when one
        running at the time of the call failed, or, given ``since`` (from :meth:`mark`),
        when any fsync of ``directory`` failed after that mark was taken.
        """
        with self._lock:
            state = self._state(directory)
            before = state.running  # started before our call: may not cover our change
            mine = state.gathering
            if mine is None:
                mine = state.gathering = _Round()
            while not mine.done:
                if state.running is None:
                    # Nobody is syncing: lead our batch (ours is the gathering round).
                    state.gathering, state.running = None, mine
                    self._lock.release()
                    error: OSError | None = None
                    try:
                        fsync_dir(directory)
                    except OSError as exc:
                        error = exc
                    except BaseException as exc:
                        # Not known to have succeeded: the batch must not think so.
                        error = OSError(errno.EIO, f"interrupted: {exc!r}")
                        raise
                    finally:
                        self._lock.acquire()
                        mine.error, mine.done = error, True
                        if error is not None:
                            state.failures += 1
                            state.last_error = error
                        state.running = None
                        state.changed.notify_all()
                else:
                    state.changed.wait()
            error = mine.error or (before.error if before is not None else None)
            if error is None and since is not None and state.failures != since:
                error = state.last_error
        if error is not None:
            # A new exception per caller (they raise it in different threads), same error.
            raise OSError(error.errno, error.strerror, str(directory))
