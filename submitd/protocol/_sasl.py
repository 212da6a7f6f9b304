"""Server side of the SASL exchanges SMTP AUTH offers: PLAIN (RFC 4616) and LOGIN.

An exchange takes the optional initial response, then one client line per challenge, and ends
in decoded :class:`Credentials` or a failure reply. It never sees the network and never logs:
the password leaves this module only inside a :class:`~submitd.secret.Secret`.

:class:`Credentials` is the one value for a login all the way through: the exchange produces
it, the ``AuthRequest`` event carries it and the ``submitd_auth`` hook receives it (exported
as ``submitd.Credentials``).
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass

from ..secret import Secret
from . import _catalogue as R
from ._grammar import has_control
from ._replies import Reply

__all__ = [
    "Challenge",
    "Credentials",
    "Mechanism",
    "SaslExchange",
    "SaslFailure",
    "SaslStep",
    "decode_base64",
]


class Mechanism(enum.Enum):
    """The SASL mechanisms submitd offers (only inside TLS)."""

    PLAIN = "PLAIN"
    LOGIN = "LOGIN"


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    """Send ``reply`` (a 334) and wait for the client's next line."""

    reply: Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """Decoded SASL credentials handed to ``submitd_auth``; the password is a :class:`Secret`.

    ``mechanism`` is the SASL mechanism's name (``"PLAIN"`` or ``"LOGIN"``); ``authzid`` is
    empty or equal to ``username`` (RFC 4616 §2: any other is refused before this exists).
    """

    mechanism: str
    username: str
    authzid: str
    password: Secret


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslFailure:
    """The exchange ended without credentials; ``counted`` failures count towards the limit."""

    reply: Reply
    counted: bool = False


SaslStep = Challenge | Credentials | SaslFailure


class _SaslError(Exception):
    def __init__(self, failure: SaslFailure) -> None:
        self.failure = failure


def decode_base64(text: bytes) -> bytes:
    """Strict base64 (RFC 4954 §4): alphabet only, padding only at the end, canonical.

    ``=`` alone stands for an empty initial response. Raises ``ValueError`` otherwise.
    """
    if text == b"=":
        return b""
    try:
        decoded = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("invalid base64") from None
    # validate=True still accepts non-zero padding bits ("YR==" for "a"): a round trip
    # refuses every encoding but the canonical one.
    if base64.b64encode(decoded) != text:
        raise ValueError("invalid base64")
    return decoded


def _decode(text: bytes) -> bytes:
    try:
        return decode_base64(text)
    except ValueError:
        raise _SaslError(SaslFailure(reply=R.INVALID_BASE64)) from None


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _SaslError(SaslFailure(reply=R.CREDENTIALS_NOT_UTF8)) from None


def _credentials(mechanism: Mechanism, authzid: str, username: str, password: str) -> SaslStep:
    # RFC 4616 §2: an authzid other than the login would let one user act as another.
    if authzid and authzid != username:
        return SaslFailure(reply=R.AUTH_FAILED, counted=True)
    if not username or not password:
        return SaslFailure(reply=R.AUTH_FAILED, counted=True)
    if has_control(username):
        return SaslFailure(reply=R.LOGIN_HAS_CONTROL)
    return Credentials(
        mechanism=mechanism.value, username=username, authzid=authzid, password=Secret(password)
    )


class SaslExchange:
    """One AUTH exchange. Call :meth:`start`, then :meth:`respond` while it challenges."""

    __slots__ = ("_mechanism", "_username")

    def __init__(self, mechanism: Mechanism) -> None:
        self._mechanism = mechanism
        self._username: str | None = None

    @property
    def mechanism(self) -> Mechanism:
        """The mechanism being negotiated."""
        return self._mechanism

    def start(self, initial: bytes | None) -> SaslStep:
        """Begin with the initial response from the AUTH line, if any (RFC 4954 §4)."""
        if initial is None:
            if self._mechanism is Mechanism.PLAIN:
                return Challenge(reply=R.PLAIN_CHALLENGE)
            return Challenge(reply=R.LOGIN_USERNAME)
        return self._step(initial)

    def respond(self, line: bytes) -> SaslStep:
        """Feed one client line (without CRLF); ``*`` cancels (RFC 4954 §4)."""
        if line == b"*":
            return SaslFailure(reply=R.AUTH_CANCELLED)
        return self._step(line)

    def _step(self, text: bytes) -> SaslStep:
        try:
            decoded = _decode(text)
            if self._mechanism is Mechanism.PLAIN:
                return self._plain(decoded)
            if self._username is None:
                self._username = _utf8(decoded)
                return Challenge(reply=R.LOGIN_PASSWORD)
            return _credentials(Mechanism.LOGIN, "", self._username, _utf8(decoded))
        except _SaslError as exc:
            return exc.failure

    @staticmethod
    def _plain(decoded: bytes) -> SaslStep:
        # RFC 4616 §2: message = [authzid] UTF8NUL authcid UTF8NUL passwd; any other NUL
        # count is malformed.
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            raise _SaslError(SaslFailure(reply=R.INVALID_PLAIN))
        authzid, username, password = (_utf8(part) for part in parts)
        return _credentials(Mechanism.PLAIN, authzid, username, password)
