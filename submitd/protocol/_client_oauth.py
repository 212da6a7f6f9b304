r"""SASL XOAUTH2 in the client role: the initial response and the provider's error challenge.

XOAUTH2 is the OAuth 2.0 bearer-token mechanism Google and Microsoft accept for SMTP AUTH
(the same exchange as OAUTHBEARER, RFC 7628, in its older framing). The client sends
``AUTH XOAUTH2`` with the initial response ``base64("user=" user ^A "auth=Bearer " token ^A
^A)``. A server that accepts it answers ``235``. A server that refuses it answers ``334`` with
a base64 JSON error (``{"status":"401","schemes":"bearer","scope":"..."}``, RFC 7628 §3.2.2);
the client answers that with an empty line and the server then sends its final ``5xx``.

Nothing here logs, and no exception text holds the token: errors name the field only.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping

from ._grammar import has_control
from ._replies import Reply

__all__ = [
    "XOAUTH2",
    "is_bearer_token",
    "offers_xoauth2",
    "xoauth2_error",
    "xoauth2_initial_response",
]

#: The mechanism's name in the EHLO ``AUTH`` keyword and the AUTH command.
XOAUTH2 = "XOAUTH2"

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")

#: The fields of the error challenge worth reporting (RFC 7628 §3.2.2), in this order.
_ERROR_FIELDS = ("status", "schemes", "scope")
#: Each reported value is cut to this many characters; the challenge is the server's text.
_MAX_VALUE = 120


def is_bearer_token(token: str) -> bool:
    """True when ``token`` has the RFC 6750 §2.1 ``b64token`` syntax a bearer token needs."""
    return _B64TOKEN.match(token) is not None


def offers_xoauth2(extensions: Mapping[str, str]) -> bool:
    """True when the EHLO ``AUTH`` keyword lists XOAUTH2 (names compare case-insensitively)."""
    return XOAUTH2 in extensions.get("AUTH", "").upper().split()


def xoauth2_initial_response(username: str, token: str) -> str:
    """``base64("user=" username ^A "auth=Bearer " token ^A ^A)``.

    Raises ``ValueError`` naming the field, never its value, when ``username`` is empty or
    holds a control character (``^A`` separates the fields) or ``token`` is not a bearer token.
    """
    if not username or has_control(username):
        raise ValueError("username must be non-empty without control characters")
    if not is_bearer_token(token):
        raise ValueError("oauth token is not an RFC 6750 bearer token")
    raw = f"user={username}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw).decode("ascii")


def xoauth2_error(challenge: Reply, secrets: Iterable[str] = ()) -> str:
    """One line summing up the JSON error in a ``334`` challenge to AUTH XOAUTH2.

    For ``{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}`` that is
    ``status=401 schemes=bearer scope=https://mail.google.com/``. Values are cut short and
    stripped of control characters; every string in ``secrets`` (the token) is blanked as
    ``***`` should a server echo it. A challenge that is not base64 JSON is reported as such.
    """
    try:
        decoded = json.loads(base64.b64decode(challenge.text.strip(), validate=True))
    except (binascii.Error, ValueError):
        return "unreadable error challenge (not base64 JSON)"
    if not isinstance(decoded, dict):
        return "unreadable error challenge (not a JSON object)"
    words = []
    for name in _ERROR_FIELDS:
        value = decoded.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool):
            text = _clean(str(value), secrets)
            words.append(f'{name}="{text}"' if " " in text or not text else f"{name}={text}")
    return " ".join(words) or "error challenge without status, schemes or scope"


def _clean(value: str, secrets: Iterable[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        value = value.replace(secret, "***")
    value = "".join(c if c.isprintable() else "?" for c in value).replace('"', "'")
    return value[:_MAX_VALUE]
