"""The mail-loop limit: more than ``[limits] max_hops`` Received: fields is 554 5.4.6.

RFC 5321 §6.3: a message that has passed through that many relays is looping. Real sockets,
both listener modes; docs/security.md §5.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd import Reply
from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.integration.test_submission import open_session
from tests.support import RECIPIENT, SENDER, delivered, wait_for_mail


def looping(hops: int, marker: str) -> bytes:
    """A message that carries ``hops`` Received: fields (folded, as relays write them)."""
    received = "".join(
        f"Received: from relay{i}.example.net (relay{i}.example.net [192.0.2.{i % 250}])\r\n"
        f"\tby relay{i + 1}.example.net with ESMTPS id {i:08d}; Mon, 2 Mar 2026 10:00:00 +0000\r\n"
        for i in range(hops)
    )
    return (f"{received}From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {marker}\r\n\r\n"
            "round and round\r\n").encode()


async def transaction(client: RawSMTPClient, message: bytes) -> Reply:
    """MAIL, RCPT, DATA with ``message``: the reply to the end of data."""
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
    assert (await client.command("DATA")).code == 354
    await client.send(message + b".\r\n")
    reply = await client.reply()
    assert reply is not None
    return reply


async def spool_empty(srv: RunningServer) -> None:
    with trio.fail_after(10):
        while await srv.server.spool.queued_ids():
            await trio.sleep(0.02)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_a_message_over_the_hop_limit_is_refused_and_nothing_is_queued(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(make_config()) as srv:
        assert srv.config.limits.max_hops == 50
        async with await open_session(srv, mode, client_tls) as client:
            reply = await transaction(client, looping(50, "fifty-hops"))
            assert (reply.code, reply.status) == (250, "2.0.0"), "50 is still allowed"
            await wait_for_mail(maildir, 1)
            await spool_empty(srv)

            reply = await transaction(client, looping(51, "fifty-one-hops"))
            assert (reply.code, reply.status) == (554, "5.4.6"), reply
            assert await srv.server.spool.queued_ids() == [], "nothing queued"
            assert not list((srv.server.spool.directory / "tmp").iterdir()), "no spool leftovers"

            # The session goes on: the next message is accepted.
            reply = await transaction(client, looping(1, "one-hop"))
            assert (reply.code, reply.status) == (250, "2.0.0")
            assert (await client.command("QUIT")).code == 221
        messages = await wait_for_mail(maildir, 2)
        await spool_empty(srv)
    assert [b"Subject: fifty-hops" in m for m in messages] == [True, False]
    assert b"Subject: one-hop" in messages[1]
    assert (found := delivered(maildir, 2)) is not None and len(found) == 2
    assert not any(b"fifty-one-hops" in m for m in found), "the looping message never arrived"
    refused = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("event=message_refused ")]
    assert len(refused) == 1 and "reply=554 hops=51" in refused[0], refused
    assert 'reason="too many Received: fields (limit 50), a mail loop"' in refused[0]


async def test_the_hop_limit_is_configurable(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    async with running_server(make_config(limits={"max_hops": 3})) as srv:
        async with await open_session(srv, "implicit", client_tls) as client:
            reply = await transaction(client, looping(4, "four-hops"))
            assert (reply.code, reply.status) == (554, "5.4.6")
            reply = await transaction(client, looping(3, "three-hops"))
            assert (reply.code, reply.status) == (250, "2.0.0")
        (message,) = await wait_for_mail(maildir, 1)
    assert b"Subject: three-hops" in message
