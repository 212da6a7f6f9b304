"""What the spool stores about a message: the envelope sidecar ``env/ID.json``.

The sidecar is versioned JSON so later releases can add fields and still read old queues.
Version 2 (written now; version 1 is still read, the new fields taking their defaults)::

    {"version": 2, "id": "...", "created": 1700000000.0, "size": 1234,
     "sender": "a@example.org", "username": "alice", "origin": "smtp",
     "held": false, "delay_warned": false,
     "params": {"size": null, "body": "8BITMIME", "smtputf8": false, "auth": null,
                "ret": "HDRS", "envid": "QQ314159"},
     "session": {"session_id": "...", "peer": "...", "tls": "TLSv1.3"},
     "next_attempt": 1700000060.0,
     "recipients": [{"address": "b@example.net", "params": [["NOTIFY", "FAILURE"]],
                     "state": "pending", "attempts": 1,
                     "last_reply": {"code": 451, "status": "4.3.0", "text": "...",
                                    "lines": ["..."]},
                     "next_attempt": 1700000060.0,
                     "history": [{"at": 1700000000.5, "remote": "smtp.example.net",
                                  "reply": {...}}]}]}

``params.ret`` and ``params.envid`` are DSN's ``RET`` and ``ENVID`` (RFC 3461 §4.3, §4.4;
the identifier decoded from xtext), ``null`` when the client gave none; a sidecar written
before they existed loads without them. Recipient ``params`` hold ``NOTIFY`` (normalised) and
``ORCPT`` (still xtext). ``last_reply.lines`` keeps a multi-line reply exact; ``text`` is the
same joined for people reading the file. ``history`` keeps the last :data:`MAX_HISTORY`
attempts per recipient. Decoding (:mod:`._decode`) checks every field; anything unexpected
makes the record unreadable and the spool moves it aside.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..message import MessageHandle
from ..protocol._events import MailParams
from ..protocol._replies import Reply
from ..views import Envelope, Recipient, RecipientParams

__all__ = [
    "FORMAT_VERSION",
    "MAX_HISTORY",
    "Attempt",
    "Origin",
    "QueueRecord",
    "QueuedMessage",
    "RecipientRecord",
    "RecipientState",
    "encode_record",
]

#: The sidecar format this code writes; it reads this version and older ones.
FORMAT_VERSION = 2

#: How many attempts each recipient's history keeps (the oldest are dropped).
MAX_HISTORY = 20


class RecipientState(enum.Enum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"  # not delivered yet: attempted on the schedule
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent refusal or expiry: the sender was told (DSN)


class Origin(enum.StrEnum):
    """Where a queued message came from (a string enum: ``Origin.BOUNCE == "bounce"``)."""

    SMTP = "smtp"  # submitted by a client
    BOUNCE = "bounce"  # a non-delivery report this server wrote (RFC 3464, Action: failed)
    DELAY = "delay"  # a delay warning this server wrote (RFC 3464, Action: delayed)
    SUCCESS = "success"  # a success report this server wrote (Action: delivered or relayed)


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One delivery attempt for one recipient: when, the reply, and who gave it."""

    at: float
    reply: Reply
    remote: str | None = None


@dataclass(frozen=True, kw_only=True)
class RecipientRecord:
    """The delivery state of one recipient, as stored in the sidecar."""

    address: str
    params: RecipientParams = ()
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    last_reply: Reply | None = None
    next_attempt: float = 0.0
    history: tuple[Attempt, ...] = ()

    def view(self) -> Recipient:
        """Return the read-only :class:`Recipient` handed to queue hooks."""
        return Recipient(address=self.address, params=self.params, attempts=self.attempts)

    @property
    def last_remote(self) -> str | None:
        """The host that gave the last reply, when known."""
        return self.history[-1].remote if self.history else None


@dataclass(frozen=True, kw_only=True)
class QueueRecord:
    """Everything the spool knows about a committed message except its bytes.

    ``held`` messages are never attempted until released; ``delay_warned`` says the sender
    was already sent a delay warning; ``origin`` tells submitted mail from reports.
    """

    queue_id: str
    created: float
    size: int
    sender: str
    params: MailParams
    username: str | None
    session: Mapping[str, str]
    recipients: tuple[RecipientRecord, ...]
    next_attempt: float
    held: bool = False
    delay_warned: bool = False
    origin: Origin = Origin.SMTP

    @property
    def envelope(self) -> Envelope:
        """The committed envelope as queue hooks see it (``received_at`` is ``created``)."""
        return Envelope(
            sender=self.sender,
            recipients=tuple(r.view() for r in self.recipients),
            params=self.params,
            username=self.username,
            queue_id=self.queue_id,
            received_at=self.created,
        )

    @property
    def pending(self) -> tuple[RecipientRecord, ...]:
        """The recipients still waiting for delivery."""
        return tuple(r for r in self.recipients if r.state is RecipientState.PENDING)


@dataclass(frozen=True, kw_only=True)
class QueuedMessage:
    """A committed message loaded from the spool: its record and a read-only handle.

    ``header_section`` is the message's header section as stored (CRLF line ends, at most
    ``[limits] max_header_size`` bytes, never a line cut by that bound), for reports.
    """

    record: QueueRecord
    message: MessageHandle
    header_section: bytes = b""

    @property
    def queue_id(self) -> str:
        """The message's queue ID."""
        return self.record.queue_id

    @property
    def envelope(self) -> Envelope:
        """The committed envelope (with ``queue_id``)."""
        return self.record.envelope

    @property
    def recipients(self) -> tuple[RecipientRecord, ...]:
        """Every recipient with its delivery state."""
        return self.record.recipients


def reply_to_json(reply: Reply) -> dict[str, Any]:
    """A reply as stored in the sidecar (``lines`` exact, ``text`` for people)."""
    return {"code": reply.code, "status": reply.status, "text": reply.text,
            "lines": list(reply.lines)}


def encode_record(record: QueueRecord) -> bytes:
    """Serialise ``record`` as the sidecar JSON (ASCII only, one line, newline-terminated)."""
    obj = {
        "version": FORMAT_VERSION,
        "id": record.queue_id,
        "created": record.created,
        "size": record.size,
        "sender": record.sender,
        "username": record.username,
        "origin": record.origin.value,
        "held": record.held,
        "delay_warned": record.delay_warned,
        "params": {
            "size": record.params.size,
            "body": record.params.body.value,
            "smtputf8": record.params.smtputf8,
            "auth": record.params.auth,
            "ret": None if record.params.ret is None else record.params.ret.value,
            "envid": record.params.envid,
        },
        "session": dict(record.session),
        "next_attempt": record.next_attempt,
        "recipients": [
            {
                "address": r.address,
                "params": [[name, value] for name, value in r.params],
                "state": r.state.value,
                "attempts": r.attempts,
                "last_reply": None if r.last_reply is None else reply_to_json(r.last_reply),
                "next_attempt": r.next_attempt,
                "history": [
                    {"at": a.at, "reply": reply_to_json(a.reply), "remote": a.remote}
                    for a in r.history[-MAX_HISTORY:]
                ],
            }
            for r in record.recipients
        ],
    }
    return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"
