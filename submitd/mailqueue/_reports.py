"""Queueing reports to senders: failures, delays and successes (RFC 3461 §6, RFC 3464).

A report goes through the same spool as submitted mail, with the null sender (RFC 5321
§4.5.5) and one recipient, the original sender. A message whose sender is already null (a
report itself) never gets one: a report about a report could loop between two servers.

Each recipient's ``NOTIFY`` parameter decides which reports it appears in (RFC 3461 §4.1,
:func:`.dsn.notify_conditions`): ``FAILURE`` (the default) for failures, ``DELAY`` (the
default too, when ``[queue] delay_warning`` is set) for the delay warning, ``SUCCESS`` for
success, ``NEVER`` for none. A success is reported as ``delivered`` after a final delivery
(the outcome names no ``remote``, e.g. a Maildir), as ``relayed`` after a hand-off to a next
hop that did not take the DSN request over, and not at all when the next hop did
(``dsn_passed_on``: it reports itself, RFC 3461 §4.1). ``RET=FULL`` returns the whole
message in a failure report (RFC 3461 §4.3) when it is at most
:data:`.dsn.MAX_RETURNED_SIZE`; every other report returns the header section.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from .._logfmt import logfmt
from ..config import QueueConfig
from ..message import MessageHandle
from ..protocol._events import DsnReturn
from ..protocol._replies import Reply
from ..views import DeliveryOutcome
from . import dsn
from ._records import Origin, QueueRecord, RecipientRecord
from .dsn import Action, Notify, RecipientStatus, Report, build_report, report_envelope
from .spool import Spool

__all__ = ["Reporter"]

log = logging.getLogger("submitd.queue")


class Reporter:
    """Writes reports about the messages in ``spool`` and queues them there."""

    def __init__(
        self, spool: Spool, config: QueueConfig, hostname: str, clock: Callable[[], float]
    ) -> None:
        self._spool = spool
        self._config = config
        self._hostname = hostname
        self._clock = clock

    def wants_delay_warning(self, record: QueueRecord, now: float) -> bool:
        """Tell whether ``record`` (after an attempt) is due its delay warning at ``now``.

        True once per message (then ``delay_warned`` is set), even when no pending recipient
        asked for delays: :meth:`delay_warning` then queues nothing.
        """
        warn_after = self._config.delay_warning
        return (
            warn_after is not None
            and bool(record.sender)
            and not record.delay_warned
            and bool(record.pending)
            and now - record.created >= warn_after
        )

    async def bounce(
        self,
        record: QueueRecord,
        headers: bytes,
        failed: Sequence[tuple[RecipientRecord, DeliveryOutcome]],
        now: float,
        *,
        message: MessageHandle | None = None,
    ) -> str | None:
        """Queue one failure report for the recipients in ``failed``; return its queue ID.

        Recipients whose ``NOTIFY`` leaves out ``FAILURE`` are not listed; None when nobody
        is left, or (logged) when the sender is null. With ``message`` and ``RET=FULL`` the
        whole message is returned. Raises SpoolError.
        """
        statuses = tuple(
            RecipientStatus(
                address=rcpt.address,
                action=Action.FAILED,
                reply=outcome.reply,
                remote=outcome.remote,
                last_attempt=now,
                original_recipient=rcpt.view().param("ORCPT"),
            )
            for rcpt, outcome in failed
            if _asks(rcpt, Notify.FAILURE)
        )
        original, note = None, None
        if message is not None and record.params.ret is DsnReturn.FULL and statuses:
            original, note = await _original(message)
        return await self._queue(record, headers, statuses, now, Origin.BOUNCE,
                                 original=original, note=note)

    async def delay_warning(self, record: QueueRecord, headers: bytes, now: float) -> str | None:
        """Queue one ``Action: delayed`` report for the pending recipients that asked for it."""
        until = record.created + self._config.max_age
        statuses = tuple(
            RecipientStatus(
                address=rcpt.address,
                action=Action.DELAYED,
                reply=_delayed_reply(rcpt.last_reply),
                remote=rcpt.last_remote,
                last_attempt=rcpt.history[-1].at if rcpt.history else None,
                will_retry_until=until,
                original_recipient=rcpt.view().param("ORCPT"),
            )
            for rcpt in record.pending
            if _asks(rcpt, Notify.DELAY)
        )
        return await self._queue(record, headers, statuses, now, Origin.DELAY)

    async def success(
        self,
        record: QueueRecord,
        headers: bytes,
        delivered: Sequence[tuple[RecipientRecord, DeliveryOutcome]],
        now: float,
    ) -> str | None:
        """Queue one success report (``delivered`` / ``relayed``) for ``NOTIFY=SUCCESS``.

        Recipients whose next hop took the DSN request over (``dsn_passed_on``) are left to
        it. Returns the report's queue ID, or None when nobody is to be told.
        """
        statuses = tuple(
            RecipientStatus(
                address=rcpt.address,
                action=Action.DELIVERED if outcome.remote is None else Action.RELAYED,
                reply=outcome.reply,
                remote=outcome.remote,
                last_attempt=now,
                original_recipient=rcpt.view().param("ORCPT"),
            )
            for rcpt, outcome in delivered
            if _asks(rcpt, Notify.SUCCESS) and not outcome.dsn_passed_on
        )
        return await self._queue(record, headers, statuses, now, Origin.SUCCESS)

    async def _queue(
        self,
        record: QueueRecord,
        headers: bytes,
        statuses: tuple[RecipientStatus, ...],
        now: float,
        origin: Origin,
        *,
        original: bytes | None = None,
        note: str | None = None,
    ) -> str | None:
        if not statuses:
            return None
        kind = statuses[0].action.value
        if not record.sender:
            log.info(logfmt("report_not_sent", queue_id=record.queue_id, kind=kind,
                            reason="null sender"))
            return None
        report = Report(
            hostname=self._hostname,
            sender=record.sender,
            arrival=record.created,
            date=now,
            recipients=statuses,
            headers=headers,
            queue_id=record.queue_id,
            envelope_id=record.params.envid,
            original=original,
            return_note=note,
        )
        envelope = report_envelope(report, received_at=now)
        report_id = await self._spool.enqueue(
            envelope,
            build_report(report),
            {"origin": origin.value, "report": report.kind.value,
             "report_for": record.queue_id},
            origin=origin,
        )
        log.info(logfmt("report_queued", queue_id=record.queue_id, kind=report.kind.value,
                        report_id=report_id, nrcpt=len(statuses)))
        return report_id


def _asks(rcpt: RecipientRecord, condition: Notify) -> bool:
    return condition in dsn.notify_conditions(rcpt.view())


async def _original(message: MessageHandle) -> tuple[bytes | None, str | None]:
    """The whole message for ``RET=FULL``, or None and the sentence saying why not."""
    if message.size > dsn.MAX_RETURNED_SIZE:
        limit = dsn.MAX_RETURNED_SIZE // (1024 * 1024)
        return None, (f"The message is larger than {limit} MiB ({message.size} bytes), so "
                      "only its header section is returned.")
    try:
        data = await trio.to_thread.run_sync(message.path.read_bytes)
    except OSError as exc:
        log.warning(logfmt("report_original_unreadable", path=message.path, error=exc))
        data = None
    if data is None or not dsn.returnable(data):
        return None, "The message cannot be returned whole, so only its header section is attached."
    return data, None


def _delayed_reply(reply: Reply | None) -> Reply | None:
    # Action: delayed carries a 4.x.x status (RFC 3464 §2.3.4): the last temporary reply.
    return reply if reply is not None and reply.is_temporary else None
