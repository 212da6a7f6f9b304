"""How ``submitd queue list`` and ``queue show`` render queue records, for people and as JSON.

Every text that came from outside (addresses, replies, header fields) passes through
:func:`printable`: control characters and bidirectional overrides never reach the terminal.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

from .mailqueue import QueueRecord, RecipientRecord, RecipientState
from .protocol._grammar import encode_xtext
from .protocol._replies import Reply

__all__ = ["as_json", "details", "format_sender", "printable", "summary", "totals"]

# Control characters (C0, DEL, C1) and bidirectional overrides never reach the terminal: a
# header or a remote server's reply could otherwise rewrite or disguise the operator's screen.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def as_json(record: QueueRecord, now: float) -> dict[str, Any]:
    """One message as ``queue list --json`` writes it (ages relative to ``now``)."""
    return {
        "id": record.queue_id,
        "created": record.created,
        "age": max(round(now - record.created), 0),
        "size": record.size,
        "sender": record.sender,
        "username": record.username,
        "origin": record.origin.value,
        "held": record.held,
        "ret": None if record.params.ret is None else record.params.ret.value,
        "envid": record.params.envid,
        "next_attempt": record.next_attempt if record.pending else None,
        "recipients": [
            {
                "address": r.address,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt if r.state is RecipientState.PENDING else None,
                "last_reply": _reply_json(r.last_reply),
                "remote": r.last_remote,
            }
            for r in record.recipients
        ],
    }


def _reply_json(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "status": reply.status, "text": reply.text}


def summary(record: QueueRecord, now: float) -> list[str]:
    """The lines ``queue list`` prints for one message."""
    head = (
        f"{record.queue_id}  age {_duration(now - record.created)}  {record.size} bytes"
        f"  from {printable(format_sender(record.sender))}"
    )
    if record.held:
        head += "  HELD"
    if record.origin.value != "smtp":
        head += f"  ({record.origin.value})"
    lines = [head]
    for rcpt in record.recipients:
        lines.append(f"  {printable(rcpt.address)}  {_state(record, rcpt, now)}")
        if rcpt.last_reply is not None and rcpt.state is not RecipientState.DELIVERED:
            remote = rcpt.last_remote
            where = f" (from {printable(remote)})" if remote else ""
            lines.append(f"    last reply: {printable(str(rcpt.last_reply))}{where}")
    return lines


def _state(record: QueueRecord, rcpt: RecipientRecord, now: float) -> str:
    attempts = f"{rcpt.attempts} attempt{'' if rcpt.attempts == 1 else 's'}"
    if rcpt.state is not RecipientState.PENDING:
        return f"{rcpt.state.value} after {attempts}"
    if record.held:
        when = "held"
    elif rcpt.next_attempt <= now:
        when = "next attempt due now"
    else:
        when = f"next attempt in {_duration(rcpt.next_attempt - now)}"
    return f"pending, {attempts}, {when}"


def totals(records: list[QueueRecord]) -> str:
    """The closing line of ``queue list``: how many messages and recipients wait."""
    if not records:
        return "the queue is empty"
    held = sum(1 for r in records if r.held)
    pending = sum(len(r.pending) for r in records)
    text = f"{len(records)} message{'' if len(records) == 1 else 's'}"
    text += f", {pending} recipient{'' if pending == 1 else 's'} pending"
    return text + (f", {held} held" if held else "")


def format_sender(sender: str) -> str:
    """The envelope sender for people: ``<>`` for the null sender."""
    return f"<{sender}>"


def _duration(seconds: float) -> str:
    """Round ``seconds`` for people: ``45s``, ``12m``, ``3h05m``, ``2d04h``."""
    s = max(int(seconds) if math.isfinite(seconds) else 0, 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def printable(text: str) -> str:
    """``text`` with control characters and bidi overrides escaped (safe for a terminal)."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def _timestamp(when: float) -> str:
    if not math.isfinite(when):
        return "-"
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def details(record: QueueRecord, now: float) -> list[str]:
    """The lines ``queue show`` prints: the envelope and every recipient's history."""
    params = [f"BODY={record.params.body.value}"]
    if record.params.smtputf8:
        params.append("SMTPUTF8")
    if record.params.size is not None:
        params.append(f"SIZE={record.params.size}")
    if record.params.ret is not None:
        params.append(f"RET={record.params.ret.value}")
    if record.params.envid is not None:  # as on the wire (RFC 3461 §4.4)
        params.append(f"ENVID={encode_xtext(record.params.envid)}")
    session = " ".join(f"{k}={v}" for k, v in record.session.items())
    if not record.pending:
        next_attempt = "none (nothing pending)"
    elif record.held:
        next_attempt = "held"
    else:
        next_attempt = _timestamp(record.next_attempt)
    fields = [
        ("Queue ID", record.queue_id),
        ("Created", f"{_timestamp(record.created)} ({_duration(now - record.created)} ago)"),
        ("Size", f"{record.size} bytes"),
        ("Sender", format_sender(record.sender)),
        ("Login", record.username or "-"),
        ("Origin", record.origin.value),
        ("Parameters", " ".join(params)),
        ("Session", session or "-"),
        ("Held", "yes" if record.held else "no"),
        ("Next attempt", next_attempt),
    ]
    lines = [f"{name + ':':<14}{printable(value)}" for name, value in fields]
    lines += ["", "Recipients:"]
    for rcpt in record.recipients:
        lines.append(f"  {printable(rcpt.address)}  {_state(record, rcpt, now)}")
        if rcpt.params:
            shown = " ".join(n if v is None else f"{n}={v}" for n, v in rcpt.params)
            lines.append(f"    parameters: {printable(shown)}")
        history = rcpt.history
        for attempt in history:
            where = f"  (from {attempt.remote})" if attempt.remote else ""
            lines.append(f"    {_timestamp(attempt.at)}  {printable(str(attempt.reply) + where)}")
        if not history and rcpt.last_reply is not None:
            lines.append(f"    last reply: {printable(str(rcpt.last_reply))}")
    return lines
