"""Delivery status notifications: RFC 3464 reports in an RFC 6522 ``multipart/report``.

:func:`build_report` writes the whole message by hand, so every byte is controlled: CRLF
line ends, no line longer than 78 characters in the generated headers and parts (998 at
most anywhere, RFC 5322 §2.1.1), 7-bit text unless an internationalised address needs UTF-8
in the ``To`` field or a returned message has 8-bit content. Every value that came from
outside (addresses, reply text, host names, ENVID, ORCPT, the original header section) is
cleaned before it is written, so nothing can add a header field or a MIME part. The report
has three parts: a text for people, the ``message/delivery-status`` fields for programs
(RFC 3464 §2), and the original message: its header section as ``text/rfc822-headers``
(RFC 6522 §4), or the whole message as ``message/rfc822`` when the client asked for it with
``RET=FULL`` (RFC 3461 §4.3; ``message/global`` when its header section is UTF-8, RFC 6532
§3.7).

Which reports a recipient gets is its ``NOTIFY`` parameter's business (RFC 3461 §4.1):
:func:`notify_conditions`.
"""

from __future__ import annotations

import enum
import re
import secrets
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from ..protocol._events import BodyType, MailParams
from ..protocol._grammar import GrammarError, decode_xtext, encode_xtext, replace_controls
from ..protocol._replies import Reply
from ..views import Envelope, Recipient

__all__ = [
    "MAX_RETURNED_SIZE",
    "Action",
    "Notify",
    "RecipientStatus",
    "Report",
    "build_report",
    "notify_conditions",
    "report_envelope",
    "returnable",
]

#: The largest message a failure report returns whole (``RET=FULL``); a larger one is
#: returned as its header section, and the report says so.
MAX_RETURNED_SIZE = 10 * 1024 * 1024

_LINE = 76  # soft limit for lines we fold or wrap
_MAX_DIAGNOSTIC = 2000  # characters of a reply kept in Diagnostic-Code
_STATUS = re.compile(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")
_HOST_CHARS = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")


class Action(enum.Enum):
    """What happened to a recipient (RFC 3464 §2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"  # final delivery (a mailbox) succeeded
    RELAYED = "relayed"  # handed to a next hop that does not report delivery itself


class Notify(enum.Enum):
    """A condition the ``NOTIFY`` parameter asks a report for (RFC 3461 §4.1)."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


#: What a recipient without ``NOTIFY`` gets: RFC 3461 §4.1 leaves the choice to the MTA;
#: submitd reports failures, and delays when ``[queue] delay_warning`` is set.
DEFAULT_NOTIFY = frozenset({Notify.FAILURE, Notify.DELAY})


def notify_conditions(recipient: Recipient) -> frozenset[Notify]:
    """The conditions ``recipient``'s ``NOTIFY`` parameter asks reports for.

    Absent: :data:`DEFAULT_NOTIFY`; ``NEVER``: none. Unknown words are ignored.
    """
    value = recipient.param("NOTIFY")
    if value is None:
        return DEFAULT_NOTIFY
    words = {w.strip().upper() for w in value.split(",")}
    return frozenset(n for n in Notify if n.value in words)


@dataclass(frozen=True, kw_only=True)
class RecipientStatus:
    """One recipient's entry in a report.

    ``reply`` is the last reply (Diagnostic-Code and, when it carries one, Status);
    ``remote`` the host that gave it (Remote-MTA); ``will_retry_until`` only for delays.
    ``original_recipient`` is the recipient's ``ORCPT`` parameter as the client sent it
    (``addr-type;xtext``); it becomes the ``Original-Recipient`` field, decoded.
    """

    address: str
    action: Action
    reply: Reply | None = None
    remote: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None
    original_recipient: str | None = None

    @property
    def status(self) -> str:
        """The RFC 3463 status: the reply's own when it fits the action, else X.0.0."""
        if self.reply is not None and _STATUS.match(self.reply.status):
            success = self.reply.status.startswith("2.")
            if success == (self.action in (Action.DELIVERED, Action.RELAYED)):
                return self.reply.status
        return {Action.FAILED: "5.0.0", Action.DELAYED: "4.0.0"}.get(self.action, "2.0.0")


@dataclass(frozen=True, kw_only=True)
class Report:
    """A report about one message, to be sent to ``sender`` (the original envelope sender).

    ``headers`` is the original header section (bounded by the caller); ``date`` is when
    the report is written; ``envelope_id`` is the client's ``ENVID`` if it gave one
    (decoded). ``original`` is the whole original message (CRLF), returned in place of
    ``headers`` (``RET=FULL``; see :func:`returnable`); ``return_note`` is one sentence for
    people saying why the message is not returned whole although they asked for it.
    """

    hostname: str
    sender: str
    arrival: float
    date: float
    recipients: tuple[RecipientStatus, ...]
    headers: bytes = b""
    queue_id: str | None = None
    envelope_id: str | None = None
    original: bytes | None = None
    return_note: str | None = None

    @property
    def kind(self) -> Action:
        """What the report is about: a failure, a delay, or a success (relayed or not)."""
        actions = {r.action for r in self.recipients}
        for action in (Action.FAILED, Action.DELAYED, Action.RELAYED):
            if action in actions:
                return action
        return Action.DELIVERED


def returnable(message: bytes) -> bool:
    """Tell whether ``message`` can be returned whole as a ``message/rfc822`` part.

    Such a part may only be 7bit or 8bit (RFC 2046 §5.2.1): CRLF line ends only, no NUL,
    no line over 998 octets (RFC 5322 §2.1.1). Submitted messages always qualify.
    """
    if len(message) > MAX_RETURNED_SIZE or b"\0" in message:
        return False
    lines = message.split(b"\r\n")
    return all(len(line) <= 998 and b"\r" not in line and b"\n" not in line for line in lines)


# --- cleaning values --------------------------------------------------------------------------


def _one_line(value: str) -> str:
    """Controls (CR, LF, NUL, DEL, ...) become spaces; runs of whitespace collapse."""
    return " ".join(replace_controls(value, " ").split())


def _xtext(value: str) -> str:
    r"""RFC 6533 §3 utf-8-addr-xtext: non-ASCII, ``\``, ``+`` and ``=`` as ``\x{HEX}``."""
    return "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in "\\+=" else f"\\x{{{ord(c):X}}}"
        for c in _one_line(value)
    )


def _address_field(address: str) -> str:
    """``rfc822; addr`` for an ASCII address, ``utf-8; xtext`` otherwise (RFC 6533 §3)."""
    clean = _one_line(address).replace(" ", "")
    if clean.isascii():
        return f"rfc822; {clean}"
    return f"utf-8; {_xtext(clean)}"


def _original_recipient(orcpt: str) -> str | None:
    """``addr-type; address`` from an ORCPT value ``addr-type;xtext`` (RFC 3464 §2.3.1).

    The address is decoded from xtext; a non-ASCII one is written as ``utf-8`` address-type
    in utf-8-addr-xtext (RFC 6533 §3). None when the value is not ``addr-type;xtext``.
    """
    addr_type, sep, encoded = orcpt.partition(";")
    addr_type = addr_type.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", addr_type):
        return None
    try:
        address = _one_line(decode_xtext(encoded.strip()))
    except GrammarError:
        return None
    if not address.isascii():
        return f"utf-8; {_xtext(address)}"
    return f"{addr_type}; {address}"


def _ascii(value: str) -> str:
    return _one_line(value).encode("ascii", "backslashreplace").decode("ascii")


def _host(value: str) -> str:
    return _HOST_CHARS.sub("", value)[:255] or "unknown"


def _fold(name: str, value: str) -> list[str]:
    """``Name: value`` folded at spaces into lines of about 78 characters (RFC 5322 §2.2.3)."""
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split(" "):
        word = word[:900]  # a word longer than a line cannot be folded: keep it bounded
        if len(current) + 1 + len(word) > _LINE and current != f"{name}:":
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return lines


def _date(seconds: float) -> str:
    """An RFC 5322 §3.3 date-time in UTC (``Tue, 14 Nov 2023 22:13:20 +0000``)."""
    return format_datetime(datetime.fromtimestamp(int(seconds), UTC))


# --- the parts --------------------------------------------------------------------------------


def _human_text(report: Report) -> str:
    lines = [f"This is the mail system at {_host(report.hostname)}.", ""]
    kind = report.kind
    if kind is Action.FAILED:
        attached = "" if report.original is not None else " (its header section)"
        lines += textwrap.wrap(
            "Your message could not be delivered to one or more recipients. It is attached "
            f"below{attached}. The reason for each recipient follows.", _LINE
        )
    elif kind is Action.DELIVERED:
        lines += textwrap.wrap(
            "Your message was delivered to the recipients below, as you asked to be told "
            "(its header section is attached).", _LINE
        )
    elif kind is Action.RELAYED:
        lines += textwrap.wrap(
            "Your message was handed on to the next mail system for the recipients marked "
            "relayed below. That system does not send delivery status notifications, so "
            "this is the last notice you will get about them: it does not confirm that the "
            "message reached the mailbox.", _LINE
        )
    else:
        until = min((r.will_retry_until for r in report.recipients if r.will_retry_until),
                    default=None)
        text = ("Your message has not been delivered yet to the recipients below. The mail "
                "system keeps trying")
        text += f" until {_date(until)}" if until is not None else ""
        text += "; you do not need to send it again."
        lines += textwrap.wrap(text, _LINE)
    if report.return_note:
        lines += ["", *textwrap.wrap(_one_line(report.return_note), _LINE)]
    for r in report.recipients:
        lines.append("")
        why = str(r.reply) if r.reply is not None else r.status
        where = f" (reported by {_host(r.remote)})" if r.remote else ""
        if r.action in (Action.DELIVERED, Action.RELAYED):
            where = f" ({r.action.value}{f' to {_host(r.remote)}' if r.remote else ''})"
        lines += textwrap.wrap(f"<{_one_line(r.address)}>: {_one_line(why)}{where}", _LINE,
                               break_long_words=True, break_on_hyphens=False)
    return "\r\n".join(lines) + "\r\n"


def _status_fields(report: Report) -> str:
    lines = [f"Reporting-MTA: dns; {_host(report.hostname)}"]
    if report.queue_id is not None:
        lines += _fold("X-Submitd-Queue-ID", _ascii(report.queue_id))
    if report.envelope_id is not None:
        # RFC 3464 §2.2.1, the ENVID as xtext (RFC 3461 §4): exactly as the client sent it.
        lines += _fold("Original-Envelope-Id", encode_xtext(report.envelope_id))
    lines.append(f"Arrival-Date: {_date(report.arrival)}")
    for r in report.recipients:
        lines.append("")
        original = (_original_recipient(r.original_recipient)
                    if r.original_recipient is not None else None)
        if original is not None:
            lines += _fold("Original-Recipient", original)
        lines += _fold("Final-Recipient", _address_field(r.address))
        lines.append(f"Action: {r.action.value}")
        lines.append(f"Status: {r.status}")
        if r.remote:
            lines.append(f"Remote-MTA: dns; {_host(r.remote)}")
        if r.reply is not None:
            diagnostic = _ascii(str(r.reply))[:_MAX_DIAGNOSTIC]
            lines += _fold("Diagnostic-Code", f"smtp; {diagnostic}")
        if r.last_attempt is not None:
            lines.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.action is Action.DELAYED and r.will_retry_until is not None:
            lines.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
    return "\r\n".join(lines) + "\r\n"


def _quoted_printable(data: bytes) -> bytes:
    """RFC 2045 §6.7 quoted-printable, one encoded line per CRLF-separated input line."""
    out: list[bytes] = []
    for line in data.split(b"\r\n"):
        encoded = bytearray()
        width = 0
        for i, byte in enumerate(line):
            last = i == len(line) - 1
            if (33 <= byte <= 126 and byte != 61) or (byte in (9, 32) and not last):
                piece = bytes((byte,))
            else:
                piece = b"=%02X" % byte
            if width + len(piece) > 75:
                encoded += b"=\r\n"
                width = 0
            encoded += piece
            width += len(piece)
        out.append(bytes(encoded))
    return b"\r\n".join(out)


def _text_part(text: str) -> tuple[str, bytes]:
    """A text body and its transfer encoding: 7bit when it can be, else quoted-printable."""
    data = text.encode("utf-8")
    if data.isascii():
        return "7bit", data
    return "quoted-printable", _quoted_printable(data.removesuffix(b"\r\n")) + b"\r\n"


def _headers_part(headers: bytes) -> tuple[str, bytes]:
    """The original header section as text/rfc822-headers (7bit when already safe)."""
    # The fields without the empty line that ended them; CRLF after the last one.
    section = headers.rstrip(b"\r\n")
    section = section + b"\r\n" if section else b""
    lines = section.removesuffix(b"\r\n").split(b"\r\n")
    safe = section.isascii() and all(
        len(line) <= 998 and not re.search(rb"[\r\n\0]", line) for line in lines
    )
    if safe:
        return "7bit", section
    return "quoted-printable", _quoted_printable(section.removesuffix(b"\r\n")) + b"\r\n"


# --- the message ------------------------------------------------------------------------------


_SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.DELIVERED: "Successful Mail Delivery Report",
    Action.RELAYED: "Relayed Mail Report (no further notice will follow)",
}


def _original_part(report: Report) -> tuple[str, str, str, bytes]:
    """Content type, transfer encoding, description and body of the third part."""
    what = "Undelivered Message" if report.kind is Action.FAILED else "Message"
    if report.original is not None:
        body = report.original if report.original.endswith(b"\r\n") else report.original + b"\r\n"
        head = body.partition(b"\r\n\r\n")[0]
        # RFC 6532 §3.7: an embedded message with UTF-8 in its header section is message/global.
        content_type = "message/rfc822" if head.isascii() else "message/global"
        return content_type, "7bit" if body.isascii() else "8bit", what, body
    headers_cte, headers = _headers_part(report.headers)
    content_type = "text/rfc822-headers" + ("" if headers_cte == "7bit" else "; charset=utf-8")
    return content_type, headers_cte, f"{what} Headers", headers


def build_report(report: Report) -> bytes:
    """Return the report as a complete message (header section and body, CRLF line ends)."""
    if not report.recipients:
        raise ValueError("a report needs at least one recipient")
    host = _host(report.hostname)
    subject = _SUBJECTS[report.kind]
    human_cte, human = _text_part(_human_text(report))
    status = _status_fields(report).encode("ascii")
    parts = (
        (f"text/plain; charset={'us-ascii' if human_cte == '7bit' else 'utf-8'}", human_cte,
         "Notification", human),
        ("message/delivery-status", "7bit", "Delivery report", status),
        _original_part(report),
    )
    while True:
        boundary = f"=_submitd_{secrets.token_hex(12)}"
        if all(boundary.encode("ascii") not in body for *_, body in parts):
            break
    to = _one_line(report.sender).replace(" ", "")
    token = secrets.token_hex(8)
    message_id = f"<{_ascii(report.queue_id or 'report')}.{token}@{host}>"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Date: {_date(report.date)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    out = ["\r\n".join(head).encode("utf-8") + b"\r\n\r\n",
           b"This is a MIME-encapsulated message (RFC 3464 delivery status notification).\r\n"]
    for content_type, cte, description, body in parts:
        out.append(
            (f"\r\n--{boundary}\r\n"
             f"Content-Type: {content_type}\r\n"
             f"Content-Description: {description}\r\n"
             f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode("ascii")
        )
        out.append(body)
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def report_envelope(report: Report, *, received_at: float) -> Envelope:
    """The envelope that sends ``report``: null sender (RFC 5321 §4.5.5), to ``sender``.

    An internationalised sender address needs SMTPUTF8 (its ``To`` field is UTF-8); a
    returned message with 8-bit content needs ``BODY=8BITMIME`` (RFC 6152).
    """
    if not report.sender:
        raise ValueError("a report is never sent to the null sender")
    international = not report.sender.isascii()
    eight_bit = international or (report.original is not None and not report.original.isascii())
    params = MailParams(
        body=BodyType.EIGHT_BIT_MIME if eight_bit else BodyType.SEVEN_BIT,
        smtputf8=international,
    )
    return Envelope(
        sender="",
        recipients=(Recipient(address=report.sender),),
        params=params,
        username=None,
        received_at=received_at,
    )
