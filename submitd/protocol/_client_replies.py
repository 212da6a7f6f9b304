r"""Reading replies in the client role: bounded framing and the EHLO extension map.

A server is not trusted to be well-behaved: a reply line is at most 512 octets including CRLF
(RFC 5321 §4.5.3.1.5), a reply has at most :data:`MAX_REPLY_LINES` lines and
:data:`MAX_REPLY_BYTES` octets (an endless multi-line reply must not exhaust memory,
CVE-2020-8794), and every line ends in CRLF: a bare LF or CR is a protocol error, never a line
ending (RFC 5321 §2.3.8). A reply may arrive split across any number of reads.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping

from ..secret import Secret
from ._errors import RemoteProtocolError
from ._replies import MAX_REPLY_LINE_LENGTH, MAX_REPLY_LINES, Reply, ReplyParseError, parse_reply

__all__ = [
    "MAX_REPLY_BYTES", "ReplyReader", "blank_secret", "malformed", "parse_extensions"
]

#: The most octets one reply may take, CRLFs included (100 full lines fit).
MAX_REPLY_BYTES = 64 * 1024

# RFC 5321 §4.1.1.1: ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-").
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")


def malformed(reason: str) -> RemoteProtocolError:
    """The error for a server that broke reply framing: ``451 4.5.0`` with our own words."""
    return RemoteProtocolError(Reply.make(451, "4.5.0", f"malformed reply from server: {reason}"))


class ReplyReader:
    """Assemble complete replies from a receive buffer, one at a time, across reads."""

    __slots__ = ("_lines", "_size")

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._size = 0

    @property
    def partial(self) -> bool:
        """True while some lines of a multi-line reply have been read but not its last one."""
        return bool(self._lines)

    def reset(self) -> None:
        """Forget a partly read reply (its buffer was thrown away)."""
        self._lines = []
        self._size = 0

    def next_reply(self, buf: bytearray) -> Reply | None:
        """Remove one complete reply from ``buf`` and return it, or None if it needs more bytes.

        Raises :class:`RemoteProtocolError` (``451 4.5.0``) when the framing is broken.
        """
        while True:
            end = buf.find(b"\n", 0, MAX_REPLY_LINE_LENGTH)
            if end == -1:
                if len(buf) >= MAX_REPLY_LINE_LENGTH:
                    raise malformed("line longer than 512 octets")
                if b"\r" in buf[:-1]:
                    raise malformed("bare CR")
                return None
            if end == 0 or buf[end - 1] != 0x0D:
                raise malformed("bare LF")
            line = bytes(buf[: end - 1])
            if b"\r" in line:
                raise malformed("bare CR")
            del buf[: end + 1]
            self._add(line, end + 1)
            if line[3:4] != b"-":
                lines = self._lines
                self.reset()
                try:
                    return parse_reply(lines)
                except ReplyParseError as exc:
                    raise malformed(str(exc)) from None

    def _add(self, line: bytes, octets: int) -> None:
        # Check each line as it comes: garbage must not wait for a last line that never comes.
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            raise malformed("not a reply line")
        if self._lines and line[:3] != self._lines[0][:3]:
            raise malformed("reply code changes inside a multi-line reply")
        self._size += octets
        if len(self._lines) >= MAX_REPLY_LINES:
            raise malformed(f"more than {MAX_REPLY_LINES} lines")
        if self._size > MAX_REPLY_BYTES:
            raise malformed(f"more than {MAX_REPLY_BYTES} octets")
        self._lines.append(line)


def parse_extensions(reply: Reply) -> Mapping[str, str]:
    """The EHLO keywords of a ``250`` reply, upper-case, mapped to their parameters.

    The first line is the server's name (RFC 5321 §4.1.1.1). Lines that are not an
    ehlo-keyword are skipped. The obsolete ``AUTH=PLAIN LOGIN`` form counts as ``AUTH``.
    """
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword[:5].upper() == "AUTH=":
            params = f"{keyword[5:]} {params}".strip()
            keyword = "AUTH"
        if not keyword.isascii() or not _KEYWORD.match(keyword):
            continue
        keyword = keyword.upper()
        if keyword in extensions and params:
            params = f"{extensions[keyword]} {params}".strip()
        extensions[keyword] = " ".join(params.split())
    return extensions


def blank_secret(
    reply: Reply,
    username: str | None,
    password: Secret | None,
    *,
    oauth_token: Secret | None = None,
) -> Reply:
    """``reply`` with the credentials replaced by ``***``.

    That is the password and its AUTH PLAIN and LOGIN encodings, and the OAuth token, its
    base64 and the XOAUTH2 initial response. A server that echoes credentials back must not
    get them into logs or error messages.
    """
    user = (username or "").encode("utf-8", "surrogateescape")
    needles: list[str] = []
    if password is not None and password.reveal():
        raw = password.reveal().encode("utf-8", "surrogateescape")
        needles += (
            password.reveal(),
            base64.b64encode(raw).decode(),
            base64.b64encode(b"\0" + user + b"\0" + raw).decode(),
        )
    if oauth_token is not None and oauth_token.reveal():
        raw = oauth_token.reveal().encode("utf-8", "surrogateescape")
        needles += (
            oauth_token.reveal(),
            base64.b64encode(raw).decode(),
            base64.b64encode(b"user=" + user + b"\x01auth=Bearer " + raw + b"\x01\x01").decode(),
        )
    if not needles:
        return reply
    lines = reply.lines
    for needle in sorted(needles, key=len, reverse=True):  # longest first: they overlap
        lines = tuple(line.replace(needle, "***") for line in lines)
    if lines == reply.lines:
        return reply
    return Reply(code=reply.code, status=reply.status, lines=lines)
