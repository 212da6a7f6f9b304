"""Taking every TLS record already received at once (the DATA loop's read), never more."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing

from submitd.config import TLSConfig
from submitd.server.tls import make_server_context, receive_buffered
from submitd.testing import TestCA

RECORD = 16384  # the most application data one TLS record carries


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(Path(tmp_path_factory.mktemp("tls")))


async def connected(ca: TestCA) -> tuple[trio.abc.Stream, Client]:
    """A server SSLStream and its client, after a handshake driven by hand.

    The client side is an ``SSLObject`` on memory BIOs, so a test can send exactly the
    records it wants (a corrupted one included).
    """
    server_raw, client_raw = trio.testing.memory_stream_pair()
    context = make_server_context(TLSConfig(cert=ca.cert_path, key=ca.key_path))
    server = trio.SSLStream(server_raw, context, server_side=True)
    client = Client(ca, client_raw)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.handshake()
    return server, client


class Client:
    """A TLS client on memory BIOs over a trio stream."""

    def __init__(self, ca: TestCA, raw: trio.abc.Stream) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ca.client_context().wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self.raw.send_all(self.outgoing.read())
                self.incoming.write(await self.raw.receive_some())
                continue
            await self.raw.send_all(self.outgoing.read())
            return

    def records(self, data: bytes) -> bytes:
        """``data`` encrypted, as the bytes that would go on the wire."""
        self.tls.write(data)
        return self.outgoing.read()


def body(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


async def test_every_record_already_received_comes_in_one_read(ca: TestCA) -> None:
    server, client = await connected(ca)
    data = body(100_000)
    await client.raw.send_all(client.records(data))  # seven records in one socket read
    first = await server.receive_some(65536)
    assert len(first) == RECORD  # what trio gives per call: one record
    got = receive_buffered(server, bytes(first), 262_144)
    assert got == data


async def test_no_more_than_the_limit_and_the_rest_comes_next(ca: TestCA) -> None:
    server, client = await connected(ca)
    data = body(100_000)
    await client.raw.send_all(client.records(data))
    got = receive_buffered(server, bytes(await server.receive_some(65536)), 40_000)
    assert len(got) == 40_000
    while len(got) < len(data):
        got += receive_buffered(server, bytes(await server.receive_some(65536)), 40_000)
    assert got == data


async def test_a_close_after_the_data_is_still_seen_by_the_next_read(ca: TestCA) -> None:
    server, client = await connected(ca)
    data = body(50_000)
    wire = client.records(data)
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.unwrap()  # close_notify; the server's answer is never read
    await client.raw.send_all(wire + client.outgoing.read())
    got = receive_buffered(server, bytes(await server.receive_some(65536)), 262_144)
    assert got == data
    assert await server.receive_some(65536) == b""


async def test_a_corrupted_record_is_never_taken_and_breaks_the_next_read(ca: TestCA) -> None:
    server, client = await connected(ca)
    good = client.records(body(RECORD))
    bad = bytearray(client.records(body(RECORD)))
    bad[100] ^= 1  # inside the encrypted payload: the record no longer authenticates
    await client.raw.send_all(good + bytes(bad))
    got = receive_buffered(server, bytes(await server.receive_some(65536)), 262_144)
    assert got == body(RECORD)
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some(65536)


async def test_a_stream_without_a_tls_buffer_gives_its_data_unchanged() -> None:
    stream, _ = trio.testing.memory_stream_pair()
    data = b"one read\r\n"
    assert receive_buffered(stream, data, 262_144) is data
