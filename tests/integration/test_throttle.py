"""The login throttle over real sockets, with clients on several loopback addresses.

Linux routes all of 127.0.0.0/8 to the loopback interface, so binding the client socket to
127.0.0.2, 127.0.0.3, ... gives the server distinct client addresses (docs/security.md §3).
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd import Reply
from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.support import PASSWORD, SENDER, USER

WRONG = "not the password"
MODES = pytest.mark.parametrize("mode", ["starttls", "implicit"])


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def command(client: RawSMTPClient, line: str) -> Reply:
    """Send ``line`` and return the reply (the connection must stay open)."""
    reply = await client.command(line)
    assert reply is not None
    return reply


async def session_from(
    srv: RunningServer, mode: str, tls: ssl.SSLContext, source: str
) -> RawSMTPClient:
    """A session from client address ``source``, in TLS and after EHLO, not logged in."""
    tcp = await trio.open_tcp_stream("127.0.0.1", srv.port(mode), local_address=source)
    if mode == "implicit":
        stream = trio.SSLStream(tcp, tls, server_hostname="localhost")
        await stream.do_handshake()
        client = RawSMTPClient(stream)
        assert (await client.reply()) is not None
    else:
        client = RawSMTPClient(tcp)
        assert (await client.reply()) is not None
        assert (await command(client, "EHLO client.example")).code == 250
        assert (await command(client, "STARTTLS")).code == 220
        await client.starttls(tls)
    assert (await command(client, "EHLO client.example")).code == 250
    return client


async def logins(
    srv: RunningServer, mode: str, tls: ssl.SSLContext, source: str,
    *attempts: tuple[str, str],
) -> list[tuple[int, str]]:
    """Try each (login, password) in one session from ``source``: the (code, status) of each."""
    out: list[tuple[int, str]] = []
    async with await session_from(srv, mode, tls, source) as client:
        for user, password in attempts:
            reply = await command(client, f"AUTH PLAIN {plain(user, password)}")
            out.append((reply.code, reply.status))
        if out[-1][0] == 235:  # a login that worked can send
            assert (await command(client, f"MAIL FROM:<{SENDER}>")).code == 250
        await client.command("QUIT")
    return out


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"event={event} ")]


FAILED = (535, "5.7.8")
OK = (235, "2.7.0")
THROTTLED = (454, "4.7.0")


@MODES
async def test_failures_from_other_addresses_never_block_a_correct_password_from_a_clean_one(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(make_config()) as srv:
        for n in range(2, 7):  # five wrong passwords for the login from five addresses
            assert await logins(srv, mode, client_tls, f"127.0.0.{n}", (USER, WRONG)) == [FAILED]
        # Before the fix the login was now blocked from everywhere. The real user, at a clean
        # address, is slowed down at most (the login-wide brake: here one second) and gets in.
        with trio.fail_after(5):
            assert await logins(srv, mode, client_tls, "127.0.0.9", (USER, PASSWORD)) == [OK]
    slowed = events(caplog, "auth_slowed")
    assert len(slowed) == 1 and f"peer=127.0.0.9 user={USER} delay=1" in slowed[0], slowed
    assert not events(caplog, "auth_throttled")


@MODES
async def test_spraying_other_logins_from_one_address_is_throttled_despite_a_valid_login(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    # auth_fail_limit 1: an address may fail 4 x 1 = 4 times before it waits.
    async with running_server(make_config(limits={"auth_fail_limit": 1})) as srv:
        spray = "127.0.0.2"
        victims = iter(f"victim{i}" for i in range(100))
        # Guesses at other logins, the attacker's own valid login in between.
        got = await logins(srv, mode, client_tls, spray,
                           (next(victims), WRONG), (next(victims), WRONG))
        assert got == [FAILED, FAILED]
        assert await logins(srv, mode, client_tls, spray, (USER, PASSWORD)) == [OK]
        assert await logins(srv, mode, client_tls, spray, (next(victims), WRONG)) == [FAILED]
        assert await logins(srv, mode, client_tls, spray, (USER, PASSWORD)) == [OK]
        # The fourth guess: before the fix each valid login had reset the count to nothing.
        assert await logins(srv, mode, client_tls, spray, (next(victims), WRONG)) == [FAILED]
        got = await logins(srv, mode, client_tls, spray, (next(victims), WRONG))
        assert got == [THROTTLED], "the valid logins did not reset the address"
        got = await logins(srv, mode, client_tls, spray, (USER, PASSWORD))
        assert got == [THROTTLED], "the address waits, whichever login it tries"
        got = await logins(srv, mode, client_tls, "127.0.0.3", ("victim0", WRONG))
        assert got == [FAILED], "another address still gets its password checked"


@MODES
async def test_a_success_clears_only_its_own_address_and_login(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits={"auth_fail_limit": 2})) as srv:
        home = "127.0.0.2"
        assert await logins(srv, mode, client_tls, home, (USER, WRONG), (USER, PASSWORD)) \
            == [FAILED, OK]
        # A second typo: two failures for this address and login in all, yet no wait, since
        # the success in between started that count afresh.
        with trio.fail_after(5):  # the login-wide brake may slow it by a second
            got = await logins(srv, mode, client_tls, home, (USER, WRONG), (USER, PASSWORD))
        assert got == [FAILED, OK]
        # The address kept its count: two failures plus six for other logins reach its eight.
        for i in range(3):
            got = await logins(srv, mode, client_tls, home, (f"other{i}a", WRONG),
                               (f"other{i}b", WRONG))
            assert got == [FAILED, FAILED]
        assert await logins(srv, mode, client_tls, home, (USER, PASSWORD)) == [THROTTLED]
        # Its neighbour's address was never touched.
        assert await logins(srv, mode, client_tls, "127.0.0.3", (USER, PASSWORD)) == [OK]
