"""Slow and stalling clients are cut with ``421 4.4.2`` and give back their slot.

Every deadline is configured short (about a second) so the tests stay fast.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import trio

from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.integration.test_submission import open_session
from tests.support import RECIPIENT, SENDER

MODES = ["starttls", "implicit"]
PEER = "127.0.0.1"


def timeouts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``event=timeout`` log lines."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=timeout")]


async def slots_freed(srv: RunningServer) -> None:
    """Wait until the server holds no connection slot (and no unauthenticated one)."""
    limiter = srv.server.limiter
    with trio.fail_after(5):
        while limiter.total or limiter.unauthenticated:
            await trio.sleep(0.02)


async def greeted(srv: RunningServer, mode: str, tls: ssl.SSLContext) -> RawSMTPClient:
    """A connection that got its 220 and sent nothing (TLS first on the implicit port)."""
    client = await RawSMTPClient.connect(PEER, srv.port(mode),
                                         tls=tls if mode == "implicit" else None)
    assert (await client.reply()).code == 220
    return client


async def assert_cut(client: RawSMTPClient, within: tuple[float, float], start: float) -> None:
    """The client reads ``421 4.4.2`` between ``within`` seconds after ``start``, then EOF."""
    with trio.fail_after(within[1] + 2):
        reply = await client.reply()
    assert reply is not None and (reply.code, reply.status) == (421, "4.4.2"), reply
    assert within[0] < trio.current_time() - start < within[1]
    assert await client.at_eof()


async def assert_cut_while_trickling(
    client: RawSMTPClient, pieces: Iterable[bytes], interval: float,
    within: tuple[float, float],
) -> None:
    """Send ``pieces`` one every ``interval`` s until the server cuts the client (assert_cut)."""
    start = trio.current_time()

    async def trickle() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for piece in pieces:
                await client.send(piece)
                await trio.sleep(interval)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        await assert_cut(client, within, start)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mode", MODES)
async def test_idle_session_that_never_logs_in_is_cut_at_the_preauth_timeout(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    config = make_config(limits={"preauth_timeout": "1s", "command_timeout": "1m"})
    async with running_server(config) as srv:
        async with await open_session(srv, mode, client_tls, auth=False) as client:
            start = trio.current_time()
            await assert_cut(client, (0.9, 3), start)
        await slots_freed(srv)
    (line,) = timeouts(caplog)
    assert f"peer={PEER} phase=command reply=421 " in line
    assert ('reason="the client did not log in and sent nothing for 1s '
            '(limits.preauth_timeout)"') in line


@pytest.mark.parametrize("mode", MODES)
async def test_a_login_lifts_the_preauth_deadline(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    config = make_config(limits={"preauth_timeout": "1s", "command_timeout": "1m"})
    async with running_server(config) as srv:
        async with await open_session(srv, mode, client_tls) as client:
            assert srv.server.limiter.unauthenticated == 0, "a login leaves the count"
            await trio.sleep(1.5)
            reply = await client.command("NOOP")
            assert reply is not None and reply.code == 250
            assert (await client.command("QUIT")).code == 221
        await slots_freed(srv)


@pytest.mark.parametrize("mode", MODES)
async def test_one_byte_at_a_time_is_cut_at_the_command_timeout_from_the_first_byte(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(make_config(limits={"command_timeout": "1s"})) as srv:
        async with await open_session(srv, mode, client_tls) as client:
            # Each byte comes well within a second of the last: a per-read deadline would
            # never fire.
            command = b"MAIL FROM:<" + SENDER.encode() + b">"
            await assert_cut_while_trickling(client, (bytes([b]) for b in command), 0.3,
                                             (0.9, 2))
        await slots_freed(srv)
        assert await srv.server.spool.queued_ids() == []
    (line,) = timeouts(caplog)
    assert ('phase=command reply=421 reason="the client took more than 1s to send one command '
            '(limits.command_timeout)"') in line


@pytest.mark.parametrize("mode", MODES)
async def test_data_below_the_minimum_rate_is_cut(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    # The rate is checked after min(10 s, command_timeout): one second here.
    limits = {"command_timeout": "1s", "min_data_rate": 500, "data_timeout": "1m"}
    async with running_server(make_config(limits=limits)) as srv:
        async with await open_session(srv, mode, client_tls) as client:
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
            assert (await client.command("DATA")).code == 354
            # 50 bytes/s, a read every 0.2 s.
            body = itertools.chain([b"Subject: slow\r\n\r\n"], itertools.repeat(b"x" * 9 + b"\n"))
            await assert_cut_while_trickling(client, body, 0.2, (0.9, 2.5))
        await slots_freed(srv)
        assert await srv.server.spool.queued_ids() == []
    (line,) = timeouts(caplog)
    assert "phase=data reply=421" in line
    assert 'reason="the message arrived slower than limits.min_data_rate (500 bytes/s): ' in line


@pytest.mark.parametrize("mode", MODES)
async def test_near_the_connection_cap_idle_deadlines_shrink_to_the_stress_timeout(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    limits = {"max_connections": 4, "stress_threshold": 50, "stress_timeout": "1s"}
    async with running_server(make_config(limits=limits)) as srv:
        first = await greeted(srv, mode, client_tls)  # 1 of 4: no stress, 30 s to go
        await trio.sleep(0.3)
        assert not srv.server.stress.active
        start = trio.current_time()
        second = await greeted(srv, mode, client_tls)  # 2 of 4 = 50 %: stress
        assert srv.server.stress.active
        # The wait already under way shrinks too: one second from its start, not from now.
        await assert_cut(first, (0.3, 1.5), start)
        await assert_cut(second, (0.9, 2.5), start)
        for client in (first, second):
            await client.aclose()
        await slots_freed(srv)
        assert not srv.server.stress.active
    lines = [r.getMessage() for r in caplog.records]
    events = [line.split()[0] for line in lines if "event=stress_" in line]
    assert events == ["event=stress_on", "event=stress_off"], "logged once each way"
    cuts = timeouts(caplog)
    assert len(cuts) == 2
    assert all('reason="the client sent nothing for 1s (limits.stress_timeout: the server is '
               'near its connection cap)"' in line for line in cuts), cuts


async def _never_reading(srv: RunningServer, mode: str, tls: ssl.SSLContext) -> trio.abc.Stream:
    """A connection with a tiny receive buffer (set before connecting, so the window is small)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((PEER, srv.port(mode)))
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if mode == "implicit":
        tls_stream = trio.SSLStream(stream, tls, server_hostname="localhost")
        await tls_stream.do_handshake()
        stream = tls_stream
    return stream


@pytest.mark.parametrize("mode", MODES)
async def test_a_client_that_never_reads_its_replies_is_an_ordinary_timeout(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    # Pipelined EHLOs, never read: megabytes of replies fill every buffer on the way.
    limits = {"command_timeout": "1s", "max_junk_commands": 10**6}
    async with running_server(make_config(limits=limits)) as srv:
        stream = await _never_reading(srv, mode, client_tls)
        batch = b"EHLO client.example\r\n" * 2000
        with trio.fail_after(30):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for _ in range(40):
                    await stream.send_all(batch)
                while True:  # the server cuts us off (RST or EOF) eventually
                    await stream.send_all(b"NOOP\r\n")
                    await trio.sleep(0.1)
            await slots_freed(srv)
        await trio.aclose_forcefully(stream)
    (line,) = timeouts(caplog)
    assert line.endswith(f'peer={PEER} phase=send reason="the client stopped reading its replies"')
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
