"""The replies that answer events: the EHLO answer, and checks on what the session hands in.

The session decides policy, the core keeps the wire honest: a refusal is a 4xx or 5xx, a
success fits the event, every 2xx/4xx/5xx carries an enhanced status code, and an EHLO
keyword cannot smuggle a line. A violation is the caller's bug (:class:`LocalProtocolError`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from . import _catalogue as R
from ._errors import LocalProtocolError
from ._replies import Reply

__all__ = ["check_positive", "check_refusal", "ehlo_reply", "is_ehlo_keyword", "require_status"]

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


def check_positive(reply: Reply | None, default: Reply, codes: range) -> Reply:
    """``reply`` (or ``default``) as the success answer, if its code is in ``codes``."""
    answer = default if reply is None else reply
    if answer.code not in codes:
        raise LocalProtocolError(f"accept() cannot answer with {answer.code} here")
    require_status(answer)
    return answer


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
