"""SMTP grammar shared by both roles: mailboxes, paths, domains, ESMTP parameters, xtext.

It is also the one place that says what a host name is (:func:`is_hostname`) and what a
control character is (:func:`has_control`, :func:`replace_controls`): the configuration,
the users file, certificates and replies all ask here.

Parsing is separate from policy: :func:`parse_mailbox` answers "is this an RFC 5321 / RFC 6531
mailbox?", :func:`relay_trick` answers "would this address route mail somewhere else?"
(docs/security.md §4). Neither ever returns text built from client input for a reply: error
reasons are our own words.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_DOMAIN",
    "MAX_ENVID",
    "MAX_HOSTNAME",
    "MAX_LOCAL_PART",
    "MAX_ORCPT",
    "MAX_PATH",
    "AddressError",
    "AddressProblem",
    "GrammarError",
    "Mailbox",
    "check_envid",
    "check_orcpt",
    "decode_envid",
    "decode_xtext",
    "encode_xtext",
    "format_path",
    "has_control",
    "is_hostname",
    "is_xtext",
    "parse_esmtp_params",
    "parse_hello_domain",
    "parse_mailbox",
    "parse_notify",
    "relay_trick",
    "replace_controls",
    "split_path",
]

#: RFC 5321 §4.5.3.1.1: a local part is at most 64 octets.
MAX_LOCAL_PART = 64
#: RFC 5321 §4.5.3.1.2: a domain is at most 255 octets.
MAX_DOMAIN = 255
#: RFC 1035 §2.3.4: 255 octets on the wire are 253 characters written without a final dot.
MAX_HOSTNAME = 253
#: RFC 1035 §2.3.4: a label is at most 63 octets.
_MAX_LABEL = 63
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets, angle brackets included.
MAX_PATH = 256
#: RFC 3461 §4.4: an envelope identifier is at most 100 characters.
MAX_ENVID = 100
#: RFC 3461 §4.2: the ORCPT value is at most 500 characters.
MAX_ORCPT = 500

# C0 controls and DEL: never part of an address, a parameter, a login or a configured value
# (docs/security.md §1). Reply text may hold TAB (RFC 5321 §4.2), nothing else of them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Lone surrogates stand for bytes that were not UTF-8 (decoded with "surrogateescape").
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# RFC 6531 §3.3: UTF8-non-ascii may appear in atext, qtextSMTP and sub-domains.
_U = r"\u0080-\ud7ff\ue000-\U0010ffff"
# RFC 5321 §4.1.2: Dot-string = Atom *("."  Atom); atext from RFC 5322 §3.2.3.
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_U}-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
# Quoted-string = DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE.
_QUOTED = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"')
# sub-domain = Let-dig [Ldh-str]: no leading or trailing hyphen.
_LABEL = re.compile(rf"[A-Za-z0-9{_U}](?:[A-Za-z0-9{_U}-]*[A-Za-z0-9{_U}])?\Z")
# EHLO names from real clients sometimes carry "_" (Windows host names): tolerated there only.
_HELLO_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\Z")
# A host name we are given to use (configuration, certificates, users file): RFC 1035 §2.3.1
# letters, digits and hyphens, a digit first allowed (RFC 1123 §2.1).
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]*\]\Z")
# RFC 5321 §4.1.2: esmtp-keyword and esmtp-value.
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
# RFC 3461 §4: xtext = *( xchar / hexchar ).
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
# RFC 3461 §4.2: addr-type = atom (RFC 5322 §3.2.3), e.g. "rfc822" or "utf-8" (RFC 6533).
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
# RFC 3461 §4.4: an ENVID is printable US-ASCII once decoded.
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*\Z")
# RFC 3461 §4.1: the NOTIFY keywords, in the order they are stored.
_NOTIFY_ORDER = ("SUCCESS", "FAILURE", "DELAY")


class GrammarError(ValueError):
    """Text does not match the grammar; the message is a short reason in our own words."""


class AddressProblem(enum.Enum):
    """Why an address was refused; each maps to its own reply."""

    SYNTAX = "syntax"
    CONTROL = "control character"
    RELAY = "relay trick"


class AddressError(GrammarError):
    """An address that cannot be used, with the kind of problem and a short reason."""

    def __init__(self, problem: AddressProblem, reason: str) -> None:
        self.problem = problem
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class Mailbox:
    """A syntactically valid RFC 5321 Mailbox, as the client wrote it."""

    local_part: str
    domain: str

    @property
    def address(self) -> str:
        """``local-part@domain``."""
        return f"{self.local_part}@{self.domain}"

    @property
    def is_ascii(self) -> bool:
        """False when the address needs SMTPUTF8 (RFC 6531)."""
        return self.address.isascii()

    @property
    def quoted(self) -> bool:
        """True when the local part is a quoted string."""
        return self.local_part.startswith('"')


def has_control(text: str, *, tab_ok: bool = False) -> bool:
    """True when ``text`` holds a control character (C0 or DEL; TAB allowed if ``tab_ok``)."""
    return (_CONTROL_BUT_TAB if tab_ok else _CONTROL).search(text) is not None


def replace_controls(text: str, replacement: str, *, tab_ok: bool = False) -> str:
    """``text`` with every control character (as :func:`has_control` sees them) replaced."""
    return (_CONTROL_BUT_TAB if tab_ok else _CONTROL).sub(replacement, text)


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _dotted(text: str, label: re.Pattern[str], max_octets: int) -> bool:
    """True for labels matching ``label`` joined by dots.

    Each label is at most 63 octets, the whole at most ``max_octets``; an empty text or an
    empty label never matches.
    """
    parts = text.split(".")
    # The labels first: they admit no lone surrogate, which _octets could not encode.
    return all(label.match(part) for part in parts) and (
        _octets(text) <= max_octets and all(_octets(part) <= _MAX_LABEL for part in parts)
    )


def is_hostname(text: str, *, min_labels: int = 1) -> bool:
    """True for a host name of at least ``min_labels`` labels, written without a final dot.

    Letters, digits and hyphens, no hyphen at either end of a label (RFC 1035 §2.3.1, a digit
    first allowed by RFC 1123 §2.1), labels of at most 63 and the name at most
    :data:`MAX_HOSTNAME` characters. ``min_labels=2`` asks for a qualified name.
    """
    return _dotted(text, _HOST_LABEL, MAX_HOSTNAME) and text.count(".") + 1 >= min_labels


def _check_text(text: str) -> None:
    if has_control(text):
        raise AddressError(AddressProblem.CONTROL, "control character in address")
    if _SURROGATE.search(text):
        raise AddressError(AddressProblem.SYNTAX, "address is not valid UTF-8")


def _is_domain(text: str) -> bool:
    return _dotted(text, _LABEL, MAX_DOMAIN)


def parse_mailbox(text: str) -> Mailbox:
    """Parse ``local-part@domain`` (RFC 5321 §4.1.2, UTF-8 per RFC 6531 §3.3).

    Raises :class:`AddressError`. Two ``@`` outside quotes are reported as a relay trick
    (``a@b@c`` is how ``%``-hack style routing is smuggled past naive parsers).
    """
    _check_text(text)
    if text.startswith('"'):
        m = _QUOTED.match(text)
        if m is None:
            raise AddressError(AddressProblem.SYNTAX, "bad quoted local part")
        local, rest = m.group(), text[m.end() :]
        if not rest.startswith("@"):
            raise AddressError(AddressProblem.SYNTAX, "missing @domain")
        domain = rest[1:]
    else:
        if text.count("@") > 1:
            raise AddressError(AddressProblem.RELAY, "more than one @")
        local, at, domain = text.partition("@")
        if not at:
            raise AddressError(AddressProblem.SYNTAX, "missing @domain")
        if not _DOT_STRING.match(local):
            raise AddressError(AddressProblem.SYNTAX, "bad local part")
    if "@" in domain:
        raise AddressError(AddressProblem.RELAY, "more than one @")
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError(AddressProblem.SYNTAX, "local part too long")
    if domain.startswith("["):
        if not _ADDRESS_LITERAL.match(domain):
            raise AddressError(AddressProblem.SYNTAX, "bad address literal")
    elif not _is_domain(domain):
        raise AddressError(AddressProblem.SYNTAX, "bad domain")
    return Mailbox(local_part=local, domain=domain)


def relay_trick(mailbox: Mailbox) -> str | None:
    """Why ``mailbox`` could make a relay route mail elsewhere, or None (docs/security.md §4).

    The ``%`` hack and UUCP ``!`` paths, ``@`` hidden in a quoted local part, address literals
    and unqualified or numeric domains are refused even though RFC 5321 allows some of them.
    """
    if "%" in mailbox.local_part or "!" in mailbox.local_part:
        return "% or ! in local part"
    if mailbox.quoted and "@" in mailbox.local_part:
        return "@ in quoted local part"
    if mailbox.domain.startswith("["):
        return "address literals are not accepted"
    labels = mailbox.domain.split(".")
    if len(labels) < 2:
        return "unqualified domain"
    if labels[-1].isdigit():
        return "numeric domain"
    return None


def split_path(argument: str) -> tuple[str, list[str]]:
    """Split ``<path> [SP params]`` into the path (brackets kept) and the parameter words.

    The closing ``>`` is found with quoted strings respected, so ``<"a>b"@c.d>`` is one path.
    Raises :class:`GrammarError` when there is no bracketed path.
    """
    if not argument.startswith("<"):
        raise GrammarError("address must be enclosed in <>")
    i, quoted = 1, False
    while i < len(argument):
        c = argument[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            break
        i += 1
    else:
        raise GrammarError("address must be enclosed in <>")
    path, rest = argument[: i + 1], argument[i + 1 :]
    if rest and not rest.startswith(" "):
        raise GrammarError("parameters must follow the address after a space")
    # RFC 5321 §4.1.2 wants single spaces; runs of spaces are harmless and common.
    return path, [word for word in rest.split(" ") if word]


def parse_esmtp_params(words: Sequence[str]) -> list[tuple[str, str | None]]:
    """Parse ``keyword[=value]`` words (RFC 5321 §4.1.2); keywords come back upper-cased."""
    params: list[tuple[str, str | None]] = []
    for word in words:
        keyword, eq, value = word.partition("=")
        if not _ESMTP_KEYWORD.match(keyword):
            raise GrammarError("bad parameter keyword")
        if eq and not _ESMTP_VALUE.match(value):
            raise GrammarError("bad parameter value")
        params.append((keyword.upper(), value if eq else None))
    return params


def parse_hello_domain(text: str) -> str:
    """Validate the EHLO/HELO argument: a domain or an address literal (RFC 5321 §4.1.1.1).

    Unqualified names are fine here (a client may not know its FQDN); ``_`` is tolerated.
    """
    if text.startswith("["):
        inner = text[1:-1] if text.endswith("]") else ""
        try:
            if inner[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise GrammarError("bad address literal") from None
        return text
    if not _dotted(text, _HELLO_LABEL, MAX_DOMAIN):
        raise GrammarError("bad domain")
    return text


def is_xtext(value: str) -> bool:
    """True when ``value`` is RFC 3461 §4 xtext."""
    return _XTEXT.match(value) is not None


def encode_xtext(text: str) -> str:
    """Encode ``text`` as xtext: ``+``, ``=``, controls, space and non-ASCII become ``+XX``."""
    out = []
    for byte in text.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def decode_xtext(value: str) -> str:
    """Decode xtext (the inverse of :func:`encode_xtext`); raises :class:`GrammarError`."""
    if not is_xtext(value):
        raise GrammarError("bad xtext")
    raw = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
    return raw.encode("latin-1").decode("utf-8", "replace")


def parse_notify(value: str | None) -> str:
    """Validate a ``NOTIFY=`` value (RFC 3461 §4.1) and return it normalised.

    ``NEVER`` alone, or a comma list of ``SUCCESS``, ``FAILURE`` and ``DELAY`` (any case, no
    repeats), which comes back upper-case in that order: ``delay,success`` → ``SUCCESS,DELAY``.
    Raises :class:`GrammarError`.
    """
    if not value or not value.isascii():
        raise GrammarError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return "NEVER"
    if "NEVER" in items:
        raise GrammarError("NOTIFY=NEVER cannot be combined with other values")
    if not all(item in _NOTIFY_ORDER for item in items):
        raise GrammarError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    if len(set(items)) != len(items):
        raise GrammarError("NOTIFY lists a value twice")
    return ",".join(item for item in _NOTIFY_ORDER if item in items)


def check_orcpt(value: str | None) -> str:
    """Validate an ``ORCPT=`` value, ``addr-type;xtext`` (RFC 3461 §4.2); returned unchanged.

    The address stays xtext-encoded. Raises :class:`GrammarError`.
    """
    if value is not None and len(value) > MAX_ORCPT:
        raise GrammarError(f"ORCPT is longer than {MAX_ORCPT} characters")
    addr_type, semicolon, address = (value or "").partition(";")
    if not (semicolon and address and _ADDR_TYPE.match(addr_type) and is_xtext(address)):
        raise GrammarError("ORCPT must be addr-type;xtext")
    return value or ""


def check_envid(text: str) -> str:
    """Validate a decoded envelope identifier (RFC 3461 §4.4); returned unchanged.

    Printable US-ASCII, at most :data:`MAX_ENVID` characters. Raises :class:`GrammarError`.
    """
    if not _PRINTABLE_ASCII.match(text):
        raise GrammarError("ENVID must be printable US-ASCII")
    if len(text) > MAX_ENVID:
        raise GrammarError(f"ENVID is longer than {MAX_ENVID} characters")
    return text


def decode_envid(value: str | None) -> str:
    """Decode and validate an ``ENVID=`` value (xtext, RFC 3461 §4.4)."""
    if not value or not is_xtext(value):
        raise GrammarError("ENVID must be xtext")
    return check_envid(decode_xtext(value))


def format_path(address: str) -> str:
    """Render ``address`` as an SMTP path for a command the client role sends.

    ``""`` becomes ``<>``. Anything that is not a valid mailbox (control characters, CR, LF,
    bad syntax) raises :class:`AddressError`, so no envelope value can break a command line
    (aiosmtplib GHSA-v3q9-hj7j-63hq).
    """
    if address == "":
        return "<>"
    parse_mailbox(address)
    path = f"<{address}>"
    if _octets(path) > MAX_PATH:
        raise AddressError(AddressProblem.SYNTAX, "path too long")
    return path
