"""Clients that reconnect at once after QUIT find their per-address slot free again."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd.testing import RawSMTPClient, running_server

CLIENTS = 20  # the default max_connections_per_ip
ROUNDS = 8


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_twenty_clients_reconnecting_from_one_address_are_never_refused(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str
) -> None:
    # Only the rate cap is lifted (one address opens 320 connections here); the per-address
    # cap keeps its default of 20, as many as there are clients.
    config = make_config(limits={"max_connection_rate": 100_000})
    greetings: list[int] = []
    async with running_server(config) as srv:
        port = srv.port(mode)

        async def client() -> None:
            for _ in range(ROUNDS):
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                stream: trio.abc.Stream = tcp
                if mode == "implicit":
                    stream = trio.SSLStream(tcp, client_tls, server_hostname="localhost")
                async with RawSMTPClient(stream) as smtp:
                    greeting = await smtp.reply()
                    assert greeting is not None
                    greetings.append(greeting.code)
                    if greeting.code == 220:
                        quit_reply = await smtp.command("QUIT")
                        assert quit_reply is not None and quit_reply.code == 221

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(CLIENTS):
                    nursery.start_soon(client)
    assert greetings == [220] * (CLIENTS * ROUNDS)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_the_slot_is_free_when_the_client_reads_the_221(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str
) -> None:
    async with running_server(make_config()) as srv:
        tcp = await trio.open_tcp_stream("127.0.0.1", srv.port(mode))
        stream: trio.abc.Stream = tcp
        if mode == "implicit":
            stream = trio.SSLStream(tcp, client_tls, server_hostname="localhost")
        async with RawSMTPClient(stream) as smtp:
            greeting = await smtp.reply()
            assert greeting is not None and greeting.code == 220
            assert srv.server.limiter.count("127.0.0.1") == 1
            quit_reply = await smtp.command("QUIT")
            assert quit_reply is not None and quit_reply.code == 221
            # Not after the server's TLS close: a client reconnecting now gets in.
            assert srv.server.limiter.count("127.0.0.1") == 0
            assert srv.server.limiter.total == 0
