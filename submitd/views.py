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
from .protocol._sasl import Credentials
from .stash import Stash

__all__ = [
    "AuthResult",
    "Credentials",
    "DeliveryOutcome",
    "Envelope",
    "OutcomeKind",
    "Recipient",
    "RecipientParams",
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
    recipients: tuple[Recipient, ...]
    params: MailParams
    username: str | None
    queue_id: str | None = None
    received_at: float = 0.0


#: ESMTP parameters of one recipient: ``(NAME, value)`` pairs, names upper-case, value None
#: for a parameter without ``=``.
RecipientParams = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True, kw_only=True)
class Recipient:
    """One recipient: its address and the ESMTP parameters given with ``RCPT TO``.

    The same value travels from ``submitd_rcpt_check`` through the spool to
    ``submitd_deliver`` and the ``submitd_delivery_result`` observers, so parameters such as
    DSN's ``NOTIFY`` and ``ORCPT`` (RFC 3461) reach every plugin unchanged. ``attempts``
    counts the delivery attempts made so far (0 during the session).
    """

    address: str
    params: RecipientParams = ()
    attempts: int = 0

    def param(self, name: str) -> str | None:
        """The value of the parameter ``name`` (case-insensitive), or None if absent."""
        key = name.upper()
        for pname, value in self.params:
            if pname == key:
                return value
        return None

    def __str__(self) -> str:
        return self.address


class OutcomeKind(enum.Enum):
    """How a delivery attempt for one recipient ended."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # 4xx, network error, timeout: retried on the schedule
    PERMANENT = "permanent"  # 5xx: bounced to the sender


@dataclass(frozen=True, kw_only=True)
class DeliveryOutcome:
    """The result of delivering to one recipient, with the reply that decided it.

    ``remote`` names the host that gave the reply (``"smtp.example.net"``), when there was
    one; it becomes the ``Remote-MTA`` of a delivery status notification (RFC 3464 §2.3.5).
    """

    kind: OutcomeKind
    reply: Reply
    remote: str | None = None
    dsn_passed_on: bool = False

    @classmethod
    def delivered(
        cls, reply: Reply | None = None, *, remote: str | None = None, dsn_passed_on: bool = False
    ) -> DeliveryOutcome:
        """The recipient's mail is handed on (``250 2.0.0`` unless ``reply`` is given).

        ``remote`` names the next hop when the message was relayed rather than delivered
        finally (a Maildir is final; a smarthost is a relay). ``dsn_passed_on`` says that the
        next hop offered DSN and received the recipient's ``NOTIFY``/``ORCPT`` and the
        message's ``RET``/``ENVID``: it reports success itself, so submitd sends no
        ``relayed`` report of its own (RFC 3461 §4.1).
        """
        return cls(
            kind=OutcomeKind.DELIVERED,
            reply=reply or Reply.make(250, "2.0.0", "Delivered"),
            remote=remote,
            dsn_passed_on=dsn_passed_on,
        )

    @classmethod
    def temporary(cls, reply: Reply, *, remote: str | None = None) -> DeliveryOutcome:
        """Try again later; ``reply`` should be a 4xx."""
        return cls(kind=OutcomeKind.TEMPORARY, reply=reply, remote=remote)

    @classmethod
    def permanent(cls, reply: Reply, *, remote: str | None = None) -> DeliveryOutcome:
        """Give up on this recipient; ``reply`` should be a 5xx."""
        return cls(kind=OutcomeKind.PERMANENT, reply=reply, remote=remote)
