"""Sans-I/O SMTP: bytes in, events and replies out; no sockets, no trio, no pluggy.

The server role is :class:`ServerConnection`, the client role :class:`ClientConnection`
(with :class:`DataEncoder` for the message body). The grammar (addresses, parameters, xtext), the
command renderers and :func:`parse_reply` are shared with the client role. ``catalogue`` holds
every reply the core sends on its own, by name.
"""

from . import _catalogue as catalogue
from ._answers import check_refusal, is_ehlo_keyword, require_status
from ._client import ClientConnection, ClientState, ReplyTo, ServerReply, choose_mechanism
from ._client_data import DataEncoder
from ._client_plan import ContentScanner, TransactionPlan, plan_transaction
from ._client_replies import MAX_REPLY_BYTES, ReplyReader, blank_secret, parse_extensions
from ._commands import RcptParams, Verb, render_command, render_mail_from, render_rcpt_to
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    AuthRequest,
    BodyType,
    ConnectionClosed,
    DataChunk,
    DataComplete,
    DataStart,
    DsnReturn,
    Event,
    Hello,
    MailFrom,
    MailParams,
    NeedData,
    NeedsAnswer,
    RcptTo,
    StartTLS,
)
from ._grammar import (
    AddressError,
    AddressProblem,
    GrammarError,
    Mailbox,
    decode_xtext,
    encode_xtext,
    format_path,
    parse_mailbox,
    relay_trick,
)
from ._limits import ProtocolLimits
from ._replies import MAX_REPLY_LINE_LENGTH, MAX_REPLY_LINES, Reply, ReplyParseError, parse_reply
from ._sasl import Credentials, Mechanism
from ._server import ServerConnection
from ._state import ServerState

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_REPLY_LINES",
    "MAX_REPLY_LINE_LENGTH",
    "NEED_DATA",
    "AddressError",
    "AddressProblem",
    "AuthRequest",
    "BodyType",
    "ClientConnection",
    "ClientState",
    "ConnectionClosed",
    "ContentScanner",
    "Credentials",
    "DataChunk",
    "DataComplete",
    "DataEncoder",
    "DataStart",
    "DsnReturn",
    "Event",
    "GrammarError",
    "Hello",
    "LocalProtocolError",
    "MailFrom",
    "MailParams",
    "Mailbox",
    "Mechanism",
    "NeedData",
    "NeedsAnswer",
    "ProtocolLimits",
    "RcptParams",
    "RcptTo",
    "RemoteProtocolError",
    "Reply",
    "ReplyParseError",
    "ReplyReader",
    "ReplyTo",
    "ServerConnection",
    "ServerReply",
    "ServerState",
    "StartTLS",
    "TransactionPlan",
    "Verb",
    "blank_secret",
    "catalogue",
    "check_refusal",
    "choose_mechanism",
    "decode_xtext",
    "encode_xtext",
    "format_path",
    "is_ehlo_keyword",
    "parse_extensions",
    "parse_mailbox",
    "parse_reply",
    "plan_transaction",
    "relay_trick",
    "render_command",
    "render_mail_from",
    "render_rcpt_to",
    "require_status",
]
