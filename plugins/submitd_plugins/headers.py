r"""headers: the RFC 6409 §8 fix-ups on every submitted message, on both ports.

Configuration (every key optional; the table itself may be left out)::

    [plugins.headers]
    hide_client = true      # the Received: field does not show the client's IP address
    show_login = false      # true: the Received: field names the login in a comment
    add_date = true         # add Date: when it is missing or unreadable (RFC 6409 §8.2)
    add_message_id = true   # add Message-ID: when it is missing or invalid (RFC 6409 §8.3)

Every accepted message gets exactly one ``Received:`` field on top (the trace field RFC 5321
§4.4 asks of every server that accepts a message), for example::

    Received: from laptop.example.org (unknown) by mail.example.org (submitd) with ESMTPSA
     (TLSv1.3 TLS_AES_256_GCM_SHA384) id 4bR7x2Kq9; Tue, 05 Mar 2024 10:00:00 +0100

(one line in the message; folded here). ``with ESMTPSA`` is the RFC 3848 name for ESMTP
inside TLS after SMTP AUTH; the comment after it gives the TLS version and cipher. ``id`` is
the queue ID that ``submitd queue`` and the logs show.

The client's address: with ``hide_client = true`` (the default) the TCP-info comment reads
``(unknown)``, the way Postfix writes a client it could not name, and an EHLO argument that is
an address literal (``[192.168.1.20]``, which some mail programs send) is written as
``unknown`` too: the field says nothing about where the submitter was. Postfix counts such a
field toward its hop limit like any other; SpamAssassin finds no address in it and skips it as
a relay it cannot place, which is what a hidden hop should be. With ``hide_client = false`` the
comment is the RFC 5321 address literal: ``([192.0.2.7])`` or ``([IPv6:2001:db8::7])``.

With ``show_login = true`` a comment ``(authenticated user alice)`` follows the TLS comment.
Text that came from the client is sanitised so the field stays one valid line: an EHLO name
that is not a plain domain name or address literal is written ``unknown``; in the login,
``(``, ``)`` and ``\`` are escaped as RFC 5322 quoted-pairs, anything but printable US-ASCII
becomes ``?``, and more than 64 characters are cut with ``...``.

``Date:``: kept when there is exactly one and :func:`email.utils.parsedate_to_datetime` reads
it; otherwise every ``Date:`` is removed and one with the time of submission is added (RFC 6409
§8.2 lets the MSA add a missing one or correct one that does not conform).

``Message-ID:``: kept when there is exactly one of the RFC 5322 §3.6.4 form ``<left@right>``
(comments and spaces around it allowed, obsolete quoted left parts and UTF-8 accepted, so that
replies keep threading); otherwise every ``Message-ID:`` is removed and ``<RANDOM@hostname>``
is added, ``hostname`` being the configuration's (RFC 6409 §8.3).

Unknown keys in ``[plugins.headers]`` stop the server at start (and ``check-config``). The
hook runs after the other plugins' data filters (``trylast``), so the ``Received:`` field is
the first line of the stored message even when another plugin adds fields of its own.

Uses only the public API: the names exported by :mod:`submitd`.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from submitd import (
    Config,
    ConfigError,
    Envelope,
    MessageHandle,
    Reply,
    SessionInfo,
    StashKey,
    hookimpl,
)

from ._login_groups import reject_unknown_keys

__all__ = [
    "SETTINGS",
    "HeadersSettings",
    "build_received",
    "submitd_configure",
    "submitd_data_filter",
    "valid_date",
    "valid_message_id",
]

NAME = "headers"
#: Longest login written into ``Received:`` (characters, before escaping).
MAX_LOGIN = 64
#: Longest TLS version or cipher name written into ``Received:``.
MAX_TLS_TOKEN = 64


@dataclass(frozen=True, kw_only=True)
class HeadersSettings:
    """The validated ``[plugins.headers]`` table."""

    hide_client: bool = True
    show_login: bool = False
    add_date: bool = True
    add_message_id: bool = True


_KEYS = ("hide_client", "show_login", "add_date", "add_message_id")

#: Where :func:`submitd_configure` keeps the settings.
SETTINGS = StashKey[HeadersSettings]()

# An EHLO name written as is: dot-separated labels of letters, digits, "-" and "_" (Windows
# host names carry "_"), at most 255 octets (RFC 5321 §4.5.3.1.2).
_HELLO_NAME = re.compile(r"\A(?=.{1,255}\Z)[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z")
# An EHLO address literal (RFC 5321 §4.1.3): the core has already checked the address.
_HELLO_LITERAL = re.compile(r"\A\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]\Z", re.IGNORECASE)
# TLS versions and cipher names are tokens such as TLSv1.3 and TLS_AES_256_GCM_SHA384.
_TLS_TOKEN = re.compile(r"\A[A-Za-z0-9._-]+\Z")
# Queue IDs are short and alphanumeric; an RFC 5321 "id" clause takes an atom.
_QUEUE_ID = re.compile(r"\A[A-Za-z0-9]{1,64}\Z")

# RFC 5322 §3.6.4 msg-id, with RFC 6532 §3.2 UTF-8 in atext and the obsolete quoted left part.
_U = r"\u0080-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_U}-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = rf'"(?:[\x21\x23-\x5b\x5d-\x7e {_U}]|\\[\x20-\x7e])*"'
_LITERAL = rf"\[[\x21-\x5a\x5e-\x7e{_U}]*\]"
_CFWS = r"(?:[ \t]|\([^()\\]*\))*"
_MSG_ID = re.compile(
    rf"\A{_CFWS}<(?:{_DOT_ATOM}|{_QUOTED})@(?:{_DOT_ATOM}|{_LITERAL})>{_CFWS}\Z"
)


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.headers]`` (four booleans) into ``config.stash``."""
    table = config.plugin_table(NAME)
    reject_unknown_keys(config, f"plugins.{NAME}", table, _KEYS)
    values: dict[str, bool] = {}
    for key, value in table.items():
        where = f"plugins.{NAME}.{key}"
        if not isinstance(value, bool):
            raise ConfigError(config.path, where, "must be true or false")
        values[key] = value
    config.stash[SETTINGS] = HeadersSettings(**values)


def _hello_name(ehlo: str | None, *, hide_client: bool) -> str:
    """The EHLO argument as the ``from`` clause writes it."""
    if ehlo is None:
        return "unknown"
    if _HELLO_NAME.match(ehlo):
        return ehlo
    if _HELLO_LITERAL.match(ehlo) and not hide_client:
        return ehlo
    return "unknown"


def _address_literal(peer_host: str) -> str:
    """``[192.0.2.7]`` or ``[IPv6:2001:db8::7]`` (RFC 5321 §4.1.3); ``unknown`` if no address."""
    try:
        address = ipaddress.ip_address(peer_host)
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


def _comment_text(text: str, limit: int) -> str:
    """``text`` made safe inside an RFC 5322 comment: escaped, printable ASCII, bounded."""
    cut = text if len(text) <= limit else text[:limit]
    out: list[str] = []
    for ch in cut:
        if ch in "()\\":
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return "".join(out) + ("..." if len(text) > limit else "")


def _protocol(session: SessionInfo) -> str:
    """The RFC 3848 ``with`` keyword: ESMTP plus S for TLS and A for SMTP AUTH."""
    return "ESMTP" + ("S" if session.tls else "") + ("A" if session.username else "")


def _tls_comment(session: SessionInfo) -> str | None:
    tokens = [t for t in (session.tls_version, session.tls_cipher)
              if t and len(t) <= MAX_TLS_TOKEN and _TLS_TOKEN.match(t)]
    return f"({' '.join(tokens)})" if session.tls and tokens else None


def _now() -> datetime:
    """The local time with its UTC offset (a function so tests can fix it)."""
    return datetime.now().astimezone()


def build_received(
    session: SessionInfo,
    settings: HeadersSettings,
    *,
    queue_id: str | None,
    when: datetime,
) -> str:
    """The value of the ``Received:`` field for a message submitted in ``session``."""
    hello = _hello_name(session.ehlo, hide_client=settings.hide_client)
    client = "unknown" if settings.hide_client else _address_literal(session.peer_host)
    parts = [f"from {hello} ({client})", f"by {session.config.hostname} (submitd)",
             f"with {_protocol(session)}"]
    tls = _tls_comment(session)
    if tls is not None:
        parts.append(tls)
    if settings.show_login and session.username:
        parts.append(f"(authenticated user {_comment_text(session.username, MAX_LOGIN)})")
    if queue_id is not None and _QUEUE_ID.match(queue_id):
        parts.append(f"id {queue_id}")
    return " ".join(parts) + "; " + email.utils.format_datetime(when)


def valid_date(values: list[str]) -> bool:
    """Whether ``values`` (every ``Date:`` of a message) is one date Python can read."""
    if len(values) != 1:
        return False
    try:
        email.utils.parsedate_to_datetime(values[0])
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return True


def valid_message_id(values: list[str]) -> bool:
    """Whether ``values`` (every ``Message-ID:``) is one RFC 5322 §3.6.4 ``<left@right>``."""
    return len(values) == 1 and _MSG_ID.match(values[0]) is not None


def _new_message_id(hostname: str) -> str:
    return f"<{secrets.token_hex(12)}@{hostname}>"


@hookimpl(trylast=True)
def submitd_data_filter(
    session: SessionInfo, envelope: Envelope, message: MessageHandle
) -> Reply | None:
    """Add ``Date:`` and ``Message-ID:`` if needed, then prepend one ``Received:``.

    Never refuses a message. ``add_header`` prepends, so the field added last is on top.
    """
    settings = session.config.stash.get(SETTINGS, None) or HeadersSettings()
    when = _now()
    if settings.add_message_id and not valid_message_id(message.get_all("Message-ID")):
        message.remove_header("Message-ID")
        message.add_header("Message-ID", _new_message_id(session.config.hostname))
    if settings.add_date and not valid_date(message.get_all("Date")):
        message.remove_header("Date")
        message.add_header("Date", email.utils.format_datetime(when))
    queue_id = message.queue_id or envelope.queue_id
    message.add_header("Received", build_received(session, settings, queue_id=queue_id,
                                                  when=when))
    return None
