"""Concurrent calls that share one worker-thread trip (the spool's removals).

A trip to a worker thread costs two cross-thread wake-ups, and the blocking work of many
removals is cheap next to them (an unlink each, one shared directory fsync). A
:class:`TripBatch` gathers the items of calls made while a trip runs and hands them to
the next trip together: ``N`` concurrent calls cost about two trips, not ``N``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import trio

from ..durable import run_blocking

__all__ = ["TripBatch"]

T = TypeVar("T")
R = TypeVar("R")


class _Batch(Generic[T, R]):
    """The items of one trip, and what each call gets back once it ran."""

    __slots__ = ("done", "items", "results")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.results: Sequence[R | Exception] | None = None
        self.done = trio.Event()


class TripBatch(Generic[T, R]):
    """Run ``work(items)`` in a worker thread for the items of concurrent :meth:`call` s.

    ``work`` gets the items in call order and returns one result per item, in that order:
    a value, or the :class:`Exception` that :meth:`call` raises for that item (an item's
    failure is its own; ``work`` raising fails every item of its trip). At most one trip runs
    at a time; calls made meanwhile form the next one, led by the first of them to see the
    running trip end. Use it from one trio run; a trip, once started, is not cancelled.
    """

    def __init__(self, work: Callable[[list[T]], Sequence[R | Exception]]) -> None:
        self._work = work
        self._gathering: _Batch[T, R] | None = None
        self._running: _Batch[T, R] | None = None

    async def call(self, item: T) -> R:
        """Have ``item`` handled by a trip; return its result or raise its exception."""
        batch = self._gathering
        if batch is None:
            batch = self._gathering = _Batch()
        index = len(batch.items)
        batch.items.append(item)
        while batch.results is None:
            running = self._running
            if running is None:
                await self._lead(batch)
            else:
                # Not cancellable here once our item is in a batch: the caller learns
                # how its item ended, whoever leads the trip.
                with trio.CancelScope(shield=True):
                    await running.done.wait()
        result = batch.results[index]
        if isinstance(result, Exception):
            raise result
        return result

    async def _lead(self, batch: _Batch[T, R]) -> None:
        self._gathering = None
        self._running = batch
        try:
            try:
                batch.results = await run_blocking(self._work, batch.items)
            except Exception as exc:
                batch.results = [exc] * len(batch.items)
            if len(batch.results) != len(batch.items):
                raise AssertionError("a trip must return one result per item")
        finally:
            self._running = None
            batch.done.set()
