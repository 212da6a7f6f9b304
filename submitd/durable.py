"""Blocking, durable file operations: the spool, the users file, plugins (public API).

Call them from a worker thread (``trio.to_thread.run_sync``), never on the event loop.

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
import errno
import os
import threading
from pathlib import Path

__all__ = [
    "DirectorySync",
    "close_quietly",
    "copy_to_end",
    "fsync_dir",
    "open_exclusive",
    "read_prefix",
    "unlink_quietly",
    "write_all",
    "write_file_durably",
]

_COPY_CHUNK = 1 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


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
    """Append the bytes of ``src_fd`` from ``offset`` to its end onto ``dst_fd``."""
    while chunk := os.pread(src_fd, _COPY_CHUNK, offset):
        write_all(dst_fd, chunk)
        offset += len(chunk)


def fsync_dir(path: Path) -> None:
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

    __slots__ = ("changed", "gathering", "running")

    def __init__(self, lock: threading.Lock) -> None:
        self.changed = threading.Condition(lock)
        self.running: _Round | None = None
        self.gathering: _Round | None = None


class DirectorySync:
    """Group commit of directory fsyncs: concurrent callers share one ``fsync`` per batch.

    :meth:`sync` is a blocking call for worker threads (like everything in this module).
    Rename (or create, or unlink) in a directory first, then call ``sync(directory)``: it
    returns only after an fsync of that directory that *started after the call* has
    succeeded, so the caller's change is durable. Callers arriving while an fsync runs form
    the next batch; the first of them to see the running one finish does the batch's fsync
    for all of them (a new descriptor each time), the others just wait. N concurrent callers
    thus cost about two fsyncs, not N.

    Failure: when the fsync fails, every caller of that batch gets an :class:`OSError`, and
    so does every caller who arrived while it ran (their change was made while the failing
    fsync was writing the directory back, so it may be among what the kernel dropped). No
    fsync is retried on a descriptor that failed; later callers get a fresh fsync. A caller
    told the fsync failed must treat its change as not durable (undo it, report failure).

    One instance may serve any number of directories (keyed by path as given). It holds no
    thread and no file open between calls; it is safe to use from many threads and from
    several trio runs at once. Within one process, use one instance per set of directories
    so that callers find each other.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._directories: dict[Path, _Directory] = {}

    def sync(self, directory: Path) -> None:
        """Block until a ``fsync`` of ``directory`` started after this call has succeeded.

        Raises :class:`OSError` when that fsync (or one running when this call came) failed.
        """
        with self._lock:
            state = self._directories.get(directory)
            if state is None:
                state = self._directories[directory] = _Directory(self._lock)
            before = state.running  # may have started before our change: does not count
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
                        state.running = None
                        state.changed.notify_all()
                else:
                    state.changed.wait()
        error = mine.error or (before.error if before is not None else None)
        if error is not None:
            # A new exception per caller (they raise it in different threads), same error.
            raise OSError(error.errno, error.strerror, str(directory))
