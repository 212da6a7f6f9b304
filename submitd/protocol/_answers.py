"""The core's own answers, and the checks on what the session hands in.

The core answers EHLO, the commands that need no policy and broken lines itself, and records
its refusals as :class:`Refusal`. The session decides policy, the core keeps the wire honest:
a refusal is a 4xx or 5xx, a success fits the event, every 2xx/4xx/5xx carries an enhanced
status code, and an EHLO keyword cannot smuggle a line. A violation is the caller's bug
(:class:`LocalProtocolError`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from . import _catalogue as R
from ._commands import Command, Verb, require_no_argument
from ._errors import LocalProtocolError, RemoteProtocolError
from ._lines import LineProblem
from ._replies import Reply

__all__ = [
    "FRAMING_REPLIES",
    "Refusal",
    "check_positive",
    "check_refusal",
    "ehlo_reply",
    "is_ehlo_keyword",
    "require_status",
    "simple_reply",
]

#: The answer to a command line that is not a proper line (RFC 5321 §2.3.8, §4.5.3.1.4).
FRAMING_REPLIES: Mapping[LineProblem, Reply] = MappingProxyType(
    {
        LineProblem.BARE_LF: R.BARE_LF_COMMAND,
        LineProblem.BARE_CR: R.BARE_CR_COMMAND,
        LineProblem.TOO_LONG: R.LINE_TOO_LONG,
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A 4xx/5xx reply the core sent on its own, so that the driver can log it.

    ``command`` is the verb of the line it answered, upper-cased ("" when the line did not
    start with a word); nothing else of the client's line is kept, so no argument (an AUTH
    initial response holds a password) can reach a log.
    """

    command: str
    reply: Reply


def simple_reply(command: Command) -> Reply:
    """The answer to a command that needs no policy: RSET, QUIT, NOOP, VRFY, HELP and the rest.

    Raises :class:`RemoteProtocolError` for an argument the command does not take or lacks.
    """
    verb = command.verb
    if verb in (Verb.RSET, Verb.QUIT):
        require_no_argument(command)
    if verb in (Verb.RSET, Verb.NOOP):
        return R.OK
    if verb is Verb.QUIT:
        return R.BYE
    if verb is Verb.VRFY:
        if not command.argument:
            raise RemoteProtocolError(R.syntax_error("VRFY needs an argument"))
        return R.CANNOT_VRFY
    if verb is Verb.HELP:
        return R.HELP
    return R.NOT_IMPLEMENTED  # EXPN, TURN, ETRN, BDAT

# RFC 5321 §4.1.1.1: ehlo-line = ehlo-keyword *( SP ehlo-param ).
_EHLO_LINE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9-]*( [\x21-\x7e]+)*\Z")


def is_ehlo_keyword(line: object) -> bool:
    """True for one valid EHLO keyword line (keyword and parameters, no line break)."""
    return isinstance(line, str) and _EHLO_LINE.match(line) is not None


def require_status(reply: Reply) -> None:
    """Every 2xx, 4xx and 5xx reply after the greeting carries one (RFC 2034 §3, RFC 3463)."""
    if reply.code // 100 != 3 and not reply.status:
        raise LocalProtocolError(f"reply {reply.code} needs an enhanced status code")


def check_refusal(reply: Reply, *, status: bool = True) -> None:
    """A refusal is 4xx or 5xx, never 521 (RFC 6409 §7: submission servers close with 421)."""
    if reply.code < 400:
        raise LocalProtocolError(f"a refusal must be 4xx or 5xx, not {reply.code}")
    if reply.code == 521:
        raise LocalProtocolError("521 is not sent on a submission port; use 421 (RFC 6409 §7)")
    if status:
        require_status(reply)


def check_positive(reply: Reply, codes: range) -> Reply:
    """``reply`` as the success answer, if its code is in ``codes`` and it has a status."""
    if reply.code not in codes:
        raise LocalProtocolError(f"cannot accept with {reply.code} here")
    require_status(reply)
    return reply


def ehlo_reply(
    hostname: str,
    *,
    max_message_size: int,
    tls_active: bool,
    tls_available: bool,
    keywords: Sequence[str],
) -> Reply:
    """The multi-line EHLO answer: the core's extensions, then the session's ``keywords``.

    A session keyword naming an extension the core already lists is left out.
    """
    if isinstance(keywords, str):
        raise LocalProtocolError("keywords must be a sequence of strings, not one string")
    for keyword in keywords:
        if not is_ehlo_keyword(keyword):
            raise LocalProtocolError("invalid EHLO keyword line")
    lines = [
        "PIPELINING",  # RFC 2920
        f"SIZE {max_message_size}",  # RFC 1870
        "8BITMIME",  # RFC 6152
        "ENHANCEDSTATUSCODES",  # RFC 2034
        "SMTPUTF8",  # RFC 6531
        "DSN",  # RFC 3461
    ]
    if tls_active:
        lines.append("AUTH PLAIN LOGIN")  # RFC 4954, and only inside TLS (RFC 6409 §4.3)
    elif tls_available:
        lines.append("STARTTLS")  # RFC 3207; never once TLS is active (§4.2)
    # A session keyword the core already announces (a plugin adding "DSN") is said once.
    core = {line.split(" ")[0].upper() for line in lines}
    extra = [keyword for keyword in keywords if keyword.split(" ")[0].upper() not in core]
    try:
        return R.ehlo(hostname, [*lines, *extra])
    except ValueError as exc:
        raise LocalProtocolError(f"EHLO answer: {exc}") from None
