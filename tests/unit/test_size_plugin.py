"""The size plugin, driven through its hooks as the session would call them."""

from __future__ import annotations

from pathlib import Path

import pytest

from submitd import (
    Config,
    ConfigError,
    Envelope,
    MailParams,
    MessageHandle,
    Recipient,
    SessionInfo,
)
from submitd.config import load_config
from submitd_plugins import size

CONFIG = """\
hostname = "mail.example.org"
[[listen]]
address = "127.0.0.1:2587"
mode = "starttls"
[tls]
cert = "cert.pem"
key = "key.pem"
[limits]
max_message_size = 100000
[plugins]
enable = ["size"]
"""
GROUPS = """\
[plugins.size]
max_message_size = 1000
[plugins.size.group.press]
logins = ["alice", "bob"]
max_message_size = 50000
"""
ENVELOPE = Envelope(
    sender="alice@example.com", recipients=(Recipient(address="bob@example.net"),),
    params=MailParams(), username="alice",
)


def make_config(tmp_path: Path, extra: str = GROUPS) -> Config:
    path = tmp_path / "submitd.toml"
    path.write_text(CONFIG + extra)
    config = load_config(path)
    size.submitd_configure(config)
    return config


def session(config: Config, username: str) -> SessionInfo:
    return SessionInfo(
        session_id="S1", config=config, listener=config.listeners[0], peer_host="192.0.2.7",
        peer_port=40000, tls=True, username=username,
    )


def mail(config: Config, login: str, declared: int | None) -> str | None:
    reply = size.submitd_mail_from(session(config, login), "x@example.com",
                                   MailParams(size=declared))
    return None if reply is None else str(reply)


def data(config: Config, tmp_path: Path, login: str, length: int) -> str | None:
    path = tmp_path / "msg"
    head = b"Subject: size\r\n\r\n"
    path.write_bytes(head + b"x" * (length - len(head)))
    handle = MessageHandle(path=path, size=path.stat().st_size,
                           headers=[("Subject", "size")], body_offset=len(head))
    reply = size.submitd_data_filter(session(config, login), ENVELOPE, handle)
    return None if reply is None else str(reply)


def test_declared_size_over_the_login_limit_is_552_at_mail(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert mail(config, "carol", 1000) is None
    assert mail(config, "carol", 1001) == (
        "552 5.3.4 Message size exceeds the limit of user carol (1000 bytes)")
    assert mail(config, "alice", 50000) is None
    assert mail(config, "bob", 50001) == (
        "552 5.3.4 Message size exceeds the limit of user bob (50000 bytes)")
    assert mail(config, "carol", None) is None  # no SIZE=: decided after DATA


def test_message_larger_than_the_login_limit_is_552_after_data(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert data(config, tmp_path, "carol", 1000) is None
    assert data(config, tmp_path, "carol", 1001) == (
        "552 5.3.4 Message size exceeds the limit of user carol (1000 bytes)")
    assert data(config, tmp_path, "alice", 20000) is None


def test_without_a_table_the_global_limit_applies(tmp_path: Path) -> None:
    config = make_config(tmp_path, "")
    assert config.stash[size.LIMITS].default == 100000
    assert mail(config, "carol", 100000) is None
    assert mail(config, "carol", 100001) == (
        "552 5.3.4 Message size exceeds the limit of user carol (100000 bytes)")


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ("[plugins.size]\ncolour = 1", "plugins.size.colour", "unknown key"),
        ('[plugins.size]\nmax_message_size = "10M"', "plugins.size.max_message_size",
         "positive integer"),
        ("[plugins.size]\nmax_message_size = 0", "plugins.size.max_message_size",
         "positive integer"),
        ("[plugins.size]\nmax_message_size = true", "plugins.size.max_message_size",
         "positive integer"),
        ("[plugins.size]\nmax_message_size = 100001", "plugins.size.max_message_size",
         "must not exceed [limits] max_message_size (100000)"),
        ("[plugins.size.group.x]\nmax_message_size = 5", "plugins.size.group.x.logins",
         "required"),
        ('[plugins.size.group.x]\nlogins = ["a"]', "plugins.size.group.x.max_message_size",
         "required"),
        ('[plugins.size.group.x]\nlogins = "a"\nmax_message_size = 5',
         "plugins.size.group.x.logins", "list of strings"),
        ('[plugins.size.group.x]\nlogins = ["a"]\nmax_message_size = 5\nsize = 1',
         "plugins.size.group.x.size", "unknown key"),
        ('[plugins.size.group.x]\nlogins = ["a"]\nmax_message_size = 5\n'
         '[plugins.size.group.y]\nlogins = ["a"]\nmax_message_size = 6',
         "plugins.size.group.y.logins", "already in group 'x'"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(
    tmp_path: Path, table: str, key: str, fragment: str
) -> None:
    (tmp_path / "submitd.toml").write_text(CONFIG + table + "\n")
    with pytest.raises(ConfigError) as info:
        size.submitd_configure(load_config(tmp_path / "submitd.toml"))
    assert info.value.key == key
    assert fragment in info.value.message
