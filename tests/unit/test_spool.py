"""The spool: what gets 250 is on disk, survives kill -9, and nothing else is ever queued."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import submitd.durable
from submitd import DsnReturn, Envelope, MailParams, MessageHandle, Recipient
from submitd.errors import SpoolError
from submitd.mailqueue import (
    FORMAT_VERSION,
    MAX_HISTORY,
    QUEUE_ID_LENGTH,
    Attempt,
    IncomingMessage,
    Origin,
    QueueEntryCorrupt,
    QueueEntryMissing,
    RecipientState,
    Spool,
    SpoolLocked,
    new_queue_id,
)
from submitd.mailqueue.spool import WRITE_BUFFER_SIZE
from submitd.protocol._events import BodyType
from submitd.protocol._replies import Reply

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch\r\n"
    b"\r\n"
    b"See you at noon.\r\n"
    b".leading dot stays unstuffed\r\n"
)
SESSION = {"session_id": "S1", "peer": "192.0.2.7:40000", "tls": "TLSv1.3"}


def envelope(*recipients: str, received_at: float = 1_700_000_000.0) -> Envelope:
    return Envelope(
        sender="alice@example.org",
        recipients=tuple(Recipient(address=a) for a in recipients or ("bob@example.net",)),
        params=MailParams(size=1234, body=BodyType.EIGHT_BIT_MIME, auth="<>"),
        username="alice",
        received_at=received_at,
    )


async def receive(
    spool: Spool, data: bytes, *, chunk: int = 1000
) -> tuple[IncomingMessage, MessageHandle]:
    incoming = await spool.open_incoming()
    for i in range(0, len(data), chunk):
        await incoming.write(data[i : i + chunk])
    handle = await incoming.finish(max_header_size=65536)
    return incoming, handle


async def queue(spool: Spool, data: bytes = MESSAGE, *recipients: str) -> str:
    incoming, handle = await receive(spool, data)
    return await incoming.commit(envelope(*recipients), handle, session_info=SESSION)


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.fixture
async def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    await spool.recover()
    return spool


# --- queue IDs ------------------------------------------------------------------------------


def test_queue_ids_are_short_unique_filename_safe_and_sorted_by_time() -> None:
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == QUEUE_ID_LENGTH <= 16 for i in ids)
    assert all(re.fullmatch(r"[0-9A-Z]+", i) for i in ids)
    assert new_queue_id(now=1_000_000) < new_queue_id(now=2_000_000_000)


# --- commit and load ------------------------------------------------------------------------


async def test_committed_message_reloads_byte_for_byte_after_restart(tmp_path: Path) -> None:
    body = b"".join(b"line %06d of a long message\r\n" % i for i in range(40_000))
    data = MESSAGE + body  # over a megabyte: several buffered writes
    assert len(data) > 3 * WRITE_BUFFER_SIZE
    first = Spool(tmp_path / "spool")
    await first.recover()
    incoming, handle = await receive(first, data, chunk=65536)
    assert handle.get("Subject") == "lunch"
    queue_id = await incoming.commit(
        envelope("bob@example.net", "carol@example.com"), handle, session_info=SESSION
    )

    restarted = Spool(tmp_path / "spool")
    assert await restarted.recover() == [queue_id]
    queued = await restarted.load(queue_id)
    assert queued.message.path.read_bytes() == data
    assert queued.message.size == len(data)
    assert queued.message.get("From") == "Alice <alice@example.org>"
    assert queued.message.queue_id == queue_id
    with pytest.raises(RuntimeError):
        queued.message.add_header("X-Late", "no")  # queue hooks get a read-only handle
    assert queued.envelope == replace(
        envelope("bob@example.net", "carol@example.com"), queue_id=queue_id
    )
    assert [r.address for r in queued.recipients] == ["bob@example.net", "carol@example.com"]
    assert all(r.state is RecipientState.PENDING and r.attempts == 0 for r in queued.recipients)
    assert dict(queued.record.session) == SESSION
    assert queued.record.next_attempt == queued.record.created == 1_700_000_000.0
    assert await restarted.queued_ids() == [queue_id]


async def test_sidecar_is_versioned_json_naming_the_message(spool: Spool) -> None:
    queue_id = await queue(spool)
    sidecar = json.loads((spool.directory / "env" / f"{queue_id}.json").read_bytes())
    assert sidecar["version"] == FORMAT_VERSION == 2
    assert sidecar["id"] == queue_id
    assert sidecar["sender"] == "alice@example.org"
    assert sidecar["username"] == "alice"
    assert (sidecar["origin"], sidecar["held"], sidecar["delay_warned"]) == ("smtp", False, False)
    assert sidecar["params"] == {
        "size": 1234, "body": "8BITMIME", "smtputf8": False, "auth": "<>", "ret": None,
        "envid": None,
    }
    assert sidecar["recipients"] == [
        {
            "address": "bob@example.net",
            "params": [],
            "state": "pending",
            "attempts": 0,
            "last_reply": None,
            "next_attempt": 1_700_000_000.0,
            "history": [],
        }
    ]
    assert (spool.directory / "msg" / queue_id).read_bytes() == MESSAGE
    assert files(spool.directory / "tmp") == []


async def test_header_edits_are_applied_on_commit_and_stay_crlf(spool: Spool) -> None:
    data = (
        b"X-Secret: one\r\n"
        b"Subject: hi\r\n"
        b"x-secret: two,\r\n"
        b"\tcontinued\r\n"
        b"From: a@example.org\r\n"
        b"\r\n"
        b"X-Secret: in the body is not a header\r\n"
    )
    incoming, handle = await receive(spool, data)
    handle.add_header("Date", "Tue, 1 Oct 2024 10:00:00 +0000")
    handle.add_header("Received", "from client by mail.example.org with ESMTPSA")
    handle.remove_header("X-SECRET")
    queue_id = await incoming.commit(envelope(), handle, session_info={})

    stored = (await spool.load(queue_id)).message.path.read_bytes()
    assert stored == (
        b"Received: from client by mail.example.org with ESMTPSA\r\n"
        b"Date: Tue, 1 Oct 2024 10:00:00 +0000\r\n"
        b"Subject: hi\r\n"
        b"From: a@example.org\r\n"
        b"\r\n"
        b"X-Secret: in the body is not a header\r\n"
    )
    assert b"\n" not in stored.replace(b"\r\n", b"")
    assert files(spool.directory / "tmp") == []


async def test_prepended_header_keeps_a_message_without_headers_as_body(spool: Spool) -> None:
    incoming, handle = await receive(spool, b"just some text\r\nno headers here\r\n")
    handle.add_header("Received", "by mail.example.org")
    queue_id = await incoming.commit(envelope(), handle, session_info={})
    stored = (await spool.load(queue_id)).message.path.read_bytes()
    assert stored == b"Received: by mail.example.org\r\n\r\njust some text\r\nno headers here\r\n"


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
async def test_header_edits_on_a_large_message_keep_the_body_byte_for_byte(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    if not kernel_copy:
        def refuse(*args: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    body = b"".join(b"body line %07d\r\n" % i for i in range(200_000))  # 3.6 MB
    incoming, handle = await receive(spool, MESSAGE + body, chunk=65536)
    handle.add_header("Received", "by mail.example.org")
    queue_id = await incoming.commit(envelope(), handle, session_info={})
    monkeypatch.undo()
    queued = await spool.load(queue_id)
    assert queued.message.path.read_bytes() == (
        b"Received: by mail.example.org\r\n" + MESSAGE + body
    )
    assert queued.record.size == queued.message.size == len(MESSAGE + body) + 31


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
def test_copying_a_large_body_starts_writeback_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    # A 100 MiB message with a Received: line is copied at commit, then fsynced before the
    # 250: the copy asks the disk to start writing as it goes, so the fsync has little left.
    if not kernel_copy:
        def refuse(*args: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    hints: list[tuple[int, int]] = []
    monkeypatch.setattr(submitd.durable, "start_writeback",
                        lambda fd, offset, nbytes: hints.append((offset, nbytes)))
    interval = submitd.durable.WRITEBACK_INTERVAL
    data = os.urandom(1 << 16) * (interval * 5 // 2 // (1 << 16))  # 2.5 intervals
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"head" + data)
    with src.open("rb") as s, dst.open("wb") as d:
        d.write(b"Received: x\r\n")
        d.flush()
        submitd.durable.copy_to_end(s.fileno(), 4, d.fileno())
    assert dst.read_bytes() == b"Received: x\r\n" + data
    # Two hints, each of at least one interval, covering the copy from where it started.
    assert len(hints) == 2
    assert hints[0][0] == len(b"Received: x\r\n")
    assert hints[1][0] == hints[0][0] + hints[0][1]
    assert all(nbytes >= interval for _, nbytes in hints)


async def test_header_edit_smuggling_a_line_break_queues_nothing(spool: Spool) -> None:
    incoming, handle = await receive(spool, MESSAGE)
    # Bypassing add_header's check by editing the list directly is caught at commit.
    handle.edits.prepend.append(("X-Note", "fine\r\nBcc: victim@example.net"))
    with pytest.raises(SpoolError):
        await incoming.commit(envelope(), handle, session_info={})
    assert await spool.queued_ids() == []
    assert files(spool.directory / "tmp") == files(spool.directory / "msg") == []


async def test_header_parsing_is_bounded_and_never_keeps_a_cut_line(spool: Spool) -> None:
    data = b"Subject: first\r\nX-Long: " + b"a" * 5000 + b"\r\n\r\nbody\r\n"
    incoming = await spool.open_incoming()
    await incoming.write(data)
    handle = await incoming.finish(max_header_size=1024)
    assert handle.headers == (("Subject", "first"),)
    await incoming.abort()


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("failing_call", [1, 2, 3, 4], ids=["msg", "env", "msg-dir", "env-dir"])
async def test_failed_fsync_queues_nothing_and_removes_temp_files(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    incoming, handle = await receive(spool, MESSAGE)
    real_fsync = os.fsync
    calls: list[int] = []

    def flaky_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky_fsync)
    with pytest.raises(SpoolError):
        await incoming.commit(envelope(), handle, session_info={})
    assert len(calls) >= failing_call
    monkeypatch.undo()
    assert await spool.queued_ids() == []
    for sub in ("tmp", "msg", "env"):
        assert files(spool.directory / sub) == [], sub
    assert await Spool(spool.directory).recover() == []
    await incoming.abort()  # harmless after a failure


async def test_failed_fsync_with_header_edits_queues_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming, handle = await receive(spool, MESSAGE)
    handle.add_header("Received", "by mail.example.org")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(SpoolError):
        await incoming.commit(envelope(), handle, session_info={})
    monkeypatch.undo()
    for sub in ("tmp", "msg", "env"):
        assert files(spool.directory / sub) == [], sub


async def test_full_disk_while_receiving_raises_and_cleans_up(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming = await spool.open_incoming()

    def disk_full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    await incoming.write(b"x" * (WRITE_BUFFER_SIZE + 1))  # written out in the background
    with pytest.raises(SpoolError):
        await incoming.finish(max_header_size=1000)  # where the failed write surfaces
    monkeypatch.undo()
    assert files(spool.directory / "tmp") == []
    with pytest.raises(SpoolError):
        await incoming.write(b"more")
    with pytest.raises(SpoolError):
        await incoming.finish(max_header_size=1000)


async def test_spool_file_that_cannot_be_created_fails_the_message_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming = await spool.open_incoming()  # touches no disk: the file comes with the data
    await incoming.write(MESSAGE)

    def refuse(path: Path) -> int:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(submitd.durable, "open_exclusive", refuse)
    with pytest.raises(SpoolError):
        await incoming.finish(max_header_size=65536)
    monkeypatch.undo()
    with pytest.raises(SpoolError):
        await incoming.commit(envelope(), MessageHandle(path=Path("x"), size=0, headers=[],
                                                        body_offset=0), session_info={})
    await incoming.abort()
    assert files(spool.directory / "tmp") == []
    assert await spool.queued_ids() == []
    assert await queue(spool)  # the next message is fine


async def test_abort_removes_the_temp_file_and_can_be_repeated(spool: Spool) -> None:
    incoming, _ = await receive(spool, MESSAGE)
    assert files(spool.directory / "tmp") == [f"{incoming.queue_id}.msg"]
    await incoming.abort()
    await incoming.abort()
    assert files(spool.directory / "tmp") == []
    assert await spool.queued_ids() == []


async def test_abort_after_commit_keeps_the_message(spool: Spool) -> None:
    incoming, handle = await receive(spool, MESSAGE)
    queue_id = await incoming.commit(envelope(), handle, session_info={})
    await incoming.abort()
    assert await spool.queued_ids() == [queue_id]
    with pytest.raises(SpoolError):
        await incoming.commit(envelope(), handle, session_info={})


# --- recovery -------------------------------------------------------------------------------


async def test_recovery_removes_fragments_and_quarantines_unreadable_sidecars(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    good = await queue(spool)
    root = spool.directory
    (root / "tmp" / f"{new_queue_id()}.msg").write_bytes(b"half a mess")
    orphan = new_queue_id()
    (root / "msg" / orphan).write_bytes(MESSAGE)  # renamed, but its sidecar never was
    broken = new_queue_id()
    (root / "msg" / broken).write_bytes(MESSAGE)
    (root / "env" / f"{broken}.json").write_bytes(b'{"version": 1, "id": ')
    lonely = new_queue_id()
    shutil_copy = (root / "env" / f"{good}.json").read_text().replace(good, lonely)
    (root / "env" / f"{lonely}.json").write_text(shutil_copy)  # no message file

    with caplog.at_level(logging.INFO, logger="submitd.queue"):
        assert await Spool(root).recover() == [good]

    assert files(root / "tmp") == []
    assert files(root / "msg") == [good]
    assert files(root / "env") == [f"{good}.json"]
    assert sorted(files(root / "corrupt")) == sorted([broken, f"{broken}.json", f"{lonely}.json"])
    quarantined = [r.getMessage() for r in caplog.records if "event=quarantined" in r.getMessage()]
    assert any(f"queue_id={broken}" in line for line in quarantined)
    assert any(f"queue_id={lonely}" in line for line in quarantined)


async def test_recovery_leaves_a_message_being_received_alone(spool: Spool) -> None:
    incoming, handle = await receive(spool, MESSAGE)
    assert await spool.recover() == []
    queue_id = await incoming.commit(envelope(), handle, session_info={})
    assert await spool.recover() == [queue_id]


CRASH_SCRIPT = """
import os, signal, sys
from pathlib import Path
import trio
from submitd import Envelope, MailParams, Recipient
from submitd.mailqueue import Spool

async def main() -> None:
    spool = Spool(Path(sys.argv[1]))
    await spool.recover()
    incoming = await spool.open_incoming()
    await incoming.write(bytes.fromhex(sys.argv[3]))
    handle = await incoming.finish(max_header_size=65536)
    handle.add_header("Received", "by crash.example.org")
    if sys.argv[2] == "before-commit":
        os.kill(os.getpid(), signal.SIGKILL)
    env = Envelope(sender="a@example.org", recipients=(Recipient(address="b@example.net"),),
                   params=MailParams(), username="a")
    queue_id = await incoming.commit(env, handle, session_info={"session_id": "S9"})
    print(queue_id, flush=True)  # what the client would see as "250 queued as ..."
    os.kill(os.getpid(), signal.SIGKILL)

trio.run(main)
"""


async def _crash(spool_dir: Path, when: str) -> str:
    result = await trio.run_process(
        [sys.executable, "-c", CRASH_SCRIPT, str(spool_dir), when, MESSAGE.hex()],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    return result.stdout.decode().strip()


async def test_message_acknowledged_before_kill_9_is_recovered(tmp_path: Path) -> None:
    queue_id = await _crash(tmp_path / "spool", "after-commit")
    assert queue_id
    spool = Spool(tmp_path / "spool")
    assert await spool.recover() == [queue_id]
    queued = await spool.load(queue_id)
    assert queued.message.path.read_bytes() == b"Received: by crash.example.org\r\n" + MESSAGE
    assert [r.address for r in queued.envelope.recipients] == ["b@example.net"]


async def test_kill_9_before_commit_leaves_only_a_fragment_that_recovery_removes(
    tmp_path: Path,
) -> None:
    assert await _crash(tmp_path / "spool", "before-commit") == ""
    assert files(tmp_path / "spool" / "tmp") != []
    spool = Spool(tmp_path / "spool")
    assert await spool.recover() == []
    assert files(tmp_path / "spool" / "tmp") == []


async def test_first_load_after_commit_matches_the_disk_and_never_a_stale_state(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.remember_commits(8)  # as the queue runner does
    await spool.recover()
    incoming, handle = await receive(spool, MESSAGE)
    handle.add_header("Received", "by mail.example.org")
    queue_id = await incoming.commit(envelope(), handle, session_info=SESSION)
    remembered = await spool.load(queue_id)
    from_disk = await Spool(spool.directory).load(queue_id)
    assert remembered.record == from_disk.record
    assert remembered.header_section == from_disk.header_section
    assert remembered.message.headers == from_disk.message.headers
    assert (remembered.message.path, remembered.message.size, remembered.message.body_offset) \
        == (from_disk.message.path, from_disk.message.size, from_disk.message.body_offset)
    # A state saved or a message removed after the commit is what the next load sees.
    second = await queue(spool)
    await spool.save(replace((await spool.load_record(second)), held=True))
    assert (await spool.load(second)).record.held
    third = await queue(spool)
    await spool.remove(third)
    with pytest.raises(QueueEntryMissing):
        await spool.load(third)


# --- state updates --------------------------------------------------------------------------


async def test_saved_state_replaces_the_sidecar(spool: Spool) -> None:
    queue_id = await queue(spool, MESSAGE, "bob@example.net", "carol@example.com")
    record = await spool.load_record(queue_id)
    reply = Reply(code=451, status="4.4.1", lines=("first line", "second line"))
    bob, carol = record.recipients
    updated = replace(
        record,
        recipients=(
            replace(bob, state=RecipientState.DELIVERED, attempts=1),
            replace(carol, attempts=1, last_reply=reply, next_attempt=record.created + 60),
        ),
        next_attempt=record.created + 60,
    )
    await spool.save(updated)
    assert await Spool(spool.directory).load_record(queue_id) == updated
    assert files(spool.directory / "tmp") == []


async def test_removed_message_is_gone_and_not_resurrected_by_a_late_save(spool: Spool) -> None:
    queue_id = await queue(spool)
    record = await spool.load_record(queue_id)
    await spool.remove(queue_id)
    await spool.remove(queue_id)  # already gone: fine
    assert await spool.queued_ids() == []
    assert files(spool.directory / "msg") == []
    with pytest.raises(QueueEntryMissing):
        await spool.load(queue_id)
    with pytest.raises(QueueEntryMissing):
        await spool.save(record)
    assert await spool.queued_ids() == []


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "", "0123456789abcdef", "A" * 40])
async def test_loading_something_that_is_not_a_queue_id_finds_nothing(
    spool: Spool, bad_id: str
) -> None:
    with pytest.raises(QueueEntryMissing):
        await spool.load(bad_id)


async def test_message_without_recipients_is_refused(spool: Spool) -> None:
    incoming, handle = await receive(spool, MESSAGE)
    empty = replace(envelope(), recipients=())
    with pytest.raises(SpoolError):
        await incoming.commit(empty, handle, session_info={})
    assert files(spool.directory / "tmp") == []


# --- sidecar versions and validation ---------------------------------------------------------

V1_SIDECAR = {
    "version": 1, "created": 1_700_000_000.0, "size": 79, "sender": "alice@example.org",
    "username": "alice", "params": {"size": None, "body": "7BIT", "smtputf8": False, "auth": None},
    "session": {"session_id": "S1"}, "next_attempt": 1_700_000_060.0,
    "recipients": [{"address": "bob@example.net", "state": "pending", "attempts": 1,
                    "last_reply": {"code": 451, "status": "4.4.1", "text": "later",
                                   "lines": ["later"]},
                    "next_attempt": 1_700_000_060.0}],
}


def plant(spool: Spool, sidecar: dict[str, object] | bytes) -> str:
    """Put a committed message with the given sidecar into the spool, as an old release would."""
    queue_id = new_queue_id()
    (spool.directory / "msg" / queue_id).write_bytes(MESSAGE)
    data = sidecar if isinstance(sidecar, bytes) else json.dumps({**sidecar, "id": queue_id})
    (spool.directory / "env" / f"{queue_id}.json").write_bytes(
        data if isinstance(data, bytes) else data.encode()
    )
    return queue_id


async def test_version_1_sidecar_from_an_older_release_still_loads(spool: Spool) -> None:
    queue_id = plant(spool, V1_SIDECAR)
    assert await Spool(spool.directory).recover() == [queue_id]
    record = await spool.load_record(queue_id)
    assert (record.held, record.delay_warned, record.origin) == (False, False, Origin.SMTP)
    assert (record.params.ret, record.params.envid) == (None, None)
    (rcpt,) = record.recipients
    assert (rcpt.attempts, rcpt.params, rcpt.history) == (1, (), ())
    assert rcpt.last_reply == Reply.make(451, "4.4.1", "later")
    await spool.save(record)  # rewritten as the current version
    sidecar = json.loads((spool.directory / "env" / f"{queue_id}.json").read_bytes())
    assert sidecar["version"] == FORMAT_VERSION


DSN_PARAMS = MailParams(size=1234, ret=DsnReturn.HDRS, envid="batch 7+1=x")
NOTIFY = (("NOTIFY", "SUCCESS,DELAY"), ("ORCPT", "rfc822;bob+2Bold@example.net"))


async def test_dsn_parameters_survive_a_restart_and_recovery(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.recover()
    incoming, handle = await receive(spool, MESSAGE)
    sent = replace(
        envelope(), params=DSN_PARAMS,
        recipients=(Recipient(address="bob@example.net", params=NOTIFY),
                    Recipient(address="carol@example.com", params=(("NOTIFY", "NEVER"),))),
    )
    queue_id = await incoming.commit(sent, handle, session_info=SESSION)
    sidecar = json.loads((spool.directory / "env" / f"{queue_id}.json").read_bytes())
    assert (sidecar["params"]["ret"], sidecar["params"]["envid"]) == ("HDRS", "batch 7+1=x")
    restarted = Spool(tmp_path / "spool")
    assert await restarted.recover() == [queue_id]
    record = await restarted.load_record(queue_id)
    assert record.params == DSN_PARAMS
    assert [r.params for r in record.recipients] == [NOTIFY, (("NOTIFY", "NEVER"),)]
    queued = await restarted.load(queue_id)
    assert queued.envelope.params.ret is DsnReturn.HDRS
    assert queued.envelope.recipients[0].param("NOTIFY") == "SUCCESS,DELAY"
    # Saving the record after an attempt keeps them.
    await restarted.save(replace(record, delay_warned=True))
    assert (await Spool(tmp_path / "spool").load_record(queue_id)).params == DSN_PARAMS


async def test_history_keeps_the_last_attempts_with_the_remote_host(spool: Spool) -> None:
    queue_id = await queue(spool)
    record = await spool.load_record(queue_id)
    attempts = tuple(
        Attempt(at=record.created + i, reply=Reply.make(451, "4.4.1", f"try {i}"),
                remote="smtp.example.net" if i % 2 == 0 else None)
        for i in range(MAX_HISTORY + 5)
    )
    (rcpt,) = record.recipients
    await spool.save(replace(record, held=True, delay_warned=True, origin=Origin.DELAY,
                             recipients=(replace(rcpt, history=attempts),)))
    reloaded = await Spool(spool.directory).load_record(queue_id)
    assert (reloaded.held, reloaded.delay_warned, reloaded.origin) == (True, True, "delay")
    assert reloaded.recipients[0].history == attempts[-MAX_HISTORY:]
    assert reloaded.recipients[0].last_remote == "smtp.example.net"


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = obj
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = value
    return change


# json.dumps writes these as the bare words NaN and Infinity, which json.loads would accept.
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_set("next_attempt", NAN), "NaN"),
        (_set("created", INF), "Infinity"),
        (_set("next_attempt", 10**400), "out of range"),
        (_set("created", -5.0), "finite non-negative"),
        (_set("recipients.0.next_attempt", "soon"), "not a number"),
        (_set("recipients.0.attempts", -1), "non-negative integer"),
        (_set("recipients.0.attempts", True), "non-negative integer"),
        (_set("recipients.0.state", "lost"), "lost"),
        (_set("recipients.0.last_reply", {"code": 999, "status": "", "text": "x"}), "range"),
        (_set("recipients.0.last_reply", {"code": 354, "status": "", "text": "go"}), "final"),
        (_set("recipients.0.last_reply", {"code": 451, "status": "5.0.0", "text": "x"}), "fit"),
        (_set("recipients.0.address", "a@b\r\nX: y"), "address"),
        (_set("recipients.0.history", [{"at": "now", "reply": None}]), "not a number"),
        (_set("held", "yes"), "held"),
        (_set("origin", "spam"), "spam"),
        (_set("size", 2.5), "size"),
        (_set("params.body", "9BIT"), "9BIT"),
        (_set("params.ret", "NONE"), "NONE"),
        (_set("params.ret", 1), "DsnReturn"),
        (_set("params.envid", 7), "envid"),
        (_set("params.envid", "a\r\nb"), "envid"),
        (_set("params.envid", "x" * 101), "longer than 100"),
        (_set("params.envid", "caf\u00e9"), "printable"),
        (_set("recipients.0.params", [["NOTIFY", "NEVER,SUCCESS"]]), "NOTIFY"),
        (_set("recipients.0.params", [["NOTIFY", None]]), "NOTIFY"),
        (_set("recipients.0.params", [["ORCPT", "bob@example.net"]]), "ORCPT"),
        (_set("recipients", []), "no recipients"),
    ],
)
async def test_sidecar_with_a_bad_field_is_moved_aside_not_crashing_start_up(
    spool: Spool, change: Callable[[dict[str, Any]], None], why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = await queue(spool)
    sidecar = json.loads((spool.directory / "env" / f"{good}.json").read_bytes())
    sidecar["recipients"][0]["history"] = [
        {"at": 1.0, "reply": {"code": 451, "status": "4.4.1", "text": "x"}, "remote": None}
    ]
    change(sidecar)
    bad = plant(spool, sidecar)
    with pytest.raises(QueueEntryCorrupt, match=re.escape(why)):
        await spool.load_record(bad)
    with caplog.at_level(logging.ERROR, logger="submitd.queue"):
        assert await Spool(spool.directory).recover() == [good]
    assert sorted(files(spool.directory / "corrupt")) == [bad, f"{bad}.json"]
    assert any(f"queue_id={bad}" in r.getMessage() for r in caplog.records)


# --- one server per spool --------------------------------------------------------------------


async def test_spool_lock_is_exclusive_and_names_the_holder(spool: Spool) -> None:
    await spool.lock()
    assert spool.locked
    assert (spool.directory / "lock").read_text() == f"{os.getpid()}\n"
    other = Spool(spool.directory)
    where = re.escape(str(spool.directory))
    with pytest.raises(SpoolLocked, match=rf"{where}.*process {os.getpid()}"):
        await other.lock()
    assert not other.locked
    spool.unlock()
    spool.unlock()  # idempotent
    await other.lock()  # free again
    other.unlock()


async def test_lock_waits_for_a_holder_that_lets_go_within_the_wait(spool: Spool) -> None:
    # An operator command on a stopped server holds the lock for a moment; a server starting
    # then waits for it instead of refusing.
    await spool.lock()
    other = Spool(spool.directory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(other.lock, wait=30.0))
        await trio.sleep(0.3)
        assert not other.locked  # still waiting
        spool.unlock()
    assert other.locked
    other.unlock()


def test_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, trio\n"
         "from submitd.mailqueue import Spool\n"
         "async def main():\n"
         f"    s = Spool({str(spool_dir)!r})\n"
         "    await s.lock()\n"
         "    print('locked', flush=True)\n"
         "    sys.stdin.read()\n"
         "trio.run(main)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(SpoolLocked, match=f"process {holder.pid}"):
            trio.run(Spool(spool_dir).lock)
    finally:
        holder.communicate("", timeout=20)  # stdin closed: the holder exits, the kernel unlocks
    trio.run(Spool(spool_dir).lock)  # a dead holder never blocks a restart
