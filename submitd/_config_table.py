"""The configuration loader's building blocks: durations and a validating TOML table.

:mod:`submitd.config` re-exports :func:`parse_duration` and :func:`format_duration`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .protocol._grammar import has_control

__all__ = ["format_duration", "parse_duration"]

# --- durations ------------------------------------------------------------------------------

_DURATION = re.compile(r"\A(\d+(?:\.\d+)?)(ms|s|m|h|d)?\Z")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Parse ``"30s"``, ``"5m"``, ``"2h"``, ``"5d"``, ``"250ms"`` or a bare number of seconds.

    Returns seconds as a float; raises ValueError for anything else (negative, NaN, booleans,
    unknown units, embedded spaces).
    """
    if isinstance(value, bool):  # bool is an int subclass; `true` is never a duration
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f'not a duration: {value!r} (use e.g. "30s", "5m", "2h", "5d")')
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds in the largest unit that divides them exactly (``300.0`` → ``"5m"``)."""
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    millis = seconds * 1000
    return f"{int(millis)}ms" if millis.is_integer() else f"{seconds}s"


# --- tables -------------------------------------------------------------------------------

_MISSING: Any = object()


class _Table:
    """One TOML table under validation: knows its dotted name and rejects unknown keys."""

    def __init__(
        self, path: Path, prefix: str, data: object, allowed: Iterable[str] | None
    ) -> None:
        self.path = path
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ConfigError(path, prefix, f"must be a table, not {_type_name(data)}")
        self.data: dict[str, Any] = data
        if allowed is not None:
            known = list(allowed)
            for name in data:
                if name not in known:
                    hint = difflib.get_close_matches(name, known, n=1)
                    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                    raise ConfigError(path, self.key(name), f"unknown key{extra}")

    def key(self, name: str) -> str:
        """Return the dotted key of ``name`` in this table."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        """Build a ConfigError about ``name`` in this table."""
        return ConfigError(self.path, self.key(name), message)

    def get(self, name: str, default: Any = _MISSING) -> Any:
        """Return the raw value, ``default`` when absent; required without a default."""
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise self.error(name, "required key is missing")
        return default

    def string(self, name: str, default: Any = _MISSING) -> str:
        """Return a non-empty string without control characters."""
        value = self.get(name, default)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, not {_type_name(value)}")
        if not value or has_control(value):
            raise self.error(name, "must be a non-empty string without control characters")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        """Return a boolean (``true`` or ``false``)."""
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, not {_type_name(value)}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 1) -> int:
        """Return an integer of at least ``minimum``."""
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, not {_type_name(value)}")
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return value

    def duration(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        """Return a duration in seconds (``"30s"``, ``"5m"``, a number); zero only if allowed."""
        return _duration(self, name, self.get(name, default), allow_zero=allow_zero)

    def array(self, name: str, default: Any = _MISSING) -> list[Any]:
        """Return a TOML array."""
        value = self.get(name, default)
        if not isinstance(value, list):
            raise self.error(name, f"must be an array, not {_type_name(value)}")
        return value

    def path_value(self, name: str, default: Any = _MISSING) -> Path:
        """Return a path, resolved against the config file's directory when relative."""
        p = Path(self.string(name, default)).expanduser()
        return p if p.is_absolute() else self.path.parent / p


def _duration(table: _Table, key: str, value: object, *, allow_zero: bool = False) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise table.error(key, str(exc)) from None
    if seconds == 0 and not allow_zero:
        raise table.error(key, "must be longer than zero")
    return seconds


def _default(cls: type, name: str) -> Any:
    """Return a field's default (slots dataclasses do not keep it as a class attribute)."""
    for f in fields(cls):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise AssertionError(f"{cls.__name__}.{name} has no default")  # pragma: no cover


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)
