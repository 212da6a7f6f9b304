"""Writing a message being received without waiting for the disk.

:class:`BackgroundWrite` runs one blocking write in a worker thread while the receiving task
goes on; :data:`start_writeback` asks Linux to start writing dirty pages out early, so that
the fsync at the commit of a large message has little left to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable

import trio

__all__ = ["WRITEBACK_INTERVAL", "BackgroundWrite", "start_writeback"]

#: While a large message is received, the disk is asked to start writing what has been written
#: so far every this many octets, so the fsync of the commit finds little left to write.
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


class BackgroundWrite:
    """One blocking write running in a worker thread while the receiving task goes on.

    It holds a token of trio's default thread limiter while it runs, as
    ``trio.to_thread.run_sync`` would, so the number of worker threads stays bounded.
    """

    __slots__ = ("_done", "error")

    def __init__(self) -> None:
        self._done = trio.Event()
        #: What the write raised, once it is done.
        self.error: BaseException | None = None

    @classmethod
    async def start(
        cls, write: Callable[[bytes | bytearray], object], take: Callable[[], bytes | bytearray]
    ) -> BackgroundWrite:
        """Wait for a worker thread, then write ``take()`` in it (taken only once it can run).

        A cancellation while waiting for the thread leaves the data where ``take`` finds it.
        """
        job = cls()
        limiter = trio.to_thread.current_default_thread_limiter()
        await limiter.acquire_on_behalf_of(job)
        token = trio.lowlevel.current_trio_token()
        data = take()

        def run() -> None:
            try:
                write(data)
            except BaseException as exc:  # handed to whoever waits for the write
                job.error = exc

        def finished() -> None:
            limiter.release_on_behalf_of(job)
            job._done.set()

        def deliver(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finished)

        try:
            trio.lowlevel.start_thread_soon(run, deliver, name="submitd spool write")
        except BaseException:
            limiter.release_on_behalf_of(job)
            raise
        return job

    @property
    def done(self) -> bool:
        """Whether the write has ended (and :attr:`error` says how)."""
        return self._done.is_set()

    async def wait(self) -> None:
        """Return once the write is done (cancellable: the write goes on regardless)."""
        await self._done.wait()
