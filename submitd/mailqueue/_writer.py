"""Writing a message being received without waiting for the disk.

:class:`BackgroundWrite` runs one blocking write in a worker thread while the receiving task
goes on; :data:`start_writeback` asks Linux to start writing dirty pages out early, so that
the fsync at the commit of a large message has little left to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio

# The same hint durable.copy_to_end gives while it copies a body.
from ..durable import WRITEBACK_INTERVAL, start_writeback

__all__ = ["WRITEBACK_INTERVAL", "BackgroundWrite", "start_writeback"]


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
