"""Queue IDs from several processes on one spool never collide (``set_process_tag``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from submitd.mailqueue import _ids


@pytest.fixture(autouse=True)
def untagged() -> Iterator[None]:
    yield
    _ids.set_process_tag(None)


def test_two_processes_with_the_same_luck_in_the_same_millisecond_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_ids, "_random_below", lambda limit: 12345 % limit)
    made: dict[int, list[str]] = {}
    for tag in (0, 1, _ids.MAX_PROCESS_TAG):
        _ids.set_process_tag(tag)  # a fresh process: nothing made before
        made[tag] = [_ids.new_queue_id(1_700_000_000.0) for _ in range(1000)]
    every = [queue_id for ids in made.values() for queue_id in ids]
    assert len(set(every)) == len(every) == 3000
    assert all(_ids.is_queue_id(queue_id) for queue_id in every)
    assert all(ids == sorted(ids) for ids in made.values())  # still monotonic


def test_without_a_tag_ids_are_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ids, "_random_below", lambda limit: limit - 1)
    _ids.set_process_tag(None)
    first = _ids.new_queue_id(1_700_000_000.0)
    assert first[10:] == _ids._encode(_ids._RANDOM_LIMIT // 2 - 1, 6)


def test_a_tag_past_the_range_is_refused() -> None:
    with pytest.raises(ValueError, match="0 to 255"):
        _ids.set_process_tag(256)
