"""The relay plugin over real sockets, both listener modes: who may send as whom, and where.

The server runs passwdfile (authentication) + relay (authorization) + maildir, as the sample
configuration does; replies are checked with their enhanced codes, and a refused message must
not reach the Maildir.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from submitd.testing import running_server
from tests.security.support import (
    MESSAGE,
    MODES,
    connect,
    expect,
    expect_reply,
    nothing_queued,
    send_ok,
)
from tests.support import RECIPIENT, SENDER, USER, wait_for_mail

ENABLE = ("passwdfile", "relay", "maildir")
RELAY = """
[plugins.relay]
deny_recipient_domains = ["competitor.example"]
[plugins.relay.senders]
"shared@example.org" = ["demo", "someone-else"]
"""


@pytest.fixture
def config(make_config: Callable[..., Path]) -> Path:
    path = make_config(enable=ENABLE)
    path.write_text(path.read_text() + RELAY)
    return path


@MODES
async def test_envelope_sender_not_owned_is_550_and_logged_as_relay(
    config: Path, client_tls: ssl.SSLContext, maildir: Path, mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(config) as srv:
        async with await connect(srv, mode, client_tls) as client:
            reply = await expect(client, "MAIL FROM:<ceo@example.org>", 550, "5.7.1")
            assert reply.text == f"Sender address <ceo@example.org> not owned by user {USER}"
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 503)  # no transaction was opened
            await expect(client, "MAIL FROM:<>", 550, "5.7.1")  # <> is not listed for demo
        await nothing_queued(srv, maildir)
    (line,) = [r.getMessage() for r in caplog.records if "event=mail_refused" in r.getMessage()
               and "ceo@" in r.getMessage()]
    assert f"user={USER} sender=<ceo@example.org> plugin=relay reply=550" in line


@MODES
async def test_users_file_senders_and_the_aliases_table_are_delivered(
    config: Path, client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(config) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await send_ok(client)  # demo@example.com, listed in the users file
            await expect(client, "MAIL FROM:<shared@example.org>", 250)  # the aliases table
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
            await expect(client, "DATA", 354)
            await client.send(b"From: Shared <shared@example.org>\r\nSender: <demo@example.com>"
                              b"\r\nSubject: alias\r\n\r\nhi\r\n.\r\n")
            await expect_reply(client, 250, "2.0.0")
        stored = await wait_for_mail(maildir, 2)
    assert any(b"Subject: alias" in m and m.startswith(b"Return-Path: <shared@example.org>")
               for m in stored)


@MODES
@pytest.mark.parametrize(
    ("header", "text"),
    [
        (f'From: "{SENDER}" <ceo@example.org>',
         f"Header From: address <ceo@example.org> not owned by user {USER}"),
        (f"From: <{SENDER}>\r\nSender: ceo@example.org",
         f"Header Sender: address <ceo@example.org> not owned by user {USER}"),
        (f"From: <{SENDER}>\r\nFrom: <ceo@example.org>",
         f"Header From: address <ceo@example.org> not owned by user {USER}"),
        (f"From: <{SENDER}>,\r\n <ceo@example.org>",  # folded
         f"Header From: address <ceo@example.org> not owned by user {USER}"),
        (f"From: {SENDER} <ceo@example.org>", "Header From: is not a valid address list"),
        (f"From: <{SENDER}>, <x@alias.example>",
         "Header From: names 2 authors and there is no Sender: (RFC 5322 section 3.6.2)"),
    ],
)
async def test_header_sender_spoofing_is_550_and_never_delivered(
    config: Path, client_tls: ssl.SSLContext, maildir: Path, mode: str, header: str, text: str,
) -> None:
    async with running_server(config) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
            await expect(client, "DATA", 354)
            await client.send(f"{header}\r\nSubject: spoof\r\n\r\nx\r\n.\r\n".encode())
            reply = await expect_reply(client, 550, "5.7.1")
            assert reply.text == text
            await expect(client, "NOOP", 250)
        await nothing_queued(srv, maildir)


@MODES
async def test_denied_recipient_domain_is_550_at_rcpt_and_never_delivered(
    config: Path, client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(config) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            reply = await expect(client, "RCPT TO:<boss@mail.competitor.example>", 550, "5.7.1")
            assert reply.text == f"Recipient <boss@mail.competitor.example> not allowed for " \
                                 f"user {USER}"
            await expect(client, "DATA", 554, "5.5.1")  # no valid recipient
        await nothing_queued(srv, maildir)


@MODES
async def test_without_relay_the_login_is_not_bound_to_its_senders(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    """passwdfile only authenticates now: leaving relay out of enable lifts the sender check
    (check-config warns about it); the sample configurations enable both."""
    async with running_server(make_config(enable=("passwdfile", "maildir"))) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, "MAIL FROM:<ceo@example.org>", 250)
            await expect(client, "RSET", 250)
            await send_ok(client, MESSAGE)
        await wait_for_mail(maildir, 1)
