"""docs/security.md §4: no relay, senders owned by the login, RFC 6409 §8 fix-ups."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from submitd.testing import TestCA, running_server, running_smarthost
from tests.security.support import (
    MESSAGE,
    MODES,
    connect,
    expect,
    expect_reply,
    nothing_queued,
    send_ok,
)
from tests.support import RECIPIENT, SENDER, wait_for_mail

WITH_HEADERS = ("passwdfile", "maildir", "headers")

RELAY_TRICKS = [
    "victim%example.org@example.net", "example.org!victim@example.net",
    "@relay.example:victim@example.org", '"victim@example.org"@example.net',
    "victim@example.org@example.net", "victim@[192.0.2.1]", "victim@localhost",
    "victim@example.123",
]


@MODES
async def test_mail_without_auth_is_refused_530(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, mode, client_tls, auth=False) as client:
            await expect(client, f"MAIL FROM:<{SENDER}>", 530, "5.7.0")
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 530, "5.7.0")
            await expect(client, "DATA", 530, "5.7.0")
        await nothing_queued(srv, maildir)


@MODES
async def test_open_relay_tricks_are_refused(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_errors": 50})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            for trick in RELAY_TRICKS:
                reply = await client.command(f"MAIL FROM:<{trick}>")
                assert reply is not None and reply.code in (501, 553), (trick, reply)
                assert reply.status in ("5.7.1", "5.1.7", "5.5.4"), (trick, reply)
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            for trick in RELAY_TRICKS:
                reply = await client.command(f"RCPT TO:<{trick}>")
                assert reply is not None and reply.code in (501, 554), (trick, reply)
                assert reply.status in ("5.7.1", "5.1.3", "5.5.4"), (trick, reply)
            await expect(client, "DATA", 554, "5.5.1")  # no valid recipient
        await nothing_queued(srv, maildir)


@MODES
async def test_relay_tricks_that_parse_get_the_policy_codes(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_errors": 50})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, "MAIL FROM:<demo%evil.example@example.com>", 553, "5.7.1")
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            for trick in ("a%b@example.net", "a!b@example.net", '"a@b"@example.net',
                          "a@[192.0.2.1]", "a@localhost", "a@example.123", "a@b@example.net"):
                await expect(client, f"RCPT TO:<{trick}>", 554, "5.7.1")


@MODES
async def test_sender_spoofing_is_refused_envelope_and_headers(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, "MAIL FROM:<ceo@example.org>", 550, "5.7.1")
            for header in (f'From: "{SENDER}" <ceo@example.org>',
                           f"From: <{SENDER}>\r\nSender: ceo@example.org"):
                await expect(client, f"MAIL FROM:<{SENDER}>", 250)
                await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
                await expect(client, "DATA", 354)
                await client.send(f"{header}\r\nSubject: spoof\r\n\r\nx\r\n.\r\n".encode())
                await expect_reply(client, 550, "5.7.1")
        await nothing_queued(srv, maildir)


@MODES
async def test_fix_ups_add_date_message_id_and_one_received_hiding_the_client(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(make_config(enable=WITH_HEADERS)) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await send_ok(client, f"From: <{SENDER}>\r\nSubject: bare\r\n\r\nx\r\n".encode())
    (stored,) = await wait_for_mail(maildir)
    head = stored.split(b"\r\n\r\n", 1)[0].decode()
    assert re.search(r"^Date: ", head, re.M) and re.search(r"^Message-ID: <.+@.+>", head, re.M)
    received = re.findall(r"^Received:(?:.*)(?:\r\n[ \t].*)*", head, re.M)
    assert len(received) == 1, head
    assert "ESMTPSA" in received[0] and "TLS" in received[0]
    assert "127.0.0.1" not in received[0], "the submitter's address is hidden by default"


@MODES
async def test_client_auth_parameter_is_never_passed_on(
    make_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext, tmp_path: Path,
    mode: str,
) -> None:
    secret = tmp_path / "relay.secret"
    secret.write_text("relay pass\n")
    async with running_smarthost(ca=ca, username="relay", password="relay pass") as fake:
        table = {"host": "127.0.0.1", "port": fake.port, "tls": "starttls",
                 "ca_file": str(ca.ca_path), "username": "relay", "password_file": str(secret)}
        config = make_config(enable=("passwdfile", "smarthost"), plugins={"smarthost": table})
        async with running_server(config) as srv:
            async with await connect(srv, mode, client_tls) as client:
                await expect(client, f"MAIL FROM:<{SENDER}> AUTH=<ceo@example.org>", 250)
                await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
                await expect(client, "DATA", 354)
                await client.send(MESSAGE + b".\r\n")
                await expect_reply(client, 250, "2.0.0")
            (received,) = await fake.wait_for_messages(1)
    assert not any(p.upper().startswith("AUTH=") and "ceo" in p for p in received.mail_params)


@pytest.mark.parametrize("what", ["messages", "recipients"])
async def test_stolen_password_is_no_spam_cannon(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, what: str,
) -> None:
    # Per-login hourly caps on messages and recipients (a stolen password's blast radius):
    # the ratelimit plugin's table.
    caps = {"messages_per_hour": 3, "recipients_per_hour": 3}
    config = make_config(enable=("passwdfile", "ratelimit", "maildir"),
                         plugins={"ratelimit": caps})
    async with running_server(config) as srv:
        async with await connect(srv, "implicit", client_tls) as client:
            if what == "messages":
                for _ in range(3):
                    await send_ok(client)
                await expect(client, f"MAIL FROM:<{SENDER}>", 450, "4.7.1")
            else:
                await expect(client, f"MAIL FROM:<{SENDER}>", 250)
                for n in range(3):
                    await expect(client, f"RCPT TO:<r{n}@example.net>", 250)
                await expect(client, "RCPT TO:<r3@example.net>", 450, "4.7.1")
