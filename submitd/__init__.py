"""submitd: an authenticated SMTP submission server on trio, extended through pluggy hooks.

The names exported here are the public plugin API; built-in plugins use nothing else.
"""

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
