"""A string that never shows itself in reprs, logs or tracebacks."""

from __future__ import annotations

__all__ = ["Secret"]


class Secret:
    """Hold a password or other credential; ``repr`` and ``str`` print ``Secret('***')``.

    Call :meth:`reveal` at the single place that needs the value (hash verification,
    the smarthost AUTH command).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        import hmac

        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str:
        raise TypeError("a Secret cannot be pickled")
