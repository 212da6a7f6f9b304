"""Helpers of the security tier: sessions in either listener mode, exact replies, empty queues.

Every test here runs a real server on loopback (``submitd.testing.running_server``) and talks
to it with :class:`~submitd.testing.RawSMTPClient`, so what is asserted is what a client sees.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
import trio

from submitd.protocol import Reply
from submitd.testing import RawSMTPClient, RunningServer
from tests.support import PASSWORD, RECIPIENT, SENDER, USER

#: Run a test once per listener mode: STARTTLS (port 587 style) and implicit TLS (465 style).
MODES = pytest.mark.parametrize("mode", ["starttls", "implicit"])

PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
WRONG = base64.b64encode(f"\0{USER}\0not the password".encode()).decode()
MESSAGE = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: fine\r\n\r\nHello.\r\n".encode()


def plain(user: str, password: str, authzid: str = "") -> str:
    """An AUTH PLAIN initial response."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


async def connect(
    srv: RunningServer, mode: str, tls: ssl.SSLContext, *, auth: bool = True,
    ehlo: bool = True, local: str | None = None,
) -> RawSMTPClient:
    """Connect (from ``local`` when given), get TLS either way, EHLO, and AUTH PLAIN if asked."""
    tcp = await trio.open_tcp_stream("127.0.0.1", srv.port(mode), local_address=local)
    client = RawSMTPClient(tcp)
    if mode == "implicit":
        stream = trio.SSLStream(tcp, tls, server_hostname="localhost")
        await stream.do_handshake()
        client = RawSMTPClient(stream)
        await expect_reply(client, 220)
    else:
        await expect_reply(client, 220)
        await expect(client, "EHLO client.example", 250)
        await expect(client, "STARTTLS", 220, "2.0.0")
        await client.starttls(tls)
    if ehlo:
        await expect(client, "EHLO client.example", 250)
    if auth:
        await expect(client, f"AUTH PLAIN {PLAIN}", 235, "2.7.0")
    return client


async def connect_plain(srv: RunningServer, *, local: str | None = None) -> RawSMTPClient:
    """A plain-text connection to the STARTTLS listener, greeting read."""
    tcp = await trio.open_tcp_stream("127.0.0.1", srv.port("starttls"), local_address=local)
    client = RawSMTPClient(tcp)
    await expect_reply(client, 220)
    return client


def check(reply: Reply | None, code: int, status: str | None = None) -> Reply:
    """Assert ``reply`` has ``code`` (and the enhanced ``status``) and return it."""
    assert reply is not None, f"connection closed, expected {code} {status or ''}"
    if status is None:
        assert reply.code == code, reply
    else:
        assert (reply.code, reply.status) == (code, status), reply
    return reply


async def expect_reply(client: RawSMTPClient, code: int, status: str | None = None,
                       *, timeout: float = 10) -> Reply:
    """Read one reply and check it."""
    with trio.fail_after(timeout):
        return check(await client.reply(), code, status)


async def expect(client: RawSMTPClient, line: str | bytes, code: int,
                 status: str | None = None) -> Reply:
    """Send one command line (CRLF added) and check its reply."""
    with trio.fail_after(10):
        return check(await client.command(line), code, status)


async def closed(client: RawSMTPClient, timeout: float = 5) -> bool:
    """True once the server has closed the connection (whatever it still had to say is read)."""
    with trio.fail_after(timeout):
        return await client.at_eof()


async def begin(client: RawSMTPClient, sender: str = SENDER,
                recipients: tuple[str, ...] = (RECIPIENT,)) -> None:
    """MAIL, RCPT(s) and DATA up to the 354."""
    await expect(client, f"MAIL FROM:<{sender}>", 250)
    for rcpt in recipients:
        await expect(client, f"RCPT TO:<{rcpt}>", 250)
    await expect(client, "DATA", 354)


async def send_ok(client: RawSMTPClient, body: bytes = MESSAGE) -> str:
    """One whole transaction that must be accepted; the queue id."""
    await begin(client)
    await client.send(body + b".\r\n")
    reply = await expect_reply(client, 250, "2.0.0")
    return reply.text.rsplit(" ", 1)[-1]


def files(directory: Path) -> list[str]:
    """Names in ``directory`` (none if it does not exist)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def nothing_queued(srv: RunningServer, maildir: Path | None = None) -> None:
    """Assert the spool holds no message (nor a fragment) and the Maildir got nothing."""
    spool = srv.server.spool
    assert await spool.queued_ids() == []
    for sub in ("tmp", "msg", "env"):
        assert files(spool.directory / sub) == [], sub
    if maildir is not None:
        assert files(maildir / "new") == [] and files(maildir / "tmp") == []
