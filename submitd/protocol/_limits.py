"""The bounds the protocol core enforces by itself."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["ProtocolLimits"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolLimits:
    """The slice of ``[limits]`` the protocol core needs (docs/security.md §5).

    ``max_message_size`` is advertised as ``SIZE n`` (RFC 1870) and checked on the unstuffed
    content; ``max_errors`` counts every 5xx reply of the session, the core's and the
    session's; ``max_transactions`` counts finished DATA phases, accepted or refused;
    ``max_junk_commands`` counts commands that send no mail (NOOP, RSET, VRFY, HELP, EXPN,
    TURN, ETRN, BDAT and a repeated EHLO/HELO) until a message is accepted, and the next one
    past the limit gets ``421 4.7.0`` and the connection is closed.
    """

    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_header_size: int = 262_144
    max_auth_failures: int = 3
    max_errors: int = 10
    max_transactions: int = 100
    max_junk_commands: int = 100

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, not {value!r}")
