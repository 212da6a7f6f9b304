"""SMTP command lines: framing limits, verb recognition, argument parsing, rendering.

Parsing raises :class:`RemoteProtocolError` carrying the exact reply; sequencing (503, 530)
is not decided here but in ``_state``. The render functions serve the client role and refuse
any value that could break a command line.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import _catalogue as R
from ._errors import RemoteProtocolError
from ._events import BodyType, DsnReturn, MailParams
from ._grammar import (
    MAX_PATH,
    AddressError,
    AddressProblem,
    GrammarError,
    Mailbox,
    check_envid,
    check_orcpt,
    decode_envid,
    encode_xtext,
    format_path,
    has_control,
    is_xtext,
    parse_esmtp_params,
    parse_hello_domain,
    parse_mailbox,
    parse_notify,
    relay_trick,
    split_path,
)
from ._sasl import Mechanism

__all__ = [
    "AUTH_LINE_MAX",
    "COMMAND_LINE_MAX",
    "MAIL_LINE_MAX",
    "Command",
    "RcptParams",
    "Verb",
    "command_line_limit",
    "is_cross_protocol",
    "parse_auth",
    "parse_command",
    "parse_hello",
    "parse_mail",
    "parse_rcpt",
    "render_command",
    "render_mail_from",
    "render_rcpt_to",
    "require_no_argument",
]

#: RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
COMMAND_LINE_MAX = 512
#: MAIL and RCPT with ESMTP parameters may be longer (RFC 5321 §4.5.3.1.4, RFC 4954 §5).
MAIL_LINE_MAX = 2048
#: RFC 4954 §4: an AUTH command line, and each SASL response line, up to 12288 octets.
AUTH_LINE_MAX = 12_288


class Verb(enum.Enum):
    """Every command verb the server recognises (others get ``500 5.5.1``)."""

    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    VRFY = "VRFY"
    HELP = "HELP"
    EXPN = "EXPN"
    TURN = "TURN"
    ETRN = "ETRN"
    BDAT = "BDAT"


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A framed command line split into its verb and the raw argument text."""

    verb: Verb
    argument: str


def command_line_limit(prefix: bytes) -> int:
    """The longest allowed line (CRLF included) for a line starting with ``prefix``."""
    head = prefix[:5].upper()
    if head in (b"MAIL ", b"RCPT "):
        return MAIL_LINE_MAX
    if head == b"AUTH ":
        return AUTH_LINE_MAX
    return COMMAND_LINE_MAX


_HTTP_METHODS = frozenset(
    {b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE", b"PATCH", b"TRACE"}
)
_HTTP_HEADERS = frozenset(
    {
        b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language",
        b"connection", b"content-length", b"content-type", b"cookie", b"origin", b"referer",
        b"upgrade", b"authorization", b"cache-control", b"pragma", b"transfer-encoding",
        b"upgrade-insecure-requests", b"te", b"dnt",
    }
)  # fmt: skip
_HEADER_NAME = re.compile(rb"([A-Za-z0-9-]+):")


def is_cross_protocol(line: bytes) -> bool:
    """True for an HTTP request line or header: a cross-protocol attack (ALPACA, 2021).

    Such a peer is disconnected without a reply, so nothing it sent is reflected back to a
    browser that could interpret it.
    """
    if line.split(b" ", 1)[0].upper() in _HTTP_METHODS:
        return True
    m = _HEADER_NAME.match(line)
    return m is not None and m.group(1).lower() in _HTTP_HEADERS


def parse_command(line: bytes) -> Command:
    """Split a command line (CRLF removed) into verb and argument; unknown verbs get 500."""
    if not line:
        raise RemoteProtocolError(R.EMPTY_COMMAND)
    # Undecodable bytes become lone surrogates, which no grammar rule accepts.
    text = line.decode("utf-8", "surrogateescape")
    word, _, argument = text.partition(" ")
    # isascii first: str.upper() maps some non-ASCII letters onto ASCII ones.
    if not word.isascii():
        raise RemoteProtocolError(R.UNRECOGNIZED)
    try:
        verb = Verb(word.upper())
    except ValueError:
        raise RemoteProtocolError(R.UNRECOGNIZED) from None
    return Command(verb=verb, argument=argument)


def require_no_argument(command: Command) -> None:
    """RSET, QUIT, DATA and STARTTLS take no argument (RFC 5321 §4.1.1, RFC 3207 §4)."""
    if command.argument:
        raise RemoteProtocolError(R.syntax_error(f"{command.verb.value} takes no arguments"))


def parse_hello(argument: str) -> str:
    """The EHLO/HELO argument: one domain or address literal (RFC 5321 §4.1.1.1)."""
    try:
        return parse_hello_domain(argument)
    except GrammarError:
        raise RemoteProtocolError(
            R.syntax_error("EHLO/HELO needs a domain or address literal")
        ) from None


def parse_auth(argument: str) -> tuple[Mechanism, bytes | None]:
    """``AUTH mechanism [initial-response]`` (RFC 4954 §4)."""
    words = [word for word in argument.split(" ") if word]
    if not words or len(words) > 2:
        raise RemoteProtocolError(R.syntax_error("AUTH needs a mechanism"))
    name = words[0].upper()
    if not name.isascii() or name not in Mechanism.__members__:
        raise RemoteProtocolError(R.UNKNOWN_MECHANISM)
    initial = words[1].encode("utf-8", "surrogateescape") if len(words) == 2 else None
    return Mechanism[name], initial


def _strip_keyword(argument: str, keyword: str, usage: str) -> str:
    if argument[: len(keyword)].upper() != keyword:
        raise RemoteProtocolError(R.syntax_error(f"expected {usage}"))
    rest = argument[len(keyword) :]
    # RFC 5321 has no space after the colon, but many clients send one: tolerate exactly one.
    return rest[1:] if rest.startswith(" ") else rest


def _path(path: str, *, sender: bool) -> Mailbox | None:
    """Validate a bracketed path; None for the null reverse path ``<>`` (senders only)."""
    bad = R.bad_sender if sender else R.bad_recipient
    refused = R.sender_rejected if sender else R.relay_denied
    inner = path[1:-1]
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise RemoteProtocolError(bad("address too long"))
    if not inner:
        if sender:
            return None
        raise RemoteProtocolError(bad("null recipient"))
    if inner.startswith("@"):
        # RFC 5321 §4.1.1.3 says ignore source routes; a submission server refuses them.
        raise RemoteProtocolError(refused("source routes are not accepted"))
    try:
        mailbox = parse_mailbox(inner)
    except AddressError as exc:
        if exc.problem is AddressProblem.CONTROL:
            raise RemoteProtocolError(R.CONTROL_IN_ADDRESS) from None
        if exc.problem is AddressProblem.RELAY:
            raise RemoteProtocolError(refused(exc.reason)) from None
        raise RemoteProtocolError(bad(exc.reason)) from None
    reason = relay_trick(mailbox)
    if reason is not None:
        raise RemoteProtocolError(refused(reason))
    return mailbox


def _split(rest: str) -> tuple[str, list[str]]:
    if has_control(rest):
        raise RemoteProtocolError(R.CONTROL_IN_ADDRESS)
    try:
        return split_path(rest)
    except GrammarError as exc:
        raise RemoteProtocolError(R.syntax_error(str(exc))) from None


_SIZE = re.compile(r"[0-9]{1,20}\Z")

#: ESMTP parameters of one RCPT TO, as ``(NAME, value)`` pairs (``None`` for a bare keyword).
RcptParams = tuple[tuple[str, str | None], ...]


def _pairs(words: list[str]) -> Iterator[tuple[str, str | None]]:
    """The ``keyword[=value]`` words in order; a repeated keyword is refused when reached."""
    try:
        pairs = parse_esmtp_params(words)
    except GrammarError as exc:
        raise RemoteProtocolError(R.syntax_error(str(exc))) from None
    seen: set[str] = set()
    for keyword, value in pairs:
        if keyword in seen:
            raise RemoteProtocolError(R.syntax_error("duplicate parameter"))
        seen.add(keyword)
        yield keyword, value


def _checked(check: Callable[[str | None], str], value: str | None) -> str:
    """``check(value)``, with its :class:`GrammarError` turned into ``501 5.5.4``."""
    try:
        return check(value)
    except GrammarError as exc:
        raise RemoteProtocolError(R.syntax_error(str(exc))) from None


def _dsn_return(value: str | None) -> str:
    if value is None or value.upper() not in DsnReturn.__members__:
        raise GrammarError("RET must be FULL or HDRS")
    return value.upper()


def _mail_params(words: list[str]) -> MailParams:
    size: int | None = None
    body = BodyType.SEVEN_BIT
    smtputf8 = False
    auth: str | None = None
    ret: DsnReturn | None = None
    envid: str | None = None
    for keyword, value in _pairs(words):
        if keyword == "SIZE":  # RFC 1870 §6
            if value is None or not _SIZE.match(value):
                raise RemoteProtocolError(R.syntax_error("SIZE needs a number"))
            size = int(value)
        elif keyword == "BODY":  # RFC 6152 §2
            kinds = {kind.value: kind for kind in BodyType}
            if value is None or value.upper() not in kinds:
                raise RemoteProtocolError(R.syntax_error("BODY must be 7BIT or 8BITMIME"))
            body = kinds[value.upper()]
        elif keyword == "SMTPUTF8":  # RFC 6531 §3.4
            if value is not None:
                raise RemoteProtocolError(R.syntax_error("SMTPUTF8 takes no value"))
            smtputf8 = True
        elif keyword == "AUTH":  # RFC 4954 §5: recorded, never trusted
            if value is None or not (value == "<>" or is_xtext(value)):
                raise RemoteProtocolError(R.syntax_error("AUTH needs xtext or <>"))
            auth = value
        elif keyword == "RET":  # RFC 3461 §4.3
            ret = DsnReturn[_checked(_dsn_return, value)]
        elif keyword == "ENVID":  # RFC 3461 §4.4: stored decoded
            envid = _checked(decode_envid, value)
        else:
            raise RemoteProtocolError(R.UNKNOWN_PARAMETER)
    return MailParams(size=size, body=body, smtputf8=smtputf8, auth=auth, ret=ret, envid=envid)


def _no_params_after_helo(words: list[str], esmtp: bool) -> None:
    """RFC 5321 §4.1.1.11, §3.3: ESMTP parameters exist only in a session opened with EHLO."""
    if words and not esmtp:
        raise RemoteProtocolError(R.PARAMETERS_NEED_EHLO)


def parse_mail(argument: str, *, max_size: int, esmtp: bool = True) -> tuple[str, MailParams]:
    """``MAIL FROM:<reverse-path> [params]`` → (sender, params); ``""`` for ``<>``.

    ``esmtp`` is False after HELO: then any parameter gets ``555 5.5.4``.
    """
    rest = _strip_keyword(argument, "FROM:", "MAIL FROM:<address>")
    path, words = _split(rest)
    mailbox = _path(path, sender=True)
    _no_params_after_helo(words, esmtp)
    params = _mail_params(words)
    if mailbox is not None and not mailbox.is_ascii and not params.smtputf8:
        raise RemoteProtocolError(R.NEEDS_SMTPUTF8)
    if params.size is not None and params.size > max_size:
        raise RemoteProtocolError(R.MESSAGE_TOO_LARGE)  # RFC 1870 §6
    return ("" if mailbox is None else mailbox.address), params


#: The RCPT parameters the server accepts (DSN, RFC 3461 §4.1, §4.2), in the order kept.
_RCPT_CHECKS: dict[str, Callable[[str | None], str]] = {
    "NOTIFY": parse_notify,
    "ORCPT": check_orcpt,
}


def _rcpt_params(words: list[str]) -> RcptParams:
    found: dict[str, str] = {}
    for keyword, value in _pairs(words):
        check = _RCPT_CHECKS.get(keyword)
        if check is None:
            raise RemoteProtocolError(R.UNKNOWN_PARAMETER)
        found[keyword] = _checked(check, value)
    return tuple((name, found[name]) for name in _RCPT_CHECKS if name in found)


def parse_rcpt(
    argument: str, *, smtputf8: bool, esmtp: bool = True
) -> tuple[str, RcptParams]:
    """``RCPT TO:<forward-path> [params]`` → (recipient, params).

    The parameters are DSN's ``NOTIFY`` (normalised upper-case, ``SUCCESS,FAILURE,DELAY``
    order) and ``ORCPT`` (as given, still xtext), NOTIFY first. ``esmtp`` is False after
    HELO: then any parameter gets ``555 5.5.4``.
    """
    rest = _strip_keyword(argument, "TO:", "RCPT TO:<address>")
    path, words = _split(rest)
    mailbox = _path(path, sender=False)
    assert mailbox is not None  # _path refuses <> for recipients
    _no_params_after_helo(words, esmtp)
    params = _rcpt_params(words)
    if not mailbox.is_ascii and not smtputf8:
        raise RemoteProtocolError(R.NEEDS_SMTPUTF8)
    return mailbox.address, params


# -- the client role ---------------------------------------------------------------------------


def render_command(verb: Verb, argument: str = "") -> bytes:
    """One command line with CRLF; ``argument`` may not hold control characters."""
    if has_control(argument):
        raise ValueError("control character in command argument")
    line = f"{verb.value} {argument}" if argument else verb.value
    return line.encode("utf-8") + b"\r\n"


def render_mail_from(sender: str, params: MailParams) -> bytes:
    """``MAIL FROM:<sender>`` with SIZE, BODY, SMTPUTF8, RET and ENVID as given.

    ``ENVID`` is xtext-encoded (RFC 3461 §4.4); an identifier that is not printable US-ASCII
    of at most 100 characters raises ``ValueError``. ``params.auth`` is deliberately not sent
    on: it came from a client and is not trusted (RFC 4954 §5).
    """
    words = [f"FROM:{format_path(sender)}"]
    if params.size is not None:
        words.append(f"SIZE={params.size}")
    if params.body is not BodyType.SEVEN_BIT:
        words.append(f"BODY={params.body.value}")
    if params.smtputf8:
        words.append("SMTPUTF8")
    if params.ret is not None:
        words.append(f"RET={params.ret.value}")
    if params.envid is not None:
        words.append(f"ENVID={encode_xtext(check_envid(params.envid))}")
    return render_command(Verb.MAIL, " ".join(words))


def _render_params(params: RcptParams) -> list[str]:
    words = [name if value is None else f"{name}={value}" for name, value in params]
    try:
        parsed = parse_esmtp_params(words)
    except GrammarError as exc:
        raise ValueError(f"bad ESMTP parameter: {exc}") from None
    # A keyword holding "=" would parse back as a different pair: refuse the ambiguity.
    if [(k, v) for k, v in parsed] != [(n.upper(), v) for n, v in params]:
        raise ValueError("bad ESMTP parameter")
    return words


def render_rcpt_to(recipient: str, params: RcptParams = ()) -> bytes:
    """``RCPT TO:<recipient> [params]``; an invalid address raises ``AddressError``.

    ``params`` (DSN's ``NOTIFY`` and ``ORCPT``, RFC 3461 §4) must follow the esmtp-param
    grammar of RFC 5321 §4.1.2, or ``ValueError`` is raised.
    """
    if not recipient:
        raise AddressError(AddressProblem.SYNTAX, "null recipient")
    words = [f"TO:{format_path(recipient)}", *_render_params(params)]
    return render_command(Verb.RCPT, " ".join(words))
