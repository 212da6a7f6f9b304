"""docs/security.md §1: where a line, a command and a message end (SMTP smuggling)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd import hookimpl
from submitd.testing import TestCA, running_server, running_smarthost
from tests.security.support import (
    MESSAGE,
    MODES,
    begin,
    connect,
    expect,
    expect_reply,
    files,
    nothing_queued,
    send_ok,
)
from tests.support import RECIPIENT, SENDER, wait_for_mail

ROOT = Path(__file__).resolve().parents[2]

# Every look-alike of CRLF "." CRLF that a smuggling attack relies on (hannob/smtpsmug and
# the SEC Consult list), each followed by a second message the attacker hopes is executed.
SMUGGLED_ENDS = [
    b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\r.\n", b"\n.\r", b"\r.\r\n",
    b"\r\n.\r\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\r\n",
]
SMUGGLED = (f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
            "From: <ceo@example.com>\r\nSubject: smuggled\r\n\r\npay now\r\n").encode()


@MODES
async def test_bare_lf_in_command_is_one_line(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await client.send(f"MAIL FROM:<{SENDER}>\nRCPT TO:<{RECIPIENT}>\r\n".encode())
            reply = await expect_reply(client, 500, "5.5.2")
            assert "-crlf" in reply.text, "the refusal says how to fix it"
            # One line, one reply: neither half ran, so there is no transaction to add to.
            await expect(client, "NOOP", 250)
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 503, "5.5.1")
        await nothing_queued(srv, maildir)


@MODES
async def test_bare_cr_in_command_smuggles_no_second_command(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await client.send(f"NOOP\rMAIL FROM:<{SENDER}>\r\n".encode())
            await expect_reply(client, 500, "5.5.2")
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 503, "5.5.1")


def test_bare_lf_refusal_is_explained_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "openssl s_client -crlf" in readme and "bare LF" in readme


@MODES
async def test_smuggled_dot_variants_never_end_data(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    # Each refusal counts towards max_errors; allow them all in one session.
    async with running_server(make_config(limits={"max_errors": 50})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            for end in SMUGGLED_ENDS:
                await begin(client)
                await client.send(b"Subject: x\r\n\r\nbody" + end + SMUGGLED + b"\r\n.\r\n")
                # Read to the real end and refused once: 550 5.5.2 (bare CR/LF) or 554 5.6.0.
                reply = await client.reply()
                assert reply is not None and (reply.code, reply.status) in {
                    (550, "5.5.2"), (554, "5.6.0")}, (end, reply)
                # Exactly one reply: the next one answers our NOOP, not a smuggled command.
                await expect(client, "NOOP", 250)
        await nothing_queued(srv, maildir)


@MODES
async def test_terminator_split_over_reads_is_still_found(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await begin(client)
            await client.send(MESSAGE + b"tail")
            for piece in (b"\r", b"\n", b".", b"\r", b"\n"):
                await trio.sleep(0.05)  # separate segments (and TLS records)
                await client.send(piece)
            await expect_reply(client, 250, "2.0.0")
        (stored,) = await wait_for_mail(maildir)
        assert stored.endswith(b"Hello.\r\ntail\r\n")


@MODES
async def test_oversized_message_is_read_to_its_real_end_then_552(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    async with running_server(make_config(limits={"max_message_size": 5000})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await begin(client)
            # Past the limit a stuffed dot line and a second "message" follow: still content.
            await client.send(MESSAGE + (b"y" * 900 + b"\r\n") * 8 + b"..\r\n" + SMUGGLED)
            await client.send((b"z" * 990 + b"\r\n") * 3 + b".\r\n")
            await expect_reply(client, 552, "5.3.4")
            await expect(client, "NOOP", 250)
        await nothing_queued(srv, maildir)


@MODES
async def test_size_parameter_never_decides_where_data_ends(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, f"MAIL FROM:<{SENDER}> SIZE=10", 250)
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
            await expect(client, "DATA", 354)
            body = MESSAGE + b"x" * 500 + b"\r\n.\r\n"
            await client.send(body)  # 10 bytes declared, far more sent: the dot decides
            await expect_reply(client, 250, "2.0.0")
            await expect(client, "NOOP", 250)
        (stored,) = await wait_for_mail(maildir)
        assert stored.endswith(b"x" * 500 + b"\r\n")


class HeaderInjector:
    """A filter plugin that tries to add a header with a line break in it."""

    @hookimpl
    def submitd_data_filter(self, session, envelope, message):  # type: ignore[no-untyped-def]
        message.add_header("X-Note", "fine\r\nBcc: victim@example.net")


async def test_plugin_cannot_inject_a_line_break_into_headers(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    async with running_server(make_config(),
                              extra_plugins=[("inject", HeaderInjector())]) as srv:
        async with await connect(srv, "implicit", client_tls) as client:
            await begin(client)
            await client.send(MESSAGE + b".\r\n")
            reply = await client.reply()
            assert reply is not None and reply.code == 451 and reply.status == "4.3.0", reply
        await nothing_queued(srv, maildir)


async def test_what_leaves_for_the_smarthost_is_canonical(
    make_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext, tmp_path: Path,
) -> None:
    secret = tmp_path / "relay.secret"
    secret.write_text("relay pass\n")
    async with running_smarthost(ca=ca, username="relay", password="relay pass") as fake:
        table = {"host": "127.0.0.1", "port": fake.port, "tls": "starttls",
                 "ca_file": str(ca.ca_path), "username": "relay", "password_file": str(secret)}
        config = make_config(enable=("passwdfile", "smarthost"), plugins={"smarthost": table})
        async with running_server(config) as srv:
            async with await connect(srv, "implicit", client_tls) as client:
                body = MESSAGE + b"..one dot\r\n..\r\n...\r\nlast\r\n"
                await send_ok(client, body)
            (received,) = await fake.wait_for_messages(1)
    # The fake unstuffs once what came on the wire: the stored message, lines with dots and all.
    assert received.data.endswith(b"Hello.\r\n.one dot\r\n.\r\n..\r\nlast\r\n")
    assert b"\n" not in received.data.replace(b"\r\n", b"") and b"\r" not in \
        received.data.replace(b"\r\n", b"")


class AddressSpy:
    """Records every address a plugin is shown."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def submitd_mail_from(self, session, sender, params):  # type: ignore[no-untyped-def]
        self.seen.append(sender)

    @hookimpl
    def submitd_rcpt_check(self, session, envelope, recipient):  # type: ignore[no-untyped-def]
        self.seen.append(recipient.address)


@MODES
async def test_control_characters_in_addresses_are_refused_501_5_1_7(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    spy = AddressSpy()
    async with running_server(make_config(), extra_plugins=[("spy", spy)]) as srv:
        async with await connect(srv, mode, client_tls) as client:
            for control in (b"\x00", b"\x01", b"\x1b", b"\x7f", b"\t"):
                await expect(client, b"MAIL FROM:<de" + control + b"mo@example.com>", 501,
                             "5.1.7")
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            for control in (b"\x00", b"\x0b", b"\x1b", b"\x7f"):
                await expect(client, b"RCPT TO:<vic" + control + b"tim@example.net>", 501,
                             "5.1.7")
        await nothing_queued(srv, maildir)
    assert spy.seen == [SENDER], "no address with a control character reached a plugin"
    for record in caplog.records:
        text = record.getMessage()
        assert not any(c in text for c in "\x00\x01\x1b\x7f\x0b\r\n"), text
    assert files(maildir / "new") == []
