"""The SMTP client's settings, results and errors, and how a transport failure becomes one.

Re-exported by :mod:`submitd.client`, which is where callers import them from.
"""

from __future__ import annotations

import enum
import math
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from .protocol import RemoteProtocolError, Reply
from .protocol._client_oauth import is_bearer_token
from .protocol._grammar import GrammarError, has_control, parse_hello_domain
from .secret import Secret

__all__ = [
    "ClientSettings",
    "ClientTLSMode",
    "ClientTimeouts",
    "SMTPClientError",
    "TransactionResult",
    "connect_error",
    "detail",
    "transport_error",
]


class ClientTLSMode(enum.Enum):
    """How the connection is protected: STARTTLS (port 587), implicit TLS (465) or not at all."""

    STARTTLS = "starttls"
    IMPLICIT = "implicit"
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class ClientTimeouts:
    """Deadlines in seconds; the defaults are RFC 5321 §4.5.3.2's."""

    connect: float = 30.0
    greeting: float = 300.0  # also EHLO/HELO, STARTTLS and the TLS handshake, AUTH, RSET, QUIT
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0  # each write of the body
    data_end: float = 600.0  # waiting for the reply after CRLF.CRLF

    def __post_init__(self) -> None:
        for name in ("connect", "greeting", "mail", "rcpt", "data_init", "data_block", "data_end"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"timeout {name} must be a positive number of seconds")


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """Where and how to connect, and how to log in.

    ``ssl_context`` is required for STARTTLS and implicit TLS and should verify certificates
    (``ssl.create_default_context()``); ``server_hostname`` is the name checked in the
    certificate (default ``host``). AUTH is used when ``username`` is set, with exactly one of
    ``password`` (AUTH PLAIN, else LOGIN) or ``oauth_token`` (AUTH XOAUTH2 with this OAuth 2.0
    bearer token; ``username`` is then the mailbox). Credentials with ``tls = NONE`` are
    refused. Neither secret shows in ``repr``.
    """

    host: str
    port: int
    tls: ClientTLSMode
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None = None
    helo_name: str
    username: str | None = None
    password: Secret | None = None
    oauth_token: Secret | None = None
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)

    def __post_init__(self) -> None:
        if not self.host or has_control(self.host) or " " in self.host:
            raise ValueError("host must be a host name or address")
        if not 0 < self.port < 65536:
            raise ValueError("port must be between 1 and 65535")
        if self.tls is not ClientTLSMode.NONE and self.ssl_context is None:
            raise ValueError(f"tls {self.tls.value} needs an ssl_context")
        if self.tls is ClientTLSMode.NONE and (
            self.username or self.password is not None or self.oauth_token is not None
        ):
            raise ValueError("credentials are never sent without TLS")
        if self.password is not None and self.oauth_token is not None:
            raise ValueError("password and oauth_token exclude each other")
        if self.oauth_token is not None and self.username is None:
            raise ValueError("oauth_token needs username (the mailbox)")
        if (self.username is None) != (self.password is None and self.oauth_token is None):
            raise ValueError("username and password (or oauth_token) go together")
        if self.password is not None and not self.password:
            raise ValueError("password is empty")
        if self.username is not None and (not self.username or has_control(self.username)):
            raise ValueError("username must be non-empty without control characters")
        if self.password is not None and "\0" in self.password.reveal():
            raise ValueError("password contains NUL")
        if self.oauth_token is not None and not is_bearer_token(self.oauth_token.reveal()):
            raise ValueError("oauth_token is not an RFC 6750 bearer token")
        try:
            parse_hello_domain(self.helo_name)
        except GrammarError:
            raise ValueError("helo_name must be a domain or address literal") from None


class SMTPClientError(Exception):
    """The attempt failed before or outside a transaction.

    That is: connect, TLS, greeting, EHLO, AUTH, a dropped connection, a timeout, or a
    protocol violation by the server. ``stage`` says where (``"connect"``, ``"tls"`` for the
    handshake, ``"greeting"``, ``"ehlo"``, ``"starttls"``, ``"auth"``, ``"mail"``, ``"rcpt"``,
    ``"data"``, ``"reset"`` or ``"protocol"``); ``reply`` is the server's reply or one made up
    for the failure (``421 4.4.1`` connection refused or timed out, ``454 4.7.5`` certificate
    did not verify, ``454 4.7.0`` STARTTLS not offered or the handshake failed, ``451 4.4.2``
    connection lost or timed out, ``451 4.5.0`` malformed reply, ``504 5.5.4`` no usable AUTH
    mechanism or XOAUTH2 not offered).

    ``oauth_error`` is set when an AUTH XOAUTH2 was refused with the provider's JSON error
    challenge (RFC 7628 §3.2.2): its ``status``, ``schemes`` and ``scope``, as in
    ``status=401 schemes=bearer scope=https://mail.google.com/``; else None. ``str(exc)`` is
    one line (with ``oauth_error`` when set); it never holds a password or a token.
    """

    def __init__(self, stage: str, reply: Reply, *, oauth_error: str | None = None) -> None:
        self.stage = stage
        self.reply = reply
        self.oauth_error = oauth_error
        text = f"{stage}: {reply}"
        if oauth_error is not None:
            text += f" (XOAUTH2 {oauth_error})"
        super().__init__(text)

    def __repr__(self) -> str:
        extra = f", oauth_error={self.oauth_error!r}" if self.oauth_error is not None else ""
        return f"SMTPClientError({self.stage!r}, {str(self.reply)!r}{extra})"


@dataclass(frozen=True, kw_only=True)
class TransactionResult:
    """The final reply for every recipient address of one :meth:`SMTPClient.send`.

    That is the RCPT refusal, else the DATA reply; a MAIL refusal is every recipient's
    reply; capability failures (SIZE, 8BITMIME, SMTPUTF8) are synthesised 5xx replies.

    ``dsn_passed_on`` is True when the server offered DSN, so the message's ``RET`` and
    ``ENVID`` went with MAIL and each recipient's ``NOTIFY`` and ``ORCPT`` with its RCPT
    (RFC 3461 §4): the server now reports on them. False when it did not offer DSN and none
    of them was sent (RFC 3461 §4.1 then leaves the reports to us).
    """

    replies: Mapping[str, Reply]
    dsn_passed_on: bool = False


def detail(text: object) -> str:
    """Our own words plus an error description, made safe for a reply line and a log line."""
    clean = "".join(c if c.isprintable() else "?" for c in str(text))
    return clean[:200]


def _cause(exc: BaseException) -> BaseException:
    """The innermost cause: trio wraps socket and TLS errors in BrokenResourceError."""
    seen = 0
    while exc.__cause__ is not None and seen < 10:
        exc, seen = exc.__cause__, seen + 1
    return exc


def connect_error(exc: OSError | trio.TooSlowError, where: str) -> SMTPClientError:
    """The TCP connection to ``where`` could not be opened: ``421 4.4.1`` (RFC 3463)."""
    if isinstance(exc, trio.TooSlowError):
        return SMTPClientError("connect", Reply.make(421, "4.4.1",
                                                     f"connection to {where} timed out"))
    reason = detail(_connect_reason(exc))
    return SMTPClientError("connect", Reply.make(421, "4.4.1",
                                                 f"cannot connect to {where}: {reason}"))


def _connect_reason(exc: OSError) -> str:
    """Why connecting failed, in the system's words ("Connection refused").

    trio reports "all attempts to connect ... failed" and keeps each address's error in an
    exception group behind it; the operator needs those.
    """
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):
        reasons = [
            _errno_text(inner) for inner in group.exceptions if isinstance(inner, OSError)
        ]
        if reasons:
            return ", ".join(dict.fromkeys(reasons))
    return _errno_text(exc)


def _errno_text(exc: OSError) -> str:
    """The system's description of ``exc`` (``os.strerror``), else its message."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc.strerror or exc)


#: What :func:`transport_error` maps; anything else is a bug and propagates.
TRANSPORT_ERRORS = (trio.TooSlowError, RemoteProtocolError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError)


def transport_error(exc: BaseException, stage: str, action: str) -> SMTPClientError:
    """The error for a failure of the connection during ``stage`` while ``action``.

    A timeout or a connection lost is ``451 4.4.2``; a reply that breaks the framing is
    stage ``protocol``. TLS errors are stage ``tls`` with ``454 4.7.5`` (certificate) or
    ``454 4.7.0`` only during the handshake (``stage == "tls"``); after it, a TLS error, an
    EOF without close_notify or a reset is the connection lost in the stage in progress.
    """
    if isinstance(exc, trio.TooSlowError):
        return SMTPClientError(stage, Reply.make(451, "4.4.2", f"timed out {action}"))
    if isinstance(exc, RemoteProtocolError):
        return SMTPClientError("protocol" if exc.reply.status == "4.5.0" else stage, exc.reply)
    cause = _cause(exc)
    if stage == "tls" and isinstance(cause, ssl.SSLCertVerificationError):
        reason = detail(cause.verify_message or cause.reason or cause)
        return SMTPClientError("tls", Reply.make(454, "4.7.5",
                                                 f"certificate did not verify: {reason}"))
    if stage == "tls" and isinstance(cause, ssl.SSLError):
        reason = detail(cause.reason or cause)
        return SMTPClientError("tls", Reply.make(454, "4.7.0", f"TLS failed: {reason}"))
    if isinstance(cause, ssl.SSLEOFError):
        reason = "closed without TLS close_notify"
    elif isinstance(cause, ssl.SSLError):
        reason = f"TLS error {detail(cause.reason or cause)}"
    else:
        reason = detail(getattr(cause, "strerror", None) or cause or type(cause).__name__)
    return SMTPClientError(stage, Reply.make(451, "4.4.2", f"connection lost {action}: {reason}"))
