r"""The DATA body reader: CRLF lines in, unstuffed chunks out, one terminator.

The only end of data is CRLF "." CRLF (RFC 5321 §4.1.1.4); at the very start of the body the
354 reply stands in for the first CRLF. ``\n.\n``, ``\r.\r``, ``\r\n.\r\r\n``, a NUL next
to the dot and every other look-alike are content, and since a bare CR or LF anywhere marks
the message bad, they are refused content: the SMTP smuggling attacks of 2023
(CVE-2023-51764/-51765/-51766, CVE-2024-27305) get a refusal, never a second message.

Once the message is known to be bad (bare CR/LF, NUL, an over-long line, too big), the reader
stops producing chunks and only looks for the real terminator, keeping four bytes of context
across reads so that a terminator split over segments is still found. Memory stays bounded by
one line (1000 octets, RFC 5321 §4.5.3.1.6) plus one chunk.
"""

from __future__ import annotations

import enum

from . import _catalogue as R
from ._events import DataChunk, DataComplete
from ._replies import Reply

__all__ = ["CHUNK_SIZE", "DataReader"]

#: Chunks handed to the session are about this big (a little more: whole lines).
CHUNK_SIZE = 65_536
#: RFC 5321 §4.5.3.1.6: 1000 octets per text line including CRLF, not counting the
#: transparency dot; so 998 octets of content.
MAX_LINE_CONTENT = 998

_TERMINATOR = b"\r\n.\r\n"
_CONTEXT = len(_TERMINATOR) - 1


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
        "_out",
        "_size",
        "_tail",
    )

    def __init__(self, *, max_size: int, max_header_size: int) -> None:
        self._max_size = max_size
        self._max_header_size = max_header_size
        self._mode = _Mode.LINES
        self._out = bytearray()
        self._size = 0
        self._header_size = 0
        self._in_header = True
        self._error: Reply | None = None
        # The bytes just before the unread input; the 354 counts as a CRLF.
        self._tail = b"\r\n"

    def read(self, buf: bytearray) -> DataChunk | DataComplete | None:
        """Consume what ``buf`` holds; return a chunk, the completion, or None for more input.

        Bytes after the terminator stay in ``buf``: they are the next commands.
        """
        if self._mode is _Mode.LINES:
            self._read_lines(buf)
        if self._mode is _Mode.DISCARD:
            self._discard(buf)
        if self._out:
            chunk = DataChunk(data=bytes(self._out))
            self._out.clear()
            return chunk
        if self._mode is _Mode.DONE:
            return DataComplete(size=self._size, error=self._error)
        return None

    # -- refusing -----------------------------------------------------------------------------

    def _fail(self, reply: Reply) -> None:
        # The first problem found is the one reported; nothing more is handed out.
        if self._error is None:
            self._error = reply
        self._out.clear()
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
        pos = 0
        slow_until = 0  # the end of a block the fast path refused: go line by line up to it
        while len(self._out) < CHUNK_SIZE:
            if not self._in_header and pos >= slow_until:
                block_end, taken = self._fast_block(buf, pos)
                if taken:
                    pos = block_end
                    continue
                slow_until = block_end
            end = buf.find(b"\r\n", pos)
            if end == -1:
                self._partial(buf, pos)
                return
            line = bytes(buf[pos:end])
            pos = end + 2
            if not self._line(line):
                break
        del buf[:pos]
        if self._mode is _Mode.DISCARD:
            self._tail = b"\r\n"

    def _partial(self, buf: bytearray, pos: int) -> None:
        """No CRLF in ``buf[pos:]``: keep the start of a line, or drain one that is too long."""
        rest = len(buf) - pos
        # A partial line may end in the CR of its CRLF, hence the + 1; a leading dot is the
        # transparency dot and does not count.
        allowed = MAX_LINE_CONTENT + 1 + (1 if buf[pos : pos + 1] == b"." else 0)
        if rest > allowed:
            # Report what the client can fix: a body sent with bare LF line ends shows up
            # here as one endless line.
            bare = b"\n" in buf[pos:] or b"\r" in buf[pos:-1]
            self._fail(R.DATA_BARE_CR_LF if bare else R.DATA_LINE_TOO_LONG)
            self._size += rest
            self._tail = bytes(buf[-_CONTEXT:])
            buf.clear()
            return
        del buf[:pos]

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
        self._out += line
        self._out += b"\r\n"
        return True

    def _fast_block(self, buf: bytearray, pos: int) -> tuple[int, bool]:
        """Take a run of clean body lines at once; return where the run ends and if taken.

        Only a block with no terminator, no bare CR/LF, no NUL, no over-long line and no size
        overflow is taken here; anything unusual is left to the line-by-line path, which is
        the one that decides. This only makes the common case cheap.
        """
        limit = pos + CHUNK_SIZE - len(self._out)
        # A small message usually arrives whole with its terminator: end the block at the
        # CRLF before the final "." so the body still takes the fast path.
        term = buf.find(_TERMINATOR, pos, limit + len(_TERMINATOR))
        if term != -1:
            limit = min(limit, term + 2)
        end = buf.rfind(b"\r\n", pos, limit)
        if end == -1:
            return pos, False
        block = bytes(buf[pos : end + 2])
        crlf = block.count(b"\r\n")
        if (
            block.count(b"\r") != crlf
            or block.count(b"\n") != crlf
            or b"\0" in block
            or block.startswith(b".\r\n")
            or _TERMINATOR in block
        ):
            return end + 2, False
        # RFC 5321 §4.5.2 transparency, for the first line and for every line after a CRLF.
        body = block[1:] if block.startswith(b".") else block
        unstuffed = body.replace(b"\r\n.", b"\r\n")
        if (
            self._size + len(unstuffed) > self._max_size
            or max(map(len, unstuffed.split(b"\r\n"))) > MAX_LINE_CONTENT
        ):
            return end + 2, False
        self._size += len(unstuffed)
        self._out += unstuffed
        return end + 2, True
