"""The maildir plugin: one durable file per message in new/, or a retryable 451 and no file."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from submitd import (
    Config,
    ConfigError,
    DeliveryOutcome,
    Envelope,
    MailParams,
    MessageHandle,
    OutcomeKind,
    Recipient,
    Reply,
)
from submitd.config import Limits, PluginsConfig, QueueConfig
from submitd_plugins import maildir

STORED = b"Received: by mail.example.org\r\nSubject: hi\r\n\r\nhello\r\n.not stuffed\r\n"
RECIPIENTS = (Recipient(address="b@example.net"), Recipient(address="c@example.net", attempts=2))


def make_config(tmp_path: Path, table: dict[str, Any] | None) -> Config:
    tables = {} if table is None else {"maildir": table}
    return Config(
        path=tmp_path / "etc" / "submitd.toml",
        hostname="mail.example.org",
        listeners=(),
        tls=None,
        limits=Limits(),
        queue=QueueConfig(dir=tmp_path / "spool"),
        plugins=PluginsConfig(enable=("maildir",), tables=tables),
    )


def stored_message(tmp_path: Path, data: bytes = STORED) -> MessageHandle:
    path = tmp_path / "spool-msg"
    path.write_bytes(data)
    return MessageHandle(path=path, size=len(data), headers=[], body_offset=0, queue_id="Q1")


def envelope(sender: str = "alice@example.org") -> Envelope:
    return Envelope(
        sender=sender,
        recipients=RECIPIENTS,
        params=MailParams(),
        username="alice",
        queue_id="01HZX5K3M2ABCDEF",
    )


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = make_config(tmp_path, {"path": "../mail"})
    maildir.submitd_configure(config)
    return config


def test_configure_resolves_the_path_and_creates_the_maildir(
    config: Config, tmp_path: Path
) -> None:
    for sub in ("tmp", "new", "cur"):
        assert (tmp_path / "mail" / sub).is_dir()
    assert config.stash[maildir.MAILDIR_PATH].resolve() == (tmp_path / "mail").resolve()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        (None, "plugins.maildir.path"),
        ({}, "plugins.maildir.path"),
        ({"path": 7}, "plugins.maildir.path"),
        ({"path": ""}, "plugins.maildir.path"),
        ({"path": "mail", "flder": "x"}, "plugins.maildir.flder"),
    ],
)
def test_bad_configuration_names_file_and_key(
    tmp_path: Path, table: dict[str, Any] | None, key: str
) -> None:
    config = make_config(tmp_path, table)
    with pytest.raises(ConfigError) as info:
        maildir.submitd_configure(config)
    assert info.value.key == key
    assert info.value.path == config.path


async def test_delivery_writes_one_file_with_return_path_into_new(
    config: Config, tmp_path: Path
) -> None:
    outcomes = await maildir.submitd_deliver(
        config, envelope(), stored_message(tmp_path), RECIPIENTS
    )
    assert outcomes is not None
    assert set(outcomes) == {"b@example.net", "c@example.net"}
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes.values())
    (delivered,) = (tmp_path / "mail" / "new").iterdir()
    assert delivered.read_bytes() == b"Return-Path: <alice@example.org>\r\n" + STORED
    assert "Q01HZX5K3M2ABCDEF" in delivered.name
    assert f"P{os.getpid()}" in delivered.name
    assert ":" not in delivered.name and "/" not in delivered.name
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []


async def test_each_delivery_gets_its_own_file(config: Config, tmp_path: Path) -> None:
    for _ in range(3):  # an at-least-once retry must not overwrite the earlier copy
        await maildir.submitd_deliver(config, envelope(""), stored_message(tmp_path), RECIPIENTS)
    files = list((tmp_path / "mail" / "new").iterdir())
    assert len(files) == 3
    assert all(f.read_bytes().startswith(b"Return-Path: <>\r\n") for f in files)


async def test_write_failure_is_temporary_and_leaves_no_file(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    outcomes = await maildir.submitd_deliver(
        config, envelope(), stored_message(tmp_path), RECIPIENTS
    )
    monkeypatch.undo()
    assert outcomes is not None
    expected = DeliveryOutcome.temporary(Reply.make(451, "4.3.0", "Maildir write failed"))
    assert dict(outcomes) == {r.address: expected for r in RECIPIENTS}
    assert list((tmp_path / "mail" / "new").iterdir()) == []
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []


async def test_failure_after_the_rename_leaves_nothing_in_new(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    calls = 0

    def fsync_fails_on_directory(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the file's fsync worked; the one on new/ fails
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_on_directory)
    outcomes = await maildir.submitd_deliver(
        config, envelope(), stored_message(tmp_path), RECIPIENTS
    )
    monkeypatch.undo()
    assert outcomes is not None
    assert all(o.kind is OutcomeKind.TEMPORARY for o in outcomes.values())
    assert list((tmp_path / "mail" / "new").iterdir()) == []


async def test_unconfigured_plugin_defers_instead_of_losing_mail(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"path": "mail"})  # submitd_configure never ran
    outcomes = await maildir.submitd_deliver(
        config, envelope(), stored_message(tmp_path), RECIPIENTS
    )
    assert outcomes is not None
    assert all(o.kind is OutcomeKind.TEMPORARY for o in outcomes.values())
