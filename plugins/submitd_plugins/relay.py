"""relay: who may send as whom, and to where — authorization, whichever plugin authenticated.

Configuration (every key optional; the table itself may be left out)::

    [plugins.relay]
    deny_recipient_domains = ["competitor.example"]   # nobody may send there
    # allow_recipient_domains = ["example.org"]       # when set: only there

    [plugins.relay.senders]           # shared mailboxes and aliases: pattern = logins
    "info@example.org" = ["alice", "bob"]
    "@lists.example.org" = ["listadmin"]

    [plugins.relay.group.interns]     # a policy for some logins, instead of the one above
    logins = ["carol", "dave"]
    allow_recipient_domains = ["example.org"]

**Senders.** A login may use an address as envelope sender (MAIL FROM) and in the ``From:``
and ``Sender:`` header fields only if a pattern allows it: the patterns the authentication
plugins publish for the login as :data:`submitd.SENDERS` (the ``passwdfile`` plugin publishes
the senders listed in the users file), plus the ``[plugins.relay.senders]`` entries naming the
login. A pattern is an address (the local part matches exactly, the domain in any case),
``@domain`` (any address at that domain) or ``<>`` (the null sender, for bounces). A login no
pattern names may send nothing. Refusals are ``550 5.7.1``::

    550 5.7.1 Sender address <ceo@example.org> not owned by user alice
    550 5.7.1 Header From: address <ceo@example.org> not owned by user alice

The header fields are parsed as RFC 5322 address lists, never read as text: a display name
(``"alice@example.org" <ceo@example.org>``) is not an address. Every ``From:`` and ``Sender:``
field counts (several fields, folded fields), and every mailbox in them, including the members
of a group; an address either of Python's two address parsers finds must be allowed, and a
field the RFC 5322 parser reports as invalid is refused, so a parser differential cannot
smuggle an address past the check. ``From:`` with several mailboxes needs a ``Sender:``
(RFC 5322 §3.6.2). A field with no address (``undisclosed-recipients:;``) is refused; a
message without ``From:`` passes (a later plugin or the receiving side adds one). The
``From:`` and ``Sender:`` values together may hold at most :data:`MAX_ADDRESS_TEXT`
characters, which bounds the parsing time; the parsing runs in a worker thread.

**Recipients.** ``deny_recipient_domains`` refuses the recipients at those domains and their
subdomains; ``allow_recipient_domains``, when given, refuses every other domain. A login in a
``[plugins.relay.group.NAME]`` table follows that group's keys instead (a key the group leaves
out falls back to ``[plugins.relay]``; ``[]`` clears it). A login may be in one group only.
Refusals are ``550 5.7.1 Recipient <bob@competitor.example> not allowed for user alice``.

The hooks run ``tryfirst``: authorization is decided before another plugin can answer (a 2xx
at RCPT TO ends the walk). Unknown keys, malformed patterns and domains stop the server at
start (and ``check-config``). Without this plugin, a logged-in user may send as anyone.

Uses only the public API: the names exported by :mod:`submitd` and :mod:`submitd.passwords`.
"""

from __future__ import annotations

import email.errors
import email.utils
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.headerregistry import AddressHeader, HeaderRegistry
from types import MappingProxyType
from typing import Any

from submitd import (
    SENDERS,
    Config,
    ConfigError,
    Envelope,
    MailParams,
    MessageHandle,
    Recipient,
    Reply,
    SessionInfo,
    StashKey,
    blocking,
    hookimpl,
)
from submitd.passwords import sender_matches, validate_login, validate_sender

from ._login_groups import login_groups, reject_unknown_keys, string_list

__all__ = [
    "MAX_ADDRESS_TEXT",
    "POLICY",
    "DomainRule",
    "RelayPolicy",
    "header_addresses",
    "submitd_configure",
    "submitd_data_filter",
    "submitd_mail_from",
    "submitd_rcpt_check",
]

NAME = "relay"
#: The most characters the ``From:`` and ``Sender:`` values of one message may hold together.
MAX_ADDRESS_TEXT = 4096
_KEYS = ("deny_recipient_domains", "allow_recipient_domains", "senders", "group")
_RULE_KEYS = ("deny_recipient_domains", "allow_recipient_domains")
_GROUP_KEYS = ("logins", *_RULE_KEYS)
_FIELDS = ("From", "Sender")
_NO_DOMAINS: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class DomainRule:
    """Where a login may send: ``deny`` always refused; ``allow`` (None: any) the only ones."""

    deny: frozenset[str] = _NO_DOMAINS
    allow: frozenset[str] | None = None

    def permits(self, domain: str) -> bool:
        """Tell whether a recipient at ``domain`` is allowed (subdomains follow their parent)."""
        if _within(domain, self.deny):
            return False
        return self.allow is None or _within(domain, self.allow)


@dataclass(frozen=True, kw_only=True)
class RelayPolicy:
    """The validated ``[plugins.relay]`` table."""

    aliases: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )  # login -> the sender patterns [plugins.relay.senders] gives it
    default: DomainRule = DomainRule()
    rules: Mapping[str, DomainRule] = field(default_factory=lambda: MappingProxyType({}))

    def rule_for(self, login: str | None) -> DomainRule:
        """The recipient rule of ``login``: its group's, else the default."""
        return self.rules.get(login, self.default) if login is not None else self.default


#: Where :func:`submitd_configure` keeps the policy.
POLICY = StashKey[RelayPolicy]()


def _within(domain: str, domains: frozenset[str]) -> bool:
    """Whether ``domain`` is one of ``domains`` or a subdomain of one."""
    labels = domain.lower().rstrip(".").split(".")
    return any(".".join(labels[i:]) in domains for i in range(len(labels)))


# --- configuration --------------------------------------------------------------------------


def _domains(config: Config, where: str, value: object) -> frozenset[str]:
    domains = []
    for domain in string_list(config, where, value):
        try:
            domains.append(validate_sender("@" + domain).removeprefix("@"))
        except ValueError:
            raise ConfigError(
                config.path, where, f"{domain!r} is not a domain name (e.g. example.org)"
            ) from None
    return frozenset(domains)


def _rule(config: Config, where: str, table: Mapping[str, Any], base: DomainRule) -> DomainRule:
    deny, allow = base.deny, base.allow
    if "deny_recipient_domains" in table:
        deny = _domains(config, f"{where}.deny_recipient_domains",
                        table["deny_recipient_domains"])
    if "allow_recipient_domains" in table:
        allow = _domains(config, f"{where}.allow_recipient_domains",
                         table["allow_recipient_domains"]) or None
    return DomainRule(deny=deny, allow=allow)


def _logins(config: Config, where: str, value: object) -> list[str]:
    logins = string_list(config, where, value)
    for login in logins:
        try:
            validate_login(login)
        except ValueError as exc:
            raise ConfigError(config.path, where, str(exc)) from None
    return logins


def _aliases(config: Config, table: object) -> Mapping[str, tuple[str, ...]]:
    where = f"plugins.{NAME}.senders"
    if not isinstance(table, Mapping):
        raise ConfigError(config.path, where, 'must be a table: "address" = ["login", ...]')
    by_login: dict[str, list[str]] = {}
    for pattern, logins in table.items():
        key = f'{where}."{pattern}"'
        try:
            normalised = validate_sender(pattern)
        except ValueError as exc:
            raise ConfigError(config.path, key, str(exc)) from None
        for login in _logins(config, key, logins):
            by_login.setdefault(login, []).append(normalised)
    return MappingProxyType({k: tuple(dict.fromkeys(v)) for k, v in by_login.items()})


def _groups(config: Config, table: object, default: DomainRule) -> Mapping[str, DomainRule]:
    rules: dict[str, DomainRule] = {}
    groups = login_groups(config, f"plugins.{NAME}.group", table, _GROUP_KEYS,
                          required=("logins",))
    for key, group, logins in groups:
        rule = _rule(config, key, group, default)
        rules.update(dict.fromkeys(logins, rule))
    return MappingProxyType(rules)


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.relay]`` into a :class:`RelayPolicy` in ``config.stash``."""
    table = config.plugin_table(NAME)
    reject_unknown_keys(config, f"plugins.{NAME}", table, _KEYS)
    default = _rule(config, f"plugins.{NAME}", table, DomainRule())
    config.stash[POLICY] = RelayPolicy(
        aliases=_aliases(config, table.get("senders", {})),
        default=default,
        rules=_groups(config, table.get("group", {}), default),
    )


# --- senders --------------------------------------------------------------------------------


def _policy(config: Config) -> RelayPolicy:
    return config.stash.get(POLICY, None) or RelayPolicy()


def _patterns(config: Config, login: str) -> list[str]:
    """Every sender pattern of ``login``: the auth plugins' and the aliases table's."""
    patterns: list[str] = list(_policy(config).aliases.get(login, ()))
    sources = config.stash.get(SENDERS, {})
    for source in sources.values():
        patterns.extend(source.get(login, ()))
    return patterns


def _allowed(session: SessionInfo, address: str) -> bool:
    login = session.username
    return login is not None and sender_matches(_patterns(session.config, login), address)


def _printable(text: str, limit: int = 200) -> str:
    """Make client-supplied text safe for a reply line (no controls, bounded length)."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _user(session: SessionInfo) -> str:
    return _printable(session.username or "(none)", 100)


def _refuse(what: str, address: str, session: SessionInfo) -> Reply:
    return Reply.make(
        550, "5.7.1", f"{what} <{_printable(address)}> not owned by user {_user(session)}"
    )


@hookimpl(tryfirst=True)
def submitd_mail_from(session: SessionInfo, sender: str, params: MailParams) -> Reply | None:
    """Refuse an envelope sender the login may not use (``<>`` only where ``<>`` is listed)."""
    if _allowed(session, sender):
        return None
    return _refuse("Sender address", sender, session)


# --- recipients -----------------------------------------------------------------------------


@hookimpl(tryfirst=True)
def submitd_rcpt_check(
    session: SessionInfo, envelope: Envelope, recipient: Recipient
) -> Reply | None:
    """Refuse a recipient whose domain the login's rule does not permit."""
    domain = recipient.address.rpartition("@")[2]
    if _policy(session.config).rule_for(session.username).permits(domain):
        return None
    return Reply.make(550, "5.7.1", f"Recipient <{_printable(recipient.address)}> not allowed "
                                    f"for user {_user(session)}")


# --- header fields --------------------------------------------------------------------------

_REGISTRY = HeaderRegistry()


class _Unreadable(ValueError):
    """A field value that is not a valid RFC 5322 address list."""


def header_addresses(name: str, values: Iterable[str]) -> list[str]:
    """Every address in the ``name`` fields ``values``, as either address parser reads them.

    The union of :mod:`email.headerregistry` (RFC 5322) and :func:`email.utils.getaddresses`
    (the lenient parser many programs use), in order, without duplicates; ``""`` stands for an
    empty address (``<>``). Raise ValueError for a value the RFC 5322 parser calls invalid.
    Display names and comments are never taken for addresses.
    """
    found: list[str] = []
    for value in values:
        try:
            header = _REGISTRY(name, value)
        except (ValueError, IndexError, TypeError, RecursionError,
                email.errors.HeaderParseError) as exc:
            raise _Unreadable(str(exc)) from None
        if not isinstance(header, AddressHeader):  # pragma: no cover - From/Sender only
            raise _Unreadable(f"{name} is not an address field")
        if any(isinstance(d, email.errors.InvalidHeaderDefect) for d in header.defects):
            raise _Unreadable("invalid address list")
        found.extend("" if a.addr_spec == "<>" else a.addr_spec for a in header.addresses)
        try:
            lenient = email.utils.getaddresses([value])
        except RecursionError:
            raise _Unreadable("nested too deeply") from None
        found.extend(address for display, address in lenient if address or display)
    return list(dict.fromkeys(found))


def _check_field(
    session: SessionInfo, name: str, values: list[str]
) -> tuple[list[str], Reply | None]:
    """The addresses of the ``name`` fields, and the refusal if one is not the login's."""
    try:
        addresses = header_addresses(name, values)
    except ValueError:
        return [], Reply.make(550, "5.7.1", f"Header {name}: is not a valid address list")
    if not addresses:
        return [], Reply.make(550, "5.7.1", f"Header {name}: holds no address")
    for address in addresses:
        if not address or not _allowed(session, address):
            return addresses, _refuse(f"Header {name}: address", address, session)
    return addresses, None


@hookimpl(tryfirst=True)
@blocking
def submitd_data_filter(
    session: SessionInfo, envelope: Envelope, message: MessageHandle
) -> Reply | None:
    """Refuse a message whose ``From:`` or ``Sender:`` holds an address the login may not use.

    Runs in a worker thread (``@blocking``): parsing a long address list takes milliseconds.
    """
    fields = {name: message.get_all(name) for name in _FIELDS}
    if sum(len(v) for values in fields.values() for v in values) > MAX_ADDRESS_TEXT:
        return Reply.make(550, "5.7.1", "Header From: and Sender: are too long to check "
                                        f"(at most {MAX_ADDRESS_TEXT} characters)")
    found: dict[str, list[str]] = {}
    for name, values in fields.items():
        if values:
            found[name], refusal = _check_field(session, name, values)
            if refusal is not None:
                return refusal
    authors = len(found.get("From", ()))
    if authors > 1 and "Sender" not in found:
        return Reply.make(550, "5.7.1", f"Header From: names {authors} authors and there is "
                                        "no Sender: (RFC 5322 section 3.6.2)")
    return None
