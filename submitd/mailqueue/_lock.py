"""One owner per spool: an exclusive ``flock`` on ``<dir>/lock`` holding the owner's pid.

Two servers on one spool would each run recovery on the other's messages in progress and
deliver the same message twice. The lock is taken before recovery and held until the
server stops; the kernel drops it when the process dies (``kill -9`` included), so a stale
lock file never blocks a restart. The pid in the file is for the error message only.

A server with several worker processes (``[server] workers``) has one owner and other
processes that only commit messages. Those *writers* hold a shared ``flock`` on the spool
directory itself for as long as they may commit; the owner takes the same directory lock
exclusively, together with ``<dir>/lock``, before recovery, so recovery can never run while
a writer lives, not even one left over from an owner that died. Once recovery is done the
owner lets writers in (:func:`admit_writers`). A process that holds a writer's lock cannot
take the exclusive one (flock locks of two open files conflict even within one process), so
a writer can never recover the spool, by mistake or otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..errors import SpoolError

__all__ = [
    "SpoolLocked",
    "WritersActive",
    "acquire_lock",
    "admit_writers",
    "join_writers",
    "leave_writers",
    "release_lock",
]


class SpoolLocked(SpoolError):
    """Another process holds the spool's lock (another ``submitd serve`` on this spool)."""

    def __init__(self, directory: Path, holder: int | None) -> None:
        self.directory = directory
        self.holder = holder
        who = f"process {holder}" if holder is not None else "another process"
        super().__init__(
            f"the spool {directory} is in use by {who} (another submitd serve on the same "
            "[queue] dir?); stop it first"
        )


class WritersActive(SpoolLocked):
    """Worker processes still commit into the spool (left by a server that stopped)."""

    def __init__(self, directory: Path) -> None:
        SpoolError.__init__(
            self,
            f"the spool {directory} is in use by worker processes of a server that stopped "
            "(they exit once their sessions end, within [limits] shutdown_grace); try again",
        )
        self.directory = directory
        self.holder = None


# The exclusive directory lock of each spool this process owns: lock-file descriptor ->
# (directory's device and inode, directory descriptor).
_exclusive: dict[int, tuple[tuple[int, int], int]] = {}


def _identity(fd_or_path: int | Path) -> tuple[int, int]:
    st = os.stat(fd_or_path)
    return st.st_dev, st.st_ino


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text.isdigit() else None
    return None


def _open_dir(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)


def acquire_lock(directory: Path) -> int:
    """Lock ``directory/lock`` (blocking call) and write our pid; return the open descriptor.

    The spool directory is locked exclusively as well (no writer may be running) until
    :func:`admit_writers` or :func:`release_lock`. Raises :class:`SpoolLocked` when another
    process holds it (:class:`WritersActive` when worker processes still do), :class:`OSError`
    otherwise.
    """
    path = directory / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    dir_fd = -1
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolLocked(directory, _holder(fd)) from None
        dir_fd = _open_dir(directory)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WritersActive(directory) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        if dir_fd >= 0:
            os.close(dir_fd)
        os.close(fd)
        raise
    _exclusive[fd] = (_identity(dir_fd), dir_fd)
    return fd


def admit_writers(directory: Path) -> bool:
    """Let worker processes commit into ``directory`` (after recovery); False if not locked.

    Drops the exclusive directory lock :func:`acquire_lock` took; the spool's lock itself
    stays held, so no other server (and no second recovery) can start meanwhile.
    """
    key = _identity(directory)
    for fd, (identity, dir_fd) in list(_exclusive.items()):
        if identity == key:
            del _exclusive[fd]
            os.close(dir_fd)
            return True
    return False


def release_lock(fd: int) -> None:
    """Clear the pid and drop the lock (closing the descriptor releases the flock)."""
    entry = _exclusive.pop(fd, None)
    if entry is not None:
        os.close(entry[1])
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


def join_writers(directory: Path) -> int:
    """Take a writer's shared lock on the spool ``directory`` (a worker process; blocking).

    Raises :class:`SpoolError` while the owner recovers the spool (or none admitted writers
    yet). Release it with :func:`leave_writers`.
    """
    try:
        fd = _open_dir(directory)
    except OSError as exc:
        raise SpoolError(f"cannot open the spool {directory}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(
            f"the spool {directory} is being recovered by its owner; a worker may not commit"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def leave_writers(fd: int) -> None:
    """Drop a writer's lock taken by :func:`join_writers`."""
    os.close(fd)
