"""Receiving into the spool: a large message is written out while the rest still arrives."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

import submitd.durable
from submitd import Envelope, MailParams, Recipient
from submitd.errors import SpoolError
from submitd.mailqueue import Spool, _incoming
from submitd.mailqueue.spool import WRITE_BUFFER_SIZE
from submitd.protocol._events import BodyType

HEAD = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: big\r\n\r\n"
SESSION = {"session_id": "S1", "peer": "192.0.2.7:40000", "tls": "TLSv1.3"}


def envelope() -> Envelope:
    return Envelope(
        sender="alice@example.org",
        recipients=(Recipient(address="bob@example.net"),),
        params=MailParams(size=None, body=BodyType.EIGHT_BIT_MIME, auth=None),
        username="alice",
        received_at=1_700_000_000.0,
    )


def chunk(n: int) -> bytes:
    """A whole spool buffer of body lines, numbered so that order and loss show."""
    line = b"%06d " % n + b"x" * 70 + b"\r\n"
    return line * (WRITE_BUFFER_SIZE // len(line) + 1)


@pytest.fixture
async def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    await spool.recover()
    return spool


class HeldWrites:
    """``durable.write_all`` that waits for the test's go-ahead, counting writes in flight."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.started = 0
        self.running = 0
        self.most_at_once = 0
        self.first_started = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._real = submitd.durable.write_all
        monkeypatch.setattr(submitd.durable, "write_all", self)

    def __call__(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self.started += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self._token.run_sync_soon(self.first_started.set)
        try:
            if not self.release.wait(timeout=30):
                raise OSError(errno.EIO, "the test never released the write")
            self._real(fd, data)
        finally:
            with self._lock:
                self.running -= 1


async def test_a_large_message_is_read_on_while_its_first_part_is_written(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    writes = HeldWrites(monkeypatch)
    incoming = await spool.open_incoming()
    await incoming.write(HEAD + chunk(0))  # goes out in the background ...
    await writes.first_started.wait()
    assert writes.running == 1  # ... and write() came back while the disk write is held

    second_done = trio.Event()

    async def second() -> None:
        await incoming.write(chunk(1))  # one write in flight at most: this one waits
        second_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not second_done.is_set()
        assert writes.started == 1
        writes.release.set()
    await incoming.write(chunk(2))
    handle = await incoming.finish(max_header_size=65536)
    queue_id = await incoming.commit(envelope(), handle, session_info=SESSION)

    assert writes.most_at_once == 1
    stored = (await spool.load(queue_id)).message.path.read_bytes()
    assert stored == HEAD + chunk(0) + chunk(1) + chunk(2)
    assert handle.get("Subject") == "big"


async def test_a_failed_background_write_fails_the_message_at_the_next_write(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming = await spool.open_incoming()
    real_write = os.write
    failed = threading.Event()

    def disk_full(fd: int, data: object) -> int:
        failed.set()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    await incoming.write(HEAD + chunk(0))
    with pytest.raises(SpoolError, match="No space left"):
        await incoming.write(chunk(1))  # waits for the first write, which failed
    monkeypatch.setattr(os, "write", real_write)
    assert failed.is_set()
    assert os.listdir(spool.directory / "tmp") == []
    with pytest.raises(SpoolError):
        await incoming.finish(max_header_size=65536)
    await incoming.abort()


async def test_abort_waits_for_the_write_in_flight_and_leaves_no_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = HeldWrites(monkeypatch)
    incoming = await spool.open_incoming()
    await incoming.write(HEAD + chunk(0))
    await writes.first_started.wait()
    aborted = trio.Event()

    async def abort() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()  # abort runs in cleanup paths: a cancellation must not cut it short
            await incoming.abort()
        aborted.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(abort)
        await trio.testing.wait_all_tasks_blocked()
        assert not aborted.is_set()  # the descriptor is still being written to
        writes.release.set()
    assert os.listdir(spool.directory / "tmp") == []
    assert spool.directory.joinpath("msg").exists()
    assert os.listdir(spool.directory / "msg") == []
    with pytest.raises(SpoolError):
        await incoming.write(b"more")


async def test_a_receive_cancelled_mid_message_then_aborted_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = HeldWrites(monkeypatch)
    incoming = await spool.open_incoming()
    await incoming.write(HEAD + chunk(0))
    scope = trio.CancelScope()

    async def second() -> None:
        with scope:  # e.g. the data timeout, while the disk is slow
            await incoming.write(chunk(1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert scope.cancelled_caught
    writes.release.set()
    await incoming.abort()
    assert os.listdir(spool.directory / "tmp") == []


async def test_writeback_starts_while_receiving_and_the_commit_still_fsyncs(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, int]] = []
    fsynced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(_incoming, "start_writeback",
                        lambda fd, offset, nbytes: started.append((offset, nbytes)))

    def fsync(fd: int) -> None:
        fsynced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    incoming = await spool.open_incoming()
    parts = [HEAD + chunk(0)] + [chunk(n) for n in range(1, 80)]  # about 20 MiB
    for part in parts:
        await incoming.write(part)
    handle = await incoming.finish(max_header_size=65536)
    queue_id = await incoming.commit(envelope(), handle, session_info=SESSION)

    data = b"".join(parts)
    assert (await spool.load(queue_id)).message.path.read_bytes() == data
    # Consecutive ranges from the start, each at least the interval long ...
    assert len(started) == len(data) // _incoming.WRITEBACK_INTERVAL
    assert [offset for offset, _ in started] == [0] + [
        sum(n for _, n in started[:i]) for i in range(1, len(started))
    ]
    assert all(n >= _incoming.WRITEBACK_INTERVAL for _, n in started)
    # ... and the whole message is fsynced before the commit returns all the same.
    assert len(data) in fsynced
