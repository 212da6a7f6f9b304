"""What the spool stores about a message: the envelope sidecar ``env/ID.json``.

The sidecar is versioned JSON (``"version": 1``) so later releases can add fields (DSN
bookkeeping, for one) and still read old queues. Layout::

    {"version": 1, "id": "...", "created": 1700000000.0, "size": 1234,
     "sender": "a@example.org", "username": "alice",
     "params": {"size": null, "body": "8BITMIME", "smtputf8": false, "auth": null},
     "session": {"session_id": "...", "peer": "...", "tls": "TLSv1.3"},
     "next_attempt": 1700000060.0,
     "recipients": [{"address": "b@example.net", "state": "pending", "attempts": 1,
                     "last_reply": {"code": 451, "status": "4.3.0", "text": "...",
                                    "lines": ["..."]},
                     "next_attempt": 1700000060.0}]}

``last_reply.lines`` keeps a multi-line reply exact; ``text`` is the same joined for people
reading the file. Unknown keys are ignored; anything else unexpected makes the record
unreadable (the spool then moves it aside).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..message import MessageHandle
from ..protocol._events import BodyType, MailParams
from ..protocol._replies import Reply
from ..views import Envelope, Recipient, RecipientParams

__all__ = [
    "FORMAT_VERSION",
    "QueueRecord",
    "QueuedMessage",
    "RecipientRecord",
    "RecipientState",
    "decode_record",
    "encode_record",
]

#: The sidecar format this code writes; it reads this version and older ones.
FORMAT_VERSION = 1


class RecipientState(enum.Enum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"  # not delivered yet: attempted on the schedule
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent refusal or expiry: the sender is to be told (DSN)


@dataclass(frozen=True, kw_only=True)
class RecipientRecord:
    """The delivery state of one recipient, as stored in the sidecar."""

    address: str
    params: RecipientParams = ()
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    last_reply: Reply | None = None
    next_attempt: float = 0.0

    def view(self) -> Recipient:
        """Return the read-only :class:`Recipient` handed to queue hooks."""
        return Recipient(address=self.address, params=self.params, attempts=self.attempts)


@dataclass(frozen=True, kw_only=True)
class QueueRecord:
    """Everything the spool knows about a committed message except its bytes."""

    queue_id: str
    created: float
    size: int
    sender: str
    params: MailParams
    username: str | None
    session: Mapping[str, str]
    recipients: tuple[RecipientRecord, ...]
    next_attempt: float

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
    """A committed message loaded from the spool: its record and a read-only handle."""

    record: QueueRecord
    message: MessageHandle

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


def _reply_to_json(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "status": reply.status, "text": reply.text, "lines": reply.lines}


def encode_record(record: QueueRecord) -> bytes:
    """Serialise ``record`` as the sidecar JSON (ASCII only, one line, newline-terminated)."""
    obj = {
        "version": FORMAT_VERSION,
        "id": record.queue_id,
        "created": record.created,
        "size": record.size,
        "sender": record.sender,
        "username": record.username,
        "params": {
            "size": record.params.size,
            "body": record.params.body.value,
            "smtputf8": record.params.smtputf8,
            "auth": record.params.auth,
        },
        "session": dict(record.session),
        "next_attempt": record.next_attempt,
        "recipients": [
            {
                "address": r.address,
                "params": [[name, value] for name, value in r.params],
                "state": r.state.value,
                "attempts": r.attempts,
                "last_reply": _reply_to_json(r.last_reply),
                "next_attempt": r.next_attempt,
            }
            for r in record.recipients
        ],
    }
    return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    # bool is an int subclass: never accept true/false where a number is expected.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise ValueError(f"field {key!r} missing or of the wrong type")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _number(obj: Mapping[str, Any], key: str) -> float:
    return float(_get(obj, key, (int, float)))


def _reply_from_json(obj: Any) -> Reply | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ValueError("last_reply is not an object")
    code = _get(obj, "code", int)
    status = _get(obj, "status", str)
    lines = obj.get("lines")
    if isinstance(lines, list) and lines and all(isinstance(x, str) for x in lines):
        return Reply(code=code, status=status, lines=tuple(lines))
    return Reply.make(code, status, _get(obj, "text", str)[:400])


def _params_from_json(obj: Any) -> RecipientParams:
    if not isinstance(obj, list):
        raise ValueError("recipient params is not a list")
    out: list[tuple[str, str | None]] = []
    for pair in obj:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not (pair[1] is None or isinstance(pair[1], str))
        ):
            raise ValueError("recipient params must be [name, value] pairs")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _recipient_from_json(obj: Any) -> RecipientRecord:
    if not isinstance(obj, dict):
        raise ValueError("recipient is not an object")
    attempts = _get(obj, "attempts", int)
    if attempts < 0:
        raise ValueError("negative attempts")
    return RecipientRecord(
        address=_get(obj, "address", str),
        params=_params_from_json(obj.get("params", [])),
        state=RecipientState(_get(obj, "state", str)),
        attempts=attempts,
        last_reply=_reply_from_json(obj.get("last_reply")),
        next_attempt=_number(obj, "next_attempt"),
    )


def decode_record(data: bytes, *, queue_id: str) -> QueueRecord:
    """Parse a sidecar written for ``queue_id``; raise ValueError if it is not a valid one."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("sidecar is not a JSON object")
    version = _get(obj, "version", int)
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"unsupported sidecar version {version}")
    if obj.get("id") != queue_id:
        raise ValueError("sidecar names another queue ID")
    params = _get(obj, "params", dict)
    declared = params.get("size")
    if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool)):
        raise ValueError("params.size is not an integer")
    auth = params.get("auth")
    if auth is not None and not isinstance(auth, str):
        raise ValueError("params.auth is not a string")
    username = obj.get("username")
    if username is not None and not isinstance(username, str):
        raise ValueError("username is not a string")
    session = _get(obj, "session", dict)
    if not all(isinstance(v, str) for v in session.values()):
        raise ValueError("session values must be strings")
    recipients = tuple(_recipient_from_json(r) for r in _get(obj, "recipients", list))
    if not recipients:
        raise ValueError("no recipients")
    return QueueRecord(
        queue_id=queue_id,
        created=_number(obj, "created"),
        size=_get(obj, "size", int),
        sender=_get(obj, "sender", str),
        params=MailParams(
            size=declared,
            body=BodyType(_get(params, "body", str)),
            smtputf8=_get(params, "smtputf8", bool),
            auth=auth,
        ),
        username=username,
        session=MappingProxyType(dict(session)),
        recipients=recipients,
        next_attempt=_number(obj, "next_attempt"),
    )
