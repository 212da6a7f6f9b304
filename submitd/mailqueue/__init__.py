"""The durable mail queue: the spool on disk and the runner that delivers from it.

Named ``mailqueue`` so that it never shadows the standard library's ``queue``.
"""

from ._ids import QUEUE_ID_LENGTH, is_queue_id, new_queue_id
from ._records import (
    FORMAT_VERSION,
    MAX_HISTORY,
    Attempt,
    Origin,
    QueuedMessage,
    QueueRecord,
    RecipientRecord,
    RecipientState,
)
from .runner import DeliveryHooks, QueueRunner
from .schedule import DueTimes, is_expired, next_attempt_at, retry_delay
from .spool import IncomingMessage, QueueEntryCorrupt, QueueEntryMissing, Spool, SpoolLocked

__all__ = [
    "FORMAT_VERSION",
    "MAX_HISTORY",
    "QUEUE_ID_LENGTH",
    "Attempt",
    "DeliveryHooks",
    "DueTimes",
    "IncomingMessage",
    "Origin",
    "QueueEntryCorrupt",
    "QueueEntryMissing",
    "QueueRecord",
    "QueueRunner",
    "QueuedMessage",
    "RecipientRecord",
    "RecipientState",
    "Spool",
    "SpoolLocked",
    "is_expired",
    "is_queue_id",
    "new_queue_id",
    "next_attempt_at",
    "retry_delay",
]
