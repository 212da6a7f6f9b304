"""The headers plugin in a real server (passwdfile + headers + maildir), both listener modes."""

from __future__ import annotations

import base64
import email.utils
import re
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from submitd.testing import RawSMTPClient, running_server
from tests.support import PASSWORD, RECIPIENT, SENDER, USER, wait_for_mail

PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
ENABLE = ("passwdfile", "headers", "maildir")
BARE = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bare\r\n\r\nNo Date, no ID.\r\n"
DATE = "Mon, 04 Mar 2024 09:00:00 +0000"
MESSAGE_ID = "<kept.1@laptop.example>"
COMPLETE = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: {DATE}\r\n"
            f"Message-ID: {MESSAGE_ID}\r\nSubject: complete\r\n\r\nAll there.\r\n")
RECEIVED = re.compile(
    r"Received: from client\.example \((?P<client>[^)]*)\) by mx\.test\.example \(submitd\) "
    r"with ESMTPSA \((?P<version>TLSv1\.[23]) (?P<cipher>[A-Z0-9_-]+)\) id (?P<id>\w+); "
    r"(?P<date>[^\r\n]+)\r\n"
)


async def submit(port: int, mode: str, tls: ssl.SSLContext, body: str) -> tuple[str, str, str]:
    """Log in, send ``body``; return the queue ID, the TLS version and the cipher used."""
    if mode == "implicit":
        client = await RawSMTPClient.connect("127.0.0.1", port, tls=tls)
        assert (await client.reply()).code == 220
    else:
        client = await RawSMTPClient.connect("127.0.0.1", port)
        assert (await client.reply()).code == 220
        assert (await client.command("EHLO client.example")).code == 250
        assert (await client.command("STARTTLS")).code == 220
        await client.starttls(tls)
    async with client:
        assert (await client.command("EHLO client.example")).code == 250
        assert (await client.command(f"AUTH PLAIN {PLAIN}")).code == 235
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(body.encode() + b".\r\n")
        reply = await client.reply()
        assert reply is not None and reply.code == 250, reply
        queue_id = reply.text.rpartition(" ")[2]
        stream = client.stream
        version = stream.version()  # type: ignore[attr-defined]
        cipher = stream.cipher()[0]  # type: ignore[attr-defined]
        assert (await client.command("QUIT")).code == 221
    return queue_id, version, cipher


def fields(stored: bytes, name: str) -> list[str]:
    head = stored.partition(b"\r\n\r\n")[0].decode()
    return [line.partition(": ")[2] for line in head.split("\r\n")
            if line.lower().startswith(name.lower() + ":")]


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_one_received_line_on_top_with_esmtpsa_and_tls_and_no_client_address(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    async with running_server(make_config(enable=ENABLE)) as srv:
        queue_id, version, cipher = await submit(srv.port(mode), mode, client_tls, BARE)
        (stored,) = await wait_for_mail(maildir)
    first_lines = stored.split(b"\r\n", 2)
    assert first_lines[0] == f"Return-Path: <{SENDER}>".encode()
    match = RECEIVED.match(stored.decode(), len(first_lines[0]) + 2)
    assert match is not None, stored[:400]
    assert match["client"] == "unknown"
    assert (match["version"], match["cipher"], match["id"]) == (version, cipher, queue_id)
    assert email.utils.parsedate_to_datetime(match["date"]).tzinfo is not None
    assert len(fields(stored, "Received")) == 1
    assert b"127.0.0.1" not in stored
    assert USER.encode() + b")" not in stored, "the login is not shown by default"


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_date_and_message_id_are_added_once_when_missing(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    async with running_server(make_config(enable=ENABLE)) as srv:
        await submit(srv.port(mode), mode, client_tls, BARE)
        (stored,) = await wait_for_mail(maildir)
    (date,) = fields(stored, "Date")
    (mid,) = fields(stored, "Message-ID")
    received_date = RECEIVED.search(stored.decode())["date"]  # type: ignore[index]
    assert email.utils.parsedate_to_datetime(date) == email.utils.parsedate_to_datetime(
        received_date)
    assert re.fullmatch(r"<[0-9a-f]{24}@mx\.test\.example>", mid)
    assert stored.endswith(b"\r\n\r\nNo Date, no ID.\r\n")


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_date_and_message_id_given_by_the_client_are_kept(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    async with running_server(make_config(enable=ENABLE)) as srv:
        await submit(srv.port(mode), mode, client_tls, COMPLETE)
        (stored,) = await wait_for_mail(maildir)
    assert fields(stored, "Date") == [DATE]
    assert fields(stored, "Message-ID") == [MESSAGE_ID]
    after_received = stored.split(b"\r\n", 2)[2]  # Return-Path, Received, then the client's
    assert after_received == COMPLETE.encode(), "the client's message follows unchanged"


async def test_shown_client_and_login_when_configured(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path
) -> None:
    config = make_config(enable=ENABLE,
                         plugins={"headers": {"hide_client": False, "show_login": True}})
    async with running_server(config) as srv:
        await submit(srv.port("implicit"), "implicit", client_tls, COMPLETE)
        (stored,) = await wait_for_mail(maildir)
    (received,) = fields(stored, "Received")
    assert received.startswith("from client.example ([127.0.0.1]) by mx.test.example ")
    assert f") (authenticated user {USER}) id " in received
