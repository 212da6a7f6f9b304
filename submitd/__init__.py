"""submitd: an authenticated SMTP submission server on trio, extended through pluggy hooks.

The names exported here are the public plugin API; built-in plugins use nothing else.
"""

from collections.abc import Mapping, Sequence

from ._hookcall import blocking
from ._logfmt import logfmt
from .config import Config
from .errors import ConfigError, PluginError, Reject, SubmitdError
from .hookspec import hookimpl
from .message import MessageHandle
from .protocol._events import BodyType, DsnReturn, MailParams
from .protocol._replies import Reply
from .secret import Secret
from .stash import Stash, StashKey
from .views import (
    AuthResult,
    Credentials,
    DeliveryOutcome,
    Envelope,
    OutcomeKind,
    Recipient,
    SessionInfo,
)

__all__ = [
    "SENDERS",
    "AuthResult",
    "BodyType",
    "Config",
    "ConfigError",
    "Credentials",
    "DeliveryOutcome",
    "DsnReturn",
    "Envelope",
    "MailParams",
    "MessageHandle",
    "OutcomeKind",
    "PluginError",
    "Recipient",
    "Reject",
    "Reply",
    "Secret",
    "SessionInfo",
    "Stash",
    "StashKey",
    "SubmitdError",
    "blocking",
    "hookimpl",
    "logfmt",
]

__version__ = "0.1.0"

#: The senders each login may use, published by authentication plugins for the policy plugins
#: (the built-in ``relay`` enforces them). In ``submitd_configure`` an auth plugin adds its
#: view under its own name: ``config.stash.setdefault(SENDERS, {})["NAME"] = logins``, where
#: ``logins`` maps a login to its sender patterns: ``user@example.com``, ``@example.com`` (any
#: address at the domain) or ``<>`` (bounces), normalised as
#: :func:`submitd.passwords.validate_sender` returns them. The mapping may change as the
#: plugin's user data changes; readers look a login up when they need it.
SENDERS: StashKey[dict[str, Mapping[str, Sequence[str]]]] = StashKey()
