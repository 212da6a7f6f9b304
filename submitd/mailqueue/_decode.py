"""Reading a sidecar back: every field checked, anything unexpected is a ValueError.

A sidecar is written by this server, but the disk, an operator's editor or an older release
may have changed it. A value that would make the runner misbehave (a ``NaN`` or infinite
time, a negative count, a reply that could not be sent, an unknown state) must not crash the
server at every start: :func:`decode_record` refuses it, and the spool moves the entry to
``corrupt/`` for a person to look at. Unknown keys are ignored (a newer release's additions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NoReturn

from ..protocol._events import BodyType, DsnReturn, MailParams
from ..protocol._grammar import check_envid, check_orcpt, has_control, parse_notify
from ..protocol._replies import Reply
from ..views import RecipientParams
from ._records import (
    FORMAT_VERSION,
    MAX_HISTORY,
    Attempt,
    Origin,
    QueueRecord,
    RecipientRecord,
    RecipientState,
)

__all__ = ["decode_record"]


def _reject(constant: str) -> NoReturn:
    # json.loads accepts NaN, Infinity and -Infinity by default; a sidecar never holds them.
    raise ValueError(f"{constant} is not a valid number")


def _get(obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj:
        raise ValueError(f"field {key!r} is missing")
    return obj[key]


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is not a list")
    return value


def _boolean(obj: Mapping[str, Any], key: str, default: bool | None = None) -> bool:
    value = obj.get(key, default) if default is not None else _get(obj, key)
    if not isinstance(value, bool):
        raise ValueError(f"field {key!r} is not true or false")
    return value


def _count(obj: Mapping[str, Any], key: str) -> int:
    value = _get(obj, key)
    # bool is an int subclass: never accept true/false where a number is expected.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"field {key!r} is not a non-negative integer")
    return value


def _time(obj: Mapping[str, Any], key: str) -> float:
    """A point in time: a finite, non-negative number of seconds since the epoch."""
    value = _get(obj, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field {key!r} is not a number")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"field {key!r} is out of range") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"field {key!r} is not a finite non-negative time")
    return seconds


def _text(value: Any, what: str, *, empty: bool = True) -> str:
    # Envelope strings never hold control characters (the session refused them).
    if not isinstance(value, str) or has_control(value) or (not empty and not value):
        raise ValueError(f"{what} is not a valid string")
    return value


def _optional_text(value: Any, what: str) -> str | None:
    return None if value is None else _text(value, what)


def _reply(value: Any, what: str) -> Reply:
    obj = _object(value, what)
    code = _get(obj, "code")
    status = _get(obj, "status")
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(status, str):
        raise ValueError(f"{what} has a bad code or status")
    lines = obj.get("lines")
    if isinstance(lines, list) and lines and all(isinstance(x, str) for x in lines):
        # Reply's own checks: code range, status fits the code, no control characters.
        reply = Reply(code=code, status=status, lines=tuple(lines))
    else:
        reply = Reply.make(code, status, _text(_get(obj, "text"), f"{what}.text")[:400])
    if reply.code // 100 not in (2, 4, 5):
        raise ValueError(f"{what} is not a final reply")
    return reply


# The DSN recipient parameters as the server stores them (RFC 3461 §4.1, §4.2).
_RCPT_CHECKS: Mapping[str, Callable[[str | None], str]] = {
    "NOTIFY": parse_notify,
    "ORCPT": check_orcpt,
}


def _params(value: Any) -> RecipientParams:
    out: list[tuple[str, str | None]] = []
    for pair in _list(value, "recipient params"):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError("recipient params must be [name, value] pairs")
        name = _text(pair[0], "a recipient parameter name", empty=False)
        value = _optional_text(pair[1], f"recipient parameter {name}")
        check = _RCPT_CHECKS.get(name)
        if check is not None:
            try:
                check(value)
            except ValueError as exc:  # GrammarError
                raise ValueError(f"recipient parameter {name}: {exc}") from None
        out.append((name, value))
    return tuple(out)


def _attempt(value: Any) -> Attempt:
    obj = _object(value, "history entry")
    return Attempt(
        at=_time(obj, "at"),
        reply=_reply(_get(obj, "reply"), "history reply"),
        remote=_optional_text(obj.get("remote"), "history remote"),
    )


def _recipient(value: Any) -> RecipientRecord:
    obj = _object(value, "recipient")
    last = obj.get("last_reply")
    history = tuple(_attempt(a) for a in _list(obj.get("history", []), "history"))
    return RecipientRecord(
        address=_text(_get(obj, "address"), "recipient address", empty=False),
        params=_params(obj.get("params", [])),
        state=RecipientState(_get(obj, "state")),
        attempts=_count(obj, "attempts"),
        last_reply=None if last is None else _reply(last, "last_reply"),
        next_attempt=_time(obj, "next_attempt"),
        history=history[-MAX_HISTORY:],
    )


def _mail_params(value: Any) -> MailParams:
    obj = _object(value, "params")
    declared = obj.get("size")
    if declared is not None and (
        isinstance(declared, bool) or not isinstance(declared, int) or declared < 0
    ):
        raise ValueError("params.size is not a non-negative integer")
    return MailParams(
        size=declared,
        body=BodyType(_get(obj, "body")),
        smtputf8=_boolean(obj, "smtputf8"),
        auth=_optional_text(obj.get("auth"), "params.auth"),
        ret=None if obj.get("ret") is None else DsnReturn(obj["ret"]),
        envid=_envid(obj.get("envid")),
    )


def _envid(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return check_envid(_text(value, "params.envid"))
    except ValueError as exc:
        raise ValueError(f"params.envid: {exc}") from None


def decode_record(data: bytes, *, queue_id: str) -> QueueRecord:
    """Parse a sidecar written for ``queue_id``; raise ValueError if it is not a valid one."""
    obj = _object(json.loads(data, parse_constant=_reject), "the sidecar")
    version = _count(obj, "version")
    if not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"unsupported sidecar version {version}")
    if obj.get("id") != queue_id:
        raise ValueError("sidecar names another queue ID")
    session = _object(_get(obj, "session"), "session")
    if not all(isinstance(v, str) for v in session.values()):
        raise ValueError("session values must be strings")
    recipients = tuple(_recipient(r) for r in _list(_get(obj, "recipients"), "recipients"))
    if not recipients:
        raise ValueError("no recipients")
    return QueueRecord(
        queue_id=queue_id,
        created=_time(obj, "created"),
        size=_count(obj, "size"),
        sender=_text(_get(obj, "sender"), "sender"),
        params=_mail_params(_get(obj, "params")),
        username=_optional_text(obj.get("username"), "username"),
        session=MappingProxyType(dict(session)),
        recipients=recipients,
        next_attempt=_time(obj, "next_attempt"),
        held=_boolean(obj, "held", False),
        delay_warned=_boolean(obj, "delay_warned", False),
        origin=Origin(obj.get("origin", Origin.SMTP.value)),
    )
