"""The one table that decides whether a command may run now (every 503, 530 and 502 by state).

A command's preconditions are checked in the order listed, *before* its arguments are parsed:
so on a STARTTLS listener ``AUTH PLAIN <credentials>`` before TLS gets ``530`` without the
credentials ever being decoded (RFC 3207 §4), and a MAIL without AUTH never reaches the
address parser.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from . import _catalogue as R
from ._commands import Verb
from ._replies import Reply

__all__ = [
    "BEFORE_TLS",
    "SEQUENCE_RULES",
    "Facts",
    "Greeting",
    "Rule",
    "ServerState",
    "Transaction",
    "check_sequence",
]


class ServerState(enum.Enum):
    """Where the server side of the conversation is."""

    NOT_GREETED = "not greeted"  # greet() not called yet
    COMMAND = "command"  # reading command lines
    AWAITING_ANSWER = "awaiting answer"  # an event needs accept_...() or reject()
    SASL = "sasl"  # reading AUTH continuation lines
    DATA = "data"  # reading message content
    TLS_HANDSHAKE = "tls handshake"  # 220 queued for STARTTLS; waiting for tls_started()
    CLOSED = "closed"  # nothing more will be read


class Greeting(enum.Enum):
    """Which hello the client has sent (since the start or since TLS started)."""

    NONE = "none"
    HELO = "HELO"
    EHLO = "EHLO"


class Transaction(enum.Enum):
    """How far the current mail transaction has come (RFC 5321 §3.3)."""

    NONE = "none"
    SENDER = "sender"  # MAIL accepted, no recipient yet
    RECIPIENTS = "recipients"  # at least one RCPT accepted


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """What the rules look at: a snapshot of the session flags."""

    tls_active: bool
    tls_available: bool
    greeting: Greeting
    authenticated: bool
    transaction: Transaction
    transactions_left: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """A precondition: when ``holds`` is False the command is answered ``reply``."""

    name: str
    holds: Callable[[Facts], bool]
    reply: Reply
    closes: bool = False


# RFC 3207 §4 and RFC 6409 §4.3: nothing that carries credentials or mail before TLS.
_TLS = Rule(name="tls", holds=lambda f: f.tls_active, reply=R.STARTTLS_REQUIRED)
_HELLO = Rule(
    name="hello",
    holds=lambda f: f.greeting is not Greeting.NONE,
    reply=R.bad_sequence("send HELO/EHLO first"),
)
# RFC 4954 §4: AUTH is an ESMTP extension, only after EHLO.
_EHLO = Rule(
    name="ehlo",
    holds=lambda f: f.greeting is Greeting.EHLO,
    reply=R.bad_sequence("send EHLO first"),
)
_NOT_AUTHENTICATED = Rule(
    name="not authenticated",
    holds=lambda f: not f.authenticated,
    reply=R.bad_sequence("already authenticated"),  # RFC 4954 §4
)
_AUTHENTICATED = Rule(name="authenticated", holds=lambda f: f.authenticated, reply=R.AUTH_REQUIRED)
_AUTH_OUTSIDE_TRANSACTION = Rule(
    name="no transaction",
    holds=lambda f: f.transaction is Transaction.NONE,
    reply=R.bad_sequence("AUTH not permitted during a mail transaction"),  # RFC 4954 §4
)
_NOT_NESTED = Rule(
    name="no transaction",
    holds=lambda f: f.transaction is Transaction.NONE,
    reply=R.bad_sequence("nested MAIL command"),
)
_TRANSACTIONS_LEFT = Rule(
    name="transactions left",
    holds=lambda f: f.transactions_left,
    reply=R.TOO_MANY_TRANSACTIONS,
    closes=True,
)
_MAIL_GIVEN = Rule(
    name="in transaction",
    holds=lambda f: f.transaction is not Transaction.NONE,
    reply=R.bad_sequence("need MAIL command"),
)
_RECIPIENTS_GIVEN = Rule(
    name="recipients",
    holds=lambda f: f.transaction is Transaction.RECIPIENTS,
    reply=R.NO_VALID_RECIPIENTS,
)
_TLS_NOT_ACTIVE = Rule(
    name="tls not active",
    holds=lambda f: not f.tls_active,
    reply=R.bad_sequence("TLS already active"),
)
_TLS_AVAILABLE = Rule(
    name="tls available", holds=lambda f: f.tls_available, reply=R.STARTTLS_UNAVAILABLE
)
_STARTTLS_OUTSIDE_TRANSACTION = Rule(
    name="no transaction",
    holds=lambda f: f.transaction is Transaction.NONE,
    reply=R.bad_sequence("STARTTLS not permitted during a mail transaction"),
)

#: Preconditions per verb, checked in order; verbs not listed may always run.
SEQUENCE_RULES: Mapping[Verb, tuple[Rule, ...]] = MappingProxyType(
    {
        Verb.STARTTLS: (_TLS_NOT_ACTIVE, _TLS_AVAILABLE, _STARTTLS_OUTSIDE_TRANSACTION),
        Verb.AUTH: (_TLS, _EHLO, _NOT_AUTHENTICATED, _AUTH_OUTSIDE_TRANSACTION),
        Verb.MAIL: (_TLS, _HELLO, _AUTHENTICATED, _NOT_NESTED, _TRANSACTIONS_LEFT),
        Verb.RCPT: (_TLS, _HELLO, _AUTHENTICATED, _MAIL_GIVEN),
        Verb.DATA: (_TLS, _HELLO, _AUTHENTICATED, _MAIL_GIVEN, _RECIPIENTS_GIVEN),
        # RFC 3207 §4: before TLS only the verbs of BEFORE_TLS are answered; every other
        # command the server knows gets 530. Unknown verbs keep 500 5.5.1: there is no
        # command to refuse, and RFC 5321 §4.2.4 gives 500 whatever the state.
        Verb.VRFY: (_TLS,),
        Verb.HELP: (_TLS,),
        Verb.EXPN: (_TLS,),
        Verb.TURN: (_TLS,),
        Verb.ETRN: (_TLS,),
        Verb.BDAT: (_TLS,),
    }
)

#: The commands a client may send before TLS on a STARTTLS listener (RFC 3207 §4).
BEFORE_TLS = frozenset({Verb.EHLO, Verb.HELO, Verb.STARTTLS, Verb.NOOP, Verb.RSET, Verb.QUIT})


def check_sequence(verb: Verb, facts: Facts) -> Rule | None:
    """The first precondition of ``verb`` that does not hold, or None if it may run."""
    for rule in SEQUENCE_RULES.get(verb, ()):
        if not rule.holds(facts):
            return rule
    return None
