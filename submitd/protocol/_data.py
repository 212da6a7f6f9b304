r"""The DATA body reader: CRLF lines in, unstuffed chunks out, one terminator.

The only end of data is CRLF "." CRLF (RFC 5321 §4.1.1.4); at the very start of the body the
354 reply stands in for the first CRLF. ``\n.\n``, ``\r.\r``, ``\r\n.\r\r\n``, a NUL next
to the dot and every other look-alike are content, and since a bare CR or LF anywhere marks
the message bad, they are refused content: the SMTP smuggling attacks of 2023
(CVE-2023-51764/-51765/-51766, CVE-2024-27305) get a refusal, never a second message.

Good lines are checked where they arrived, in the receive buffer, and leave it at once as
one copied piece per read; the pieces go out as one chunk of about :data:`CHUNK_SIZE` octets
(or less at the end of the message), so the receive buffer only ever holds one read plus an
unfinished line. A run of body lines is checked as a block with C scans over the buffer (the
terminator, a line starting with a dot, a bare CR or LF, NUL, a line over the limit); a block
with dot-stuffed lines is unstuffed with one ``replace``. A block that fails a check, the
terminator and the header section go line by line, and the line-by-line rules are the ones
that decide.

Once the message is known to be bad (bare CR/LF, NUL, an over-long line, too big), the reader
stops producing chunks and only looks for the real terminator, keeping four bytes of context
across reads so that a terminator split over segments is still found. Memory stays bounded by
one chunk plus one line (1000 octets, RFC 5321 §4.5.3.1.6) plus one read.
"""

from __future__ import annotations

import enum
import re

from . import _catalogue as R
from ._events import DataChunk, DataComplete
from ._replies import Reply

__all__ = ["CHUNK_SIZE", "DataReader"]

#: Chunks handed to the session are about this big (a little more: whole lines).
CHUNK_SIZE = 262_144
#: RFC 5321 §4.5.3.1.6: 1000 octets per text line including CRLF, not counting the
#: transparency dot; so 998 octets of content.
MAX_LINE_CONTENT = 998
_MAX_LINE = MAX_LINE_CONTENT + 2

_TERMINATOR = b"\r\n.\r\n"
_CONTEXT = len(_TERMINATOR) - 1
_DOT = 0x2E
# An LF that starts a dot line (stuffed, or the terminator) or has no CR before it; a CR not
# followed by LF; an LF not preceded by CR. Regular expressions with a literal first byte are
# searched for at memchr-like speed (one scan each, cheaper than counting CRs and LFs).
_LF_EVENT = re.compile(rb"\n(?:\.|(?<!\r\n))")
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


class _Mode(enum.Enum):
    LINES = "lines"  # reading good lines, producing chunks
    DISCARD = "discard"  # the message is refused; only looking for the terminator
    DONE = "done"  # the terminator was read


class DataReader:
    """Read one message body from a receive buffer shared with the command reader."""

    __slots__ = (
        "_error",
        "_header_size",
        "_in_header",
        "_max_header_size",
        "_max_size",
        "_mode",
        "_pending",
        "_pieces",
        "_size",
        "_tail",
    )

    def __init__(self, *, max_size: int, max_header_size: int) -> None:
        self._max_size = max_size
        self._max_header_size = max_header_size
        self._mode = _Mode.LINES
        # Checked, unstuffed content not yet handed out (``_pending`` octets in all).
        self._pieces: list[bytes] = []
        self._pending = 0
        self._size = 0
        self._header_size = 0
        self._in_header = True
        self._error: Reply | None = None
        # The bytes just before the unread input (in DISCARD); the 354 counts as a CRLF.
        self._tail = b"\r\n"

    def read(self, buf: bytearray) -> DataChunk | DataComplete | None:
        """Consume what ``buf`` holds; return a chunk, the completion, or None for more input.

        Bytes after the terminator stay in ``buf``: they are the next commands.
        """
        if self._mode is _Mode.LINES:
            self._read_lines(buf)
        if self._mode is _Mode.DISCARD:
            self._discard(buf)
        if self._pending and (self._pending >= CHUNK_SIZE or self._mode is _Mode.DONE):
            pieces = self._pieces
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self._pieces = []
            self._pending = 0
            return DataChunk(data=data)
        if self._mode is _Mode.DONE:
            return DataComplete(size=self._size, error=self._error)
        return None

    # -- refusing -----------------------------------------------------------------------------

    def _fail(self, reply: Reply) -> None:
        # The first problem found is the one reported; nothing more is handed out.
        if self._error is None:
            self._error = reply
        self._pieces.clear()
        self._pending = 0
        self._mode = _Mode.DISCARD

    def _discard(self, buf: bytearray) -> None:
        window = self._tail + bytes(buf)
        end = window.find(_TERMINATOR)
        if end == -1:
            self._size += len(buf)
            self._tail = window[-_CONTEXT:]
            buf.clear()
            return
        used = end + len(_TERMINATOR) - len(self._tail)
        self._size += max(0, end + 2 - len(self._tail))
        del buf[:used]
        self._mode = _Mode.DONE

    # -- good lines ---------------------------------------------------------------------------

    def _read_lines(self, buf: bytearray) -> None:
        # buf[:out] is checked output; buf[out:pos] holds transparency dots dropped by the
        # line-by-line path (squeezed out once, not per line); buf[pos:] is unread. Output
        # leaves the buffer at once (copied into a piece), so the buffer stays small.
        pos = out = 0
        slow_until = 0  # the end of a block the fast path refused: go line by line up to it
        while self._pending + out < CHUNK_SIZE:
            if not self._in_header and pos >= slow_until:
                if out != pos:
                    self._cut(buf, out, pos)
                    pos = out = slow_until = 0
                limit = pos + CHUNK_SIZE - self._pending - out
                block_end, taken = self._fast_block(buf, pos, limit)
                if taken:
                    pos = out = block_end
                    continue
                slow_until = block_end
            end = buf.find(b"\r\n", pos)
            if end == -1:
                self._cut(buf, out, pos)
                self._partial(buf)
                return
            line = bytes(buf[pos:end])
            if not self._line(line):
                if self._mode is _Mode.DONE:
                    self._cut(buf, out, end + 2)
                    return
                del buf[: end + 2]  # refused: what was ready is dropped with it
                self._tail = b"\r\n"
                return
            start = pos + 1 if line.startswith(b".") else pos  # RFC 5321 §4.5.2
            size = end + 2 - start
            if out != start:
                buf[out : out + size] = buf[start : end + 2]
            out += size
            pos = end + 2
        self._cut(buf, out, pos)

    def _cut(self, buf: bytearray, out: int, pos: int) -> None:
        """Take ``buf[:out]`` as output and drop ``buf[:pos]`` from the buffer."""
        if out:
            with memoryview(buf) as view, view[:out] as head:
                self._pieces.append(head.tobytes())
            self._pending += out
        del buf[:pos]

    def _partial(self, buf: bytearray) -> None:
        """No CRLF in ``buf``: keep the start of a line, or drain one that is too long."""
        rest = len(buf)
        # A partial line may end in the CR of its CRLF, hence the + 1; a leading dot is the
        # transparency dot and does not count.
        allowed = MAX_LINE_CONTENT + 1 + (1 if buf[:1] == b"." else 0)
        if rest > allowed:
            # Report what the client can fix: a body sent with bare LF line ends shows up
            # here as one endless line.
            bare = buf.find(b"\n") != -1 or buf.find(b"\r", 0, rest - 1) != -1
            self._fail(R.DATA_BARE_CR_LF if bare else R.DATA_LINE_TOO_LONG)
            self._size += rest
            self._tail = bytes(buf[-_CONTEXT:])
            buf.clear()

    def _line(self, line: bytes) -> bool:
        """Take one line (without its CRLF); False when the body ended or turned bad."""
        if line == b".":
            self._mode = _Mode.DONE
            return False
        if line.startswith(b"."):
            line = line[1:]  # RFC 5321 §4.5.2 transparency
        self._size += len(line) + 2
        if b"\r" in line or b"\n" in line:
            self._fail(R.DATA_BARE_CR_LF)
            return False
        if b"\0" in line:
            # RFC 2045 §2.7-2.8: NUL is not allowed in 7bit or 8bit text, and a relay that
            # drops NULs would see "\0." as a terminator.
            self._fail(R.DATA_NUL)
            return False
        if len(line) > MAX_LINE_CONTENT:
            self._fail(R.DATA_LINE_TOO_LONG)
            return False
        if self._in_header:
            if line:
                self._header_size += len(line) + 2
                if self._header_size > self._max_header_size:
                    self._fail(R.HEADER_TOO_LARGE)
                    return False
            else:
                self._in_header = False  # RFC 5322 §2.1: the first empty line ends the header
        if self._size > self._max_size:
            # RFC 1870 §6: the size limit never decides where the data ends.
            self._fail(R.MESSAGE_TOO_LARGE)
            return False
        return True

    def _fast_block(self, buf: bytearray, pos: int, limit: int) -> tuple[int, bool]:
        """Take a run of body lines at once; return where the run ends and if it was taken.

        A run is taken only when it holds no bare CR or LF and no NUL, no line is over the
        limit and the size stays within it; it ends before the terminator. Such lines stay in
        the buffer as they are, or, when some start with a transparency dot, are replaced by
        their unstuffed copy. Anything else is left to the line-by-line path, which is the one
        that decides; this only makes the common case cheap. Every check is a scan in C.
        """
        if buf.startswith(b".\r\n", pos):
            return pos, False  # the terminator: the line-by-line path ends the data
        end = buf.rfind(b"\r\n", pos, limit)
        if end == -1:
            return pos, False
        stop = end + 2
        stuffed = buf[pos] == _DOT
        # One scan finds the first LF that starts a dot line or is bare; usually there is none.
        event = _LF_EVENT.search(buf, pos, stop)
        if event is not None:
            if event.end() - event.start() == 1:
                return stop, False  # a bare LF (before any dot line)
            # The first line starting with a dot is the earliest the terminator can be.
            dot = event.start()
            term = buf.find(_TERMINATOR, max(pos, dot - 1), stop)
            if term != -1:
                stop = term + 2  # the lines before the end of data
            stuffed = stuffed or dot + 1 < stop
            if _BARE_LF.search(buf, dot, stop) is not None:
                return stop, False
        if buf.find(b"\0", pos, stop) != -1 or _BARE_CR.search(buf, pos, stop) is not None:
            return stop, False
        if not stuffed:
            if stop - pos + self._size > self._max_size or not _lines_fit(buf, pos, stop):
                return stop, False
            self._size += stop - pos
            return stop, True
        with memoryview(buf) as view, view[pos:stop] as raw:
            block = raw.tobytes()
        # RFC 5321 §4.5.2 transparency, for the first line and for every line after a CRLF.
        body = block[1:] if block[0] == _DOT else block
        unstuffed = body.replace(b"\r\n.", b"\r\n")
        if (
            len(unstuffed) + self._size > self._max_size
            or not _lines_fit(unstuffed, 0, len(unstuffed))
        ):
            return stop, False
        buf[pos:stop] = unstuffed
        self._size += len(unstuffed)
        return pos + len(unstuffed), True


def _lines_fit(buf: bytes | bytearray, start: int, stop: int) -> bool:
    """True if no line in ``buf[start:stop]`` (whole CRLF lines) is over 1000 octets with CRLF.

    Jumps from line end to line end at most 1000 octets ahead, so a block of short lines
    costs one search per 1000 octets.
    """
    pos = start
    while stop - pos > _MAX_LINE:
        lf = buf.rfind(b"\n", pos, pos + _MAX_LINE)
        if lf == -1:
            return False
        pos = lf + 1
    return True
