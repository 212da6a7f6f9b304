"""The issue workloads' client: a small SMTP submission client on trio (one thread, many sessions).

Every session does what a mail application does on port 587: connect, EHLO, STARTTLS with the
certificate verified against the test CA (name ``localhost``), EHLO, AUTH PLAIN, then MAIL, RCPT,
DATA per message (no pipelining, as smtplib), QUIT. One trio event loop drives all sessions, so
10,000 idle ones cost a socket and a small object each, not a thread.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass

import trio

CHUNK = 1024 * 1024  # a large body goes out in pieces of this size


class SmtpError(Exception):
    """An unexpected reply; ``code`` is its status (0 when the connection closed)."""

    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage = stage
        self.code = code


def stuff(body: bytes) -> bytes:
    """``body`` (CRLF lines, ending in CRLF) dot-stuffed and terminated (RFC 5321 §4.5.2)."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass(frozen=True, kw_only=True)
class Login:
    """Who logs in and what the envelope says."""

    user: str
    password: str
    sender: str
    recipient: str

    @property
    def plain(self) -> bytes:
        """The AUTH PLAIN command with its initial response (RFC 4954, RFC 4616)."""
        blob = base64.b64encode(f"\0{self.user}\0{self.password}".encode())
        return b"AUTH PLAIN " + blob + b"\r\n"


class Session:
    """One SMTP session over a trio stream (plain TCP until :meth:`open` switched to TLS)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def reply(self, stage: str) -> tuple[int, str]:
        """Read one (possibly multiline) reply."""
        last = b""
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise SmtpError(stage, 0, "connection closed")
                self.buf += data
                continue
            last = bytes(self.buf[:end])
            del self.buf[: end + 2]
            if last[3:4] != b"-":
                break
        try:
            return int(last[:3]), last[4:].decode(errors="replace")
        except ValueError:
            raise SmtpError(stage, 0, f"bad reply {last!r}") from None

    async def command(self, stage: str, line: bytes, expect: int) -> None:
        """Send ``line`` and require reply code ``expect``."""
        await self.stream.send_all(line)
        code, text = await self.reply(stage)
        if code != expect:
            raise SmtpError(stage, code, text)

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext, login: Login) -> Session:
        """Connect, EHLO, STARTTLS, EHLO, AUTH PLAIN; the caller closes the session."""
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        session = cls(tcp)
        try:
            code, text = await session.reply("greeting")
            if code != 220:
                raise SmtpError("greeting", code, text)
            await session.command("ehlo", b"EHLO client.bench.example\r\n", 250)
            await session.command("starttls", b"STARTTLS\r\n", 220)
            tls = trio.SSLStream(tcp, context, server_hostname="localhost")
            await tls.do_handshake()
            session.stream = tls
            await session.command("ehlo", b"EHLO client.bench.example\r\n", 250)
            await session.command("auth", login.plain, 235)
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return session

    async def send(self, login: Login, wire: bytes, *, size_param: bool = False) -> None:
        """One transaction; ``wire`` is the body already stuffed and terminated."""
        mail = f"MAIL FROM:<{login.sender}>".encode()
        if size_param:
            mail += f" SIZE={len(wire)}".encode()
        await self.command("mail", mail + b"\r\n", 250)
        await self.command("rcpt", f"RCPT TO:<{login.recipient}>\r\n".encode(), 250)
        await self.command("data", b"DATA\r\n", 354)
        await self.send_body(wire)
        code, text = await self.reply("data end")
        if code != 250:
            raise SmtpError("data end", code, text)

    async def send_body(self, wire: bytes) -> None:
        """Write the stuffed body in pieces of :data:`CHUNK` bytes."""
        view = memoryview(wire)
        for start in range(0, len(view), CHUNK):
            await self.stream.send_all(view[start : start + CHUNK])

    async def quit(self) -> None:
        """QUIT, wait for the 221, close."""
        try:
            await self.command("quit", b"QUIT\r\n", 221)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close without QUIT."""
        await trio.aclose_forcefully(self.stream)

    def detach_tls(self) -> trio.abc.Stream:
        """Drop the client's TLS state and keep only the TCP stream (idle sessions).

        Nothing is sent: the server keeps its TLS session and its authenticated state; the
        client holds a socket and little memory, so 10,000 idle sessions fit in one process.
        """
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        self.stream = stream
        return stream
