"""Connection rate per address, the cap on unauthenticated sessions, and start-up on a busy port."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.integration.test_submission import PLAIN, open_session

MODES = ["starttls", "implicit"]
PEER = "127.0.0.1"


async def slots_freed(srv: RunningServer) -> None:
    """Wait until the server holds no connection slot."""
    with trio.fail_after(5):
        while srv.server.limiter.total or srv.server.limiter.unauthenticated:
            await trio.sleep(0.02)


async def connect(srv: RunningServer, mode: str, tls: ssl.SSLContext,
                  local: str | None = None) -> RawSMTPClient:
    """Connect (TLS from the first byte on the implicit port), optionally from ``local``."""
    tcp = await trio.open_tcp_stream(PEER, srv.port(mode), local_address=local)
    if mode == "starttls":
        return RawSMTPClient(tcp)
    stream = trio.SSLStream(tcp, tls, server_hostname="localhost")
    await stream.do_handshake()
    return RawSMTPClient(stream)


@pytest.mark.parametrize("mode", MODES)
async def test_a_burst_of_connections_from_one_address_is_stopped_with_421(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    # The default limits: 30 new connections per 10 s from one address.
    async with running_server(make_config()) as srv:
        codes = []
        start = trio.current_time()
        for _ in range(50):
            async with await connect(srv, mode, client_tls) as client:
                reply = await client.reply()
                assert reply is not None
                codes.append((reply.code, reply.status))
                if reply.code == 220:
                    assert (await client.command("QUIT")).code == 221
                else:
                    assert reply.text == "Too many new connections from your address, try later"
                assert await client.at_eof()
        elapsed = trio.current_time() - start
        # The bucket refills at 3 connections per second while the burst runs.
        admitted = codes.count((220, ""))
        assert codes[:30] == [(220, "")] * 30
        assert 30 <= admitted <= 31 + int(elapsed * 3), (admitted, elapsed)
        assert codes.count((421, "4.7.0")) == 50 - admitted
        # Another address is not affected.
        async with await connect(srv, mode, client_tls, local="127.0.0.2") as other:
            assert (await other.reply()).code == 220
        await slots_freed(srv)
        assert await srv.server.spool.queued_ids() == []
    refused = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("event=connection_refused")]
    assert len(refused) == 50 - admitted
    assert refused[0].endswith(f'peer={PEER} reply=421 reason="too many new connections from '
                               f'this address (limit 30 per 10s)"')


@pytest.mark.parametrize("mode", MODES)
async def test_sessions_that_have_not_logged_in_are_capped(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(make_config(limits={"max_unauthenticated": 2})) as srv:
        first = await open_session(srv, mode, client_tls, auth=False)
        second = await connect(srv, mode, client_tls)
        assert (await second.reply()).code == 220
        third = await connect(srv, mode, client_tls)
        reply = await third.reply()
        assert reply is not None and (reply.code, reply.status) == (421, "4.7.0")
        assert await third.at_eof()
        await third.aclose()
        # A successful login leaves the count: room for one more.
        assert (await first.command(f"AUTH PLAIN {PLAIN}")).code == 235
        fourth = await connect(srv, mode, client_tls)
        assert (await fourth.reply()).code == 220
        # So does a session that ends.
        await second.aclose()
        with trio.fail_after(5):
            while True:
                fifth = await connect(srv, mode, client_tls)
                if (await fifth.reply()).code == 220:
                    break
                await fifth.aclose()
        for client in (first, fourth, fifth):
            await client.aclose()
        await slots_freed(srv)
    assert ('reason="too many sessions that have not logged in (limit 2)"'
            in caplog.text)


def test_serve_on_a_busy_port_says_so_in_one_line_and_exits_2(
    make_config: Callable[..., Path],
) -> None:
    config = make_config()
    with socket.socket() as busy:
        busy.bind((PEER, 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = config.read_text().replace(f'address = "{PEER}:0"', f'address = "{PEER}:{port}"',
                                          1)
        config.write_text(text)
        exe = Path(sys.executable).with_name("submitd")
        result = subprocess.run([str(exe), "serve", "-c", str(config)], capture_output=True,
                                text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("submitd:")]
    assert errors == [f"submitd: {config}: listen: cannot listen on {PEER}:{port}: "
                      f"Address already in use"]
    assert "Traceback" not in result.stderr
    assert " ERROR " not in result.stderr

