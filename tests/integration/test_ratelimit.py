"""The ratelimit plugin in a real server (passwdfile + ratelimit + maildir), both listener modes."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path

import trio

from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.security.support import MODES, begin, connect, expect, expect_reply, send_ok
from tests.support import SENDER, USER, wait_for_mail

ENABLE = ("passwdfile", "ratelimit", "maildir")
WAIT = r"try again in (59|60) minutes"


def config_with(make_config: Callable[..., Path], **table: object) -> Path:
    return make_config(enable=ENABLE, plugins={"ratelimit": table})


async def refused_at_mail(client: RawSMTPClient, what: str) -> str:
    reply = await expect(client, f"MAIL FROM:<{SENDER}>", 450, "4.7.1")
    assert re.fullmatch(rf"Rate limit of 2 {what} per hour reached for {USER}, {WAIT}",
                        reply.text), reply
    return reply.text


async def settled(srv: RunningServer, maildir: Path, delivered: int) -> None:
    """Wait until the queue is empty; exactly ``delivered`` messages reached the Maildir."""
    with trio.fail_after(10):
        while await srv.server.spool.queued_ids():
            await trio.sleep(0.02)
    assert len(list((maildir / "new").iterdir())) == delivered


@MODES
async def test_the_third_message_of_the_hour_is_refused_450_with_the_wait(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(config_with(make_config, messages_per_hour=2)) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await send_ok(client)
            await send_ok(client)
            await refused_at_mail(client, "messages")
            await expect(client, f"RCPT TO:<{SENDER}>", 503)  # no transaction was opened
        async with await connect(srv, mode, client_tls) as client:  # a new session: the same
            await refused_at_mail(client, "messages")
        await wait_for_mail(maildir, 2)
        await settled(srv, maildir, 2)


@MODES
async def test_recipients_past_the_limit_are_refused_at_rcpt(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    async with running_server(config_with(make_config, recipients_per_hour=2)) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            await expect(client, "RCPT TO:<r0@example.net>", 250)
            await expect(client, "RCPT TO:<r1@example.net>", 250)
            reply = await expect(client, "RCPT TO:<r2@example.net>", 450, "4.7.1")
            assert re.fullmatch(rf"Rate limit of 2 recipients per hour reached for {USER}, "
                                rf"try again in 60 minutes", reply.text), reply
            await expect(client, "DATA", 354)  # the accepted two still go
            await client.send(b"Subject: two of three\r\n\r\nHello.\r\n.\r\n")
            await expect_reply(client, 250, "2.0.0")
            await refused_at_mail(client, "recipients")
        (stored,) = await wait_for_mail(maildir, 1)
        await settled(srv, maildir, 1)
    assert b"two of three" in stored


async def test_counts_survive_a_reload_and_a_restart_on_the_same_spool(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    config = config_with(make_config, messages_per_hour=2)
    async with running_server(config) as srv:
        async with await connect(srv, "implicit", client_tls) as client:
            await send_ok(client)
        assert await srv.server.reload()
        async with await connect(srv, "starttls", client_tls) as client:
            await send_ok(client)
            await refused_at_mail(client, "messages")
    assert (config.parent / "spool" / "ratelimit.sqlite3").is_file()
    async with running_server(config) as srv:  # a restart
        async with await connect(srv, "implicit", client_tls) as client:
            await refused_at_mail(client, "messages")
        await settled(srv, maildir, 2)


@MODES
async def test_refused_and_abandoned_transactions_use_no_budget(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path, mode: str,
) -> None:
    config = make_config(enable=ENABLE, plugins={"ratelimit": {"messages_per_hour": 2}},
                         limits={"max_message_size": 10_000})
    async with running_server(config) as srv:
        async with await connect(srv, mode, client_tls) as client:
            await begin(client)
            await client.send(b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 200 + b".\r\n")
            await expect_reply(client, 552, "5.3.4")  # too large: refused, not committed
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            await expect(client, "RCPT TO:<someone@example.net>", 250)
            await expect(client, "RSET", 250)         # abandoned
        async with await connect(srv, mode, client_tls) as client:
            await begin(client)                      # the connection drops mid-transaction
        async with await connect(srv, mode, client_tls) as client:
            await send_ok(client)
            await send_ok(client)
            await refused_at_mail(client, "messages")
        await settled(srv, maildir, 2)


async def test_a_login_override_replaces_the_default(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    config = config_with(make_config, messages_per_hour=50)
    with config.open("a") as f:
        f.write(f'[plugins.ratelimit.logins]\n"{USER}" = {{ messages_per_hour = 1 }}\n')
    async with running_server(config) as srv:
        async with await connect(srv, "implicit", client_tls) as client:
            await send_ok(client)
            reply = await expect(client, f"MAIL FROM:<{SENDER}>", 450, "4.7.1")
            assert reply.text.startswith(f"Rate limit of 1 message per hour reached for {USER}")
        await settled(srv, maildir, 1)
