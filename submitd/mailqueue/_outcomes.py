"""What one delivery attempt does to a message's record (pure: no I/O, no clock).

Delivered recipients are done; a permanent refusal fails the recipient; a temporary one
counts an attempt and schedules the next (:mod:`.schedule`) unless the message has outlived
``max_age``, which fails the recipient as expired (``4.4.7``, RFC 3463 §3.5). Every attempt
is added to the recipient's history (the last :data:`MAX_HISTORY` are kept).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .._logfmt import logfmt
from ..config import QueueConfig
from ..protocol._replies import Reply
from ..views import DeliveryOutcome, OutcomeKind, Recipient
from ._records import MAX_HISTORY, Attempt, QueueRecord, RecipientRecord, RecipientState
from .schedule import is_expired, next_attempt_at

__all__ = ["UNHANDLED", "AttemptResult", "apply_outcomes", "expired_reply"]

log = logging.getLogger("submitd.queue")

#: The outcome of a recipient the delivery hooks did not answer for.
UNHANDLED = DeliveryOutcome.temporary(
    Reply.make(451, "4.3.0", "No delivery plugin took this recipient")
)


def expired_reply(last: Reply) -> Reply:
    """The reply recorded when a message outlived ``max_age``; it keeps the last error."""
    # RFC 3463 §3.5: X.4.7 "delivery time expired".
    code = last.code if last.is_temporary else 451
    text = f"Delivery time expired; last error: {last}"
    text = text.encode("utf-8")[:400].decode("utf-8", "ignore")
    return Reply.make(code, "4.4.7", text)


@dataclass(frozen=True, kw_only=True)
class AttemptResult:
    """The record after an attempt, what to tell the observers, and its report material.

    ``failed`` and ``delivered`` are the recipients that failed or were delivered in this
    attempt: the ones its failure and success reports are about.
    """

    record: QueueRecord
    results: tuple[tuple[Recipient, DeliveryOutcome], ...]
    failed: tuple[tuple[RecipientRecord, DeliveryOutcome], ...]
    delivered: tuple[tuple[RecipientRecord, DeliveryOutcome], ...] = ()


def apply_outcomes(
    config: QueueConfig,
    record: QueueRecord,
    outcomes: Mapping[str, DeliveryOutcome],
    now: float,
) -> AttemptResult:
    """Apply one attempt's ``outcomes`` (by address) to every pending recipient of ``record``."""
    updated: list[RecipientRecord] = []
    results: dict[str, tuple[Recipient, DeliveryOutcome]] = {}
    failed: list[tuple[RecipientRecord, DeliveryOutcome]] = []
    delivered: list[tuple[RecipientRecord, DeliveryOutcome]] = []
    for rcpt in record.recipients:
        if rcpt.state is not RecipientState.PENDING:
            updated.append(rcpt)
            continue
        outcome = outcomes.get(rcpt.address, UNHANDLED)
        new, final = _advance(config, record, rcpt, outcome, now)
        updated.append(new)
        results.setdefault(rcpt.address, (new.view(), final))
        if new.state is RecipientState.FAILED:
            failed.append((new, final))
        elif new.state is RecipientState.DELIVERED:
            delivered.append((new, final))
    pending = [r.next_attempt for r in updated if r.state is RecipientState.PENDING]
    next_attempt = min(pending) if pending else now
    new_record = replace(record, recipients=tuple(updated), next_attempt=next_attempt)
    return AttemptResult(record=new_record, results=tuple(results.values()), failed=tuple(failed),
                         delivered=tuple(delivered))


def _advance(
    config: QueueConfig,
    record: QueueRecord,
    rcpt: RecipientRecord,
    outcome: DeliveryOutcome,
    now: float,
) -> tuple[RecipientRecord, DeliveryOutcome]:
    attempts = rcpt.attempts + 1
    history = (*rcpt.history, Attempt(at=now, reply=outcome.reply, remote=outcome.remote))
    rcpt = replace(rcpt, history=history[-MAX_HISTORY:])
    reply = outcome.reply
    fields = {"queue_id": record.queue_id, "rcpt": rcpt.address, "attempts": attempts}
    if outcome.kind is OutcomeKind.DELIVERED:
        log.info(logfmt("delivered", **fields, reply=reply, remote=outcome.remote))
        state = RecipientState.DELIVERED
    elif outcome.kind is OutcomeKind.PERMANENT:
        log.warning(logfmt("failed", **fields, reply=reply, remote=outcome.remote))
        state = RecipientState.FAILED
    elif is_expired(config, created=record.created, now=now):
        reply = expired_reply(reply)
        outcome = DeliveryOutcome.permanent(reply, remote=outcome.remote)
        log.warning(logfmt("expired", **fields, reply=reply))
        state = RecipientState.FAILED
    else:
        retry_at = next_attempt_at(config, attempts=attempts, now=now)
        log.info(logfmt("deferred", **fields, reply=reply, remote=outcome.remote,
                        retry_in=round(retry_at - now)))
        new = replace(rcpt, attempts=attempts, last_reply=reply, next_attempt=retry_at)
        return new, outcome
    return replace(rcpt, state=state, attempts=attempts, last_reply=reply), outcome
