"""TripBatch and run_blocking: worker-thread trips, shared by concurrent calls or not."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from submitd.durable import run_blocking
from submitd.mailqueue._batch import TripBatch

WAIT = 10.0


class Work:
    """Doubles numbers in a worker thread; fails on negative ones; the first trip can wait."""

    def __init__(self) -> None:
        self.trips: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: list[int]) -> list[int | Exception]:
        self.trips.append(list(items))
        if len(self.trips) == 1:
            assert self.release.wait(WAIT)
        if 13 in items:
            raise RuntimeError("the whole trip failed")
        return [ValueError(f"negative: {i}") if i < 0 else 2 * i for i in items]


async def call_all(batch: TripBatch[int, int], items: list[int]) -> dict[int, int | Exception]:
    results: dict[int, int | Exception] = {}

    async def one(item: int) -> None:
        try:
            results[item] = await batch.call(item)
        except Exception as exc:
            results[item] = exc

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(one, item)
    return results


async def test_calls_made_while_a_trip_runs_share_the_next_trip() -> None:
    work = Work()
    work.release.clear()
    batch = TripBatch(work)
    results: dict[int, int | Exception] = {}

    async def release_when_all_called() -> None:
        await trio.testing.wait_all_tasks_blocked()
        work.release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_when_all_called)
        results = await call_all(batch, list(range(10)))
    assert results == {i: 2 * i for i in range(10)}
    assert len(work.trips) == 2
    assert sorted(work.trips[0] + work.trips[1]) == list(range(10))


async def test_an_item_that_fails_fails_only_its_own_call() -> None:
    results = await call_all(TripBatch(Work()), [1, -2, 3, -4])
    assert results[1] == 2 and results[3] == 6
    assert isinstance(results[-2], ValueError) and str(results[-2]) == "negative: -2"
    assert isinstance(results[-4], ValueError) and str(results[-4]) == "negative: -4"


async def test_a_failed_trip_fails_its_calls_and_the_next_trip_runs() -> None:
    batch = TripBatch(Work())
    with pytest.raises(RuntimeError, match="the whole trip failed"):
        await batch.call(13)
    assert await batch.call(5) == 10


# --- run_blocking: the trip itself ------------------------------------------------------------


async def test_run_blocking_returns_the_result_from_another_thread() -> None:
    result, ident = await run_blocking(lambda a, b: (a + b, threading.get_ident()), 2, 3)
    assert result == 5 and ident != threading.get_ident()


async def test_run_blocking_raises_what_the_function_raised() -> None:
    def fail() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        await run_blocking(fail)


async def test_run_blocking_cancelled_midway_still_waits_for_the_thread() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def work() -> str:
        started.set()
        assert release.wait(WAIT)
        finished.append("done")
        return "done"

    results: list[str] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                results.append(await run_blocking(work))

            nursery.start_soon(call)
            await trio.to_thread.run_sync(started.wait, WAIT)
            scope.cancel()  # the blocking work cannot be taken back: the call waits for it
            release.set()
    assert finished == ["done"]
    assert results == ["done"]
