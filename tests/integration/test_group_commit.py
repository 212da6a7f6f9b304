"""Group commit through the real server: concurrent sessions share the spool's directory fsyncs.

Each client still gets its 250 only once its message is durable, every message is delivered
once; when the shared fsync fails, every client whose message it concerned gets 451 and none
of those messages is delivered, and the server goes on accepting mail.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.integration.test_submission import open_session
from tests.support import RECIPIENT, SENDER, wait_for_mail
from tests.unit.test_group_commit import WAIT, Disk

SESSIONS = 8


def body(i: int) -> bytes:
    return f"From: <{SENDER}>\r\nSubject: batch {i}\r\n\r\nmessage {i}\r\n".encode()


async def expect(client: RawSMTPClient, command: str, code: int) -> None:
    reply = await client.command(command)
    assert reply is not None and reply.code == code, reply


async def transaction(client: RawSMTPClient, i: int) -> tuple[int, str]:
    """One message; the reply to its data (code, text)."""
    await expect(client, f"MAIL FROM:<{SENDER}>", 250)
    await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
    await expect(client, "DATA", 354)
    await client.send(body(i) + b".\r\n")
    reply = await client.reply()
    assert reply is not None
    return reply.code, reply.text


async def all_at_once(srv: RunningServer, tls: ssl.SSLContext) -> list[tuple[int, str]]:
    """Open SESSIONS authenticated sessions, then send one message on each at the same time."""
    clients = [await open_session(srv, "implicit", tls) for _ in range(SESSIONS)]
    replies: list[tuple[int, str]] = [(0, "")] * SESSIONS

    async def one(i: int) -> None:
        replies[i] = await transaction(clients[i], i)

    with trio.fail_after(2 * WAIT):
        async with trio.open_nursery() as nursery:
            for i in range(SESSIONS):
                nursery.start_soon(one, i)
    for client in clients:
        await client.aclose()
    return replies


async def test_concurrent_sessions_share_fsyncs_and_every_message_is_delivered_once(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk = Disk("msg", SESSIONS)
    async with running_server(make_config()) as srv:
        disk.install(monkeypatch)
        replies = await all_at_once(srv, client_tls)
        stored = await wait_for_mail(maildir, SESSIONS)
        monkeypatch.undo()
    assert [code for code, _ in replies] == [250] * SESSIONS, replies
    assert len({text for _, text in replies}) == SESSIONS  # one queue ID each
    subjects = sorted(m.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in stored)
    assert subjects == sorted(b"batch %d" % i for i in range(SESSIONS))
    assert disk.fsyncs["msg"] < SESSIONS, disk.fsyncs


async def test_a_failed_shared_fsync_is_451_for_its_whole_batch_and_nothing_is_delivered(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    disk = Disk("env", SESSIONS, fail=True)
    async with running_server(make_config()) as srv:
        disk.install(monkeypatch)
        replies = await all_at_once(srv, client_tls)
        assert [code for code, _ in replies] == [451] * SESSIONS, replies
        assert await srv.server.spool.queued_ids() == []
        spool = srv.server.spool.directory
        assert list((spool / "msg").iterdir()) == list((spool / "env").iterdir()) == []
        # The spool keeps working: the next message is queued and delivered.
        async with await open_session(srv, "implicit", client_tls) as client:
            code, _ = await transaction(client, SESSIONS)
        monkeypatch.undo()
        assert code == 250
        (stored,) = await wait_for_mail(maildir)
    assert b"Subject: batch %d\r\n" % SESSIONS in stored
