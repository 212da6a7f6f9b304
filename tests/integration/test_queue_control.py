"""``submitd queue`` against a running server: the command asks, the server's runner acts.

The server runs in this process with a delivery plugin that defers every recipient; the
commands run as the operator runs them, as ``submitd`` child processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
import trio

from submitd import DeliveryOutcome, Envelope, MessageHandle, Recipient, Reply, hookimpl
from submitd.mailqueue import Origin, QueueEntryMissing, QueueRecord
from submitd.server.control import QueueControl, serve_control, socket_path
from submitd.testing import RunningServer, running_server
from tests.integration.test_submission import open_session, send_message
from tests.support import RECIPIENT, SENDER

SUBMITD = Path(sys.executable).with_name("submitd")
REFUSAL = Reply.make(451, "4.4.1", "relay.example.net is not answering")


class Deferring:
    """A delivery plugin that defers every recipient, and remembers which message it saw."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    @hookimpl
    async def submitd_deliver(
        self, envelope: Envelope, message: MessageHandle, recipients: tuple[Recipient, ...]
    ) -> Mapping[str, DeliveryOutcome]:
        assert envelope.queue_id is not None
        self.attempts.append(envelope.queue_id)
        return {
            r.address: DeliveryOutcome.temporary(REFUSAL, remote="relay.example.net")
            for r in recipients
        }


@contextlib.asynccontextmanager
async def steerable_server(config: Path, plugin: Deferring) -> AsyncIterator[RunningServer]:
    """A running server holding its spool lock and answering on its control socket."""
    async with running_server(config, extra_plugins=[("deferring", plugin)]) as srv:
        spool = srv.server.spool
        locked_here = not spool.locked
        if locked_here:
            await spool.lock()
        try:
            async with trio.open_nursery() as nursery:
                path = socket_path(srv.config.queue.dir)
                control = None
                if not path.exists():  # the server does not start it itself (yet)
                    runner: QueueControl = srv.server.runner  # what the socket needs of it
                    control = await nursery.start(serve_control, runner, path)
                yield srv
                if control is not None:
                    control.cancel()
        finally:
            if locked_here:
                spool.unlock()


async def submitd_queue(config: Path, *args: str) -> tuple[int, str, str]:
    """Run ``submitd queue ARGS -c CONFIG`` as a child process: (status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "SUBMITD_CONFIG"}
    with trio.fail_after(60):
        done = await trio.run_process(
            [str(SUBMITD), "queue", args[0], "-c", str(config), *args[1:]],
            capture_stdout=True, capture_stderr=True, check=False, env=env,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def submit(srv: RunningServer, tls: ssl.SSLContext) -> str:
    client = await open_session(srv, "implicit", tls)
    async with client:
        text = await send_message(client)
    return text.rsplit(" ", 1)[-1]  # "Ok: queued as ID"


async def wait_for_attempts(srv: RunningServer, queue_id: str, count: int) -> QueueRecord:
    """Wait until ``queue_id``'s sidecar records ``count`` attempts."""
    with trio.fail_after(15):
        while True:
            record = await srv.server.spool.load_record(queue_id)
            if record.recipients[0].attempts >= count:
                return record
            await trio.sleep(0.02)


@pytest.fixture
def config(make_config: Callable[..., Path]) -> Path:
    # No retry within the test: every attempt after the first is the operator's flush.
    return make_config(enable=("passwdfile",), queue={"retry": ["1h"]})


async def test_list_and_show_describe_the_deferred_message_and_why(
    config: Path, client_tls: ssl.SSLContext
) -> None:
    plugin = Deferring()
    async with steerable_server(config, plugin) as srv:
        queue_id = await submit(srv, client_tls)
        await wait_for_attempts(srv, queue_id, 1)

        size = (await srv.server.spool.load_record(queue_id)).size
        status, out, err = await submitd_queue(config, "list")
        assert (status, err) == (0, "")
        first, *rest = out.splitlines()
        assert re.fullmatch(rf"{queue_id}  age \d+s  {size} bytes  from <{SENDER}>", first)
        assert rest[:2] == [
            f"  {RECIPIENT}  pending, 1 attempt, next attempt in 59m",
            "    last reply: 451 4.4.1 relay.example.net is not answering"
            " (from relay.example.net)",
        ]

        status, out, _ = await submitd_queue(config, "list", "--json")
        (message,) = json.loads(out)["messages"]
        assert message["id"] == queue_id
        assert message["recipients"][0]["last_reply"]["text"] == REFUSAL.text

        status, out, _ = await submitd_queue(config, "show", queue_id)
        assert status == 0
        assert "451 4.4.1 relay.example.net is not answering  (from relay.example.net)" in out
        assert "  Subject: integration" in out


async def test_hold_keeps_a_message_from_flush_and_release_lets_it_go_at_once(
    config: Path, client_tls: ssl.SSLContext
) -> None:
    plugin = Deferring()
    async with steerable_server(config, plugin) as srv:
        held = await submit(srv, client_tls)
        witness = await submit(srv, client_tls)
        await wait_for_attempts(srv, held, 1)
        await wait_for_attempts(srv, witness, 1)

        assert await submitd_queue(config, "hold", held) == (0, f"held {held}\n", "")
        assert (await srv.server.spool.load_record(held)).held
        status, out, _ = await submitd_queue(config, "flush")
        assert (status, out) == (0, "the server is attempting every queued message now\n")
        # The flush reached the runner: the other message is attempted again at once ...
        await wait_for_attempts(srv, witness, 2)
        with trio.fail_after(10):
            while srv.server.runner.in_flight:
                await trio.sleep(0.02)
        # ... and the held one was left alone.
        assert plugin.attempts.count(held) == 1
        assert (await srv.server.spool.load_record(held)).recipients[0].attempts == 1

        assert await submitd_queue(config, "release", held) == (0, f"released {held}\n", "")
        assert await submitd_queue(config, "flush", held) == (
            0, f"the server is attempting {held} now\n", ""
        )
        record = await wait_for_attempts(srv, held, 2)
        assert not record.held
        assert plugin.attempts.count(held) == 2


async def test_delete_with_bounce_tells_the_sender_and_plain_delete_does_not(
    config: Path, client_tls: ssl.SSLContext
) -> None:
    plugin = Deferring()
    async with steerable_server(config, plugin) as srv:
        spool = srv.server.spool
        bounced = await submit(srv, client_tls)
        dropped = await submit(srv, client_tls)
        await wait_for_attempts(srv, bounced, 1)
        await wait_for_attempts(srv, dropped, 1)

        status, out, err = await submitd_queue(config, "delete", bounced, "--bounce")
        assert (status, err) == (0, "")
        assert out == f"deleted {bounced}; a bounce to the sender is queued\n"
        with pytest.raises(QueueEntryMissing):
            await spool.load_record(bounced)
        (bounce_id,) = [i for i in await spool.queued_ids() if i not in (bounced, dropped)]
        bounce = await spool.load(bounce_id)
        assert bounce.record.origin is Origin.BOUNCE
        assert bounce.record.sender == ""
        assert [r.address for r in bounce.recipients] == [SENDER]
        report = bounce.message.path.read_bytes()
        assert b"multipart/report" in report
        assert f"Final-Recipient: rfc822; {RECIPIENT}".encode() in report

        assert await submitd_queue(config, "delete", dropped) == (
            0, f"deleted {dropped} (the sender was not told)\n", ""
        )
        assert await spool.queued_ids() == [bounce_id]  # no second bounce
        assert await submitd_queue(config, "delete", dropped) == (
            1, "", f"submitd: no queued message {dropped}\n"
        )
        status, out, _ = await submitd_queue(config, "list", "--json")
        assert [m["id"] for m in json.loads(out)["messages"]] == [bounce_id]


async def test_the_control_socket_is_owner_only_and_without_a_server_the_cli_acts_itself(
    config: Path, client_tls: ssl.SSLContext
) -> None:
    async with steerable_server(config, Deferring()) as srv:
        queue_id = await submit(srv, client_tls)
        await wait_for_attempts(srv, queue_id, 1)
        path = socket_path(srv.config.queue.dir)
        assert path.stat().st_mode & 0o777 == 0o600
    assert not path.exists()
    assert await submitd_queue(config, "hold", queue_id) == (0, f"held {queue_id}\n", "")
    assert (await srv.server.spool.load_record(queue_id)).held
