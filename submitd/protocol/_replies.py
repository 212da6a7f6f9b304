"""SMTP replies: a validated value type, its wire form, and a bounded parser.

Both roles share this module: the server renders replies, the client parses them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ._grammar import has_control, replace_controls

__all__ = ["MAX_REPLY_LINES", "MAX_REPLY_LINE_LENGTH", "Reply", "ReplyParseError", "parse_reply"]

# RFC 3463 §2: class.subject.detail, class equal to the first digit of the reply code.
_ENHANCED = re.compile(r"\A([245])\.(\d{1,3})\.(\d{1,3})\Z")
# Reply text is printable US-ASCII plus SP and TAB (RFC 5321 §4.2); UTF-8 is tolerated only
# for SMTPUTF8 addresses echoed back, so anything >= 0x80 is allowed but no controls.

#: A client never keeps more than this many lines of one reply (hostile servers, CVE-2020-8794).
MAX_REPLY_LINES = 100
#: RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including CRLF.
MAX_REPLY_LINE_LENGTH = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """One SMTP reply: a three-digit code, an enhanced status code and text.

    ``status`` is the RFC 3463 enhanced status code (``"5.7.0"``). It must be given for every
    2xx, 4xx and 5xx reply except the greeting and the EHLO/HELO answer (RFC 2034 §3), and it
    must be empty for 3xx intermediate replies (``334``, ``354``). ``lines`` holds the text,
    one entry per reply line; it never contains CR, LF or other control characters, so a reply
    can never break the line framing, whoever built it.
    """

    code: int
    status: str = ""
    lines: tuple[str, ...] = field(default=("",))

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.status:
            m = _ENHANCED.match(self.status)
            if m is None or m.group(1) != str(self.code)[0]:
                raise ValueError(f"enhanced status {self.status!r} does not fit code {self.code}")
        if self.code // 100 == 3 and self.status:
            raise ValueError("3xx intermediate replies carry no enhanced status code")
        if not self.lines:
            raise ValueError("a reply has at least one line")
        for line in self.lines:
            if not isinstance(line, str) or has_control(line, tab_ok=True):
                raise ValueError("reply text may not contain control characters")
            if len(line.encode("utf-8", "surrogateescape")) > MAX_REPLY_LINE_LENGTH - 16:
                raise ValueError("reply line too long")
        if len(self.lines) > MAX_REPLY_LINES:
            raise ValueError("too many reply lines")

    @classmethod
    def make(cls, code: int, status: str, text: str, *more: str) -> Reply:
        """Build a reply from a code, an enhanced status code and one or more text lines."""
        return cls(code=code, status=status, lines=(text, *more))

    @property
    def text(self) -> str:
        """The reply text, lines joined with a space (for logs and messages)."""
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        """True for 2xx and 3xx replies."""
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        """True for 4xx replies."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """True for 5xx replies."""
        return self.code >= 500

    def to_bytes(self) -> bytes:
        """Render the reply for the wire, CRLF after every line (RFC 5321 §4.2.1)."""
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            text = f"{self.status} {line}".rstrip(" ") if self.status else line
            out.append(f"{self.code}{sep}{text}")
        return ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}".replace("  ", " ").strip()


class ReplyParseError(ValueError):
    """A peer sent something that is not a well-formed SMTP reply."""


def parse_reply(lines: list[bytes]) -> Reply:
    """Parse the lines of one complete reply (each without CRLF) into a :class:`Reply`.

    The caller bounds how many lines it collects (:data:`MAX_REPLY_LINES`). The enhanced status
    code is recognised when every line carries the same one; otherwise it is left empty.
    """
    if not lines or len(lines) > MAX_REPLY_LINES:
        raise ReplyParseError("empty or oversized reply")
    code: int | None = None
    texts: list[str] = []
    for i, raw in enumerate(lines):
        if len(raw) > MAX_REPLY_LINE_LENGTH or len(raw) < 3 or not raw[:3].isdigit():
            raise ReplyParseError("malformed reply line")
        this = int(raw[:3])
        if code is None:
            code = this
        elif this != code:
            raise ReplyParseError("reply code changes inside a multi-line reply")
        sep = raw[3:4]
        last = i == len(lines) - 1
        if (sep == b"-" and last) or (sep not in (b"-", b" ", b"")) or (sep != b"-" and not last):
            raise ReplyParseError("bad reply continuation")
        texts.append(raw[4:].decode("utf-8", "replace"))
    assert code is not None
    if not 200 <= code <= 599:
        raise ReplyParseError("reply code out of range")
    status = ""
    first = texts[0].split(" ", 1)[0]
    m = _ENHANCED.match(first)
    if m and m.group(1) == str(code)[0] and all(t.split(" ", 1)[0] == first for t in texts):
        status = first
        texts = [t.split(" ", 1)[1] if " " in t else "" for t in texts]
    texts = [replace_controls(t, "?", tab_ok=True)[: MAX_REPLY_LINE_LENGTH - 16] for t in texts]
    try:
        return Reply(code=code, status=status if code // 100 != 3 else "", lines=tuple(texts))
    except ValueError as exc:  # pragma: no cover - sanitised above
        raise ReplyParseError(str(exc)) from exc
