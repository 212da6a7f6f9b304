"""Blocking, durable file operations: the spool, the users file, plugins (public API).

Call them from a worker thread (``trio.to_thread.run_sync``), never on the event loop.

The rules (docs/security.md §6): a file counts as stored only after ``fsync`` on its descriptor
and ``fsync`` on the directory that received its name. A failed ``fsync`` is never retried
on the same descriptor: after an error the kernel may have dropped the dirty pages and a
second ``fsync`` can report success for data that is gone (the 2018 "fsyncgate" finding).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = [
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
