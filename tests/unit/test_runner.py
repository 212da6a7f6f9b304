"""The queue runner: delivers, retries on schedule, gives up, and never runs a message twice."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from submitd import DeliveryOutcome, Envelope, MailParams, MessageHandle, OutcomeKind, Recipient
from submitd.config import QueueConfig
from submitd.mailqueue import QueueRunner, Spool, retry_delay
from submitd.protocol._replies import Reply

T0 = 1_700_000_000.0
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
DEFERRED = Reply.make(451, "4.4.1", "Try later")
REFUSED = Reply.make(550, "5.1.1", "No such user")

Answer = Callable[[Recipient], DeliveryOutcome]


def clock() -> float:
    """Wall-clock time that moves with trio's (autojump) clock."""
    return T0 + trio.current_time()


def always(outcome: DeliveryOutcome) -> Answer:
    return lambda _recipient: outcome


class FakeHooks:
    """Records every call; answers with ``answer``; each delivery takes ``duration`` seconds."""

    def __init__(
        self, answer: Answer, *, duration: float = 0.0, gate: trio.Event | None = None
    ) -> None:
        self.answer = answer
        self.duration = duration
        self.gate = gate
        self.attempts: list[tuple[str, tuple[str, ...], float]] = []
        self.results: list[tuple[str, Recipient, DeliveryOutcome]] = []
        self.bodies: list[bytes] = []
        self.active: dict[str, int] = {}
        self.max_active = 0
        self.max_active_per_message = 0
        self._changed = trio.Event()
        self.delivering = trio.Event()

    async def deliver(
        self, envelope: Envelope, message: MessageHandle, recipients: tuple[Recipient, ...]
    ) -> Mapping[str, DeliveryOutcome]:
        assert envelope.queue_id is not None
        queue_id = envelope.queue_id
        self.attempts.append((queue_id, tuple(r.address for r in recipients), trio.current_time()))
        self.delivering.set()
        self._notify()
        self.active[queue_id] = self.active.get(queue_id, 0) + 1
        self.max_active = max(self.max_active, sum(self.active.values()))
        self.max_active_per_message = max(self.max_active_per_message, self.active[queue_id])
        try:
            self.bodies.append(message.path.read_bytes())
            await trio.sleep(self.duration)
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.active[queue_id] -= 1
        return {r.address: self.answer(r) for r in recipients}

    async def delivery_result(
        self, envelope: Envelope, recipient: Recipient, outcome: DeliveryOutcome
    ) -> None:
        assert envelope.queue_id is not None
        self.results.append((envelope.queue_id, recipient, outcome))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_attempts(self, count: int) -> None:
        while len(self.attempts) < count:
            await self._changed.wait()

    async def wait_results(self, count: int) -> None:
        while len(self.results) < count:
            await self._changed.wait()


def queue_config(tmp_path: Path, **overrides: object) -> QueueConfig:
    return QueueConfig(dir=tmp_path / "spool", **overrides)  # type: ignore[arg-type]


async def commit(spool: Spool, *recipients: str) -> str:
    incoming = await spool.open_incoming()
    await incoming.write(MESSAGE)
    handle = await incoming.finish(max_header_size=65536)
    envelope = Envelope(
        sender="a@example.org",
        recipients=tuple(Recipient(address=a) for a in recipients or ("b@example.net",)),
        params=MailParams(),
        username="a",
    )
    return await incoming.commit(envelope, handle, session_info={"session_id": "S1"})


@asynccontextmanager
async def running(runner: QueueRunner) -> AsyncIterator[QueueRunner]:
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        yield runner
        nursery.cancel_scope.cancel()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", clock=clock)


async def test_delivered_message_is_removed_from_the_spool(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    await spool.recover()
    queue_id = await commit(spool, "b@example.net", "c@example.net")
    hooks = FakeHooks(always(DeliveryOutcome.delivered()))
    with caplog.at_level(logging.INFO, logger="submitd.queue"):
        async with running(QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)):
            await hooks.wait_results(2)
    assert hooks.attempts == [(queue_id, ("b@example.net", "c@example.net"), 0.0)]
    assert hooks.bodies == [MESSAGE]
    assert [(q, r.address, o.kind) for q, r, o in hooks.results] == [
        (queue_id, "b@example.net", OutcomeKind.DELIVERED),
        (queue_id, "c@example.net", OutcomeKind.DELIVERED),
    ]
    assert await spool.queued_ids() == []
    assert list((spool.directory / "msg").iterdir()) == []
    delivered = [r.getMessage() for r in caplog.records if "event=delivered" in r.getMessage()]
    assert len(delivered) == 2
    assert all(f"queue_id={queue_id}" in line for line in delivered)
    assert all("hello" not in r.getMessage() for r in caplog.records)  # never the body


async def test_temporary_failure_is_retried_on_the_schedule(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    config = queue_config(tmp_path, retry=(60.0, 300.0))
    hooks = FakeHooks(always(DeliveryOutcome.temporary(DEFERRED)))
    async with running(QueueRunner(spool, hooks, config, clock=clock)):
        await hooks.wait_results(1)
        # Read synchronously: a worker thread here would let the autojump clock run ahead.
        sidecar = json.loads((spool.directory / "env" / f"{queue_id}.json").read_bytes())
        assert sidecar["next_attempt"] == T0 + 60
        assert sidecar["recipients"][0] | {"last_reply": None, "history": []} == {
            "address": "b@example.net",
            "params": [],
            "state": "pending",
            "attempts": 1,
            "last_reply": None,
            "next_attempt": T0 + 60,
            "history": [],
        }
        assert sidecar["recipients"][0]["last_reply"]["status"] == "4.4.1"
        assert sidecar["recipients"][0]["history"] == [
            {"at": T0, "remote": None,
             "reply": {"code": 451, "status": "4.4.1", "text": "Try later", "lines": ["Try later"]}}
        ]
        await hooks.wait_results(4)
    # The last interval repeats: 60 s, then 300 s, then 300 s again.
    assert [t for _, _, t in hooks.attempts] == [0.0, 60.0, 360.0, 660.0]
    assert all(r.attempts == n for n, (_, r, _) in enumerate(hooks.results, start=1))
    assert (await spool.load_record(queue_id)).recipients[0].attempts == 4


async def test_only_pending_recipients_are_attempted_again(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool, "ok@example.net", "later@example.net")
    later_once = {"later@example.net": 1}

    def answer(r: Recipient) -> DeliveryOutcome:
        if r.address == "later@example.net" and later_once.pop(r.address, 0):
            return DeliveryOutcome.temporary(DEFERRED)
        return DeliveryOutcome.delivered()

    hooks = FakeHooks(answer)
    runner = QueueRunner(spool, hooks, queue_config(tmp_path, retry=(60.0,)), clock=clock)
    async with running(runner):
        await hooks.wait_results(3)
    assert [(rcpts, t) for _, rcpts, t in hooks.attempts] == [
        (("ok@example.net", "later@example.net"), 0.0),
        (("later@example.net",), 60.0),
    ]
    assert await spool.queued_ids() == []
    assert queue_id not in runner.in_flight


async def test_permanent_failure_fails_the_recipient_and_removes_the_message(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    hooks = FakeHooks(always(DeliveryOutcome.permanent(REFUSED)))
    with caplog.at_level(logging.INFO, logger="submitd.queue"):
        async with running(QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)):
            await hooks.wait_results(1)
    ((_, recipient, outcome),) = hooks.results
    assert (recipient.address, outcome.kind, outcome.reply) == (
        "b@example.net",
        OutcomeKind.PERMANENT,
        REFUSED,
    )
    assert await spool.queued_ids() == []
    failed = [r.getMessage() for r in caplog.records if "event=failed" in r.getMessage()]
    assert len(failed) == 1
    assert f"queue_id={queue_id}" in failed[0] and "5.1.1" in failed[0]


async def test_message_older_than_max_age_expires_with_4_4_7(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    await commit(spool)
    config = queue_config(tmp_path, retry=(60.0,), max_age=150.0)
    hooks = FakeHooks(always(DeliveryOutcome.temporary(DEFERRED)))
    async with running(QueueRunner(spool, hooks, config, clock=clock)):
        await hooks.wait_results(4)
    assert [t for _, _, t in hooks.attempts] == [0.0, 60.0, 120.0, 180.0]
    kinds = [o.kind for _, _, o in hooks.results]
    assert kinds == [OutcomeKind.TEMPORARY] * 3 + [OutcomeKind.PERMANENT]
    final = hooks.results[-1][2].reply
    assert (final.code, final.status) == (451, "4.4.7")
    assert "4.4.1 Try later" in final.text
    assert await spool.queued_ids() == []


async def test_recipient_no_plugin_took_is_deferred_with_451(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool)

    class Nobody(FakeHooks):
        async def deliver(
            self, envelope: Envelope, message: MessageHandle, recipients: tuple[Recipient, ...]
        ) -> Mapping[str, DeliveryOutcome]:
            await super().deliver(envelope, message, recipients)
            return {}

    hooks = Nobody(always(DeliveryOutcome.delivered()))
    async with running(QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)):
        await hooks.wait_results(1)
    outcome = hooks.results[0][2]
    assert (outcome.kind, outcome.reply.code, outcome.reply.status) == (
        OutcomeKind.TEMPORARY,
        451,
        "4.3.0",
    )
    assert await spool.queued_ids() == [queue_id]


async def test_crashing_hook_does_not_stop_the_runner(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    await commit(spool)
    calls = 0

    def answer(_r: Recipient) -> DeliveryOutcome:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("plugin bug")
        return DeliveryOutcome.delivered()

    hooks = FakeHooks(answer)
    async with running(QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)):
        await hooks.wait_results(2)
    assert [o.kind for _, _, o in hooks.results] == [OutcomeKind.TEMPORARY, OutcomeKind.DELIVERED]
    assert hooks.attempts[1][2] == retry_delay(QueueConfig(dir=tmp_path).retry, 1)
    assert await spool.queued_ids() == []


async def test_at_most_max_parallel_deliveries_run_at_once(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    ids = [await commit(spool) for _ in range(5)]
    gate = trio.Event()
    hooks = FakeHooks(always(DeliveryOutcome.delivered()), gate=gate)
    runner = QueueRunner(spool, hooks, queue_config(tmp_path, max_parallel=2), clock=clock)
    async with running(runner):
        await hooks.wait_attempts(2)
        await trio.testing.wait_all_tasks_blocked()
        assert len(hooks.attempts) == 2  # the other three wait for a free slot
        assert len(runner.in_flight) == 2
        gate.set()
        await hooks.wait_results(5)
    assert hooks.max_active == 2
    assert sorted(q for q, _, _ in hooks.attempts) == sorted(ids)
    assert await spool.queued_ids() == []


async def test_notify_wakes_the_idle_runner_at_once(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    hooks = FakeHooks(always(DeliveryOutcome.delivered()))
    runner = QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)
    async with running(runner):
        await trio.sleep(3600)  # the runner idles with an empty queue
        queue_id = await commit(spool)
        runner.notify(queue_id)
        await hooks.wait_results(1)
    assert hooks.attempts == [(queue_id, ("b@example.net",), 3600.0)]


async def test_notify_during_an_attempt_never_runs_the_message_twice_at_once(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    hooks = FakeHooks(always(DeliveryOutcome.temporary(DEFERRED)), duration=10.0)
    runner = QueueRunner(spool, hooks, queue_config(tmp_path, retry=(600.0,)), clock=clock)
    async with running(runner):
        await hooks.delivering.wait()
        assert runner.in_flight == {queue_id}
        for _ in range(3):
            runner.notify(queue_id)
        await hooks.wait_results(2)
    assert hooks.max_active_per_message == 1
    # Re-run right after the attempt in flight, not 600 s later.
    assert [t for _, _, t in hooks.attempts] == [0.0, 10.0]


async def test_restarted_runner_resumes_the_schedule_from_the_spool(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    config = queue_config(tmp_path, retry=(300.0,))
    first = FakeHooks(always(DeliveryOutcome.temporary(DEFERRED)))
    async with running(QueueRunner(spool, first, config, clock=clock)):
        await first.wait_results(1)
    assert trio.current_time() == 0.0

    restarted_spool = Spool(spool.directory, clock=clock)
    second = FakeHooks(always(DeliveryOutcome.delivered()))
    async with running(QueueRunner(restarted_spool, second, config, clock=clock)):
        await second.wait_results(1)
    assert second.attempts == [(queue_id, ("b@example.net",), 300.0)]
    assert second.results[0][1].attempts == 2
    assert await restarted_spool.queued_ids() == []


async def test_sidecars_with_nan_or_infinity_are_moved_aside_and_the_rest_is_delivered(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    good = await commit(spool)
    broken = [await commit(spool), await commit(spool)]
    for queue_id, word in zip(broken, ("NaN", "Infinity"), strict=True):
        path = spool.directory / "env" / f"{queue_id}.json"
        sidecar = json.loads(path.read_bytes())
        sidecar["next_attempt"] = "@@"
        path.write_text(json.dumps(sidecar).replace('"@@"', word))
    hooks = FakeHooks(always(DeliveryOutcome.delivered()))
    async with running(QueueRunner(Spool(spool.directory, clock=clock), hooks,
                                   queue_config(tmp_path), clock=clock)):
        await hooks.wait_results(1)
    assert [q for q, _, _ in hooks.attempts] == [good]
    corrupt = sorted(p.name for p in (spool.directory / "corrupt").iterdir())
    assert corrupt == sorted([*broken, *(f"{q}.json" for q in broken)])
    assert await spool.queued_ids() == []


async def test_start_up_reads_each_sidecar_once(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await spool.recover()
    ids = [await commit(spool) for _ in range(5)]
    for queue_id in ids:  # all deferred for an hour: start-up is the only reader
        record = await spool.load_record(queue_id)
        await spool.save(replace(record, next_attempt=T0 + 3600))
    reads: list[str] = []
    restarted = Spool(spool.directory, clock=clock)
    real = restarted._read_record_sync

    def counting(queue_id: str) -> object:
        reads.append(queue_id)
        return real(queue_id)

    monkeypatch.setattr(restarted, "_read_record_sync", counting)
    hooks = FakeHooks(always(DeliveryOutcome.delivered()))
    async with running(QueueRunner(restarted, hooks, queue_config(tmp_path), clock=clock)):
        await trio.sleep(3000)
        assert sorted(reads) == sorted(ids)  # recovery read each once; nothing else did
        await hooks.wait_results(5)
    assert trio.current_time() == 3600.0


async def test_held_message_is_never_attempted(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    held = await commit(spool)
    await spool.save(replace(await spool.load_record(held), held=True))
    other = await commit(spool)
    hooks = FakeHooks(always(DeliveryOutcome.delivered()))
    runner = QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)
    async with running(runner):
        await hooks.wait_results(1)
        runner.notify(held)  # even a flush does not deliver a held message
        await trio.sleep(7 * 86400)
    assert [q for q, _, _ in hooks.attempts] == [other]
    assert await spool.queued_ids() == [held]
