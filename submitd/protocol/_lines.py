r"""CRLF line framing for command and SASL lines, with a length bound and draining.

A line ends only at CRLF (RFC 5321 §2.3.8): everything up to the next CRLF is one line,
whatever it holds. A bare LF or a bare CR inside it makes the whole line bad; the reader
reports it as soon as it sees the stray byte (so a person typing into ``openssl s_client``
without ``-crlf`` gets the refusal at once) and then drops the rest of the line up to its
CRLF without reading it. So ``MAIL FROM:<a@b>\nRCPT TO:<c@d>\r\n`` is one refused line, never
two commands (SMTP smuggling, 2023).

An over-long line is drained to its CRLF without being buffered, then reported: memory stays
bounded by the largest allowed line (RFC 5321 §4.5.3.1.4).
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
    BARE_LF = "bare LF"  # holds an LF without CR before it
    BARE_CR = "bare CR"  # holds a CR without LF after it
    TOO_LONG = "too long"  # longer than the limit; drained, ``text`` is only its start


@dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    """One framed line without its line ending; ``problem`` says whether it may be used.

    For a bare CR or LF, ``text`` is what came before the stray byte; the rest of the line
    is dropped unread.
    """

    text: bytes
    problem: LineProblem = LineProblem.NONE


class _Drain(enum.Enum):
    NONE = "none"  # reading lines
    REPORTED = "reported"  # the line was already refused; drop it up to its CRLF
    TOO_LONG = "too long"  # report the line once its CRLF is reached


class LineReader:
    """Pull lines out of a receive buffer, one at a time, keeping drain state across reads."""

    __slots__ = ("_cr_pending", "_drain", "_drained_prefix")

    def __init__(self) -> None:
        self._drain = _Drain.NONE
        self._drained_prefix = b""
        self._cr_pending = False  # the drained bytes so far end in CR

    def reset(self) -> None:
        """Forget a half-drained line (the buffer it came from was thrown away)."""
        self._drain = _Drain.NONE
        self._drained_prefix = b""
        self._cr_pending = False

    def next_line(self, buf: bytearray, limit: Callable[[bytes], int]) -> Line | None:
        """Remove and return the next line from ``buf``, or None if it holds no complete line.

        ``limit(prefix)`` gives the maximum length of the line *including* its CRLF, from the
        first bytes of the line (the command verb decides, RFC 5321 §4.5.3.1.4 / RFC 4954 §4).
        """
        while self._drain is not _Drain.NONE:
            if not self._skip_to_crlf(buf):
                return None
            drain, prefix = self._drain, self._drained_prefix
            self.reset()
            if drain is _Drain.TOO_LONG:
                return Line(text=prefix, problem=LineProblem.TOO_LONG)
        max_length = limit(bytes(buf[:_KEPT_PREFIX]))
        lf = buf.find(b"\n", 0, max_length)
        cr = buf.find(b"\r", 0, max_length)
        if cr != -1 and (lf == -1 or cr < lf):
            return self._at_cr(buf, cr, max_length, limit)
        if lf != -1:
            return self._refuse(buf, lf, LineProblem.BARE_LF)
        return self._too_long(buf, limit) if len(buf) >= max_length else None

    def _at_cr(
        self, buf: bytearray, cr: int, max_length: int, limit: Callable[[bytes], int]
    ) -> Line | None:
        if cr + 1 >= max_length:
            # Even a CRLF here would make the line one octet too long.
            return self._too_long(buf, limit)
        if cr + 1 == len(buf):
            return None  # the LF may be in the next read
        if buf[cr + 1] != 0x0A:
            return self._refuse(buf, cr, LineProblem.BARE_CR)
        text = bytes(buf[:cr])
        del buf[: cr + 2]
        return Line(text=text)

    def _refuse(self, buf: bytearray, stray: int, problem: LineProblem) -> Line:
        """Report the line at its first stray CR or LF and drop the rest up to its CRLF."""
        text = bytes(buf[:stray])
        del buf[: stray + 1]
        self._drain = _Drain.REPORTED
        return Line(text=text, problem=problem)

    def _too_long(self, buf: bytearray, limit: Callable[[bytes], int]) -> Line | None:
        self._drain = _Drain.TOO_LONG
        self._drained_prefix = bytes(buf[:_KEPT_PREFIX])
        return self.next_line(buf, limit)

    def _skip_to_crlf(self, buf: bytearray) -> bool:
        """Drop bytes up to and including the next CRLF; False if ``buf`` ran out first."""
        if self._cr_pending and buf[:1] == b"\n":
            del buf[:1]
            return True
        end = buf.find(b"\r\n")
        if end == -1:
            if buf:
                self._cr_pending = buf.endswith(b"\r")
            buf.clear()
            return False
        del buf[: end + 2]
        return True
