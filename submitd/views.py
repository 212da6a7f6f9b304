"""Frozen views that hooks receive: who is connected, what they asked for, what happened.

Plugins never see the stream or the protocol core. Each view is a snapshot; the session hands
a fresh one to every hook. Mutable plugin state goes into the ``stash`` each view carries
(shared by every snapshot of the same session or message).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .config import Config, ListenerConfig
from .protocol._events import MailParams
from .protocol._replies import Reply
from .secret import Secret
from .stash import Stash

__all__ = [
    "AuthResult",
    "Credentials",
    "DeliveryOutcome",
    "Envelope",
    "OutcomeKind",
    "Recipient",
    "SessionInfo",
]


@dataclass(frozen=True, kw_only=True)
class SessionInfo:
    """One client connection as plugins see it.

    ``username`` is the authenticated login (None before a successful AUTH). ``peer_host``
    is the client address (from the PROXY header when the listener uses one).
    """

    session_id: str
    config: Config
    listener: ListenerConfig
    peer_host: str
    peer_port: int
    tls: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    ehlo: str | None = None
    username: str | None = None
    stash: Stash = field(default_factory=Stash, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """Decoded SASL credentials handed to ``submitd_auth``; the password is a :class:`Secret`."""

    mechanism: str
    username: str
    authzid: str
    password: Secret


@dataclass(frozen=True, kw_only=True)
class AuthResult:
    """What an ``submitd_auth`` implementation decided.

    ``accepted`` grants the session the identity ``username``. A refusal may carry its own
    ``reply`` (4xx for a temporary problem); the default is ``535 5.7.8``.
    """

    accepted: bool
    username: str | None = None
    reply: Reply | None = None

    @classmethod
    def ok(cls, username: str) -> AuthResult:
        """Accept the login as ``username``."""
        return cls(accepted=True, username=username)

    @classmethod
    def deny(cls, reply: Reply | None = None) -> AuthResult:
        """Refuse the login (``535 5.7.8`` unless ``reply`` says otherwise)."""
        return cls(accepted=False, reply=reply)


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """The SMTP envelope of one transaction.

    During the session ``queue_id`` is None and ``recipients`` holds the recipients accepted so
    far; in queue hooks it is the committed envelope. ``username`` is the authenticated
    submitter (never the client's ``AUTH=`` parameter, which is in ``params.auth``).
    """

    sender: str
    recipients: tuple[str, ...]
    params: MailParams
    username: str | None
    queue_id: str | None = None
    received_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Recipient:
    """One recipient in the queue: its address and how many delivery attempts it has had."""

    address: str
    attempts: int = 0


class OutcomeKind(enum.Enum):
    """How a delivery attempt for one recipient ended."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # 4xx, network error, timeout: retried on the schedule
    PERMANENT = "permanent"  # 5xx: bounced to the sender


@dataclass(frozen=True, kw_only=True)
class DeliveryOutcome:
    """The result of delivering to one recipient, with the reply that decided it."""

    kind: OutcomeKind
    reply: Reply

    @classmethod
    def delivered(cls, reply: Reply | None = None) -> DeliveryOutcome:
        """The recipient's mail is handed on (``250 2.0.0`` unless ``reply`` is given)."""
        return cls(kind=OutcomeKind.DELIVERED, reply=reply or Reply.make(250, "2.0.0", "Delivered"))

    @classmethod
    def temporary(cls, reply: Reply) -> DeliveryOutcome:
        """Try again later; ``reply`` should be a 4xx."""
        return cls(kind=OutcomeKind.TEMPORARY, reply=reply)

    @classmethod
    def permanent(cls, reply: Reply) -> DeliveryOutcome:
        """Give up on this recipient; ``reply`` should be a 5xx."""
        return cls(kind=OutcomeKind.PERMANENT, reply=reply)
