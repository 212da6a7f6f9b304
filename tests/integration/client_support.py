"""Scripted SMTP servers on loopback for the client driver's tests (real TCP, trustme TLS).

Each :class:`Script` is one server's behaviour; :func:`serve` runs it on 127.0.0.1 port 0 and
records what the client sent: commands, the decoded AUTH, and the message bytes after
dot-unstuffing.
"""

from __future__ import annotations

import base64
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from submitd import MessageHandle, Recipient, Secret
from submitd.client import ClientSettings, ClientTimeouts, ClientTLSMode
from submitd.message import parse_header_section
from submitd.testing import TestCA

PASSWORD = "s3cret-Pa55word"
TOKEN = "ya29.a0Ae4lvC-Scripted_Access~Token/42+x=="
MAILBOX = "printer@example.org"
#: Google's XOAUTH2 error, the JSON of RFC 7628 §3.2.2.
OAUTH_ERROR = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
SENDER = "sender@example.org"
EXTENSIONS = ("PIPELINING", "SIZE 10485760", "8BITMIME", "ENHANCEDSTATUSCODES")


@dataclass
class Script:
    """How the scripted server behaves, and what it saw."""

    tls: str = "starttls"  # starttls | implicit | none
    extensions: tuple[str, ...] = EXTENSIONS
    auth: tuple[str, ...] = ("PLAIN", "LOGIN")  # offered inside TLS
    auth_reply: bytes = b"235 2.7.0 Authentication successful\r\n"
    mail_reply: bytes = b"250 2.1.0 Ok\r\n"
    rcpt_replies: dict[str, bytes] = field(default_factory=dict)
    data_reply: bytes = b"250 2.0.0 Ok: queued as X1\r\n"
    after_starttls: bytes = b""  # injected plaintext behind the 220 (CVE-2021-38371)
    stall_on: str | None = None  # a verb the server never answers
    ehlo_reply: bytes | None = None  # instead of the generated one
    cut_after: str | None = None  # a verb after whose reply TCP ends without close_notify
    cut_with_reset: bool = False  # ... and with a TCP RST rather than a FIN
    tokens: tuple[str, ...] = (TOKEN,)  # bearer tokens AUTH XOAUTH2 accepts
    oauth_error: bytes = OAUTH_ERROR  # the JSON sent, base64, in the 334 for any other token
    # (empty: no challenge, oauth_final at once)
    oauth_final: bytes = b"535 5.7.8 Username and Password not accepted\r\n"
    # What the server saw:
    commands: list[str] = field(default_factory=list)
    credentials: list[tuple[str, str]] = field(default_factory=list)  # (user, password|token)
    sasl_responses: list[bytes] = field(default_factory=list)  # answers to the XOAUTH2 334
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0


class _Lines:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def line(self) -> bytes | None:
        while (i := self.buf.find(b"\r\n")) < 0:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.buf += data
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line


async def _handle(script: Script, ca: TestCA, stream: trio.abc.Stream) -> None:
    script.connections += 1
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(ca.cert_path), str(ca.key_path))
    tls, raw = False, stream
    if script.tls == "implicit":
        stream = trio.SSLStream(stream, server_ctx, server_side=True)
        tls = True
    reader = _Lines(stream)
    try:
        await stream.send_all(b"220 scripted.example ESMTP\r\n")
        while (line := await reader.line()) is not None:
            text = line.decode()
            verb = text.split(" ", 1)[0].upper()
            script.commands.append(text if verb != "AUTH" else "AUTH")
            if verb == script.stall_on:
                await trio.sleep_forever()
            if verb == "EHLO" and script.ehlo_reply is not None:
                await stream.send_all(script.ehlo_reply)
            elif verb == "EHLO":
                keywords = list(script.extensions)
                if script.tls == "starttls" and not tls:
                    keywords.append("STARTTLS")
                if tls and script.auth:
                    keywords.append("AUTH " + " ".join(script.auth))
                lines = ["scripted.example", *keywords]
                out = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
                await stream.send_all(out.encode())
            elif verb == "HELO":
                await stream.send_all(b"250 scripted.example\r\n")
            elif verb == "STARTTLS":
                await stream.send_all(b"220 2.0.0 go ahead\r\n" + script.after_starttls)
                stream = trio.SSLStream(stream, server_ctx, server_side=True)
                reader = _Lines(stream)
                tls = True
            elif verb == "AUTH":
                await _auth(script, text, stream, reader)
            elif verb == "MAIL":
                await stream.send_all(script.mail_reply)
            elif verb == "RCPT":
                address = text.split("<", 1)[1].split(">", 1)[0]
                await stream.send_all(script.rcpt_replies.get(address, b"250 2.1.5 Ok\r\n"))
            elif verb == "DATA":
                await stream.send_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                body = bytearray()
                while (data_line := await reader.line()) != b".":
                    assert data_line is not None
                    body += (data_line[1:] if data_line.startswith(b".") else data_line) + b"\r\n"
                script.messages.append(bytes(body))
                await stream.send_all(script.data_reply)
            elif verb in ("RSET", "NOOP"):
                await stream.send_all(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                await stream.send_all(b"221 2.0.0 Bye\r\n")
                break
            else:
                await stream.send_all(b"502 5.5.1 Unknown\r\n")
            if verb == script.cut_after:
                assert isinstance(raw, trio.SocketStream)
                if script.cut_with_reset:
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await raw.aclose()  # under the TLS layer: no close_notify
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _auth(script: Script, text: str, stream: trio.abc.Stream, reader: _Lines) -> None:
    words = text.split(" ")
    if words[1].upper() == "XOAUTH2":
        await _xoauth2(script, words[2], stream, reader)
        return
    if words[1].upper() == "PLAIN":
        _, user, password = base64.b64decode(words[2]).decode().split("\0")
    else:
        await stream.send_all(b"334 VXNlcm5hbWU6\r\n")
        user = base64.b64decode(await reader.line() or b"").decode()
        await stream.send_all(b"334 UGFzc3dvcmQ6\r\n")
        password = base64.b64decode(await reader.line() or b"").decode()
    script.credentials.append((user, password))
    await stream.send_all(script.auth_reply)


async def _xoauth2(script: Script, initial: str, stream: trio.abc.Stream, reader: _Lines) -> None:
    """Google's behaviour: 235, or a 334 JSON error, the client's empty line, then 535."""
    user, auth, *rest = base64.b64decode(initial).decode().split("\x01")
    assert user.startswith("user=") and auth.startswith("auth=Bearer ") and rest == ["", ""]
    token = auth.removeprefix("auth=Bearer ")
    script.credentials.append((user.removeprefix("user="), token))
    if token in script.tokens:
        await stream.send_all(b"235 2.7.0 Accepted\r\n")
        return
    if script.oauth_error:  # else Exchange Online's way: the final reply without a challenge
        await stream.send_all(b"334 " + base64.b64encode(script.oauth_error) + b"\r\n")
        response = await reader.line()
        script.sasl_responses.append(b"<closed>" if response is None else response)
    await stream.send_all(script.oauth_final)


@asynccontextmanager
async def serve(script: Script, ca: TestCA) -> AsyncIterator[int]:
    """Run ``script`` on 127.0.0.1:0 and yield the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_handle, script, ca), 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def settings(port: int, ca: TestCA, *, tls: ClientTLSMode = ClientTLSMode.STARTTLS,
             auth: bool = True, timeouts: ClientTimeouts | None = None,
             context: ssl.SSLContext | None = None, token: str | None = None) -> ClientSettings:
    """Settings for the scripted server; ``token`` logs in as MAILBOX with AUTH XOAUTH2."""
    return ClientSettings(
        host="127.0.0.1", port=port, tls=tls,
        ssl_context=None if tls is ClientTLSMode.NONE else (context or ca.client_context()),
        server_hostname="localhost", helo_name="relay.example.org",
        username=MAILBOX if token else "relay-user" if auth else None,
        password=Secret(PASSWORD) if auth and not token else None,
        oauth_token=Secret(token) if token else None,
        timeouts=timeouts or ClientTimeouts(),
    )


def stored(tmp_path: Path, data: bytes, name: str = "msg") -> MessageHandle:
    path = tmp_path / name
    path.write_bytes(data)
    headers, offset = parse_header_section(data)
    return MessageHandle(path=path, size=len(data), headers=headers, body_offset=offset)


MESSAGE = b"From: <sender@example.org>\r\nSubject: hi\r\n\r\nHello.\r\n.leading dot\r\n..two\r\n"


def rcpts(*addresses: str) -> list[Recipient]:
    return [Recipient(address=a) for a in addresses]
