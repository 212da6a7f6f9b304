"""Real sockets on loopback, real TLS (trustme), both ports, passwdfile + maildir."""

from __future__ import annotations

import base64
import logging
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.support import PASSWORD, RECIPIENT, SENDER, USER, wait_for_mail

PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
MESSAGE = (
    f"From: Demo <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: integration\r\n\r\n"
    "Hello over real TLS.\r\n..leading dot\r\n"
).encode()


async def open_session(
    srv: RunningServer, mode: str, tls: ssl.SSLContext, *, auth: bool = True
) -> RawSMTPClient:
    """Connect, greet, get TLS (either way), EHLO, and optionally AUTH PLAIN."""
    if mode == "implicit":
        client = await RawSMTPClient.connect("127.0.0.1", srv.port(mode), tls=tls)
        greeting = await client.reply()
    else:
        client = await RawSMTPClient.connect("127.0.0.1", srv.port(mode))
        greeting = await client.reply()
        assert (await client.command("EHLO client.example")).code == 250
        assert (await client.command("STARTTLS")).code == 220
        await client.starttls(tls)
    assert greeting is not None and greeting.code == 220
    ehlo = await client.command("EHLO client.example")
    assert ehlo is not None and ehlo.code == 250
    if auth:
        reply = await client.command(f"AUTH PLAIN {PLAIN}")
        assert reply is not None and (reply.code, reply.status) == (235, "2.7.0")
    return client


async def send_message(client: RawSMTPClient, body: bytes = MESSAGE) -> str:
    """Run one transaction and return the 250 reply text after DATA."""
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
    assert (await client.command("DATA")).code == 354
    await client.send(body + b".\r\n")
    reply = await client.reply()
    assert reply is not None and (reply.code, reply.status) == (250, "2.0.0"), reply
    return reply.text


@pytest.fixture
async def server(make_config: Callable[..., Path]):  # type: ignore[no-untyped-def]
    async with running_server(make_config()) as srv:
        yield srv


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_authenticated_message_is_queued_and_delivered_to_the_maildir(
    server: RunningServer, client_tls: ssl.SSLContext, maildir: Path, mode: str
) -> None:
    async with await open_session(server, mode, client_tls) as client:
        text = await send_message(client)
        assert text.startswith("Ok: queued as ")
        assert (await client.command("QUIT")).code == 221
    (stored,) = await wait_for_mail(maildir)
    assert stored.startswith(f"Return-Path: <{SENDER}>\r\n".encode())
    assert b"Subject: integration\r\n" in stored
    assert b"\r\n.leading dot\r\n" in stored, "dot-unstuffed"
    assert b"\n" not in stored.replace(b"\r\n", b""), "CRLF only"


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_mail_without_auth_is_refused_530(
    server: RunningServer, client_tls: ssl.SSLContext, mode: str
) -> None:
    async with await open_session(server, mode, client_tls, auth=False) as client:
        reply = await client.command(f"MAIL FROM:<{SENDER}>")
        assert (reply.code, reply.status) == (530, "5.7.0")


async def test_starttls_port_hides_auth_and_refuses_everything_before_tls(
    server: RunningServer,
) -> None:
    async with await RawSMTPClient.connect("127.0.0.1", server.port("starttls")) as client:
        assert (await client.reply()).code == 220
        ehlo = await client.command("EHLO client.example")
        keywords = [line.split(" ")[0].upper() for line in ehlo.lines[1:]]
        assert "STARTTLS" in keywords and "AUTH" not in keywords
        for command in (f"AUTH PLAIN {PLAIN}", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>",
                        "DATA"):
            reply = await client.command(command)
            assert (reply.code, reply.status) == (530, "5.7.0"), command


async def test_implicit_port_advertises_auth_at_once(
    server: RunningServer, client_tls: ssl.SSLContext
) -> None:
    async with await RawSMTPClient.connect("127.0.0.1", server.port("implicit"),
                                           tls=client_tls) as client:
        assert (await client.reply()).code == 220
        ehlo = await client.command("EHLO client.example")
        assert "AUTH PLAIN LOGIN" in ehlo.lines
        assert "STARTTLS" not in ehlo.lines


async def test_after_starttls_auth_is_advertised_and_starttls_is_not(
    server: RunningServer, client_tls: ssl.SSLContext
) -> None:
    async with await open_session(server, "starttls", client_tls, auth=False) as client:
        ehlo = await client.command("EHLO again.example")
        assert "AUTH PLAIN LOGIN" in ehlo.lines and "STARTTLS" not in ehlo.lines


async def test_plaintext_pipelined_behind_starttls_is_discarded(
    server: RunningServer, client_tls: ssl.SSLContext
) -> None:
    async with await RawSMTPClient.connect("127.0.0.1", server.port("starttls")) as client:
        await client.reply()
        await client.command("EHLO client.example")
        # The injected AUTH would authenticate the session inside TLS if it were executed.
        await client.send(f"STARTTLS\r\nAUTH PLAIN {PLAIN}\r\n".encode())
        assert (await client.reply()).code == 220
        await client.starttls(client_tls)
        ehlo = await client.command("EHLO client.example")
        assert ehlo.code == 250, "the first reply inside TLS answers EHLO, not the injection"
        reply = await client.command(f"MAIL FROM:<{SENDER}>")
        assert (reply.code, reply.status) == (530, "5.7.0"), "still not authenticated"


async def test_auth_login_and_wrong_password(
    server: RunningServer, client_tls: ssl.SSLContext
) -> None:
    async with await open_session(server, "implicit", client_tls, auth=False) as client:
        assert (await client.command("AUTH LOGIN")).lines == ("VXNlcm5hbWU6",)
        assert (await client.command(base64.b64encode(USER.encode()))).code == 334
        reply = await client.command(base64.b64encode(b"wrong password"))
        assert (reply.code, reply.status) == (535, "5.7.8")
        assert (await client.command("AUTH LOGIN")).code == 334
        assert (await client.command(base64.b64encode(USER.encode()))).code == 334
        reply = await client.command(base64.b64encode(PASSWORD.encode()))
        assert (reply.code, reply.status) == (235, "2.7.0")


async def test_unknown_user_and_three_failures_close_the_session(
    server: RunningServer, client_tls: ssl.SSLContext
) -> None:
    async with await open_session(server, "implicit", client_tls, auth=False) as client:
        bad = base64.b64encode(b"\0nobody\0guess").decode()
        for _ in range(2):
            assert (await client.command(f"AUTH PLAIN {bad}")).code == 535
        await client.send(f"AUTH PLAIN {bad}\r\n".encode())
        assert (await client.reply()).code == 535
        final = await client.reply()
        assert (final.code, final.status) == (421, "4.7.0")
        assert await client.at_eof()


async def test_sender_not_owned_by_the_login_is_refused(
    server: RunningServer, client_tls: ssl.SSLContext, maildir: Path
) -> None:
    async with await open_session(server, "implicit", client_tls) as client:
        reply = await client.command("MAIL FROM:<ceo@example.com>")
        assert (reply.code, reply.status) == (550, "5.7.1")
        # A wildcard domain from the users file is accepted.
        assert (await client.command("MAIL FROM:<anything@alias.example>")).code == 250
        assert (await client.command("RSET")).code == 250
        # The header From: is checked too, on the address and not the display name.
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(f'From: "{SENDER}" <ceo@example.com>\r\n\r\nhi\r\n.\r\n'.encode())
        reply = await client.reply()
        assert (reply.code, reply.status) == (550, "5.7.1")
    assert not (maildir / "new").exists() or not list((maildir / "new").iterdir())


SMUGGLED = [
    b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\r.\n", b"\n.\r", b"\r.\r\n",
    b"\r\n.\r\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
]


@pytest.mark.parametrize("terminator", SMUGGLED, ids=lambda b: repr(b)[2:-1])
async def test_smuggled_message_is_refused_and_never_delivered(
    server: RunningServer, client_tls: ssl.SSLContext, maildir: Path, terminator: bytes
) -> None:
    smuggled = (
        f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
        "Subject: smuggled\r\n\r\nsmuggled\r\n"
    ).encode()
    async with await open_session(server, "implicit", client_tls) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(b"Subject: outer\r\n\r\nouter" + terminator + smuggled + b".\r\n")
        reply = await client.reply()
        # Bare CR/LF and NUL are refused outright (after reading to the real end).
        assert reply.code in (550, 554) and reply.status in ("5.5.2", "5.6.0"), reply
        assert (await client.command("NOOP")).code == 250, "session goes on, nothing pipelined"
        # A clean message after it: once it has arrived, everything that was queued has.
        await send_message(client)
    stored = await wait_for_mail(maildir, 1)
    assert len(stored) == 1, "only the clean message"
    assert b"Subject: integration" in stored[0]
    assert b"smuggled" not in stored[0] and b"outer" not in stored[0]


async def test_http_request_is_closed_without_reply(server: RunningServer) -> None:
    async with await RawSMTPClient.connect("127.0.0.1", server.port("starttls")) as client:
        assert (await client.reply()).code == 220
        await client.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        assert await client.at_eof()


async def test_failed_tls_handshake_ends_only_that_connection(
    server: RunningServer, client_tls: ssl.SSLContext
) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(trio.BrokenResourceError):
        await RawSMTPClient.connect("127.0.0.1", server.port("implicit"), tls=old)
    cbc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cbc.check_hostname = False
    cbc.verify_mode = ssl.CERT_NONE
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA:AES128-SHA")
    with pytest.raises(trio.BrokenResourceError):
        await RawSMTPClient.connect("127.0.0.1", server.port("implicit"), tls=cbc)
    async with await open_session(server, "implicit", client_tls) as client:
        assert (await client.command("NOOP")).code == 250


async def test_tls12_with_aead_cipher_works(server: RunningServer, client_tls: ssl.SSLContext
                                            ) -> None:
    client_tls.maximum_version = ssl.TLSVersion.TLSv1_2
    async with await RawSMTPClient.connect("127.0.0.1", server.port("implicit"),
                                           tls=client_tls) as client:
        assert (await client.reply()).code == 220
        stream = client.stream
        assert isinstance(stream, trio.SSLStream)
        assert stream.version() == "TLSv1.2"
        assert "GCM" in stream.cipher()[0] or "CHACHA20" in stream.cipher()[0]


async def test_passwords_never_reach_the_log(
    server: RunningServer, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "hunter2-wrong-password"
    with caplog.at_level(logging.DEBUG):
        async with await open_session(server, "implicit", client_tls, auth=False) as client:
            token = base64.b64encode(f"\0{USER}\0{wrong}".encode()).decode()
            assert (await client.command(f"AUTH PLAIN {token}")).code == 535
            assert (await client.command("AUTH LOGIN")).code == 334
            assert (await client.command(base64.b64encode(USER.encode()))).code == 334
            assert (await client.command(base64.b64encode(PASSWORD.encode()))).code == 235
            await send_message(client)
    assert "auth_failed" in caplog.text and "auth_ok" in caplog.text
    for secret in (wrong, PASSWORD, token, base64.b64encode(PASSWORD.encode()).decode()):
        assert secret not in caplog.text


async def test_quit_ends_tls_with_close_notify(server: RunningServer, client_tls: ssl.SSLContext
                                              ) -> None:
    async with await open_session(server, "implicit", client_tls, auth=False) as client:
        assert (await client.command("QUIT")).code == 221
        # trio's SSLStream raises BrokenResourceError on a TCP close without close_notify.
        with trio.fail_after(5):
            assert await client.stream.receive_some(100) == b""
