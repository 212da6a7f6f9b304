"""Queueing reports to senders: bounces (``Action: failed``) and delay warnings.

A report goes through the same spool as submitted mail, with the null sender (RFC 5321
§4.5.5) and one recipient, the original sender. A message whose sender is already null (a
report itself) never gets one: a report about a report could loop between two servers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from .._logfmt import logfmt
from ..config import QueueConfig
from ..protocol._replies import Reply
from ..views import DeliveryOutcome
from ._records import Origin, QueueRecord, RecipientRecord
from .dsn import Action, RecipientStatus, Report, build_report, report_envelope
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
        """Tell whether ``record`` (after an attempt) is due a delay warning at ``now``."""
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
    ) -> str | None:
        """Queue one report listing every recipient in ``failed``; return its queue ID.

        Returns None (and logs) when the sender is null. Raises SpoolError.
        """
        statuses = tuple(
            RecipientStatus(
                address=rcpt.address,
                action=Action.FAILED,
                reply=outcome.reply,
                remote=outcome.remote,
                last_attempt=now,
            )
            for rcpt, outcome in failed
        )
        return await self._queue(record, headers, statuses, now, Origin.BOUNCE)

    async def delay_warning(self, record: QueueRecord, headers: bytes, now: float) -> str | None:
        """Queue one ``Action: delayed`` report for the recipients still pending."""
        until = record.created + self._config.max_age
        statuses = tuple(
            RecipientStatus(
                address=rcpt.address,
                action=Action.DELAYED,
                reply=_delayed_reply(rcpt.last_reply),
                remote=rcpt.last_remote,
                last_attempt=rcpt.history[-1].at if rcpt.history else None,
                will_retry_until=until,
            )
            for rcpt in record.pending
        )
        return await self._queue(record, headers, statuses, now, Origin.DELAY)

    async def _queue(
        self,
        record: QueueRecord,
        headers: bytes,
        statuses: tuple[RecipientStatus, ...],
        now: float,
        origin: Origin,
    ) -> str | None:
        if not record.sender:
            log.info(logfmt("report_not_sent", queue_id=record.queue_id, kind=origin.value,
                            reason="null sender"))
            return None
        if not statuses:
            return None
        report = Report(
            hostname=self._hostname,
            sender=record.sender,
            arrival=record.created,
            date=now,
            recipients=statuses,
            headers=headers,
            queue_id=record.queue_id,
        )
        envelope = report_envelope(report, received_at=now)
        report_id = await self._spool.enqueue(
            envelope,
            build_report(report),
            {"origin": origin.value, "report_for": record.queue_id},
            origin=origin,
        )
        log.info(logfmt("report_queued", queue_id=record.queue_id, kind=origin.value,
                        report_id=report_id, nrcpt=len(statuses)))
        return report_id


def _delayed_reply(reply: Reply | None) -> Reply | None:
    # Action: delayed carries a 4.x.x status (RFC 3464 §2.3.4): the last temporary reply.
    return reply if reply is not None and reply.is_temporary else None
