"""SIGTERM racing a commit: a queued message always gets its 250; a refused one is not queued.

RFC 5321 §6.1: once the server has said 250 to the end of data it has taken on the
responsibility for the message; the converse holds too: a client told 421 sends the message
again, so a message it was not told 250 for must not be delivered as well.
"""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

import submitd.durable
from submitd import hookimpl
from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.integration.test_submission import open_session
from tests.support import RECIPIENT, SENDER

BODY = f"From: <{SENDER}>\r\nSubject: racing the shutdown\r\n\r\nhello\r\n".encode()


class SlowDisk:
    """A stand-in for ``fsync_dir``: the fsync of ``env/`` right after the spool's commit point
    (the sidecar is in place, the message is queued) waits until the test lets it go."""

    def __init__(self, real: Callable[[Path], None]) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, path: Path) -> None:
        if path.name == "env" and not self.release.is_set():
            self.entered.set()
            self.release.wait(timeout=20)
        self.real(path)


class HeldFilter:
    """A content filter that holds every message until the session is cancelled."""

    def __init__(self) -> None:
        self.entered = trio.Event()

    @hookimpl
    async def submitd_data_filter(self, session: object, envelope: object, message: object
                                  ) -> None:
        self.entered.set()
        await trio.sleep_forever()


async def start_transaction(client: RawSMTPClient, then: bytes = b"") -> None:
    """MAIL, RCPT, DATA, the body with its final dot and ``then`` (pipelined); no reply read."""
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
    assert (await client.command("DATA")).code == 354
    await client.send(BODY + b".\r\n" + then)


async def shut_down_now(srv: RunningServer) -> None:
    """SIGTERM with no grace period; return once the drain has cancelled every session."""
    srv.server.request_shutdown()
    # shutdown_grace = 0: the drain cancels the sessions without waiting on a timer, so once
    # nothing in the server can run any more the cancellation has reached the session.
    await trio.testing.wait_all_tasks_blocked()


async def stored_copies(srv: RunningServer, maildir: Path) -> tuple[list[str], list[str]]:
    """(IDs still queued, file names delivered into the Maildir) after the server stopped."""
    queued = await srv.server.spool.queued_ids()
    new = maildir / "new"
    delivered = sorted(p.name for p in new.iterdir()) if new.exists() else []
    return queued, delivered


@pytest.mark.parametrize(
    ("then", "last"),
    [
        pytest.param(b"", (421, "4.3.2"), id="then-421"),
        # A client that pipelined QUIT behind the data is answered 221, not 421.
        pytest.param(b"QUIT\r\n", (221, "2.0.0"), id="quit-then-221"),
    ],
)
async def test_sigterm_during_a_slow_commit_still_sends_the_250_first(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
    monkeypatch: pytest.MonkeyPatch, then: bytes, last: tuple[int, str],
) -> None:
    disk = SlowDisk(submitd.durable.fsync_dir)
    async with running_server(make_config(limits={"shutdown_grace": "0s"})) as srv:
        client = await open_session(srv, "implicit", client_tls)
        monkeypatch.setattr(submitd.durable, "fsync_dir", disk)
        try:
            await start_transaction(client, then)
            assert await trio.to_thread.run_sync(disk.entered.wait, 10), "commit never started"
            await shut_down_now(srv)
        finally:
            disk.release.set()
        with trio.fail_after(10):
            accepted = await client.reply()
            closing = await client.reply()
            assert await client.at_eof()
        await client.aclose()
    assert accepted is not None and (accepted.code, accepted.status) == (250, "2.0.0"), accepted
    match = re.fullmatch(r"Ok: queued as (\S+)", accepted.text)
    assert match, accepted.text
    queue_id = match.group(1)
    assert closing is not None and (closing.code, closing.status) == last
    # The message the client was told about is kept exactly once: still queued, or delivered
    # by the runner before it stopped.
    queued, delivered = await stored_copies(srv, maildir)
    assert queued + delivered, "the acknowledged message was lost"
    assert set(queued) <= {queue_id}
    assert all(queue_id in name for name in delivered)
    assert len(queued) + len(delivered) == 1


async def test_sigterm_before_the_commit_starts_is_421_and_nothing_is_queued(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    held = HeldFilter()
    config = make_config(limits={"shutdown_grace": "0s"})
    async with running_server(config, extra_plugins=[("held", held)]) as srv:
        client = await open_session(srv, "implicit", client_tls)
        await start_transaction(client)
        with trio.fail_after(10):
            await held.entered.wait()
        await shut_down_now(srv)
        with trio.fail_after(10):
            reply = await client.reply()
            assert await client.at_eof()
        await client.aclose()
    assert reply is not None and (reply.code, reply.status) == (421, "4.3.2")
    assert await stored_copies(srv, maildir) == ([], [])
    assert not list((srv.server.spool.directory / "tmp").iterdir()), "no partial spool files"
