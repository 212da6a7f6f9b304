"""The queue runner: hands committed messages to the delivery hooks and keeps their state.

One attempt on a message: load it, call ``deliver`` with the recipients still pending, then
record each outcome (:mod:`._outcomes`). Recipients that failed in the attempt are reported
to the sender in one bounce, queued durably *before* the message's own state is updated, so
a crash in between repeats the bounce rather than losing it (at-least-once); those delivered
and asking for it (``NOTIFY=SUCCESS``) in one success report, the same way. Each recipient's
``NOTIFY`` decides which reports list it (:mod:`._reports`). The new state is
written atomically, or the message is removed once nothing is pending, and only then are the
``delivery_result`` observers told. Delivery is at-least-once: a crash between ``deliver`` and
the state update repeats that one attempt.

Attempts run concurrently up to ``[queue] max_parallel``; one message is never attempted
twice at once, and a hung delivery holds one slot only (the hook deadline still ends it).
Due times live in a heap (:class:`.schedule.DueTimes`), so a wake-up costs O(log n) however
full the queue is; held messages are not in it. :meth:`QueueRunner.notify` wakes the runner
for a message that was just committed; :meth:`QueueRunner.exclusive` keeps it off a message
while an operator command changes it. :meth:`QueueRunner.stop` ends the runner gracefully:
attempts in flight may finish and record their outcome within a grace period.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from .._logfmt import logfmt
from ..config import QueueConfig
from ..errors import SpoolError
from ..message import MessageHandle
from ..protocol._replies import Reply
from ..views import DeliveryOutcome, Envelope, Recipient
from ._outcomes import AttemptResult, apply_outcomes
from ._records import QueuedMessage, QueueRecord, RecipientState
from ._reports import Reporter
from .schedule import DueTimes, retry_delay
from .spool import QueueEntryCorrupt, QueueEntryMissing, Spool

__all__ = ["DELETED_REPLY", "MAX_IDLE_SLEEP", "DeliveryHooks", "QueueRunner"]

log = logging.getLogger("submitd.queue")

#: The runner re-reads the wall clock at least this often (seconds), so a clock step or a
#: suspended machine cannot make it oversleep a due message by much.
MAX_IDLE_SLEEP = 60.0

#: How long start-up waits for the spool lock held by someone else: long enough for an
#: operator command on a stopped server, short enough to refuse a second server promptly.
LOCK_WAIT = 3.0

#: How many just-committed messages the spool keeps in memory for their first load
#: (only those with a small header section; the oldest go first).
_REMEMBERED_COMMITS = 256

#: What the sender's bounce says for recipients of a message an operator deleted.
DELETED_REPLY = Reply.make(550, "5.0.0", "Deleted from the queue by the postmaster")


class DeliveryHooks(Protocol):
    """What the runner calls to deliver; the server implements it on top of pluggy."""

    async def deliver(
        self, envelope: Envelope, message: MessageHandle, recipients: tuple[Recipient, ...]
    ) -> Mapping[str, DeliveryOutcome]:
        """Deliver to ``recipients``; return an outcome per address. Never raises."""
        ...

    async def delivery_result(
        self, envelope: Envelope, recipient: Recipient, outcome: DeliveryOutcome
    ) -> None:
        """Tell the observers how one recipient's attempt ended."""
        ...


@dataclass(kw_only=True)
class _Claim:
    """Operator commands holding a message (:meth:`QueueRunner.exclusive`)."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0
    flushed: bool = False  # notify() arrived meanwhile: due at once when released


class QueueRunner:
    """Deliver what is in ``spool`` through ``hooks``, retrying on ``config``'s schedule.

    At most ``config.max_parallel`` attempts run at once. ``hostname`` is this server's
    name (``Reporting-MTA`` and ``MAILER-DAEMON@`` of its reports); reports include the
    original header section as the spool read it (``Spool(max_header_size=...)``, the same
    ``[limits]`` as the session). ``clock`` returns wall-clock seconds (the spool stores
    wall-clock times); tests inject one tied to trio's clock. Start :meth:`run` in a nursery
    with ``nursery.start``.
    """

    def __init__(
        self,
        spool: Spool,
        hooks: DeliveryHooks,
        config: QueueConfig,
        *,
        hostname: str = "localhost",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config.max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self._spool = spool
        # Each message is loaded right after its commit: keep it in memory for that load.
        spool.remember_commits(_REMEMBERED_COMMITS)
        self._hooks = hooks
        self._config = config
        self._max_parallel = config.max_parallel
        self._clock = clock
        self._reporter = Reporter(spool, config, hostname, clock)
        self._due = DueTimes()  # queue ID -> wall-clock due time (not in flight, not held)
        self._held: set[str] = set()
        self._in_flight: dict[str, trio.Event] = {}  # set when that attempt has finished
        self._renotified: set[str] = set()
        self._claims: dict[str, _Claim] = {}
        self._wakeup = trio.Event()
        self._stopping = False
        self._stop_at = math.inf  # trio time after which attempts in flight are abandoned
        self._grace_scope: trio.CancelScope | None = None  # while waiting for them to finish

    # --- scheduling ---------------------------------------------------------------------------

    def notify(self, queue_id: str) -> None:
        """Deliver ``queue_id`` now (it was just committed, or an operator flushed it).

        Synchronous and non-blocking; call it from the trio thread. A message already being
        attempted is attempted again right after; a held message stays held.
        """
        claim = self._claims.get(queue_id)
        if claim is not None:
            claim.flushed = True
        elif queue_id in self._in_flight:
            self._renotified.add(queue_id)
        else:
            self._held.discard(queue_id)  # the attempt re-reads it: still held, no delivery
            self._due.set(queue_id, -math.inf)
        self._wakeup.set()

    def flush_all(self) -> None:
        """Make every queued message that is not held due now (``queue flush``)."""
        for queue_id in self._due.ids():
            self._due.set(queue_id, -math.inf)
        self._renotified.update(self._in_flight)
        for claim in self._claims.values():
            claim.flushed = True
        self._wakeup.set()

    @property
    def in_flight(self) -> frozenset[str]:
        """The queue IDs being attempted right now."""
        return frozenset(self._in_flight)

    @property
    def held(self) -> frozenset[str]:
        """The queue IDs known to be held."""
        return frozenset(self._held)

    def _schedule(self, queue_id: str, due: float) -> None:
        """Put ``queue_id`` on the schedule at ``due`` (``math.inf``: held, off the schedule)."""
        if due == math.inf:
            self._due.discard(queue_id)
            self._held.add(queue_id)
            return
        self._held.discard(queue_id)
        current = self._due.due(queue_id)
        self._due.set(queue_id, due if current is None else min(due, current))

    def _forget(self, queue_id: str) -> None:
        self._due.discard(queue_id)
        self._held.discard(queue_id)
        self._renotified.discard(queue_id)

    # --- operator commands --------------------------------------------------------------------

    @asynccontextmanager
    async def exclusive(self, queue_id: str) -> AsyncIterator[QueueRecord]:
        """Keep the runner off ``queue_id`` for the ``async with`` block; yield its record.

        Waits for an attempt on it in flight to finish (and record its outcome) first. On
        exit the sidecar is read again and the message rescheduled, held, or forgotten if it
        was removed. Raises :class:`QueueEntryMissing` for an unknown ID.
        """
        claim = self._claims.setdefault(queue_id, _Claim())
        claim.users += 1
        try:
            async with claim.lock:
                while (done := self._in_flight.get(queue_id)) is not None:
                    await done.wait()
                try:
                    yield await self._spool.load_record(queue_id)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._reread(queue_id, flushed=claim.flushed)
                    claim.flushed = False
        finally:
            claim.users -= 1
            if claim.users == 0:
                del self._claims[queue_id]

    async def _reread(self, queue_id: str, *, flushed: bool) -> None:
        self._forget(queue_id)
        try:
            record = await self._spool.load_record(queue_id)
        except QueueEntryMissing:
            return
        except SpoolError:
            self._due.set(queue_id, -math.inf)  # the attempt moves it aside or retries
        else:
            if record.held:
                self._held.add(queue_id)
            else:
                self._due.set(queue_id, -math.inf if flushed else record.next_attempt)
        self._wakeup.set()

    async def hold(self, queue_id: str) -> None:
        """Keep ``queue_id`` from being attempted until :meth:`release` (durable)."""
        async with self.exclusive(queue_id) as record:
            if not record.held:
                await self._spool.save(replace(record, held=True))
        log.info(logfmt("held", queue_id=queue_id))

    async def release(self, queue_id: str) -> None:
        """Let a held ``queue_id`` be attempted again, at its next due time."""
        async with self.exclusive(queue_id) as record:
            if record.held:
                await self._spool.save(replace(record, held=False))
        log.info(logfmt("released", queue_id=queue_id))

    async def delete(self, queue_id: str, *, bounce: bool) -> str | None:
        """Remove ``queue_id`` from the queue; return the queue ID of its bounce, if any.

        With ``bounce`` the sender gets one report listing every pending recipient as
        failed (``550 5.0.0``), queued before the message is removed; without, nobody is told.
        """
        report_id = None
        async with self.exclusive(queue_id) as record:
            if bounce and record.pending:
                queued = await self._spool.load(queue_id)
                failed = [(r, DeliveryOutcome.permanent(DELETED_REPLY)) for r in record.pending]
                report_id = await self._reporter.bounce(
                    record, queued.header_section, failed, self._clock(),
                    message=queued.message,
                )
            await self._spool.remove(queue_id)
        log.info(logfmt("deleted", queue_id=queue_id, report_id=report_id))
        if report_id is not None:
            self.notify(report_id)
        return report_id

    # --- running ------------------------------------------------------------------------------

    def stop(self, grace: float = 0.0) -> None:
        """Stop starting attempts; :meth:`run` returns once those in flight have finished.

        Attempts still running ``grace`` seconds from now are cancelled and logged as
        ``attempt_abandoned`` (their message is attempted again after a restart). A second
        call may only shorten the grace (a second SIGTERM: stop now).
        """
        self._stopping = True
        self._stop_at = min(self._stop_at, trio.current_time() + grace)
        if self._grace_scope is not None:
            self._grace_scope.deadline = self._stop_at
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Lock and recover the spool, report started, then deliver until :meth:`stop`.

        Raises :class:`SpoolLocked` when another process works on the spool. The lock is
        released when this returns.
        """
        await self._spool.lock(wait=LOCK_WAIT)
        try:
            recovered = await self._spool.recover_due()
            for queue_id, due in recovered.items():
                self._schedule(queue_id, due)
            log.info(logfmt("queue_runner_started", queued=len(recovered), held=len(self._held),
                            max_parallel=self._max_parallel))
            async with trio.open_nursery() as nursery:
                task_status.started()
                while not self._stopping:
                    # A fresh event before looking at the schedule: a notify() from here on
                    # (there is no checkpoint in between) wakes the wait below.
                    self._wakeup = trio.Event()
                    self._start_due(nursery)
                    with trio.move_on_after(self._idle_time()):
                        await self._wakeup.wait()
                await self._wind_down(nursery)
        finally:
            self._spool.unlock()
        log.info(logfmt("queue_runner_stopped"))

    async def _wind_down(self, nursery: trio.Nursery) -> None:
        if self._in_flight:
            log.info(logfmt("queue_runner_stopping", in_flight=len(self._in_flight)))
        with trio.move_on_at(self._stop_at) as self._grace_scope:
            while self._in_flight:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
        nursery.cancel_scope.cancel()  # each attempt still delivering logs attempt_abandoned

    def _start_due(self, nursery: trio.Nursery) -> None:
        now = self._clock()
        while len(self._in_flight) < self._max_parallel:
            queue_id = self._due.pop_due(now)
            if queue_id is None:
                break
            claim = self._claims.get(queue_id)
            if claim is not None:
                claim.flushed = True  # rescheduled when the operator command ends
                continue
            self._in_flight[queue_id] = trio.Event()
            nursery.start_soon(self._attempt_guarded, queue_id)

    def _idle_time(self) -> float:
        earliest = self._due.earliest()
        if len(self._in_flight) >= self._max_parallel or earliest is None:
            # Nothing can start before a finishing attempt or notify() wakes us. No timer
            # here also keeps trio's autojump clock from leaping while disk I/O runs in a
            # worker thread.
            return math.inf
        return min(max(earliest - self._clock(), 0.0), MAX_IDLE_SLEEP)

    async def _attempt_guarded(self, queue_id: str) -> None:
        due: float | None = None
        try:
            due = await self._attempt(queue_id)
        except Exception:
            # A bug must not stop the runner or lose the message: log, try again later.
            log.exception(logfmt("attempt_crashed", queue_id=queue_id))
            due = self._clock() + retry_delay(self._config.retry, 1)
        finally:
            self._in_flight.pop(queue_id).set()
            if queue_id in self._renotified:
                self._renotified.discard(queue_id)
                if due is not None and due != math.inf:
                    due = -math.inf
            if due is not None:
                self._schedule(queue_id, due)
            self._wakeup.set()

    # --- one attempt --------------------------------------------------------------------------

    async def _attempt(self, queue_id: str) -> float | None:
        """Make one delivery attempt; return when the message is due next (None: gone)."""
        try:
            queued = await self._spool.load(queue_id)
        except QueueEntryMissing:
            log.info(logfmt("dequeued", queue_id=queue_id, reason="no longer in the spool"))
            return None
        except QueueEntryCorrupt as exc:
            await self._spool.quarantine(queue_id, str(exc))
            return None
        except SpoolError as exc:
            log.error(logfmt("load_failed", queue_id=queue_id, error=exc))
            return self._clock() + retry_delay(self._config.retry, 1)
        record = queued.record
        if record.held:
            return math.inf
        pending = record.pending
        if not pending:
            await self._spool.remove(queue_id)
            return None
        envelope = record.envelope
        targets = tuple({r.address: r.view() for r in pending}.values())
        if log.isEnabledFor(logging.DEBUG):
            log.debug(logfmt("attempt", queue_id=queue_id, nrcpt=len(targets),
                             attempt=pending[0].attempts + 1))
        try:
            outcomes = await self._hooks.deliver(envelope, queued.message, targets)
        except trio.Cancelled:
            # Shutdown ran out of grace: the outcome is unknown, so the message stays as it
            # was and is attempted again after a restart.
            log.warning(logfmt("attempt_abandoned", queue_id=queue_id, nrcpt=len(targets)))
            raise
        except Exception:
            log.exception(logfmt("deliver_failed", queue_id=queue_id))
            outcomes = {}
        # Shielded: once delivery happened, cancelling before the state is written would
        # widen the duplicate window beyond the attempt in flight.
        with trio.CancelScope(shield=True):
            now = self._clock()
            result = await self._report(queued, apply_outcomes(self._config, record, outcomes,
                                                               now), now)
            due = await self._persist(result.record, now)
        for recipient, outcome in result.results:
            try:
                await self._hooks.delivery_result(envelope, recipient, outcome)
            except Exception:
                log.exception(logfmt("delivery_result_failed", queue_id=queue_id))
        return due

    async def _report(self, queued: QueuedMessage, result: AttemptResult,
                      now: float) -> AttemptResult:
        """Queue the reports this attempt calls for (failure, success, delay), before its state.

        If a bounce cannot be queued, its recipients stay pending (retried soon, and
        reported then): the sender is never left untold. A success report that cannot be
        queued is logged and dropped (delivering again to report it would duplicate mail).
        """
        record = result.record
        if result.failed:
            try:
                report_id = await self._reporter.bounce(
                    record, queued.header_section, result.failed, now, message=queued.message
                )
            except SpoolError as exc:
                log.error(logfmt("report_failed", queue_id=record.queue_id, error=exc))
                retry_at = now + retry_delay(self._config.retry, 1)
                failed = {r.address for r, _ in result.failed}
                recipients = tuple(
                    replace(r, state=RecipientState.PENDING, next_attempt=retry_at)
                    if r.address in failed else r
                    for r in record.recipients
                )
                record = replace(record, recipients=recipients)
                record = replace(record, next_attempt=min(r.next_attempt for r in record.pending))
            else:
                if report_id is not None:
                    self.notify(report_id)
        if result.delivered:
            try:
                report_id = await self._reporter.success(
                    record, queued.header_section, result.delivered, now
                )
            except SpoolError as exc:
                log.error(logfmt("report_failed", queue_id=record.queue_id, error=exc))
            else:
                if report_id is not None:
                    self.notify(report_id)
        if self._reporter.wants_delay_warning(record, now):
            try:
                report_id = await self._reporter.delay_warning(
                    record, queued.header_section, now
                )
            except SpoolError as exc:
                log.error(logfmt("report_failed", queue_id=record.queue_id, error=exc))
            else:
                record = replace(record, delay_warned=True)
                if report_id is not None:
                    self.notify(report_id)
        return replace(result, record=record)

    async def _persist(self, record: QueueRecord, now: float) -> float | None:
        try:
            if record.pending:
                await self._spool.save(record)
                return record.next_attempt
            await self._spool.remove(record.queue_id)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(logfmt("removed", queue_id=record.queue_id))
        except QueueEntryMissing:
            log.info(logfmt("dequeued", queue_id=record.queue_id, reason="removed meanwhile"))
        except SpoolError as exc:
            # The old state stays on disk: recipients delivered now will be again later.
            log.error(logfmt("state_update_failed", queue_id=record.queue_id, error=exc))
            return now + retry_delay(self._config.retry, 1)
        return None
