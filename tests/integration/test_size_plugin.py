"""The size plugin over real sockets, both listener modes: a login's own limit, below the global.

``[limits] max_message_size`` is 100000 (advertised as SIZE); the login ``demo`` may send
2000 bytes, or 50000 when it is in a group that allows more.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from submitd.testing import running_server
from tests.security.support import MODES, connect, expect, expect_reply, nothing_queued
from tests.support import RECIPIENT, SENDER, USER, wait_for_mail

ENABLE = ("passwdfile", "relay", "size", "maildir")
REFUSED = f"Message size exceeds the limit of user {USER} (2000 bytes)"


def body(length: int) -> bytes:
    head = f"From: <{SENDER}>\r\nSubject: size\r\n\r\n".encode()
    lines = b"x" * 70 + b"\r\n"
    text = head + lines * ((length - len(head)) // len(lines) + 1)
    return text[:length - 2] + b"\r\n"


@pytest.fixture
def config(make_config: Callable[..., Path]) -> Callable[[str], Path]:
    def make(extra: str = "") -> Path:
        path = make_config(enable=ENABLE, limits={"max_message_size": 100000},
                           plugins={"size": {"max_message_size": 2000}})
        path.write_text(path.read_text() + extra)
        return path

    return make


@MODES
async def test_declared_size_over_the_login_limit_is_552_at_mail(
    config: Callable[[str], Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(config("")) as srv:
        async with await connect(srv, mode, client_tls) as client:
            ehlo = await expect(client, "EHLO again.example", 250)
            assert "SIZE 100000" in ehlo.lines  # the global ceiling is what is advertised
            reply = await expect(client, f"MAIL FROM:<{SENDER}> SIZE=2001", 552, "5.3.4")
            assert reply.text == REFUSED
            await expect(client, f"MAIL FROM:<{SENDER}> SIZE=2000", 250)
        await nothing_queued(srv, maildir)


@MODES
async def test_message_larger_than_declared_is_552_after_data_and_never_delivered(
    config: Callable[[str], Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(config("")) as srv:
        async with await connect(srv, mode, client_tls) as client:
            for mail in (f"MAIL FROM:<{SENDER}>", f"MAIL FROM:<{SENDER}> SIZE=100"):
                await expect(client, mail, 250)
                await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
                await expect(client, "DATA", 354)
                await client.send(body(5000) + b".\r\n")
                reply = await expect_reply(client, 552, "5.3.4")
                assert reply.text == REFUSED
        await nothing_queued(srv, maildir)


@MODES
async def test_a_group_limit_lets_its_logins_send_more(
    config: Callable[[str], Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    group = f'\n[plugins.size.group.press]\nlogins = ["{USER}"]\nmax_message_size = 50000\n'
    async with running_server(config(group)) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, f"MAIL FROM:<{SENDER}> SIZE=40000", 250)
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
            await expect(client, "DATA", 354)
            await client.send(body(40000) + b".\r\n")
            await expect_reply(client, 250, "2.0.0")
            reply = await expect(client, f"MAIL FROM:<{SENDER}> SIZE=50001", 552, "5.3.4")
            assert reply.text == f"Message size exceeds the limit of user {USER} (50000 bytes)"
        (stored,) = await wait_for_mail(maildir)
    assert len(stored) > 40000
