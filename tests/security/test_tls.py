"""docs/security.md §2: STARTTLS, TLS policy and cross-protocol attacks."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd import Reply, hookimpl
from submitd.testing import RawSMTPClient, TestCA, running_server
from tests.security.support import (
    MODES,
    PLAIN,
    closed,
    connect,
    connect_plain,
    expect,
    expect_reply,
    nothing_queued,
)
from tests.support import PASSWORD, RECIPIENT, SENDER

BEFORE_TLS_REFUSED = ["VRFY demo", "EXPN staff", "HELP", "HELP MAIL", f"AUTH PLAIN {PLAIN}",
                      "AUTH LOGIN", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", "DATA"]


class AuthSpy:
    """Counts the logins a plugin is asked to verify."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def submitd_auth(self, session, credentials):  # type: ignore[no-untyped-def]
        self.calls += 1


@pytest.mark.parametrize("injected", [f"AUTH PLAIN {PLAIN}", "EHLO evil.example",
                                      f"MAIL FROM:<{SENDER}>"])
async def test_plaintext_pipelined_behind_starttls_is_discarded(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, injected: str,
) -> None:
    spy = AuthSpy()
    async with running_server(make_config(), extra_plugins=[("spy", spy)]) as srv:
        async with await connect_plain(srv) as client:
            await expect(client, "EHLO client.example", 250)
            await client.send(f"STARTTLS\r\n{injected}\r\n".encode())
            await expect_reply(client, 220, "2.0.0", timeout=2)  # nothing waits for more
            await client.starttls(client_tls)
            # The first reply inside TLS answers this EHLO, not the injected line.
            ehlo = await expect(client, "EHLO client.example", 250)
            assert ehlo.lines[0].startswith("mx.test.example")
            await expect(client, f"MAIL FROM:<{SENDER}>", 530, "5.7.0")
        assert spy.calls == 0


async def test_tls_forgets_everything_learnt_before_it(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, "starttls", client_tls, ehlo=False, auth=False) as client:
            # EHLO is required again: the one before TLS no longer counts.
            await expect(client, f"AUTH PLAIN {PLAIN}", 503, "5.5.1")
            ehlo = await expect(client, "EHLO client.example", 250)
            assert "STARTTLS" not in ehlo.lines and "AUTH PLAIN LOGIN" in ehlo.lines
            await expect(client, "STARTTLS", 503, "5.5.1")


async def test_commands_before_tls_get_530(
    make_config: Callable[..., Path], maildir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    spy = AuthSpy()
    async with running_server(make_config(limits={"max_errors": 50}),
                              extra_plugins=[("spy", spy)]) as srv:
        async with await connect_plain(srv) as client:
            ehlo = await expect(client, "EHLO client.example", 250)
            assert "STARTTLS" in ehlo.lines and not any(
                line.startswith("AUTH") for line in ehlo.lines)
            for command in BEFORE_TLS_REFUSED:
                await expect(client, command, 530, "5.7.0")
            # The six commands RFC 3207 §4 allows before TLS still work.
            await expect(client, "HELO client.example", 250)
            await expect(client, "NOOP", 250)
            await expect(client, "RSET", 250)
            await expect(client, "QUIT", 221)
        await nothing_queued(srv, maildir)
    assert spy.calls == 0, "credentials sent before TLS are never checked"
    assert PASSWORD not in caplog.text and PLAIN not in caplog.text


async def test_implicit_tls_advertises_auth_at_once(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, "implicit", client_tls, ehlo=False, auth=False) as client:
            ehlo = await expect(client, "EHLO client.example", 250)
            assert "AUTH PLAIN LOGIN" in ehlo.lines and "STARTTLS" not in ehlo.lines


def weak_context(*, version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """A client context that offers only what the server must refuse."""
    import warnings

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is the point here
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = version
    ctx.set_ciphers(ciphers)
    return ctx


@MODES
@pytest.mark.parametrize("weak", ["tls1.1", "tls1.2-cbc", "tls1.2-no-forward-secrecy"])
async def test_old_tls_and_weak_ciphers_are_refused(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str, weak: str,
) -> None:
    ctx = {
        "tls1.1": lambda: weak_context(version=ssl.TLSVersion.TLSv1_1,
                                       ciphers="ALL:@SECLEVEL=0"),
        "tls1.2-cbc": lambda: weak_context(version=ssl.TLSVersion.TLSv1_2,
                                           ciphers="ECDHE+AES+SHA:ECDHE+AES+SHA256:@SECLEVEL=0"),
        "tls1.2-no-forward-secrecy": lambda: weak_context(
            version=ssl.TLSVersion.TLSv1_2, ciphers="kRSA:@SECLEVEL=0"),
    }[weak]()
    async with running_server(make_config()) as srv:
        tcp = await trio.open_tcp_stream("127.0.0.1", srv.port(mode))
        if mode == "starttls":
            client = RawSMTPClient(tcp)
            await expect_reply(client, 220)
            await expect(client, "EHLO client.example", 250)
            await expect(client, "STARTTLS", 220)
        stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
        with trio.fail_after(5), pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
            await stream.do_handshake()
        await trio.aclose_forcefully(stream)
        # A failed handshake ends only that connection.
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, "NOOP", 250)


async def test_renegotiation_is_refused(
    make_config: Callable[..., Path], ca: TestCA,
) -> None:
    from OpenSSL import SSL

    async with running_server(make_config()) as srv:
        port = srv.port("implicit")

        def renegotiate() -> bool:
            ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
            ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
            ctx.load_verify_locations(str(ca.ca_path))
            sock = socket.create_connection(("127.0.0.1", port))
            # Blocking for pyOpenSSL, but never forever: reads give up after 5 s.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
            conn = SSL.Connection(ctx, sock)
            conn.set_tlsext_host_name(b"localhost")
            conn.set_connect_state()
            try:
                conn.do_handshake()
                assert conn.recv(4096).startswith(b"220"), "a working TLS 1.2 session first"
                try:
                    conn.renegotiate()
                    conn.do_handshake()
                    conn.send(b"NOOP\r\n")
                    data = conn.recv(4096)
                except SSL.Error as exc:  # the server's no_renegotiation alert
                    return "no renegotiation" not in str(exc)
                return data.startswith(b"250") and conn.total_renegotiations() > 0
            finally:
                sock.close()

        assert not await trio.to_thread.run_sync(renegotiate)


@MODES
async def test_slow_tls_handshake_is_cut(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    config = make_config()
    config.write_text(config.read_text().replace('handshake_timeout = "10s"',
                                                 'handshake_timeout = "1s"'))
    async with running_server(config) as srv:
        tcp = await trio.open_tcp_stream("127.0.0.1", srv.port(mode))
        if mode == "starttls":
            client = RawSMTPClient(tcp)
            await expect_reply(client, 220)
            await expect(client, "STARTTLS", 220)
        start = trio.current_time()
        with trio.fail_after(5):  # the server hangs up; nothing of a handshake was sent
            while await tcp.receive_some(4096):
                pass
        assert trio.current_time() - start < 3
        await tcp.aclose()
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, "NOOP", 250)


@MODES
@pytest.mark.parametrize("line", ["GET / HTTP/1.1", "POST /cgi-bin/x HTTP/1.1",
                                  "CONNECT example.net:443 HTTP/1.1", "Host: example.net"])
async def test_http_verbs_close_without_a_reply(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str, line: str,
) -> None:
    async with running_server(make_config()) as srv:
        async with await connect(srv, mode, client_tls, auth=False) as client:
            await client.send(line.encode() + b"\r\n")
            with trio.fail_after(5):
                assert await client.read_line() is None, "closed, nothing reflected"


class Gatekeeper:
    @hookimpl
    def submitd_connect(self, session):  # type: ignore[no-untyped-def]
        return Reply.make(521, "5.3.2", "Go away")


@MODES
async def test_no_521_on_a_submission_port(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(), extra_plugins=[("gate", Gatekeeper())]) as srv:
        tcp = await trio.open_tcp_stream("127.0.0.1", srv.port(mode))
        stream: trio.abc.Stream = tcp
        if mode == "implicit":
            stream = trio.SSLStream(tcp, client_tls, server_hostname="localhost")
        async with RawSMTPClient(stream) as client:
            await expect_reply(client, 554, "5.7.1")
            assert await closed(client)
