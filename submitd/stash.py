"""A typed per-object store for plugin state (modelled on pytest's Stash)."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

__all__ = ["Stash", "StashKey"]

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key for :class:`Stash`; create one per value at module level: ``KEY = StashKey[int]()``."""

    __slots__ = ()


class Stash:
    """A mapping from :class:`StashKey` to values of the key's type.

    The config, every session and every message carry one, so plugins keep state there
    rather than in module globals.
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        """Return the value stored under ``key``, or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        """Return the value under ``key``, storing ``default`` first if there is none."""
        if key not in self._data:
            self._data[key] = default
        return self[key]

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<Stash with {len(self._data)} items>"
