"""What an administrator reads in the log: every refusal once, with the client and the reason.

Real sockets, an in-process server, the log captured with caplog. Lines are matched the way an
operator's grep (or fail2ban) would match them.
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from submitd import Reply, hookimpl
from submitd.config import load_config
from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.integration.test_submission import open_session
from tests.support import PASSWORD, RECIPIENT, SENDER, USER

PEER = "127.0.0.1"
WRONG = "Tr0ub4dor&3-wrong"
BODY_MARKER = "the-quarterly-numbers-are-secret"


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    """The captured records of one event."""
    return [r for r in caplog.records if r.getMessage().startswith(f"event={event} ")]


def one(caplog: pytest.LogCaptureFixture, event: str, level: int = logging.INFO) -> str:
    """The one line of ``event``, checked to be at ``level``; its text."""
    found = lines(caplog, event)
    assert len(found) == 1, [r.getMessage() for r in caplog.records]
    assert found[0].levelno == level
    return found[0].getMessage()


def refusals_with(caplog: pytest.LogCaptureFixture, code: int) -> list[str]:
    """Every line that reports a reply ``code`` (to check a refusal is logged only once)."""
    return [r.getMessage() for r in caplog.records if f" reply={code}" in r.getMessage()]


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
async def server(make_config: Callable[..., Path]):  # type: ignore[no-untyped-def]
    async with running_server(make_config()) as srv:
        yield srv


async def test_mail_before_starttls_is_530_logged_once_with_the_reason(
    server: RunningServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with await RawSMTPClient.connect(PEER, server.port("starttls")) as client:
        assert (await client.reply()).code == 220
        assert (await client.command("EHLO client.example")).code == 250
        reply = await client.command(f"MAIL FROM:<{SENDER}>")
        assert (reply.code, reply.status) == (530, "5.7.0")
        await client.command("QUIT")
    line = one(caplog, "command_refused")
    assert re.fullmatch(
        rf'event=command_refused session=\w+ peer={PEER} command=MAIL reply=530 '
        r'reason="the client sent MAIL before STARTTLS \(TLS is required first\)"', line
    ), line
    assert len(refusals_with(caplog, 530)) == 1


async def test_mail_without_login_is_530_logged_with_the_reason(
    server: RunningServer, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with await open_session(server, "implicit", client_tls, auth=False) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 530
    line = one(caplog, "command_refused")
    assert f"peer={PEER} command=MAIL reply=530" in line
    assert 'reason="the client sent MAIL without logging in (AUTH is required)"' in line


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_failed_login_is_one_warning_line_with_address_login_and_mechanism(
    server: RunningServer, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
    mechanism: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with await open_session(server, "implicit", client_tls, auth=False) as client:
        if mechanism == "PLAIN":
            reply = await client.command(f"AUTH PLAIN {plain(USER, WRONG)}")
        else:
            assert (await client.command("AUTH LOGIN")).code == 334
            assert (await client.command(b64(USER))).code == 334
            reply = await client.command(b64(WRONG))
        assert (reply.code, reply.status) == (535, "5.7.8")
    # The exact shape the fail2ban filter in deploy/fail2ban/ relies on.
    line = one(caplog, "auth_failed", logging.WARNING)
    assert re.fullmatch(
        rf"event=auth_failed session=\w+ peer={re.escape(PEER)} user={USER} "
        rf"mechanism={mechanism} reply=535", line
    ), line
    assert len(refusals_with(caplog, 535)) == 1


async def test_throttled_login_names_the_address_and_the_wait(
    server: RunningServer, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(server.server.throttle.free + 1):  # failures from earlier sessions
        server.server.throttle.failed(PEER, USER)
    async with await open_session(server, "implicit", client_tls, auth=False) as client:
        reply = await client.command(f"AUTH PLAIN {plain(USER, PASSWORD)}")
        assert (reply.code, reply.status) == (454, "4.7.0")
    line = one(caplog, "auth_throttled", logging.WARNING)
    assert re.fullmatch(rf"event=auth_throttled session=\w+ peer={PEER} user={USER} wait=\d+",
                        line), line


async def test_too_many_failed_logins_closing_the_session_is_logged(
    server: RunningServer, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    limit = server.server.config.limits.max_auth_failures
    async with await open_session(server, "implicit", client_tls, auth=False) as client:
        for _ in range(limit - 1):
            assert (await client.command(f"AUTH PLAIN {plain(USER, WRONG)}")).code == 535
        assert (await client.command(f"AUTH PLAIN {plain(USER, WRONG)}")).code == 535
        reply = await client.reply()
        assert (reply.code, reply.status) == (421, "4.7.0")
    assert len(lines(caplog, "auth_failed")) == limit
    line = one(caplog, "command_refused")
    assert f"peer={PEER} command=AUTH reply=421" in line
    assert f'reason="too many failed logins in one session (limit {limit})"' in line


async def test_sender_not_owned_is_550_logged_once_with_address_and_reason(
    server: RunningServer, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with await open_session(server, "implicit", client_tls) as client:
        reply = await client.command("MAIL FROM:<ceo@example.com>")
        assert (reply.code, reply.status) == (550, "5.7.1")
    line = one(caplog, "mail_refused")
    assert f"peer={PEER} user={USER} sender=<ceo@example.com> plugin=relay reply=550" in line
    assert f'reason="Sender address <ceo@example.com> not owned by user {USER}"' in line
    assert len(refusals_with(caplog, 550)) == 1


class NoSuchUser:
    @hookimpl
    async def submitd_rcpt_check(self, session, envelope, recipient):  # type: ignore[no-untyped-def]
        if recipient.address.startswith("nope@"):
            return Reply.make(550, "5.1.1", "No such user here")
        return None


async def test_recipient_refusals_are_logged_once_with_the_reason(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(make_config(), extra_plugins=[("rcpt", NoSuchUser())]) as srv:
        async with await open_session(srv, "implicit", client_tls) as client:
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert (await client.command("RCPT TO:<nope@example.net>")).code == 550
            relay = await client.command("RCPT TO:<victim%elsewhere.example@example.net>")
            assert (relay.code, relay.status) == (554, "5.7.1")
    line = one(caplog, "rcpt_refused")
    assert f"peer={PEER} user={USER} rcpt=<nope@example.net> plugin=rcpt reply=550" in line
    assert 'reason="No such user here"' in line
    core = one(caplog, "command_refused")
    assert f"peer={PEER} command=RCPT reply=554" in core
    assert 'reason="Relay access denied: ' in core
    assert len(refusals_with(caplog, 550)) == len(refusals_with(caplog, 554)) == 1


@pytest.mark.parametrize(("limits", "reason"), [
    ({"max_connections_per_ip": 1}, "too many connections from this address (limit 1)"),
    ({"max_connections": 1}, "server full (limit 1)"),
])
async def test_connection_over_a_cap_is_421_logged_with_the_cap(
    make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture,
    limits: dict[str, object], reason: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(make_config(limits=limits)) as srv:
        first = await RawSMTPClient.connect(PEER, srv.port("starttls"))
        assert (await first.reply()).code == 220
        second = await RawSMTPClient.connect(PEER, srv.port("starttls"))
        reply = await second.reply()
        assert (reply.code, reply.status) == (421, "4.7.0")
        await second.aclose()
        await first.aclose()
    line = one(caplog, "connection_refused")
    assert re.fullmatch(rf'event=connection_refused session=\w+ peer={PEER} reply=421 '
                        rf'reason="{re.escape(reason)}"', line), line


async def test_idle_timeout_is_logged_with_the_limit(
    make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(make_config(limits={"command_timeout": "1s"})) as srv:
        async with await RawSMTPClient.connect(PEER, srv.port("starttls")) as client:
            assert (await client.reply()).code == 220
            with trio.fail_after(5):
                assert (await client.reply()).code == 421
    line = one(caplog, "timeout")
    assert f"peer={PEER} phase=command reply=421" in line
    assert 'reason="the client sent nothing for 1s (limits.command_timeout)"' in line


async def test_plain_smtp_on_the_implicit_tls_port_is_explained(
    server: RunningServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    stream = await trio.open_tcp_stream(PEER, server.port("implicit"))
    await stream.send_all(b"EHLO client.example\r\n")
    with trio.fail_after(5):
        while await stream.receive_some(4096):  # the server gives up and closes
            pass
    await stream.aclose()
    with trio.fail_after(5):
        while not lines(caplog, "tls_failed"):
            await trio.sleep(0.01)
    line = one(caplog, "tls_failed")
    assert f"peer={PEER} " in line
    assert ('reason="the client spoke plain SMTP on the implicit-TLS port (use STARTTLS on the '
            'submission port, or TLS from the first byte here)"') in line


async def test_a_client_waiting_for_a_greeting_on_the_implicit_tls_port_is_explained(
    make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = load_config(make_config())
    assert config.tls is not None
    config = replace(config, tls=replace(config.tls, handshake_timeout=0.5))
    async with running_server(config) as srv:
        stream = await trio.open_tcp_stream(PEER, srv.port("implicit"))
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # like STARTTLS clients, says nothing
        await stream.aclose()
    line = one(caplog, "tls_failed")
    assert f"peer={PEER} reason=" in line
    assert "the client sent nothing for 0.5s (tls.handshake_timeout)" in line
    assert "waits for a greeting on the implicit-TLS port" in line


async def test_no_password_and_no_message_content_in_any_line_at_debug(
    server: RunningServer, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with await open_session(server, "implicit", client_tls, auth=False) as client:
        assert (await client.command(f"AUTH PLAIN {plain(USER, WRONG)}")).code == 535
        assert (await client.command("AUTH LOGIN")).code == 334
        assert (await client.command(b64(USER))).code == 334
        assert (await client.command(b64(WRONG))).code == 535
        assert (await client.command(f"AUTH PLAIN {plain(USER, PASSWORD)}")).code == 235
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(f"Subject: {BODY_MARKER}\r\n\r\n{BODY_MARKER}\r\n.\r\n".encode())
        assert (await client.reply()).code == 250
        assert (await client.command("QUIT")).code == 221
    with trio.fail_after(10):
        while not lines(caplog, "delivered"):  # delivery logs too
            await trio.sleep(0.01)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "event=auth_ok" in text and "event=accepted" in text
    for secret in (PASSWORD, WRONG, plain(USER, WRONG), plain(USER, PASSWORD), b64(WRONG),
                   BODY_MARKER):
        assert secret not in text


async def test_a_tls_client_on_the_starttls_port_is_explained(
    server: RunningServer, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    tcp = await trio.open_tcp_stream(PEER, server.port("starttls"))
    stream = trio.SSLStream(tcp, client_tls, server_hostname="localhost")
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()  # the 220 greeting is no ServerHello; then we close
    await trio.aclose_forcefully(stream)
    with trio.fail_after(5):
        while not lines(caplog, "tls_mismatch"):
            await trio.sleep(0.01)
    line = one(caplog, "tls_mismatch")
    assert line.endswith(f'peer={PEER} reason="the client started TLS at once on the STARTTLS '
                         'port (use the implicit-TLS port, or STARTTLS here)"')
