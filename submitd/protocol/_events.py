"""Events the server-role protocol core hands to its user (the session).

Events that need an answer are marked with :class:`NeedsAnswer`: before asking for the next
event the session accepts the event with the ``ServerConnection`` method made for its kind
(``accept_hello``, ``accept_auth``, ``accept_mail``, ``accept_rcpt``, ``accept_data``,
``accept_message``) or refuses it with ``reject(reply)``. The others are informational.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._replies import Reply
from ._sasl import Credentials

__all__ = [
    "NEED_DATA",
    "AuthRequest",
    "BodyType",
    "ConnectionClosed",
    "DataChunk",
    "DataComplete",
    "DataStart",
    "Event",
    "Hello",
    "MailFrom",
    "MailParams",
    "NeedData",
    "NeedsAnswer",
    "RcptTo",
    "StartTLS",
]


class NeedData(enum.Enum):
    """Sentinel type: the core needs more bytes before it can produce another event."""

    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event()`` when the receive buffer holds no complete command.
NEED_DATA = NeedData.NEED_DATA


class BodyType(enum.Enum):
    """The MAIL FROM ``BODY=`` parameter (RFC 6152)."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"


class DsnReturn(enum.Enum):
    """The MAIL FROM ``RET=`` parameter (RFC 3461 §4.3): what a failure report returns."""

    FULL = "FULL"  # the whole message
    HDRS = "HDRS"  # only its header section


@dataclass(frozen=True, slots=True, kw_only=True)
class MailParams:
    """Validated ESMTP parameters of MAIL FROM.

    ``auth`` is the client's ``AUTH=`` value, recorded verbatim and never trusted
    (RFC 4954 §5): policy must not treat it as an identity. ``ret`` and ``envid`` are the
    DSN parameters ``RET=`` and ``ENVID=`` (RFC 3461 §4.3, §4.4); ``envid`` is decoded from
    xtext.
    """

    size: int | None = None
    body: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    auth: str | None = None
    ret: DsnReturn | None = None
    envid: str | None = None


class NeedsAnswer:
    """Mixin for events the session must answer: its ``accept_...`` method or ``reject(reply)``."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(NeedsAnswer):
    """EHLO or HELO. ``accept_hello(event, keywords)`` answers with the core's extensions."""

    domain: str
    extended: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTLS:
    """STARTTLS accepted; ``220 2.0.0`` is queued. Flush, wrap the stream, call ``tls_started()``.

    ``discarded`` counts the plaintext bytes that followed the command and were thrown away
    (CVE-2011-0411): a non-zero value is worth a log line.
    """

    discarded: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthRequest(NeedsAnswer):
    """A completed SASL exchange (PLAIN or LOGIN) with the ``credentials`` to verify.

    ``accept_auth(event)`` sends ``235 2.7.0``; a ``reject`` counts as a failed login.
    """

    credentials: Credentials


@dataclass(frozen=True, slots=True, kw_only=True)
class MailFrom(NeedsAnswer):
    """MAIL FROM with a syntactically valid reverse path ("" for ``<>``): ``accept_mail``."""

    sender: str
    params: MailParams


@dataclass(frozen=True, slots=True, kw_only=True)
class RcptTo(NeedsAnswer):
    """RCPT TO with a syntactically valid forward path (never a relay trick).

    ``params`` holds the ESMTP parameters the core accepted, as ``(NAME, value)`` pairs.
    ``accept_rcpt(event)`` sends ``250 2.1.5`` (or the session's own 2xx).
    """

    recipient: str
    params: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DataStart(NeedsAnswer):
    """DATA with at least one accepted recipient. ``accept_data(event)`` sends ``354``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DataChunk:
    """Message content, dot-unstuffed, lines ending in CRLF; no answer needed."""

    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class DataComplete(NeedsAnswer):
    """The terminating CRLF.CRLF was read.

    ``error`` is set when the message must be refused (bare CR or LF, line or header too long,
    size exceeded): the session must discard what it stored and ``reject(error)``. Otherwise
    the session stores the message and answers ``accept_message(event, reply)`` with its
    ``250 2.0.0``.
    ``size`` is the number of octets of the unstuffed message received.
    """

    size: int
    error: Reply | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """The session is over (QUIT, EOF, too many errors, a cross-protocol attack).

    Flush ``data_to_send()`` (it may hold ``221`` or ``421``) and close the stream.
    ``client_done`` is True when the client ended it (QUIT or EOF): it sends nothing more, so
    there is no input to drain before closing.
    """

    reason: str
    client_done: bool = False


Event = (
    Hello | StartTLS | AuthRequest | MailFrom | RcptTo | DataStart | DataChunk | DataComplete
    | ConnectionClosed
)
