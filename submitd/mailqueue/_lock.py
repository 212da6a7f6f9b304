"""One server per spool: an exclusive ``flock`` on ``<dir>/lock`` holding the owner's pid.

Two servers on one spool would each run recovery on the other's messages in progress and
deliver the same message twice. The lock is taken before recovery and held until the
server stops; the kernel drops it when the process dies (``kill -9`` included), so a stale
lock file never blocks a restart. The pid in the file is for the error message only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ..errors import SpoolError

__all__ = ["SpoolLocked", "acquire_lock", "release_lock"]


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


def _holder(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text.isdigit() else None
    return None


def acquire_lock(directory: Path) -> int:
    """Lock ``directory/lock`` (blocking call) and write our pid; return the open descriptor.

    Raises :class:`SpoolLocked` when another process holds it, :class:`OSError` otherwise.
    """
    path = directory / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolLocked(directory, _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_lock(fd: int) -> None:
    """Clear the pid and drop the lock (closing the descriptor releases the flock)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)
