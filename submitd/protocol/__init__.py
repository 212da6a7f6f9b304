"""Sans-I/O SMTP: bytes in, events and replies out; no sockets, no trio, no pluggy."""

from ._events import (
    NEED_DATA,
    AuthRequest,
    BodyType,
    ConnectionClosed,
    DataChunk,
    DataComplete,
    DataStart,
    Event,
    Hello,
    MailFrom,
    MailParams,
    NeedData,
    NeedsAnswer,
    RcptTo,
    StartTLS,
)
from ._replies import Reply, ReplyParseError, parse_reply

__all__ = [
    "NEED_DATA",
    "AuthRequest",
    "BodyType",
    "ConnectionClosed",
    "DataChunk",
    "DataComplete",
    "DataStart",
    "Event",
    "Hello",
    "MailFrom",
    "MailParams",
    "NeedData",
    "NeedsAnswer",
    "RcptTo",
    "Reply",
    "ReplyParseError",
    "StartTLS",
    "parse_reply",
]
