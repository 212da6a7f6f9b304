"""TripBatch: concurrent calls share worker-thread trips, and each gets its own result."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

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
