"""Group commit: concurrent commits, removals and Maildir deliveries share directory fsyncs.

What must hold whatever the sharing: a commit returns only once its message, its sidecar and
both directory entries are durable; a failed directory fsync fails every message whose
durability it leaves uncertain and queues none of them; a commit cancelled mid-way leaves
the message either queued or not at all, and a restarted spool agrees.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

import submitd.durable
from submitd import Config, DeliveryOutcome, MessageHandle, OutcomeKind
from submitd.durable import DirectorySync
from submitd.errors import SpoolError
from submitd.mailqueue import IncomingMessage, Spool
from submitd_plugins import maildir
from tests.unit.test_maildir import RECIPIENTS, make_config, stored_message
from tests.unit.test_maildir import envelope as maildir_envelope
from tests.unit.test_spool import MESSAGE, SESSION, envelope, files, receive

N = 12
WAIT = 10.0  # seconds a gated fsync waits for the others at most (a hang fails the test)


class Disk:
    """Real renames, unlinks and fsyncs, counted per directory, with a gate on the first fsync.

    The first fsync of the gated directory waits until ``needed`` names have been renamed
    into it (or unlinked from it) by the concurrent callers, so they all find it running and
    must share what comes after; with ``fail`` that fsync then fails with EIO.
    """

    def __init__(self, gated: str, needed: int, *, fail: bool = False) -> None:
        self.gated, self.needed, self.fail = gated, needed, fail
        self.fsyncs: Counter[str] = Counter()
        self.changes: Counter[str] = Counter()
        self.changed = threading.Condition()
        self.released = threading.Event()  # set to let a held fsync go on (hold())
        self.held = threading.Event()
        self._hold = False

    def hold(self) -> None:
        """Make the gated fsync also wait for :attr:`released` (set :attr:`held` meanwhile)."""
        self._hold = True

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_rename, real_replace, real_unlink = os.rename, os.replace, os.unlink
        real_fsync_dir = submitd.durable.fsync_dir

        def note(directory: str) -> None:
            with self.changed:
                self.changes[directory] += 1
                self.changed.notify_all()

        def rename(src: str | Path, dst: str | Path) -> None:
            real_rename(src, dst)
            note(Path(dst).parent.name)

        def replace_(src: str | Path, dst: str | Path) -> None:
            real_replace(src, dst)
            note(Path(dst).parent.name)

        def unlink(path: str | Path, **kwargs: object) -> None:
            real_unlink(path, **kwargs)  # type: ignore[arg-type]
            note(Path(path).parent.name)

        def fsync_dir(path: Path) -> None:
            name = Path(path).name
            with self.changed:
                self.fsyncs[name] += 1
                first = name == self.gated and self.fsyncs[name] == 1
                if first:
                    assert self.changed.wait_for(
                        lambda: self.changes[name] >= self.needed, WAIT
                    ), f"only {self.changes[name]} of {self.needed} changes in {name}/"
            if first and self._hold:
                self.held.set()
                assert self.released.wait(WAIT)
            if first and self.fail:
                raise OSError(errno.EIO, "Input/output error")
            real_fsync_dir(path)

        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace_)
        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(submitd.durable, "fsync_dir", fsync_dir)


@pytest.fixture
async def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    await spool.recover()
    return spool


async def received(spool: Spool, n: int) -> list[tuple[IncomingMessage, MessageHandle]]:
    return [await receive(spool, MESSAGE + b"message %d\r\n" % i) for i in range(n)]


async def commit_all(
    pairs: list[tuple[IncomingMessage, MessageHandle]],
) -> list[str | SpoolError]:
    """Commit every message at once; each one's queue ID or its SpoolError, in order."""
    results: list[str | SpoolError] = [SpoolError("never ran")] * len(pairs)

    async def one(i: int, incoming: IncomingMessage, handle: MessageHandle) -> None:
        try:
            results[i] = await incoming.commit(envelope(), handle, session_info=SESSION)
        except SpoolError as exc:
            results[i] = exc
        finally:
            await incoming.abort()  # no-op after a commit; removes what a failure left

    with trio.fail_after(2 * WAIT):
        async with trio.open_nursery() as nursery:
            for i, (incoming, handle) in enumerate(pairs):
                nursery.start_soon(one, i, incoming, handle)
    return results


# --- DirectorySync on its own --------------------------------------------------------------


def run_threads(n: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT)
    assert not any(t.is_alive() for t in threads), "a sync never returned"
    return errors


def test_each_sync_waits_for_an_fsync_that_started_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    started: list[int] = []
    lock = threading.Lock()
    real = submitd.durable.fsync_dir

    def fsync_dir(path: Path) -> None:
        with lock:
            started.append(len(started))
        real(path)

    monkeypatch.setattr(submitd.durable, "fsync_dir", fsync_dir)
    sync = DirectorySync()

    def create_and_sync(i: int) -> None:
        mark = sync.mark(directory)
        (directory / f"f{i}").write_bytes(b"x")
        with lock:
            before = len(started)
        sync.sync(directory, since=mark)
        with lock:
            assert len(started) > before, "returned without an fsync started after the call"

    assert run_threads(N, create_and_sync) == []
    assert sorted(os.listdir(directory)) == sorted(f"f{i}" for i in range(N))
    assert 1 <= len(started) <= N


def test_a_failed_fsync_fails_every_change_made_before_it_ended_and_no_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    disk = Disk("d", N, fail=True)
    disk.install(monkeypatch)
    sync = DirectorySync()

    def rename_and_sync(i: int) -> None:
        mark = sync.mark(directory)
        (tmp_path / f"f{i}").write_bytes(b"x")
        os.rename(tmp_path / f"f{i}", directory / f"f{i}")
        sync.sync(directory, since=mark)

    errors = run_threads(N, rename_and_sync)
    assert len(errors) == N and all(
        isinstance(e, OSError) and e.errno == errno.EIO for e in errors
    ), errors
    # The next change gets a fresh fsync (never a retry on the descriptor that failed).
    assert run_threads(1, lambda i: rename_and_sync(N)) == []
    assert disk.fsyncs["d"] >= 2


# --- the spool ------------------------------------------------------------------------------


async def test_concurrent_commits_share_directory_fsyncs_and_all_are_queued(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = await received(spool, N)
    disk = Disk("msg", N)
    disk.install(monkeypatch)
    results = await commit_all(pairs)
    monkeypatch.undo()
    assert all(isinstance(r, str) for r in results), results
    assert sorted(str(r) for r in results) == await spool.queued_ids()
    # Two fsyncs per message (its file and its sidecar), the directories' shared.
    assert disk.fsyncs["msg"] < N and disk.fsyncs["env"] < N, disk.fsyncs
    assert await Spool(spool.directory).recover() == sorted(str(r) for r in results)
    for queue_id in results:
        queued = await spool.load(str(queue_id))
        assert queued.message.path.read_bytes().startswith(MESSAGE)
    assert files(spool.directory / "tmp") == []


@pytest.mark.parametrize("directory", ["msg", "env"])
async def test_a_failed_fsync_fails_every_message_of_its_batch_and_queues_none(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, directory: str
) -> None:
    pairs = await received(spool, N)
    disk = Disk(directory, N, fail=True)
    disk.install(monkeypatch)
    results = await commit_all(pairs)
    assert all(isinstance(r, SpoolError) for r in results), results
    assert await spool.queued_ids() == []
    for sub in ("tmp", "msg", "env"):
        assert files(spool.directory / sub) == [], sub
    assert await Spool(spool.directory).recover() == []
    # The spool keeps working: the next batch gets fresh fsyncs and is queued.
    again = await commit_all(await received(spool, 3))
    monkeypatch.undo()
    assert all(isinstance(r, str) for r in again), again
    assert await spool.queued_ids() == sorted(str(r) for r in again)


async def test_cancelled_commits_are_either_queued_or_gone_and_recovery_agrees(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = await received(spool, N)
    late_incoming, late_handle = await receive(spool, MESSAGE)
    disk = Disk("env", N)
    disk.hold()
    disk.install(monkeypatch)
    outcomes: dict[int, str | None] = {}
    scopes: list[trio.CancelScope] = []

    async def one(i: int, incoming: IncomingMessage, handle: MessageHandle) -> None:
        outcomes[i] = None
        with trio.CancelScope() as scope:
            scopes.append(scope)
            try:
                outcomes[i] = await incoming.commit(envelope(), handle, session_info=SESSION)
                await trio.lowlevel.checkpoint()  # where the cancellation lands, if not before
            finally:
                with trio.CancelScope(shield=True):
                    await incoming.abort()

    with trio.fail_after(2 * WAIT):
        async with trio.open_nursery() as nursery:
            for i, (incoming, handle) in enumerate(pairs):
                nursery.start_soon(one, i, incoming, handle)
            # Every commit is in its batch, the first env/ fsync in flight: cancel them all.
            assert await trio.to_thread.run_sync(disk.held.wait, WAIT)
            for scope in scopes:
                scope.cancel()
            # And one cancelled before its commit could start.
            with trio.CancelScope() as late:
                late.cancel()
                await late_incoming.commit(envelope(), late_handle, session_info=SESSION)
            await late_incoming.abort()
            disk.released.set()
    monkeypatch.undo()
    committed = sorted(q for q in outcomes.values() if q is not None)
    # A commit that had started finishes (its caller was told, or would have been);
    # the one cancelled before it started queued nothing.
    assert len(committed) == N
    assert await spool.queued_ids() == committed
    assert files(spool.directory / "msg") == committed
    assert files(spool.directory / "tmp") == []
    assert await Spool(spool.directory).recover() == committed


async def test_removals_share_env_fsyncs_and_never_fsync_msg(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = [str(q) for q in await commit_all(await received(spool, N))]
    # The first removal's trip starts alone; the others gather behind it and share the next.
    disk = Disk("env", 1)
    disk.install(monkeypatch)
    with trio.fail_after(2 * WAIT):
        async with trio.open_nursery() as nursery:
            for queue_id in queued:
                nursery.start_soon(spool.remove, queue_id)
    monkeypatch.undo()
    assert disk.fsyncs["msg"] == 0
    assert 1 <= disk.fsyncs["env"] <= 2, disk.fsyncs
    assert await spool.queued_ids() == []
    assert files(spool.directory / "msg") == files(spool.directory / "env") == []


async def test_a_failed_env_fsync_fails_the_removals_it_concerns_and_keeps_their_files(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = [str(q) for q in await commit_all(await received(spool, N))]
    disk = Disk("env", 1, fail=True)
    disk.install(monkeypatch)
    failed: list[str] = []

    async def remove(queue_id: str) -> None:
        try:
            await spool.remove(queue_id)
        except SpoolError:
            failed.append(queue_id)

    with trio.fail_after(2 * WAIT):
        async with trio.open_nursery() as nursery:
            for queue_id in queued:
                nursery.start_soon(remove, queue_id)
    monkeypatch.undo()
    # Only the first trip's fsync failed: its removal (whichever task ran first) is reported
    # failed and its message file stays (recovery removes the fragment); the later trip's
    # removals succeeded.
    assert len(failed) == 1
    assert files(spool.directory / "msg") == failed
    assert files(spool.directory / "env") == []
    assert await Spool(spool.directory).recover() == []


async def test_saves_share_env_fsyncs(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    queued = [str(q) for q in await commit_all(await received(spool, N))]
    records = [await spool.load_record(q) for q in queued]
    disk = Disk("env", N)
    disk.install(monkeypatch)
    with trio.fail_after(2 * WAIT):
        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(spool.save, replace(record, held=True))
    monkeypatch.undo()
    assert 1 <= disk.fsyncs["env"] < N, disk.fsyncs
    assert [(await spool.load_record(q)).held for q in queued] == [True] * N


# --- the Maildir ----------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = make_config(tmp_path, {"path": "../mail"})
    maildir.submitd_configure(config)
    return config


async def deliver_concurrently(
    config: Config, message: MessageHandle
) -> list[dict[str, DeliveryOutcome]]:
    """N Maildir deliveries at once (queue IDs Q000...0 to Q...N-1); each one's outcomes."""
    outcomes: list[dict[str, DeliveryOutcome]] = []

    async def deliver(i: int) -> None:
        got = await maildir.submitd_deliver(
            config, maildir_envelope(queue_id=f"Q{i:015d}"), message, RECIPIENTS
        )
        assert got is not None
        outcomes.append(dict(got))

    with trio.fail_after(2 * WAIT):
        async with trio.open_nursery() as nursery:
            for i in range(N):
                nursery.start_soon(deliver, i)
    return outcomes


async def test_concurrent_maildir_deliveries_share_the_fsync_of_new(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = stored_message(tmp_path)
    disk = Disk("new", N)
    disk.install(monkeypatch)
    outcomes = await deliver_concurrently(config, message)
    monkeypatch.undo()
    assert len(outcomes) == N
    assert all(o.kind is OutcomeKind.DELIVERED for got in outcomes for o in got.values())
    new = sorted(os.listdir(tmp_path / "mail" / "new"))
    assert len(new) == N and all(f".QQ{i:015d}." in " ".join(new) for i in range(N))
    assert os.listdir(tmp_path / "mail" / "tmp") == []
    assert 1 <= disk.fsyncs["new"] < N, disk.fsyncs


async def test_a_failed_fsync_of_new_defers_every_delivery_it_concerns(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = stored_message(tmp_path)
    disk = Disk("new", N, fail=True)
    disk.install(monkeypatch)
    outcomes = await deliver_concurrently(config, message)
    monkeypatch.undo()
    assert len(outcomes) == N
    assert all(o.kind is OutcomeKind.TEMPORARY for got in outcomes for o in got.values())
    assert os.listdir(tmp_path / "mail" / "new") == []
