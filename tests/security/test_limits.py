"""docs/security.md §5: bounded lines, counts, deadlines and connections (denial of service).

Deadlines are configured at about a second so the tier stays fast; the longer versions with
their log lines are in tests/integration/test_slow_clients.py and test_connection_limits.py.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path

import trio

from submitd import hookimpl
from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.security.support import (
    MESSAGE,
    MODES,
    PLAIN,
    begin,
    closed,
    connect,
    expect,
    expect_reply,
    nothing_queued,
    send_ok,
)
from tests.support import RECIPIENT, SENDER, wait_for_mail


async def slots_freed(srv: RunningServer) -> None:
    """Wait until the server holds no connection slot (nor an unauthenticated one)."""
    limiter = srv.server.limiter
    with trio.fail_after(5):
        while limiter.total or limiter.unauthenticated:
            await trio.sleep(0.02)


async def greeted(srv: RunningServer, mode: str, tls: ssl.SSLContext) -> RawSMTPClient:
    """A connection that read its greeting and said nothing."""
    client = await RawSMTPClient.connect("127.0.0.1", srv.port(mode),
                                         tls=tls if mode == "implicit" else None)
    await expect_reply(client, 220)
    return client


async def cut_within(client: RawSMTPClient, start: float, low: float, high: float) -> None:
    """``421 4.4.2`` between ``low`` and ``high`` seconds after ``start``, then EOF."""
    await expect_reply(client, 421, "4.4.2", timeout=high + 2)
    assert low < trio.current_time() - start < high
    assert await closed(client)


@MODES
async def test_overlong_lines_are_drained_and_refused(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_errors": 50})) as srv:
        async with await connect(srv, mode, client_tls, auth=False) as client:
            await expect(client, "NOOP " + "x" * 1_000_000, 500, "5.5.2")  # drained, not kept
            await expect(client, "NOOP " + "x" * 506, 500, "5.5.2")  # 513 with CRLF
            # AUTH lines may be up to 12288 octets (RFC 4954 §4): this one is decoded ...
            await expect(client, "AUTH PLAIN " + "QUFB" * 3000, 501, "5.5.2")
            # ... longer is refused as too long, on the AUTH line or in the exchange.
            await expect(client, "AUTH PLAIN " + "QUFB" * 3100, 500, "5.5.2")
            await expect(client, "AUTH PLAIN", 334)
            await expect(client, "QUFB" * 3100, 500, "5.5.6")
            await expect(client, f"AUTH PLAIN {PLAIN}", 235)
            # MAIL and RCPT may carry parameters past 512 octets.
            await expect(client, f"MAIL FROM:<{SENDER}> ENVID=" + "e" * 99 + " " + " " * 500,
                         250)
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
            await expect(client, "DATA", 354)
            await client.send(MESSAGE + b"y" * 999 + b"\r\n.\r\n")  # 1001 octets with CRLF
            await expect_reply(client, 554, "5.6.0")
            await expect(client, "NOOP", 250)
        await nothing_queued(srv, maildir)


@MODES
async def test_recipient_flood_gets_452_4_5_3(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_recipients": 3})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            for n in range(3):
                await expect(client, f"RCPT TO:<r{n}@example.net>", 250)
            await expect(client, "RCPT TO:<r3@example.net>", 452, "4.5.3")
            await expect(client, "DATA", 354)
            await client.send(MESSAGE + b".\r\n")
            await expect_reply(client, 250, "2.0.0")
        (stored,) = await wait_for_mail(maildir)
        assert b"r3@example.net" not in stored, "the fourth recipient got nothing"


@MODES
async def test_header_flood_is_552_and_nothing_queued(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_header_size": 2000})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await begin(client)
            await client.send(b"X-Pad: " + b"p" * 900 + b"\r\n" + (b" fold\r\n" * 400)
                              + b"\r\nbody\r\n.\r\n")
            await expect_reply(client, 552, "5.3.4")
        await nothing_queued(srv, maildir)


@MODES
async def test_transaction_flood_ends_the_session_421(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_transactions": 2})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await send_ok(client)
            await send_ok(client)
            reply = await client.command(f"MAIL FROM:<{SENDER}>")
            assert reply is not None and (reply.code, reply.status) == (421, "4.7.0"), reply
            assert await closed(client)


@MODES
async def test_command_trickled_a_byte_at_a_time_is_cut_from_its_first_byte(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits={"command_timeout": "1s"})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            start = trio.current_time()

            async def trickle() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP":
                        await client.send(bytes([byte]))
                        await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                await cut_within(client, start, 0.9, 2.0)
                nursery.cancel_scope.cancel()
        await slots_freed(srv)


@MODES
async def test_idle_preauth_is_cut(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    limits = {"preauth_timeout": "1s", "command_timeout": "1m"}
    async with running_server(make_config(limits=limits)) as srv:
        client = await greeted(srv, mode, client_tls)
        start = trio.current_time()
        await cut_within(client, start, 0.9, 2.5)
        await client.aclose()
        # Logged in, the longer command deadline applies.
        async with await connect(srv, mode, client_tls) as client:
            await trio.sleep(1.2)
            await expect(client, "NOOP", 250)
    await slots_freed(srv)


@MODES
async def test_data_below_the_minimum_rate_is_cut(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    limits = {"command_timeout": "1s", "min_data_rate": 500, "data_timeout": "1m"}
    async with running_server(make_config(limits=limits)) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await begin(client)
            start = trio.current_time()

            async def trickle() -> None:  # 50 bytes/s, each read well within 1 s
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await client.send(b"Subject: slow\r\n\r\n")
                    while True:
                        await client.send(b"x" * 8 + b"\r\n")
                        await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                await cut_within(client, start, 0.9, 3.0)
                nursery.cancel_scope.cancel()
        await slots_freed(srv)
        await nothing_queued(srv, maildir)


@MODES
async def test_deadlines_shrink_near_the_connection_cap(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    limits = {"max_connections": 4, "stress_threshold": 50, "stress_timeout": "1s"}
    async with running_server(make_config(limits=limits)) as srv:
        first = await greeted(srv, mode, client_tls)
        start = trio.current_time()
        second = await greeted(srv, mode, client_tls)  # 2 of 4: stress mode
        await cut_within(first, start, 0.3, 2.0)
        await cut_within(second, start, 0.5, 2.5)
        for client in (first, second):
            await client.aclose()
        await slots_freed(srv)


@MODES
async def test_connection_flood_from_one_address_is_rate_limited(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    limits = {"max_connection_rate": 5, "connection_rate_window": "10s"}
    async with running_server(make_config(limits=limits)) as srv:
        clients = [await greeted(srv, mode, client_tls) for _ in range(5)]
        flood = await RawSMTPClient.connect("127.0.0.1", srv.port(mode),
                                            tls=client_tls if mode == "implicit" else None)
        await expect_reply(flood, 421, "4.7.0")
        assert await closed(flood)
        # Another address is not affected.
        async with await connect(srv, mode, client_tls, local="127.0.0.2") as other:
            await expect(other, "NOOP", 250)
        for client in [*clients, flood]:
            await client.aclose()
        await slots_freed(srv)


@MODES
async def test_connection_caps_total_and_per_address(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_connections_per_ip": 2,
                                                  "max_connections": 3})) as srv:
        held = [await greeted(srv, mode, client_tls) for _ in range(2)]
        third = await RawSMTPClient.connect("127.0.0.1", srv.port(mode),
                                            tls=client_tls if mode == "implicit" else None)
        await expect_reply(third, 421, "4.7.0")  # per address
        other = await connect(srv, mode, client_tls, local="127.0.0.2", auth=False)
        tcp = await trio.open_tcp_stream("127.0.0.1", srv.port(mode), local_address="127.0.0.3")
        stream: trio.abc.Stream = tcp
        if mode == "implicit":
            stream = trio.SSLStream(tcp, client_tls, server_hostname="localhost")
        fourth = RawSMTPClient(stream)
        await expect_reply(fourth, 421, "4.7.0")  # in total
        for client in [*held, third, other, fourth]:
            await client.aclose()
        await slots_freed(srv)


@MODES
async def test_unauthenticated_sessions_are_capped(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_unauthenticated": 2})) as srv:
        first = await connect(srv, mode, client_tls, auth=False)
        second = await greeted(srv, mode, client_tls)
        third = await RawSMTPClient.connect("127.0.0.1", srv.port(mode),
                                            tls=client_tls if mode == "implicit" else None)
        await expect_reply(third, 421, "4.7.0")
        await third.aclose()
        # An authenticated session does not count: a real user still gets in.
        await expect(first, f"AUTH PLAIN {PLAIN}", 235)
        fourth = await greeted(srv, mode, client_tls)
        for client in (first, second, fourth):
            await client.aclose()
        await slots_freed(srv)


@MODES
async def test_junk_commands_are_cut(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_junk_commands": 10})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            codes = []
            for command in ["NOOP", "RSET", "VRFY demo", "NOOP"] * 5:
                reply = await client.command(command)
                if reply is None:
                    break
                codes.append((reply.code, reply.status))
            assert codes[-1] == (421, "4.7.0"), codes
            assert 8 <= len(codes) <= 12, codes
            assert await closed(client)


@MODES
async def test_mail_loop_is_refused_554_5_4_6(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_hops": 5})) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await begin(client)
            hops = b"".join(b"Received: from hop%d.example by mx.example; "
                            b"Mon, 1 Jan 2024 00:00:00 +0000\r\n" % n for n in range(6))
            await client.send(hops + MESSAGE + b".\r\n")
            await expect_reply(client, 554, "5.4.6")
        await nothing_queued(srv, maildir)


class Exploder:
    """A plugin that raises where the server does not expect it."""

    @hookimpl
    def submitd_connect(self, session):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


@MODES
async def test_an_exception_in_a_handler_never_stops_the_server(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(), extra_plugins=[("boom", Exploder())]) as srv:
        for _ in range(2):  # the second connection proves the listener still serves
            client = await RawSMTPClient.connect("127.0.0.1", srv.port(mode),
                                                 tls=client_tls if mode == "implicit" else None)
            reply = await client.reply()
            assert reply is not None and reply.code in (421, 451), reply
            await client.aclose()
        await slots_freed(srv)
