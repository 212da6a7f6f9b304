"""The relay plugin, driven through its hooks as the session would call them."""

from __future__ import annotations

from pathlib import Path

import argon2
import pytest

from submitd import (
    SENDERS,
    Config,
    ConfigError,
    Envelope,
    MailParams,
    MessageHandle,
    Recipient,
    SessionInfo,
)
from submitd.config import load_config
from submitd_plugins import passwdfile, relay

CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
CONFIG = """\
hostname = "mail.example.org"
[[listen]]
address = "127.0.0.1:2587"
mode = "starttls"
[tls]
cert = "cert.pem"
key = "key.pem"
[plugins]
enable = ["passwdfile", "relay"]
[plugins.passwdfile]
path = "users"
"""
ALIASES = """\
[plugins.relay.senders]
"info@example.org" = ["alice", "bob"]
"@lists.example.org" = ["bob"]
"<>" = ["bob"]
"""
DOMAINS = """\
[plugins.relay]
deny_recipient_domains = ["competitor.example"]
[plugins.relay.group.interns]
logins = ["carol"]
allow_recipient_domains = ["example.org"]
[plugins.relay.group.board]
logins = ["bob"]
deny_recipient_domains = []
"""


def make_config(tmp_path: Path, extra: str = "") -> Config:
    users = tmp_path / "users"
    if not users.exists():
        users.write_text(
            f"alice {CHEAP.hash('pw')} alice@example.com @alias.example\n"
            f"bob {CHEAP.hash('pw')}\n"
            f"bounces {CHEAP.hash('pw')} <> notify@example.com\n"
        )
    path = tmp_path / "submitd.toml"
    path.write_text(CONFIG + extra)
    config = load_config(path)
    relay.submitd_configure(config)  # before passwdfile, as enable's order calls them
    passwdfile.submitd_configure(config)
    return config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


def session(config: Config, username: str | None = "alice") -> SessionInfo:
    return SessionInfo(
        session_id="S1", config=config, listener=config.listeners[0], peer_host="192.0.2.7",
        peer_port=40000, tls=True, username=username,
    )


def message(tmp_path: Path, *headers: tuple[str, str]) -> MessageHandle:
    path = tmp_path / "msg"
    path.write_bytes(b"".join(f"{n}: {v}\r\n".encode() for n, v in headers) + b"\r\nbody\r\n")
    return MessageHandle(path=path, size=path.stat().st_size, headers=list(headers), body_offset=0)


SELF = "alice@example.com"
ENVELOPE = Envelope(
    sender="alice@example.com", recipients=(Recipient(address="bob@example.net"),),
    params=MailParams(), username="alice",
)


def mail_from(config: Config, login: str | None, sender: str) -> str | None:
    reply = relay.submitd_mail_from(session(config, login), sender, MailParams())
    return None if reply is None else str(reply)


def data(config: Config, tmp_path: Path, *headers: tuple[str, str],
         login: str = "alice") -> str | None:
    reply = relay.submitd_data_filter(session(config, login), ENVELOPE,
                                      message(tmp_path, *headers))
    return None if reply is None else str(reply)


def rcpt(config: Config, login: str, address: str) -> str | None:
    reply = relay.submitd_rcpt_check(session(config, login), ENVELOPE,
                                     Recipient(address=address))
    return None if reply is None else str(reply)


# --- MAIL FROM ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("login", "sender", "allowed"),
    [
        ("alice", "alice@example.com", True),
        ("alice", "alice@EXAMPLE.COM", True),
        ("alice", "anything@alias.example", True),
        ("alice", "Alice@example.com", False),  # local parts match exactly
        ("alice", "bob@example.com", False),
        ("alice", "", False),
        ("bounces", "", True),
        ("bounces", "notify@example.com", True),
        ("bob", "bob@example.com", False),  # listed with no senders: may log in, not send
        ("mallory", "mallory@example.com", False),
        (None, "alice@example.com", False),
    ],
)
def test_mail_from_allows_only_the_senders_listed_for_the_login(
    config: Config, login: str | None, sender: str, allowed: bool
) -> None:
    reply = mail_from(config, login, sender)
    if allowed:
        assert reply is None
    else:
        assert reply == (f"550 5.7.1 Sender address <{sender}> not owned by user "
                         f"{login or '(none)'}")


def test_aliases_table_adds_shared_mailboxes_to_the_users_file(tmp_path: Path) -> None:
    config = make_config(tmp_path, ALIASES)
    assert mail_from(config, "alice", "info@example.org") is None
    assert mail_from(config, "alice", "alice@example.com") is None  # the users file still counts
    assert mail_from(config, "bob", "info@example.org") is None
    assert mail_from(config, "bob", "news@LISTS.example.org") is None
    assert mail_from(config, "bob", "") is None
    assert mail_from(config, "alice", "news@lists.example.org") == (
        "550 5.7.1 Sender address <news@lists.example.org> not owned by user alice")
    assert mail_from(config, "bounces", "info@example.org") is not None


def test_a_second_auth_plugin_shares_the_server(config: Config) -> None:
    """Any plugin may publish senders for its logins; relay checks them all."""
    config.stash[SENDERS]["ldap"] = {"erin": ["erin@example.net"], "alice": ["@corp.example"]}
    assert mail_from(config, "erin", "erin@example.net") is None
    assert mail_from(config, "erin", "alice@example.com") is not None
    assert mail_from(config, "alice", "boss@corp.example") is None
    assert mail_from(config, "alice", "alice@example.com") is None


def test_without_any_published_senders_nobody_may_send(tmp_path: Path) -> None:
    (tmp_path / "submitd.toml").write_text(CONFIG.replace('"passwdfile", ', ""))
    config = load_config(tmp_path / "submitd.toml")
    relay.submitd_configure(config)
    assert mail_from(config, "alice", "alice@example.com") == (
        "550 5.7.1 Sender address <alice@example.com> not owned by user alice")


def test_control_characters_never_reach_the_reply(config: Config) -> None:
    reply = mail_from(config, "alice", "x\x01y@example.net")
    assert reply is not None and "\x01" not in reply and "x?y@example.net" in reply


# --- From: and Sender: ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("From", "Alice <alice@example.com>")],
        [("From", "alice@EXAMPLE.com")],
        [("From", '"Someone Else <boss@corp.example>" <alice@example.com>')],
        [("From", "Alice <alice@example.com> (not boss@corp.example)")],
        [("From", "=?utf-8?q?boss=40corp.example?= <alice@example.com>")],
        [("From", "Alice <alice@example.com>, Team <team@alias.example>"),
         ("Sender", "alice@example.com")],
        [("From", "team@alias.example"), ("Sender", "alice@example.com")],
        [("From", "Team: alice@example.com, x@alias.example;"), ("Sender", "alice@example.com")],
        [("Subject", "no From: at all; a later plugin adds it")],
    ],
)
def test_header_from_and_sender_owned_by_the_login_pass(
    config: Config, tmp_path: Path, headers: list[tuple[str, str]]
) -> None:
    assert data(config, tmp_path, *headers) is None


@pytest.mark.parametrize(
    ("headers", "text"),
    [
        ([("From", "Boss <boss@corp.example>")],
         "Header From: address <boss@corp.example> not owned by user alice"),
        ([("From", '"alice@example.com" <boss@corp.example>')],  # the display name is not it
         "Header From: address <boss@corp.example> not owned by user alice"),
        ([("From", "alice@example.com"), ("Sender", "boss@corp.example")],
         "Header Sender: address <boss@corp.example> not owned by user alice"),
        ([("From", "alice@example.com"), ("From", "boss@corp.example")],  # several From: lines
         "Header From: address <boss@corp.example> not owned by user alice"),
        ([("From", "Alice <alice@example.com>, boss@corp.example"), ("Sender", SELF)],
         "Header From: address <boss@corp.example> not owned by user alice"),
        ([("From", "Team: alice@example.com, boss@corp.example;"), ("Sender", SELF)],
         "Header From: address <boss@corp.example> not owned by user alice"),
        ([("From", "alice@example.com <boss@corp.example>")],  # parsers disagree: invalid
         "Header From: is not a valid address list"),
        ([("From", "alice@example.com@corp.example")], "Header From: is not a valid address list"),
        ([("From", "<>")], "Header From: is not a valid address list"),
        ([("From", "(" * 2000)], "Header From: is not a valid address list"),
        ([("From", "undisclosed-recipients:;")], "Header From: holds no address"),
        ([("From", "")], "Header From: holds no address"),
        ([("From", "Alice <alice@example.com>, Team <team@alias.example>")],
         "Header From: names 2 authors and there is no Sender: (RFC 5322 section 3.6.2)"),
        ([("From", "alice@example.com"), ("From", "x@alias.example")],
         "Header From: names 2 authors and there is no Sender: (RFC 5322 section 3.6.2)"),
        ([("From", "alice@example.com, " * 250)],
         "Header From: and Sender: are too long to check (at most 4096 characters)"),
    ],
)
def test_header_addresses_not_owned_by_the_login_are_refused(
    config: Config, tmp_path: Path, headers: list[tuple[str, str]], text: str
) -> None:
    assert data(config, tmp_path, *headers) == f"550 5.7.1 {text}"


def test_header_refusal_replaces_control_characters(config: Config, tmp_path: Path) -> None:
    reply = data(config, tmp_path, ("From", "boss@corp.example\x01"))
    assert reply is not None and reply.startswith("550 5.7.1 ") and "\x01" not in reply


def test_header_check_uses_the_aliases_table_too(tmp_path: Path) -> None:
    config = make_config(tmp_path, ALIASES)
    assert data(config, tmp_path, ("From", "Info <info@example.org>"), login="bob") is None
    assert data(config, tmp_path, ("From", "alice@example.com"), login="bob") == (
        "550 5.7.1 Header From: address <alice@example.com> not owned by user bob")


def test_the_header_check_runs_in_a_worker_thread() -> None:
    assert getattr(relay.submitd_data_filter, "submitd_blocking", False) is True


# --- recipients -----------------------------------------------------------------------------


def test_recipients_are_unrestricted_by_default(config: Config) -> None:
    assert rcpt(config, "alice", "anyone@competitor.example") is None


def test_denied_and_allowed_recipient_domains_per_group(tmp_path: Path) -> None:
    config = make_config(tmp_path, DOMAINS)
    denied = "550 5.7.1 Recipient <x@{}> not allowed for user {}"
    assert rcpt(config, "alice", "x@competitor.example") == denied.format(
        "competitor.example", "alice")
    assert rcpt(config, "alice", "x@mail.COMPETITOR.example") == denied.format(
        "mail.COMPETITOR.example", "alice")
    assert rcpt(config, "alice", "x@notcompetitor.example") is None
    assert rcpt(config, "alice", "x@example.net") is None
    # interns: only example.org (and its subdomains); the default deny list still applies
    assert rcpt(config, "carol", "x@example.org") is None
    assert rcpt(config, "carol", "x@eu.example.org") is None
    assert rcpt(config, "carol", "x@example.net") == denied.format("example.net", "carol")
    # board: the deny list cleared
    assert rcpt(config, "bob", "x@competitor.example") is None


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ('[plugins.relay]\ncolour = "red"', "plugins.relay.colour", "unknown key"),
        ('[plugins.relay]\ndeny_recipient_domains = "x.example"',
         "plugins.relay.deny_recipient_domains", "list of strings"),
        ('[plugins.relay]\nallow_recipient_domains = ["not a domain"]',
         "plugins.relay.allow_recipient_domains", "not a domain name"),
        ('[plugins.relay]\nsenders = ["x"]', "plugins.relay.senders", "must be a table"),
        ('[plugins.relay.senders]\n"nobody" = ["alice"]', 'plugins.relay.senders."nobody"',
         "invalid sender"),
        ('[plugins.relay.senders]\n"a@example.org" = "alice"',
         'plugins.relay.senders."a@example.org"', "list of strings"),
        ('[plugins.relay.senders]\n"a@example.org" = ["two words"]',
         'plugins.relay.senders."a@example.org"', "invalid login"),
        ("[plugins.relay.group.x]\nallow_recipient_domains = []", "plugins.relay.group.x.logins",
         "required"),
        ('[plugins.relay.group.x]\nlogins = ["a"]\nsize = 1', "plugins.relay.group.x.size",
         "unknown key"),
        ('[plugins.relay.group.x]\nlogins = ["a"]\n[plugins.relay.group.y]\nlogins = ["a"]',
         "plugins.relay.group.y.logins", "already in group 'x'"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(
    tmp_path: Path, table: str, key: str, fragment: str
) -> None:
    (tmp_path / "submitd.toml").write_text(CONFIG + table + "\n")
    config = load_config(tmp_path / "submitd.toml")
    with pytest.raises(ConfigError) as info:
        relay.submitd_configure(config)
    assert info.value.key == key
    assert fragment in info.value.message
