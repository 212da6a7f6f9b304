"""The queue runner: hands committed messages to the delivery hooks and keeps their state.

One attempt on a message: load it, call ``deliver`` with the recipients still pending, then
record each outcome. Delivered recipients are done; a permanent refusal fails the recipient
(logged; the DSN to the sender is a later addition, DESIGN.md §8); a temporary one counts an
attempt and schedules the next (:mod:`.schedule`) unless the message has outlived
``max_age``, which fails the recipient as expired (``4.4.7``). The new state is written
atomically, or the message is removed once nothing is pending, and only then are the
``delivery_result`` observers told. Delivery is at-least-once: a crash between ``deliver``
and the state update repeats that one attempt.

Attempts run concurrently up to ``max_parallel``; one message is never attempted twice at
once. Between attempts the runner sleeps until the next due time; :meth:`QueueRunner.notify`
wakes it for a message that was just committed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

import trio

from .._logfmt import logfmt
from ..config import QueueConfig
from ..errors import SpoolError
from ..message import MessageHandle
from ..protocol._replies import Reply
from ..views import DeliveryOutcome, Envelope, OutcomeKind, Recipient
from ._records import QueueRecord, RecipientRecord, RecipientState
from .schedule import is_expired, next_attempt_at, retry_delay
from .spool import QueueEntryCorrupt, QueueEntryMissing, Spool

__all__ = ["MAX_IDLE_SLEEP", "DeliveryHooks", "QueueRunner"]

log = logging.getLogger("submitd.queue")

#: The runner re-reads the wall clock at least this often (seconds), so a clock step or a
#: suspended machine cannot make it oversleep a due message by much.
MAX_IDLE_SLEEP = 60.0

_UNHANDLED = DeliveryOutcome.temporary(
    Reply.make(451, "4.3.0", "No delivery plugin took this recipient")
)
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


def _expired_reply(last: Reply) -> Reply:
    # RFC 3463 §3.5: X.4.7 "delivery time expired"; keep the last error for the DSN.
    code = last.code if last.is_temporary else 451
    text = f"Delivery time expired; last error: {last}"
    text = text.encode("utf-8")[:400].decode("utf-8", "ignore")
    return Reply.make(code, "4.4.7", text)


class QueueRunner:
    """Deliver what is in ``spool`` through ``hooks``, retrying on ``config``'s schedule.

    ``clock`` returns wall-clock seconds (the spool stores wall-clock times); tests inject
    one tied to trio's clock. Start :meth:`run` in a nursery with ``nursery.start``.
    """

    def __init__(
        self,
        spool: Spool,
        hooks: DeliveryHooks,
        config: QueueConfig,
        *,
        max_parallel: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self._spool = spool
        self._hooks = hooks
        self._config = config
        self._max_parallel = max_parallel
        self._clock = clock
        self._due: dict[str, float] = {}  # queue ID -> wall-clock due time (not in flight)
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
            self._due[queue_id] = -math.inf
        self._wakeup.set()

    @property
    def in_flight(self) -> frozenset[str]:
        """The queue IDs being attempted right now."""
        return frozenset(self._in_flight)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover the spool, report started, then deliver until cancelled."""
        ids = await self._spool.recover()
        for queue_id, due in (await self._spool.next_attempts(ids)).items():
            self._due[queue_id] = min(due, self._due.get(queue_id, math.inf))
        log.info(logfmt("queue_runner_started", queued=len(ids), max_parallel=self._max_parallel))
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                # A fresh event before looking at the schedule: a notify() from here on
                # (there is no checkpoint in between) wakes the wait below.
                self._wakeup = trio.Event()
                self._start_due(nursery)
                with trio.move_on_after(self._idle_time()):
                    await self._wakeup.wait()

    def _start_due(self, nursery: trio.Nursery) -> None:
        now = self._clock()
        ready = sorted((due, qid) for qid, due in self._due.items() if due <= now)
        for _, queue_id in ready:
            if len(self._in_flight) >= self._max_parallel:
                break
            del self._due[queue_id]
            self._in_flight.add(queue_id)
            nursery.start_soon(self._attempt_guarded, queue_id)

    def _idle_time(self) -> float:
        if len(self._in_flight) >= self._max_parallel or not self._due:
            # Nothing can start before a finishing attempt or notify() wakes us. No timer
            # here also keeps trio's autojump clock from leaping while disk I/O runs in a
            # worker thread.
            return math.inf
        wait = min(self._due.values()) - self._clock()
        return min(max(wait, 0.0), MAX_IDLE_SLEEP)

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
                self._due[queue_id] = due
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
        # widen the duplicate window beyond the attempt in flight (SECURITY.md §6).
        with trio.CancelScope(shield=True):
            now = self._clock()
            updated, results = self._record_outcomes(record, outcomes, now)
            due = await self._persist(updated, now)
        for recipient, outcome in results:
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

    def _record_outcomes(
        self, record: QueueRecord, outcomes: Mapping[str, DeliveryOutcome], now: float
    ) -> tuple[QueueRecord, list[tuple[Recipient, DeliveryOutcome]]]:
        updated: list[RecipientRecord] = []
        results: dict[str, tuple[Recipient, DeliveryOutcome]] = {}
        for rcpt in record.recipients:
            if rcpt.state is not RecipientState.PENDING:
                updated.append(rcpt)
                continue
            outcome = outcomes.get(rcpt.address, _UNHANDLED)
            new, final = self._advance(record, rcpt, outcome, now)
            updated.append(new)
            results.setdefault(rcpt.address, (new.view(), final))
        pending = [r.next_attempt for r in updated if r.state is RecipientState.PENDING]
        next_attempt = min(pending) if pending else now
        new_record = replace(record, recipients=tuple(updated), next_attempt=next_attempt)
        return new_record, list(results.values())

    def _advance(
        self, record: QueueRecord, rcpt: RecipientRecord, outcome: DeliveryOutcome, now: float
    ) -> tuple[RecipientRecord, DeliveryOutcome]:
        attempts = rcpt.attempts + 1
        reply = outcome.reply
        fields = {"queue_id": record.queue_id, "rcpt": rcpt.address, "attempts": attempts}
        if outcome.kind is OutcomeKind.DELIVERED:
            log.info(logfmt("delivered", **fields, reply=reply))
            state = RecipientState.DELIVERED
        elif outcome.kind is OutcomeKind.PERMANENT:
            log.warning(logfmt("failed", **fields, reply=reply))
            state = RecipientState.FAILED
        elif is_expired(self._config, created=record.created, now=now):
            reply = _expired_reply(reply)
            outcome = DeliveryOutcome.permanent(reply)
            log.warning(logfmt("expired", **fields, reply=reply))
            state = RecipientState.FAILED
        else:
            retry_at = next_attempt_at(self._config, attempts=attempts, now=now)
            log.info(logfmt("deferred", **fields, reply=reply, retry_in=round(retry_at - now)))
            new = replace(rcpt, attempts=attempts, last_reply=reply, next_attempt=retry_at)
            return new, outcome
        return replace(rcpt, state=state, attempts=attempts, last_reply=reply), outcome
