r"""CRLF line framing for command and SASL lines, with a length bound and draining.

A line ends only at CRLF (RFC 5321 §2.3.8). A bare LF still ends the line, but only so that
the error reply goes out at a sensible moment: such a line is never executed. A bare CR does
not end anything; the line runs on to the next LF and is refused as a whole, so
``NOOP\rMAIL FROM:<...>\r\n`` can never smuggle a second command.

An over-long line is drained to its LF without being buffered: memory stays bounded by the
largest allowed line (RFC 5321 §4.5.3.1.4).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Line", "LineProblem", "LineReader"]

#: How many leading bytes of a drained line are kept, enough to recognise an HTTP request.
_KEPT_PREFIX = 16


class LineProblem(enum.Enum):
    """What, if anything, is wrong with the framing of one line."""

    NONE = "none"
    BARE_LF = "bare LF"  # ended by LF without CR
    BARE_CR = "bare CR"  # ended by CRLF, but holds a CR elsewhere
    TOO_LONG = "too long"  # longer than the limit; drained, ``text`` is only its start


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One framed line without its line ending; ``problem`` says whether it may be used."""

    text: bytes
    problem: LineProblem = LineProblem.NONE


class LineReader:
    """Pull lines out of a receive buffer, one at a time, keeping drain state across reads."""

    __slots__ = ("_drained_prefix", "_draining")

    def __init__(self) -> None:
        self._draining = False
        self._drained_prefix = b""

    def reset(self) -> None:
        """Forget a half-drained line (the buffer it came from was thrown away)."""
        self._draining = False
        self._drained_prefix = b""

    def next_line(self, buf: bytearray, limit: Callable[[bytes], int]) -> Line | None:
        """Remove and return the next line from ``buf``, or None if it holds no complete line.

        ``limit(prefix)`` gives the maximum length of the line *including* its CRLF, from the
        first bytes of the line (the command verb decides, RFC 5321 §4.5.3.1.4 / RFC 4954 §4).
        """
        if self._draining:
            return self._drain(buf)
        max_length = limit(bytes(buf[:_KEPT_PREFIX]))
        # A line of n octets including its LF is fine when n <= max_length, i.e. its LF sits
        # at an index below max_length.
        end = buf.find(b"\n", 0, max_length)
        if end == -1:
            if len(buf) < max_length:
                return None
            self._draining = True
            self._drained_prefix = bytes(buf[:_KEPT_PREFIX])
            return self._drain(buf)
        raw = bytes(buf[:end])
        del buf[: end + 1]
        if not raw.endswith(b"\r"):
            return Line(text=raw, problem=LineProblem.BARE_LF)
        text = raw[:-1]
        if b"\r" in text:
            return Line(text=text, problem=LineProblem.BARE_CR)
        return Line(text=text)

    def _drain(self, buf: bytearray) -> Line | None:
        end = buf.find(b"\n")
        if end == -1:
            buf.clear()
            return None
        del buf[: end + 1]
        prefix = self._drained_prefix
        self.reset()
        return Line(text=prefix, problem=LineProblem.TOO_LONG)
