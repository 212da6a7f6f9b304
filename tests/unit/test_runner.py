"""The queue runner: delivers, retries on schedule, gives up, and never runs a message twice."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from submitd import DeliveryOutcome, Envelope, MailParams, MessageHandle, OutcomeKind, Recipient
from submitd.config import QueueConfig
from submitd.errors import SpoolError
from submitd.mailqueue import (
    QueueEntryMissing,
    QueueRunner,
    RecipientState,
    Spool,
    SpoolLocked,
    retry_delay,
)
from submitd.protocol._replies import Reply
from tests.unit.test_dsn import parse_report

T0 = 1_700_000_000.0
SENDER = "a@example.org"
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
DEFERRED = Reply.make(451, "4.4.1", "Try later")
REFUSED = Reply.make(550, "5.1.1", "No such user")

Answer = Callable[[Recipient], DeliveryOutcome]


def clock() -> float:
    """Wall-clock time that moves with trio's (autojump) clock."""
    return T0 + trio.current_time()


def always(outcome: DeliveryOutcome) -> Answer:
    return lambda _recipient: outcome


def for_recipients(outcome: DeliveryOutcome, *addresses: str) -> Answer:
    """``outcome`` for ``addresses`` (default: every b@/c@ recipient); others are delivered.

    The sender, a@example.org, is where reports go: they are delivered.
    """
    def answer(recipient: Recipient) -> DeliveryOutcome:
        if recipient.address in addresses or (not addresses and recipient.address != SENDER):
            return outcome
        return DeliveryOutcome.delivered()
    return answer


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
        self.envelopes: dict[str, Envelope] = {}
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
        self.envelopes[queue_id] = envelope
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
    hooks = FakeHooks(for_recipients(DeliveryOutcome.permanent(REFUSED)))
    with caplog.at_level(logging.INFO, logger="submitd.queue"):
        async with running(QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)):
            await hooks.wait_results(2)  # the failure, then the bounce to the sender
    ((_, recipient, outcome),) = [r for r in hooks.results if r[0] == queue_id]
    ((bounce_id, to_sender, _),) = [r for r in hooks.results if r[0] != queue_id]
    assert to_sender.address == SENDER and hooks.envelopes[bounce_id].sender == ""
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
    hooks = FakeHooks(for_recipients(DeliveryOutcome.temporary(DEFERRED)))
    async with running(QueueRunner(spool, hooks, config, clock=clock)):
        await hooks.wait_results(5)  # four attempts, then the bounce
    assert [t for _, _, t in hooks.attempts] == [0.0, 60.0, 120.0, 180.0, 180.0]
    original = [o for _, r, o in hooks.results if r.address != SENDER]
    assert [o.kind for o in original] == [OutcomeKind.TEMPORARY] * 3 + [OutcomeKind.PERMANENT]
    final = original[-1].reply
    report = parse_report(hooks.bodies[-1])
    assert report.recipients[0]["Status"] == "4.4.7"
    assert report.recipients[0]["Action"] == "failed"
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


# --- bounces and delay warnings -------------------------------------------------------------


async def test_recipients_failing_in_one_attempt_get_one_bounce_to_the_sender(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool, "b@example.net", "ok@example.net", "c@example.net")

    def answer(r: Recipient) -> DeliveryOutcome:
        if r.address == "c@example.net":
            return DeliveryOutcome.permanent(Reply.make(552, "5.2.2", "Full"))
        if r.address == "b@example.net":
            return DeliveryOutcome.permanent(REFUSED, remote="mx.example.net")
        return DeliveryOutcome.delivered()

    hooks = FakeHooks(answer)
    async with running(QueueRunner(spool, hooks, queue_config(tmp_path), hostname="mx.test",
                                   clock=clock)):
        await hooks.wait_results(4)  # three recipients, then the one bounce
    (bounce_id, rcpts, _) = hooks.attempts[1]
    assert rcpts == (SENDER,) and hooks.envelopes[bounce_id].sender == ""
    report = parse_report(hooks.bodies[1])
    assert report.message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.test"
    assert report.per_message["Reporting-MTA"] == "dns; mx.test"
    assert report.per_message["X-Submitd-Queue-ID"] == queue_id
    assert [(r["Final-Recipient"], r["Status"], r["Remote-MTA"]) for r in report.recipients] == [
        ("rfc822; b@example.net", "5.1.1", "dns; mx.example.net"),
        ("rfc822; c@example.net", "5.2.2", None),
    ]
    assert "Subject: hi" in report.headers
    assert await spool.queued_ids() == []


async def test_bounce_is_committed_before_the_message_state_changes(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    steps: list[str] = []
    real_enqueue, real_remove = spool.enqueue, spool.remove

    async def enqueue(*args: object, **kwargs: object) -> str:
        report_id = await real_enqueue(*args, **kwargs)  # type: ignore[arg-type]
        steps.append(f"bounce queued {report_id}")
        return report_id

    async def remove(qid: str) -> None:
        steps.append(f"removed {qid}")
        await real_remove(qid)

    monkeypatch.setattr(spool, "enqueue", enqueue)
    monkeypatch.setattr(spool, "remove", remove)
    hooks = FakeHooks(for_recipients(DeliveryOutcome.permanent(REFUSED)))
    async with running(QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)):
        await hooks.wait_results(2)
    bounce_id = hooks.attempts[1][0]
    assert steps[:2] == [f"bounce queued {bounce_id}", f"removed {queue_id}"]


async def test_bounce_that_cannot_be_queued_keeps_the_recipient_pending(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    real_enqueue = spool.enqueue
    failures = [SpoolError("disk full")]

    async def enqueue(*args: object, **kwargs: object) -> str:
        if failures:
            raise failures.pop()
        return await real_enqueue(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(spool, "enqueue", enqueue)
    hooks = FakeHooks(for_recipients(DeliveryOutcome.permanent(REFUSED)))
    async with running(QueueRunner(spool, hooks, queue_config(tmp_path, retry=(60.0,)),
                                   clock=clock)):
        await hooks.wait_results(1)
        assert await spool.queued_ids() == [queue_id]  # not failed silently
        await hooks.wait_results(3)  # tried again a minute later, then the bounce went out
    assert [t for _, _, t in hooks.attempts] == [0.0, 60.0, 60.0]
    assert hooks.attempts[2][1] == (SENDER,)
    assert await spool.queued_ids() == []


async def test_failed_bounce_is_dropped_never_bounced(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    await spool.recover()
    incoming = await spool.open_incoming()
    await incoming.write(MESSAGE)
    handle = await incoming.finish(max_header_size=65536)
    null_sender = Envelope(sender="", recipients=(Recipient(address="a@example.org"),),
                           params=MailParams(), username=None)
    await incoming.commit(null_sender, handle, session_info={})
    hooks = FakeHooks(always(DeliveryOutcome.permanent(REFUSED)))
    with caplog.at_level(logging.INFO, logger="submitd.queue"):
        async with running(QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)):
            await hooks.wait_results(1)
            await trio.sleep(3600)
    assert len(hooks.attempts) == 1
    assert await spool.queued_ids() == []
    assert any("event=report_not_sent" in r.getMessage() for r in caplog.records)


async def test_delay_warning_is_sent_once_when_a_message_waits_too_long(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    config = queue_config(tmp_path, retry=(60.0,), delay_warning=100.0, max_age=86400.0)
    hooks = FakeHooks(for_recipients(DeliveryOutcome.temporary(DEFERRED, remote="mx.b.example")))
    async with running(QueueRunner(spool, hooks, config, clock=clock)):
        await hooks.wait_results(6)
    to_sender = [q for q, rcpts, _ in hooks.attempts if rcpts == (SENDER,)]
    assert len(to_sender) == 1  # once, however many attempts follow
    report = parse_report(hooks.bodies[[q for q, _, _ in hooks.attempts].index(to_sender[0])])
    assert report.message["Subject"] == "Delayed Mail (still being retried)"
    # Written at the first attempt after 100 s in the queue.
    first_late = min(t for _, rcpts, t in hooks.attempts if rcpts != (SENDER,) and t >= 100)
    assert report.message["Date"].datetime.timestamp() == T0 + first_late
    (rcpt,) = report.recipients
    assert (rcpt["Action"], rcpt["Status"], rcpt["Remote-MTA"]) == (
        "delayed", "4.4.1", "dns; mx.b.example"
    )
    assert rcpt["Will-Retry-Until"] is not None
    record = await spool.load_record(queue_id)
    assert record.delay_warned and record.recipients[0].state is RecipientState.PENDING


async def test_hung_delivery_holds_one_slot_and_the_others_go_on(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    hung = await commit(spool, "hang@example.net")
    others = [await commit(spool) for _ in range(4)]
    never = trio.Event()

    class Hanging(FakeHooks):
        async def deliver(
            self, envelope: Envelope, message: MessageHandle, recipients: tuple[Recipient, ...]
        ) -> Mapping[str, DeliveryOutcome]:
            if envelope.queue_id == hung:
                await never.wait()
            return await super().deliver(envelope, message, recipients)

    hooks = Hanging(always(DeliveryOutcome.delivered()))
    runner = QueueRunner(spool, hooks, queue_config(tmp_path, max_parallel=2), clock=clock)
    async with running(runner):
        await hooks.wait_results(4)
        assert runner.in_flight == {hung}
    assert sorted(q for q, _, _ in hooks.attempts) == sorted(others)


# --- operator commands ----------------------------------------------------------------------


async def test_exclusive_waits_for_the_attempt_in_flight_and_keeps_the_runner_off(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    hooks = FakeHooks(always(DeliveryOutcome.temporary(DEFERRED)), duration=10.0)
    runner = QueueRunner(spool, hooks, queue_config(tmp_path, retry=(3600.0,)), clock=clock)
    async with running(runner):
        await hooks.delivering.wait()
        async with runner.exclusive(queue_id) as record:
            assert trio.current_time() >= 10.0  # the attempt finished and was recorded
            assert record.recipients[0].attempts == 1
            assert hooks.results and not runner.in_flight
            runner.notify(queue_id)  # a flush meanwhile waits for the command to end
            await trio.sleep(3600)  # past the retry time: still not attempted
            assert len(hooks.attempts) == 1
            ended = trio.current_time()
        await hooks.wait_attempts(2)
    # Right after the command, as flushed; not an hour later on the retry schedule.
    assert ended <= hooks.attempts[1][2] < ended + 3000


async def test_hold_and_release_survive_a_restart(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    queue_id = await commit(spool)
    config = queue_config(tmp_path, retry=(60.0,))
    hooks = FakeHooks(always(DeliveryOutcome.temporary(DEFERRED)))
    runner = QueueRunner(spool, hooks, config, clock=clock)
    async with running(runner):
        await hooks.wait_results(1)
        await runner.hold(queue_id)
        runner.flush_all()
        await trio.sleep(3600)
        assert runner.held == {queue_id}
    assert len(hooks.attempts) == 1
    assert (await spool.load_record(queue_id)).held

    restarted = QueueRunner(Spool(spool.directory, clock=clock), hooks, config, clock=clock)
    async with running(restarted):
        await trio.sleep(3600)
        assert len(hooks.attempts) == 1  # still held after the restart
        released_at = trio.current_time()
        await restarted.release(queue_id)
        await hooks.wait_attempts(2)  # long overdue: attempted at once
    assert hooks.attempts[1][2] == released_at
    assert not (await spool.load_record(queue_id)).held


async def test_delete_with_bounce_tells_the_sender_and_without_tells_nobody(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    config = queue_config(tmp_path, retry=(86400.0,))
    hooks = FakeHooks(for_recipients(DeliveryOutcome.temporary(DEFERRED)))
    runner = QueueRunner(spool, hooks, config, clock=clock)
    async with running(runner):
        loud, quiet = await commit(spool, "b@example.net", "c@example.net"), await commit(spool)
        runner.notify(loud)
        runner.notify(quiet)
        await hooks.wait_results(3)
        bounce_id = await runner.delete(loud, bounce=True)
        assert await runner.delete(quiet, bounce=False) is None
        await hooks.wait_results(4)  # the bounce is delivered to the sender
    index = [q for q, _, _ in hooks.attempts].index(bounce_id)
    assert hooks.attempts[index][1] == (SENDER,)
    report = parse_report(hooks.bodies[index])
    assert [(r["Final-Recipient"], r["Action"], r["Status"]) for r in report.recipients] == [
        ("rfc822; b@example.net", "failed", "5.0.0"),
        ("rfc822; c@example.net", "failed", "5.0.0"),
    ]
    assert "Deleted from the queue by the postmaster" in report.recipients[0]["Diagnostic-Code"]
    assert await spool.queued_ids() == []


async def test_operator_commands_on_an_unknown_id_raise_queue_entry_missing(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    runner = QueueRunner(spool, FakeHooks(always(DeliveryOutcome.delivered())),
                         queue_config(tmp_path), clock=clock)
    async with running(runner):
        for command in (runner.hold, runner.release):
            with pytest.raises(QueueEntryMissing):
                await command("0123456789ABCDEF")
        with pytest.raises(QueueEntryMissing):
            await runner.delete("0123456789ABCDEF", bounce=True)
        with pytest.raises(QueueEntryMissing):
            async with runner.exclusive("../../etc/passwd"):
                pass


async def test_list_records_reads_every_committed_message_once(spool: Spool) -> None:
    await spool.recover()
    ids = [await commit(spool, f"r{i}@example.net") for i in range(3)]
    listed = await spool.list_records()
    assert [q for q, _ in listed] == ids
    assert [r.recipients[0].address for _, r in listed] == [f"r{i}@example.net" for i in range(3)]


# --- one server per spool, and shutdown -----------------------------------------------------


async def test_second_runner_on_the_same_spool_refuses_and_touches_nothing(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    hooks = FakeHooks(always(DeliveryOutcome.delivered()))
    first = QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)
    async with running(first):
        incoming = await spool.open_incoming()  # a message being received by the first
        await incoming.write(MESSAGE)
        await incoming.finish(max_header_size=65536)  # its file is in tmp/ by now
        before = sorted(p.name for p in (spool.directory / "tmp").iterdir())
        second = QueueRunner(Spool(spool.directory, clock=clock), hooks, queue_config(tmp_path),
                             clock=clock)
        with pytest.raises(SpoolLocked) as info:
            await second.run()
        assert str(spool.directory) in str(info.value)
        assert f"process {os.getpid()}" in str(info.value)
        assert sorted(p.name for p in (spool.directory / "tmp").iterdir()) == before != []
        await incoming.abort()
    # Once the first has stopped, the lock is free again.
    async with running(QueueRunner(Spool(spool.directory, clock=clock), hooks,
                                   queue_config(tmp_path), clock=clock)):
        pass


async def stop_while_delivering(
    spool: Spool, tmp_path: Path, *, duration: float, stops: list[tuple[float, float]]
) -> tuple[str, FakeHooks]:
    """Queue one message, stop the runner while its attempt (``duration`` s) is in flight.

    ``stops`` are ``(wait, grace)`` pairs: sleep ``wait`` seconds, then ``runner.stop(grace)``.
    Returns when the runner has returned.
    """
    await spool.recover()
    queue_id = await commit(spool)
    hooks = FakeHooks(always(DeliveryOutcome.delivered()), duration=duration)
    runner = QueueRunner(spool, hooks, queue_config(tmp_path), clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        await hooks.delivering.wait()
        for wait, grace in stops:
            await trio.sleep(wait)
            runner.stop(grace=grace)
    return queue_id, hooks


def abandoned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "attempt_abandoned" in r.getMessage()]


async def test_stop_lets_the_attempt_in_flight_finish_and_record_its_outcome(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    queue_id, hooks = await stop_while_delivering(spool, tmp_path, duration=10.0,
                                                  stops=[(0.0, 300.0)])
    assert trio.current_time() <= 300.0
    assert [(q, r.address) for q, r, _ in hooks.results] == [(queue_id, "b@example.net")]
    assert await spool.queued_ids() == []


async def test_stop_abandons_an_attempt_that_outlasts_the_grace_and_logs_it(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="submitd.queue"):
        queue_id, hooks = await stop_while_delivering(spool, tmp_path, duration=100.0,
                                                      stops=[(0.0, 5.0)])
    assert trio.current_time() == 5.0
    assert hooks.results == []
    lines = abandoned(caplog)
    assert len(lines) == 1 and f"queue_id={queue_id}" in lines[0]
    record = await spool.load_record(queue_id)  # untouched: attempted again after a restart
    assert record.recipients[0].attempts == 0


async def test_a_second_stop_shortens_the_grace_of_the_first(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # SIGTERM gives deliveries 300 s; a second SIGTERM after 7 s means "stop now"; a later,
    # longer grace never extends it again.
    with caplog.at_level(logging.INFO, logger="submitd.queue"):
        queue_id, hooks = await stop_while_delivering(
            spool, tmp_path, duration=100.0, stops=[(0.0, 300.0), (7.0, 0.0), (0.0, 600.0)])
    assert trio.current_time() == 7.0
    assert hooks.results == []
    assert any(f"attempt_abandoned queue_id={queue_id}" in line for line in abandoned(caplog))
