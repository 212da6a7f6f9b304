"""``submitd queue``: what an operator sees and changes, with and without a running server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from submitd import DsnReturn, Envelope, MailParams, Recipient, cli
from submitd.mailqueue import (
    Attempt,
    Origin,
    QueueEntryMissing,
    QueueRecord,
    RecipientState,
    Spool,
)
from submitd.protocol._replies import Reply
from submitd.server.control import (
    MAX_LINE,
    ControlError,
    ControlRequest,
    send_request,
    serve_control,
    socket_path,
)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: quarterly \x1b[2Jfigures\r\n"
    b"\r\n"
    b"The body is never shown.\r\n"
)
SESSION = {"session_id": "S1", "peer": "192.0.2.7:40000", "tls": "TLSv1.3"}
DEFERRED = Reply.make(451, "4.4.1", "connection refused by smtp.example.net")
AGE = 2 * 3600 + 5 * 60 + 30  # shown as 2h05m


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configuration whose spool is ``tmp_path/spool``, also found through $SUBMITD_CONFIG."""
    path = tmp_path / "submitd.toml"
    path.write_text(
        'hostname = "mx.example.org"\n[queue]\ndir = "spool"\n[limits]\nmax_header_size = 1024\n'
    )
    monkeypatch.delenv("SUBMITD_CONFIG", raising=False)
    return path


def spool_of(config: Path) -> Spool:
    return Spool(config.parent / "spool")


async def enqueue(
    spool: Spool,
    *recipients: str,
    sender: str = "alice@example.org",
    data: bytes = MESSAGE,
    created: float | None = None,
    params: MailParams | None = None,
    rcpt_params: tuple[tuple[str, str | None], ...] = (),
) -> str:
    envelope = Envelope(
        sender=sender,
        recipients=tuple(
            Recipient(address=a, params=rcpt_params) for a in recipients or ("bob@example.net",)
        ),
        params=MailParams(size=len(data)) if params is None else params,
        username="alice",
        received_at=time.time() - AGE if created is None else created,
    )
    return await spool.enqueue(envelope, data, SESSION, origin=Origin.SMTP)


async def change(spool: Spool, queue_id: str, edit: Callable[[QueueRecord], QueueRecord]) -> None:
    await spool.save(edit(await spool.load_record(queue_id)))


def deferred(record: QueueRecord, *, retry_in: float = 840.0) -> QueueRecord:
    """The first recipient deferred twice by smtp.example.net; the others untouched."""
    now = time.time()
    first, *rest = record.recipients
    history = (
        Attempt(at=now - 600, reply=Reply.make(421, "4.4.2", "timed out"), remote=None),
        Attempt(at=now - 60, reply=DEFERRED, remote="smtp.example.net"),
    )
    first = replace(first, attempts=2, last_reply=DEFERRED, history=history,
                    next_attempt=now + retry_in)
    return replace(record, recipients=(first, *rest), next_attempt=now + retry_in)


def build(config: Path, *steps: Callable[[Spool], Any]) -> list[Any]:
    """Run async spool ``steps`` (each ``step(spool)``) outside any trio run; their results."""

    async def main() -> list[Any]:
        spool = spool_of(config)
        return [await step(spool) for step in steps]

    return trio.run(main)


def record_of(config: Path, queue_id: str) -> QueueRecord:
    result: QueueRecord = build(config, lambda s: s.load_record(queue_id))[0]
    return result


def queue(config: Path, *args: str) -> int:
    return cli.main(["queue", *args[:1], "-c", str(config), *args[1:]])


# --- queue list -----------------------------------------------------------------------------


def test_list_shows_each_message_its_recipients_and_why_they_wait(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = build(
        config,
        partial(enqueue, sender="alice@example.org"),
        lambda s: enqueue(s, "carol@example.com", "dave@example.com", sender=""),
    )
    build(
        config,
        lambda s: change(s, first, deferred),
        lambda s: change(s, second, lambda r: replace(r, held=True, recipients=(
            replace(r.recipients[0], state=RecipientState.DELIVERED, attempts=1),
            r.recipients[1]))),
    )
    assert queue(config, "list") == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"{first}  age 2h05m  {len(MESSAGE)} bytes  from <alice@example.org>",
        "  bob@example.net  pending, 2 attempts, next attempt in 13m",
        "    last reply: 451 4.4.1 connection refused by smtp.example.net"
        " (from smtp.example.net)",
        "",
        f"{second}  age 2h05m  {len(MESSAGE)} bytes  from <>  HELD",
        "  carol@example.com  delivered after 1 attempt",
        "  dave@example.com  pending, 0 attempts, held",
        "",
        "2 messages, 2 recipients pending, 1 held",
    ]


def test_list_json_is_a_stable_machine_format(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    created = time.time() - AGE
    (queue_id,) = build(config, partial(enqueue, created=created))
    build(config, lambda s: change(s, queue_id, deferred))
    assert queue(config, "list", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    record = record_of(config, queue_id)
    assert doc == {
        "version": 1,
        "messages": [
            {
                "id": queue_id,
                "created": created,
                "age": pytest.approx(AGE, abs=5),
                "size": len(MESSAGE),
                "sender": "alice@example.org",
                "username": "alice",
                "origin": "smtp",
                "held": False,
                "ret": None,
                "envid": None,
                "next_attempt": record.next_attempt,
                "recipients": [
                    {
                        "address": "bob@example.net",
                        "state": "pending",
                        "attempts": 2,
                        "next_attempt": record.next_attempt,
                        "last_reply": {"code": 451, "status": "4.4.1",
                                       "text": "connection refused by smtp.example.net"},
                        "remote": "smtp.example.net",
                    }
                ],
            }
        ],
    }


def test_list_of_a_spool_that_was_never_created_is_empty(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert queue(config, "list") == 0
    assert capsys.readouterr().out == "the queue is empty\n"
    assert queue(config, "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"version": 1, "messages": []}
    assert not (config.parent / "spool").exists()  # reading never creates the spool


def test_list_finds_the_config_through_the_environment(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (queue_id,) = build(config, enqueue)
    monkeypatch.setenv("SUBMITD_CONFIG", str(config))
    assert cli.main(["queue", "list"]) == 0
    assert queue_id in capsys.readouterr().out


def test_a_missing_config_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["queue", "list", "-c", str(tmp_path / "nope.toml")]) == 2
    assert "no configuration file at" in capsys.readouterr().err


# --- queue show -----------------------------------------------------------------------------


def test_show_prints_envelope_header_section_and_history_but_never_the_body(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (queue_id,) = build(config, lambda s: enqueue(s, "bob@example.net", "carol@example.com"))
    build(config, lambda s: change(s, queue_id, deferred))
    assert queue(config, "show", queue_id.lower()) == 0  # IDs may be typed in lower case
    out = capsys.readouterr().out
    assert f"Queue ID:     {queue_id}\n" in out
    assert "Sender:       <alice@example.org>\n" in out
    assert "Login:        alice\n" in out
    assert "Session:      session_id=S1 peer=192.0.2.7:40000 tls=TLSv1.3\n" in out
    assert "Held:         no\n" in out
    recipients = out[out.index("Recipients:"):out.index("Header section:")].splitlines()
    assert recipients[1] == "  bob@example.net  pending, 2 attempts, next attempt in 13m"
    assert recipients[2].endswith("  421 4.4.2 timed out")
    assert recipients[3].endswith(
        "  451 4.4.1 connection refused by smtp.example.net  (from smtp.example.net)"
    )
    assert recipients[4] == "  carol@example.com  pending, 0 attempts, next attempt due now"
    headers = out[out.index("Header section:"):].splitlines()[1:]
    assert headers == [
        "  From: Alice <alice@example.org>",
        "  To: bob@example.net",
        "  Subject: quarterly \\x1b[2Jfigures",  # no terminal escapes reach the operator
    ]
    assert "never shown" not in out


def test_show_and_list_json_give_the_dsn_parameters(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = MailParams(size=len(MESSAGE), ret=DsnReturn.HDRS, envid="batch 7+1")
    notify = (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;bob+2B1@example.net"))
    (queue_id,) = build(config, partial(enqueue, params=dsn, rcpt_params=notify))
    assert queue(config, "show", queue_id) == 0
    out = capsys.readouterr().out
    # RFC 3461 §4.4: the identifier is shown as it travels, in xtext.
    assert f"Parameters:   BODY=7BIT SIZE={len(MESSAGE)} RET=HDRS ENVID=batch+207+2B1\n" in out
    assert "    parameters: NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2B1@example.net\n" in out
    assert queue(config, "list", "--json") == 0
    (message,) = json.loads(capsys.readouterr().out)["messages"]
    assert (message["ret"], message["envid"]) == ("HDRS", "batch 7+1")
    # A message without them shows neither.
    (plain,) = build(config, enqueue)
    assert queue(config, "show", plain) == 0
    out = capsys.readouterr().out
    assert "RET=" not in out and "ENVID=" not in out and "parameters:" not in out


def test_show_reads_at_most_max_header_size_of_the_message(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    huge = b"".join(b"X-Filler-%04d: %s\r\n" % (i, b"y" * 60) for i in range(200))
    (queue_id,) = build(config, partial(enqueue, data=huge + b"\r\nbody\r\n"))
    assert queue(config, "show", queue_id) == 0
    out = capsys.readouterr().out
    assert "X-Filler-0000" in out
    assert "X-Filler-0199" not in out
    assert "[... no end of the header section within 1024 bytes]" in out


@pytest.mark.parametrize(
    "args",
    [("show",), ("hold",), ("release",), ("delete",), ("delete", "--bounce"), ("flush",)],
)
def test_an_unknown_id_fails_with_a_clear_message(
    config: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    build(config, enqueue)  # the spool exists; the ID is just not in it
    assert queue(config, *args, "0123456789ABCDEF") == 1
    assert capsys.readouterr().err == "submitd: no queued message 0123456789ABCDEF\n"
    assert queue(config, args[0], "../../etc/passwd") == 1
    assert capsys.readouterr().err == "submitd: no queued message ../../etc/passwd\n"


# --- changing the queue with no server running ----------------------------------------------


def test_hold_and_release_without_a_server_rewrite_the_sidecar(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (queue_id,) = build(config, enqueue)
    assert queue(config, "hold", queue_id) == 0
    assert capsys.readouterr().out == f"held {queue_id}\n"
    assert record_of(config, queue_id).held
    assert queue(config, "hold", queue_id) == 0
    assert capsys.readouterr().out == f"{queue_id} is already held\n"
    assert queue(config, "release", queue_id) == 0
    assert capsys.readouterr().out == f"released {queue_id}\n"
    assert not record_of(config, queue_id).held
    assert not (config.parent / "spool" / "control.sock").exists()


def test_delete_without_a_server_removes_the_message_silently(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep, gone = build(config, enqueue, enqueue)
    assert queue(config, "delete", gone) == 0
    assert capsys.readouterr().out == f"deleted {gone} (the sender was not told)\n"
    assert build(config, lambda s: s.queued_ids()) == [[keep]]
    assert sorted(os.listdir(config.parent / "spool" / "msg")) == [keep]


def test_flush_without_a_server_makes_messages_due_for_its_start(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    waiting, held = build(config, enqueue, enqueue)
    build(
        config,
        lambda s: change(s, waiting, partial(deferred, retry_in=7200)),
        lambda s: change(s, held, lambda r: replace(deferred(r, retry_in=7200), held=True)),
    )
    before = time.time()
    assert queue(config, "flush") == 0
    assert capsys.readouterr().out == (
        f"1 message due now ({held} held: release it first); no server is running: they are"
        " attempted when it starts\n"
    )
    record = record_of(config, waiting)
    assert before <= record.next_attempt <= time.time()
    assert record.recipients[0].next_attempt == record.next_attempt
    assert record.recipients[0].attempts == 2  # the history stays
    assert record_of(config, held).next_attempt > time.time() + 3600


def test_flush_of_one_message_without_a_server(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (queue_id,) = build(config, enqueue)
    build(config, lambda s: change(s, queue_id, deferred))
    assert queue(config, "flush", queue_id) == 0
    assert capsys.readouterr().out.startswith("1 message due now;")
    assert record_of(config, queue_id).next_attempt <= time.time()


def test_flush_of_a_held_message_says_to_release_it_first(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (queue_id,) = build(config, enqueue)
    assert queue(config, "hold", queue_id) == 0
    assert queue(config, "flush", queue_id) == 1
    assert capsys.readouterr().err == f"submitd: {queue_id} is held: release it first\n"


def test_delete_with_bounce_without_a_server_queues_one_bounce_for_the_pending_recipients(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (queue_id,) = build(config, lambda s: enqueue(s, "bob@example.net", "carol@example.com"))
    build(config, lambda s: change(s, queue_id, lambda r: replace(r, recipients=(
        replace(r.recipients[0], state=RecipientState.DELIVERED), r.recipients[1]))))
    assert queue(config, "delete", queue_id, "--bounce") == 0
    ((bounce_id,),) = build(config, lambda s: s.queued_ids())
    assert capsys.readouterr().out == (
        f"deleted {queue_id}; the bounce to <alice@example.org> is {bounce_id}\n"
    )
    (bounce,) = build(config, lambda s: s.load(bounce_id))
    assert (bounce.record.sender, bounce.record.origin) == ("", Origin.BOUNCE)
    assert [r.address for r in bounce.recipients] == ["alice@example.org"]
    report = bounce.message.path.read_bytes()
    assert b"Final-Recipient: rfc822; carol@example.com" in report
    assert b"bob@example.net" not in report.split(b"text/rfc822-headers")[0]  # was delivered
    assert b"550 5.0.0 Deleted from the queue by the postmaster" in report


def test_delete_with_bounce_of_a_bounce_tells_nobody(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (queue_id,) = build(config, partial(enqueue, sender=""))
    assert queue(config, "delete", queue_id, "--bounce") == 0
    assert "no bounce" in capsys.readouterr().out
    assert build(config, lambda s: s.queued_ids()) == [[]]


def test_the_cli_takes_the_spool_lock_while_it_changes_the_spool(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (queue_id,) = build(config, enqueue)
    assert queue(config, "hold", queue_id) == 0
    # Released afterwards: a server can start (and a second command can run) right away.
    build(config, lambda s: s.lock())
    assert (config.parent / "spool" / "lock").exists()


# --- changing the queue while a server runs: the control socket -----------------------------


class FakeRunner:
    """Records what the control socket asked; unknown IDs raise as the runner does."""

    def __init__(self, known: set[str], *, held: frozenset[str] = frozenset()) -> None:
        self.known = known
        self.held = held
        self.in_flight: frozenset[str] = frozenset()
        self.calls: list[tuple[str, ...]] = []
        self.block = trio.Event()
        self.blocking = False

    def _check(self, queue_id: str) -> None:
        if queue_id not in self.known:
            raise QueueEntryMissing(f"no queued message {queue_id}")

    @contextlib.asynccontextmanager
    async def exclusive(self, queue_id: str) -> AsyncIterator[Any]:
        self._check(queue_id)
        self.calls.append(("exclusive", queue_id))
        yield types.SimpleNamespace(queue_id=queue_id, held=queue_id in self.held)

    def notify(self, queue_id: str) -> None:
        self.calls.append(("notify", queue_id))

    def flush_all(self) -> None:
        self.calls.append(("flush_all",))

    async def hold(self, queue_id: str) -> None:
        if self.blocking:
            await self.block.wait()
        self._check(queue_id)
        self.calls.append(("hold", queue_id))

    async def release(self, queue_id: str) -> None:
        self._check(queue_id)
        self.calls.append(("release", queue_id))

    async def delete(self, queue_id: str, *, bounce: bool) -> None:
        if queue_id == "BAD0000000000000":
            raise RuntimeError("a bug")
        self._check(queue_id)
        self.calls.append(("delete", queue_id, str(bounce)))


async def test_with_the_lock_held_the_cli_asks_the_server_over_the_socket(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server_spool = spool_of(config)
    queue_id = await enqueue(server_spool)
    await server_spool.lock()  # as `submitd serve` does
    runner = FakeRunner({queue_id})
    path = socket_path(server_spool.directory)
    before = (server_spool.directory / "env" / f"{queue_id}.json").read_bytes()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, runner, path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

            async def run(*args: str) -> int:
                return await trio.to_thread.run_sync(partial(queue, config, *args))

            assert await run("hold", queue_id) == 0
            assert await run("release", queue_id) == 0
            assert await run("flush", queue_id) == 0
            assert await run("flush") == 0
            assert await run("delete", queue_id, "--bounce") == 0
            assert await run("delete", queue_id) == 0
            assert await run("hold", "0123456789ABCDEF") == 1
            assert await run("flush", "0123456789ABCDEF") == 1
            runner.held = frozenset({queue_id})
            assert await run("flush", queue_id) == 1
            nursery.cancel_scope.cancel()
    finally:
        server_spool.unlock()
    assert runner.calls == [
        ("hold", queue_id), ("release", queue_id), ("exclusive", queue_id), ("notify", queue_id),
        ("flush_all",), ("delete", queue_id, "True"), ("delete", queue_id, "False"),
        ("exclusive", queue_id),
    ]
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"held {queue_id}",
        f"released {queue_id}",
        f"the server is attempting {queue_id} now",
        "the server is attempting every queued message now",
        f"deleted {queue_id}; a bounce to the sender is queued",
        f"deleted {queue_id} (the sender was not told)",
    ]
    assert err.splitlines() == [
        "submitd: no queued message 0123456789ABCDEF",
        "submitd: no queued message 0123456789ABCDEF",
        f"submitd: {queue_id} is held: release it first",
    ]
    # The CLI itself changed nothing on disk, and the socket is gone with the server.
    assert (server_spool.directory / "env" / f"{queue_id}.json").read_bytes() == before
    assert not path.exists()


async def test_with_the_lock_held_and_no_socket_the_cli_says_no_server_answers(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = spool_of(config)
    queue_id = await enqueue(holder)
    await holder.lock()
    try:
        status = await trio.to_thread.run_sync(partial(queue, config, "hold", queue_id))
    finally:
        holder.unlock()
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith(f"submitd: no server answers on {holder.directory / 'control.sock'}")
    assert not (await holder.load_record(queue_id)).held


# --- the control socket protocol ------------------------------------------------------------


async def raw_exchange(path: Path, data: bytes) -> dict[str, Any]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(10):
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                assert chunk, "the server closed without an answer"
                reply += chunk
    result: dict[str, Any] = json.loads(reply)
    return result


@pytest.mark.parametrize(
    ("request_line", "error"),
    [
        (b"hold it\n", "the request is not a JSON line"),
        (b"[1, 2]\n", "the request is not a JSON object"),
        (b'{"op": "destroy", "id": "0123456789ABCDEF"}\n', "unknown op; expected one of "
         "flush, hold, release, delete"),
        (b'{"op": "hold"}\n', "hold needs a queue ID"),
        (b'{"op": "hold", "id": "../../x"}\n', "no queued message ../../x"),
        (b'{"op": "hold", "id": 12}\n', "no queued message 12"),
        (b'{"op": "delete", "id": "0123456789ABCDEF", "bounce": "yes"}\n',
         "bounce must be true or false"),
        (b'{"op": "hold", "id": "0123456789ABCDEF"}\n', "no queued message 0123456789ABCDEF"),
        (b'{"op": "delete", "id": "BAD0000000000000"}\n', "internal error: RuntimeError"),
        (b"[" * 10_000 + b"\n", "the line is longer than 4096 bytes"),
        (b'{"op": "flush"}', "the request ended without a newline"),
    ],
)
async def test_bad_requests_get_an_error_and_the_server_keeps_serving(
    tmp_path: Path, request_line: bytes, error: str
) -> None:
    runner = FakeRunner({"0000000000000001"})
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, runner, path)
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(request_line)
            await stream.send_eof()
            reply = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    reply += chunk
        assert json.loads(reply) == {"ok": False, "error": error}
        assert len(reply) <= MAX_LINE
        assert await raw_exchange(path, b'{"op": "hold", "id": "0000000000000001"}\n') == {
            "ok": True
        }
        nursery.cancel_scope.cancel()
    assert runner.calls == [("hold", "0000000000000001")]


async def test_a_silent_client_is_dropped_at_the_deadline(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, FakeRunner(set()), path)
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            with trio.fail_after(30):
                reply = await stream.receive_some(65536)
        assert json.loads(reply) == {"ok": False, "error": "no complete request line in time"}
        nursery.cancel_scope.cancel()


async def test_a_slow_runner_gets_an_answer_within_the_operation_deadline(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    runner = FakeRunner({"0000000000000001"})
    runner.blocking = True
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_control, runner, path, operation_timeout=30))
        with pytest.raises(ControlError, match="gave up after 30s waiting for the queue"):
            await send_request(path, ControlRequest(op="hold", queue_id="0000000000000001"))
        nursery.cancel_scope.cancel()


async def test_a_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a server that was killed
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, FakeRunner(set()), path)
        with pytest.raises(OSError, match="another process answers"):
            await serve_control(FakeRunner(set()), path)
        await send_request(path, ControlRequest(op="flush"))  # the first one still answers
        nursery.cancel_scope.cancel()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="is not a socket"):
        await serve_control(FakeRunner(set()), path)


async def test_a_socket_path_too_long_for_sockaddr_un_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    runner = FakeRunner(set())
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, runner, path)
        assert path.exists()
        await send_request(path, ControlRequest(op="flush"))
        nursery.cancel_scope.cancel()
    assert runner.calls == [("flush_all",)]
    assert not path.exists()


async def test_the_scope_it_reports_stops_it_and_removes_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        scope = await nursery.start(serve_control, FakeRunner(set()), path)
        await send_request(path, ControlRequest(op="flush"))
        scope.cancel()  # what the server does when it shuts down
    assert not nursery.cancel_scope.cancelled_caught
    assert not path.exists()
    with pytest.raises(ControlError, match="no server answers"):
        await send_request(path, ControlRequest(op="flush"))


async def test_send_request_to_nobody_says_so(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no server answers on"):
        await send_request(tmp_path / "control.sock", ControlRequest(op="flush"))


def test_list_names_an_unreadable_sidecar_and_shows_the_others(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = build(config, partial(enqueue, sender="alice@example.org"),
                      partial(enqueue, sender="alice@example.org"))
    (spool_of(config).layout.env_path(bad)).write_text('{"version": 2, "created": NaN}\n')
    assert queue(config, "list", "--json") == 0
    captured = capsys.readouterr()
    assert [m["id"] for m in json.loads(captured.out)["messages"]] == [good]
    assert captured.err.startswith(f"submitd: skipping {bad}: ")
