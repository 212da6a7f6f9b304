"""What the client sends for one message, decided before the first command of the transaction.

The server's EHLO extensions and the message's content decide MAIL's parameters and which
recipients can be tried at all: a message larger than the announced SIZE (RFC 1870 §6), 8-bit
content without 8BITMIME (RFC 6152 §3), or UTF-8 addresses or header fields without SMTPUTF8
(RFC 6531 §3.4) are refused here with a synthesised reply instead of failing on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ._commands import RcptParams, render_rcpt_to
from ._events import BodyType, DsnReturn, MailParams
from ._grammar import GrammarError, check_envid, format_path
from ._replies import Reply

__all__ = ["ContentScanner", "TransactionPlan", "plan_transaction", "size_limit"]

#: The parameters passed on to a server that offers DSN (RFC 3461 §4).
_DSN_PARAMS = ("NOTIFY", "ORCPT")


class ContentScanner:
    """Feed the stored message in chunks; learn whether it is 8-bit and where (sans-I/O).

    ``header_end`` is the offset of the body: 8-bit octets before it are UTF-8 header
    fields, which need SMTPUTF8 (RFC 6532).
    """

    __slots__ = ("_header_end", "_pos", "eight_bit", "utf8_headers")

    def __init__(self, header_end: int) -> None:
        self._header_end = header_end
        self._pos = 0
        self.eight_bit = False
        self.utf8_headers = False

    @property
    def done(self) -> bool:
        """True when more content cannot change the answer."""
        return self.eight_bit and (self.utf8_headers or self._pos >= self._header_end)

    def feed(self, chunk: bytes) -> None:
        """Look at the next chunk of the message."""
        if not chunk.isascii():
            self.eight_bit = True
            head = chunk[: max(0, self._header_end - self._pos)]
            self.utf8_headers = self.utf8_headers or not head.isascii()
        self._pos += len(chunk)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionPlan:
    """MAIL's parameters, the recipients to send RCPT for, and the replies for the others."""

    params: MailParams
    recipients: tuple[str, ...]
    recipient_params: tuple[RcptParams, ...]
    refused: Mapping[str, Reply]
    #: The server offers DSN, so RET, ENVID, NOTIFY and ORCPT go with MAIL and RCPT.
    dsn: bool = False


def size_limit(extensions: Mapping[str, str]) -> int | None:
    """The server's SIZE (RFC 1870 §4); absent, 0 or unreadable means no announced limit."""
    value = extensions.get("SIZE", "").split(" ")[0]
    return int(value) if value.isdigit() and int(value) > 0 else None


def _valid(address: str, params: RcptParams = ()) -> bool:
    try:
        if address:
            render_rcpt_to(address, params)
        else:
            format_path(address)
    except ValueError:  # AddressError included
        return False
    return True


def plan_transaction(
    *,
    extensions: Mapping[str, str],
    sender: str,
    recipients: Sequence[tuple[str, RcptParams]],
    size: int,
    eight_bit: bool,
    utf8_headers: bool,
    ret: DsnReturn | None = None,
    envid: str | None = None,
) -> TransactionPlan:
    """Decide MAIL's parameters and which recipients to try; see the module docstring.

    ``recipients`` pairs each address with its RCPT parameters; only DSN's are passed on, and
    only to a server offering DSN, like MAIL's ``ret`` and ``envid`` (RFC 3461 §4: a client
    must not send them to a server that did not offer the extension). An invalid sender or
    recipient address is refused (``553``) rather than rendered.
    """

    def refuse_all(code: int, status: str, text: str) -> TransactionPlan:
        reply = Reply.make(code, status, text)
        return TransactionPlan(params=MailParams(), recipients=(), recipient_params=(),
                               refused={address: reply for address, _ in recipients})

    limit = size_limit(extensions)
    if limit is not None and size > limit:
        return refuse_all(552, "5.3.4", f"message size {size} exceeds the server's limit of "
                          f"{limit}")
    if eight_bit and "8BITMIME" not in extensions:
        return refuse_all(554, "5.6.3", "8-bit message, but the server does not offer 8BITMIME")
    utf8_offered = "SMTPUTF8" in extensions
    if (not sender.isascii() or utf8_headers) and not utf8_offered:
        return refuse_all(553, "5.6.7", "message needs SMTPUTF8, the server does not offer it")
    if not _valid(sender):
        return refuse_all(553, "5.1.7", "invalid sender address")
    offered = "DSN" in extensions
    refused: dict[str, Reply] = {}
    send: list[tuple[str, RcptParams]] = []
    for address, rcpt_params in recipients:
        dsn = tuple((n, v) for n, v in rcpt_params if n.upper() in _DSN_PARAMS)
        if not offered or not _valid(address, dsn):
            dsn = ()
        if not address.isascii() and not utf8_offered:
            refused[address] = Reply.make(553, "5.6.7", "address needs SMTPUTF8, the server "
                                          "does not offer it")
        elif not address or not _valid(address):
            refused[address] = Reply.make(553, "5.1.3", "invalid recipient address")
        else:
            send.append((address, dsn))
    smtputf8 = utf8_offered and (
        not sender.isascii() or utf8_headers or any(not a.isascii() for a, _ in send)
    )
    params = MailParams(
        size=size if "SIZE" in extensions else None,
        body=BodyType.EIGHT_BIT_MIME if eight_bit else BodyType.SEVEN_BIT,
        smtputf8=smtputf8,
        ret=ret if offered else None,
        envid=envid if offered and _valid_envid(envid) else None,
    )
    return TransactionPlan(params=params, recipients=tuple(a for a, _ in send),
                           recipient_params=tuple(p for _, p in send), refused=refused,
                           dsn=offered)


def _valid_envid(envid: str | None) -> bool:
    """An ENVID the server stored is always valid; anything else is dropped, not sent."""
    if envid is None:
        return False
    try:
        check_envid(envid)
    except GrammarError:
        return False
    return True
