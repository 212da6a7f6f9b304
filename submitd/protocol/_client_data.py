r"""The message body as the client role sends it after ``354``: dot-stuffed, CRLF canonical.

Stored messages already use CRLF, but the encoder does not rely on it: a bare LF or a bare CR
becomes CRLF, so the peer never sees a line ending it could read differently from us (SMTP
smuggling, 2023). A line starting with ``.`` gets a second one (RFC 5321 §4.5.2), so the only
``CRLF.CRLF`` on the wire is the terminator :meth:`DataEncoder.end` appends. Chunks may be
split anywhere, also between CR and LF: the output does not depend on where.
"""

from __future__ import annotations

import re

__all__ = ["DataEncoder"]

_LINE_END = re.compile(rb"\r\n|\r|\n")
# A CR not followed by LF, and a line that starts with a dot: patterns with a literal first
# byte, searched for at memchr-like speed (a stored message is canonical and rarely has dots).
_BARE_CR = re.compile(rb"\r(?!\n)")
_DOT_LINE = re.compile(rb"\n\.")


def _is_canonical(data: bytes) -> bool:
    """True if every CR in ``data`` starts a CRLF and every LF ends one."""
    # With no bare CR, each CR is one CRLF: as many LFs as CRs means no bare LF.
    return _BARE_CR.search(data) is None and data.count(b"\n") == data.count(b"\r")


class DataEncoder:
    """Turn message chunks into DATA content; :meth:`end` gives the final bytes."""

    __slots__ = ("_at_line_start", "_done", "_held_cr", "_size")

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False  # a CR ended the last chunk: the next byte decides what it was
        self._done = False
        self._size = 0

    @property
    def size(self) -> int:
        """Octets of message content fed so far (before stuffing)."""
        return self._size

    def feed(self, chunk: bytes) -> bytes:
        """Encode the next piece of the message; may return ``b""`` (a CR is held back)."""
        if self._done:
            raise ValueError("feed() after end()")
        self._size += len(chunk)
        data = b"\r" + chunk if self._held_cr else chunk
        self._held_cr = data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        if not data:
            return b""
        if not _is_canonical(data):
            data = _LINE_END.sub(b"\r\n", data)
        stuffed = data.replace(b"\r\n.", b"\r\n..") if _DOT_LINE.search(data) else data
        if self._at_line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._at_line_start = stuffed.endswith(b"\r\n")
        return stuffed

    def end(self) -> bytes:
        """The bytes that close the message: a missing final CRLF, then ``.`` CRLF."""
        if self._done:
            raise ValueError("end() called twice")
        self._done = True
        if self._held_cr:
            self._held_cr = False
            return b"\r\n.\r\n"
        return b".\r\n" if self._at_line_start else b"\r\n.\r\n"
