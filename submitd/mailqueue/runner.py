"""The queue runner: hands committed messages to the delivery hooks and keeps their state.

One attempt on a message: load it, call ``deliver`` with the recipients still pending, then
record each outcome (:mod:`._outcomes`). The new state is written atomically, or the message
is removed once nothing is pending, and only then are the ``delivery_result`` observers told.
Delivery is at-least-once: a crash between ``deliver`` and the state update repeats that one
attempt.

Attempts run concurrently up to ``[queue] max_parallel``; one message is never attempted
twice at once. Due times live in a heap (:class:`.schedule.DueTimes`), so a wake-up costs
O(log n) however full the queue is; held messages are not in it. Between attempts the runner
sleeps until the next due time; :meth:`QueueRunner.notify` wakes it for a message that was
just committed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import trio

from .._logfmt import logfmt
from ..config import QueueConfig
from ..errors import SpoolError
from ..message import MessageHandle
from ..protocol._replies import Reply
from ..views import DeliveryOutcome, Envelope, Recipient
from ._outcomes import apply_outcomes
from ._records import QueueRecord
from .schedule import DueTimes, retry_delay
from .spool import QueueEntryCorrupt, QueueEntryMissing, Spool

__all__ = ["MAX_IDLE_SLEEP", "DeliveryHooks", "QueueRunner"]

log = logging.getLogger("submitd.queue")

#: The runner re-reads the wall clock at least this often (seconds), so a clock step or a
#: suspended machine cannot make it oversleep a due message by much.
MAX_IDLE_SLEEP = 60.0

_HOOK_FAILED = DeliveryOutcome.temporary(Reply.make(451, "4.3.0", "Delivery failed"))


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


class QueueRunner:
    """Deliver what is in ``spool`` through ``hooks``, retrying on ``config``'s schedule.

    At most ``config.max_parallel`` attempts run at once. ``hostname`` is this server's
    name (``Reporting-MTA`` of its reports). ``clock`` returns wall-clock seconds (the spool
    stores wall-clock times); tests inject one tied to trio's clock. Start :meth:`run` in a
    nursery with ``nursery.start``.
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
        self._hooks = hooks
        self._config = config
        self._hostname = hostname
        self._max_parallel = config.max_parallel
        self._clock = clock
        self._due = DueTimes()  # queue ID -> wall-clock due time (not in flight, not held)
        self._held: set[str] = set()
        self._in_flight: set[str] = set()
        self._renotified: set[str] = set()
        self._wakeup = trio.Event()

    def notify(self, queue_id: str) -> None:
        """Deliver ``queue_id`` now (it was just committed, or an operator flushed it).

        Synchronous and non-blocking; call it from the trio thread. A message already being
        attempted is attempted again right after.
        """
        if queue_id in self._in_flight:
            self._renotified.add(queue_id)
        else:
            self._held.discard(queue_id)  # the attempt re-reads it: still held, no delivery
            self._due.set(queue_id, -math.inf)
        self._wakeup.set()

    @property
    def in_flight(self) -> frozenset[str]:
        """The queue IDs being attempted right now."""
        return frozenset(self._in_flight)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover the spool, report started, then deliver until cancelled."""
        recovered = await self._spool.recover_due()
        for queue_id, due in recovered.items():
            self._schedule(queue_id, due)
        log.info(logfmt("queue_runner_started", queued=len(recovered), held=len(self._held),
                        max_parallel=self._max_parallel))
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                # A fresh event before looking at the schedule: a notify() from here on
                # (there is no checkpoint in between) wakes the wait below.
                self._wakeup = trio.Event()
                self._start_due(nursery)
                with trio.move_on_after(self._idle_time()):
                    await self._wakeup.wait()

    def _schedule(self, queue_id: str, due: float) -> None:
        """Put ``queue_id`` on the schedule at ``due`` (``math.inf``: held, off the schedule)."""
        if due == math.inf:
            self._due.discard(queue_id)
            self._held.add(queue_id)
            return
        self._held.discard(queue_id)
        current = self._due.due(queue_id)
        self._due.set(queue_id, due if current is None else min(due, current))

    def _start_due(self, nursery: trio.Nursery) -> None:
        now = self._clock()
        while len(self._in_flight) < self._max_parallel:
            queue_id = self._due.pop_due(now)
            if queue_id is None:
                break
            self._in_flight.add(queue_id)
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
            self._in_flight.discard(queue_id)
            if queue_id in self._renotified:
                self._renotified.discard(queue_id)
                if due is not None:
                    due = -math.inf
            if due is not None:
                self._schedule(queue_id, due)
            self._wakeup.set()

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
            log.info(logfmt("held", queue_id=queue_id))
            return math.inf
        pending = record.pending
        if not pending:
            await self._spool.remove(queue_id)
            return None
        envelope = record.envelope
        targets = tuple({r.address: r.view() for r in pending}.values())
        log.debug(
            logfmt(
                "attempt", queue_id=queue_id, nrcpt=len(targets), attempt=pending[0].attempts + 1
            )
        )
        try:
            outcomes = await self._hooks.deliver(envelope, queued.message, targets)
        except Exception:
            log.exception(logfmt("deliver_failed", queue_id=queue_id))
            outcomes = {}
        # Shielded: once delivery happened, cancelling before the state is written would
        # widen the duplicate window beyond the attempt in flight.
        with trio.CancelScope(shield=True):
            now = self._clock()
            result = apply_outcomes(self._config, record, outcomes, now)
            due = await self._persist(result.record, now)
        for recipient, outcome in result.results:
            try:
                await self._hooks.delivery_result(envelope, recipient, outcome)
            except Exception:
                log.exception(logfmt("delivery_result_failed", queue_id=queue_id))
        return due

    async def _persist(self, record: QueueRecord, now: float) -> float | None:
        try:
            if record.pending:
                await self._spool.save(record)
                return record.next_attempt
            await self._spool.remove(record.queue_id)
            log.debug(logfmt("removed", queue_id=record.queue_id))
        except QueueEntryMissing:
            log.info(logfmt("dequeued", queue_id=record.queue_id, reason="removed meanwhile"))
        except SpoolError as exc:
            # The old state stays on disk: recipients delivered now will be again later.
            log.error(logfmt("state_update_failed", queue_id=record.queue_id, error=exc))
            return now + retry_delay(self._config.retry, 1)
        return None
