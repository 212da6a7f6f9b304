"""The maildir plugin: one durable file per message in new/, or a retryable 451 and no file."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import replace
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
QUEUE_ID = "01HZX5K3M2ABCDEF"
RECEIVED = 1_700_000_000.75


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


def envelope(sender: str = "alice@example.org", queue_id: str = QUEUE_ID) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=RECIPIENTS,
        params=MailParams(),
        username="alice",
        queue_id=queue_id,
        received_at=RECEIVED,
    )


def files(maildir: Path, sub: str) -> list[str]:
    return sorted(p.name for p in (maildir / sub).iterdir())


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> str:
    """A host name with the two characters Maildir names must escape."""
    monkeypatch.setattr(socket, "gethostname", lambda: "mx/1:2.example.org")
    return r"mx\0571\0722.example.org"


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
    config: Config, tmp_path: Path, host: str
) -> None:
    outcomes = await maildir.submitd_deliver(
        config, envelope(), stored_message(tmp_path), RECIPIENTS
    )
    assert outcomes is not None
    assert set(outcomes) == {"b@example.net", "c@example.net"}
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes.values())
    (delivered,) = (tmp_path / "mail" / "new").iterdir()
    assert delivered.read_bytes() == b"Return-Path: <alice@example.org>\r\n" + STORED
    # SECONDS (when received).Q<queue id>.<host, "/" and ":" escaped in octal>
    assert delivered.name == f"1700000000.Q{QUEUE_ID}.{host}"
    assert files(tmp_path / "mail", "tmp") == []


async def test_each_message_gets_its_own_file(config: Config, tmp_path: Path) -> None:
    for queue_id in ("01HZX5K3M2AAAAAA", "01HZX5K3M2BBBBBB", "01HZX5K3M2CCCCCC"):
        await maildir.submitd_deliver(
            config, envelope("", queue_id), stored_message(tmp_path), RECIPIENTS
        )
    delivered = list((tmp_path / "mail" / "new").iterdir())
    assert len(delivered) == 3
    assert all(f.read_bytes().startswith(b"Return-Path: <>\r\n") for f in delivered)


async def test_attempt_repeated_after_a_crash_does_not_deliver_a_second_copy(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mail = tmp_path / "mail"
    # The first attempt delivers; the server dies before the runner records the outcome.
    await maildir.submitd_deliver(config, envelope(), stored_message(tmp_path), RECIPIENTS)
    (first,) = files(mail, "new")
    # After the restart the runner repeats the attempt (one more attempt counted).
    retried = tuple(replace(r, attempts=r.attempts + 1) for r in RECIPIENTS)
    with caplog.at_level(logging.INFO, logger="submitd.plugins.maildir"):
        outcomes = await maildir.submitd_deliver(
            config, envelope(), stored_message(tmp_path), retried
        )
    assert outcomes is not None
    assert set(outcomes) == {r.address for r in RECIPIENTS}
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes.values())
    assert files(mail, "new") == [first], "still exactly one copy"
    assert files(mail, "tmp") == []
    assert f"event=maildir_already_delivered queue_id={QUEUE_ID}" in caplog.text


async def test_message_a_reader_already_moved_to_cur_is_not_delivered_again(
    config: Config, tmp_path: Path
) -> None:
    mail = tmp_path / "mail"
    await maildir.submitd_deliver(config, envelope(), stored_message(tmp_path), RECIPIENTS)
    (first,) = files(mail, "new")
    os.rename(mail / "new" / first, mail / "cur" / f"{first}:2,S")  # what a mail reader does
    outcomes = await maildir.submitd_deliver(
        config, envelope(), stored_message(tmp_path), RECIPIENTS
    )
    assert outcomes is not None
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes.values())
    assert files(mail, "new") == []
    assert files(mail, "cur") == [f"{first}:2,S"]


async def test_partial_files_of_a_crashed_attempt_at_the_same_message_are_removed(
    config: Config, tmp_path: Path, host: str
) -> None:
    tmp = tmp_path / "mail" / "tmp"
    # Killed mid-write: this release's name, and an earlier release's name for the same ID.
    (tmp / f"1700000000.Q{QUEUE_ID}.{host}").write_bytes(b"Return-Path: <alice@exa")
    (tmp / f"1700000000.M12P345Q{QUEUE_ID}R0a1b2c.{host}").write_bytes(b"Return-")
    other = f"1700000001.Q01HZX5K3M2ZZZZZZ.{host}"  # another message, perhaps in progress
    (tmp / other).write_bytes(b"Return-Path: <bob@example.org>\r\n")
    outcomes = await maildir.submitd_deliver(
        config, envelope(), stored_message(tmp_path), RECIPIENTS
    )
    assert outcomes is not None
    assert all(o.kind is OutcomeKind.DELIVERED for o in outcomes.values())
    (delivered,) = (tmp_path / "mail" / "new").iterdir()
    assert delivered.read_bytes() == b"Return-Path: <alice@example.org>\r\n" + STORED
    assert files(tmp_path / "mail", "tmp") == [other]


def test_configure_removes_tmp_files_older_than_36_hours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, {"path": "../mail"})
    maildir.submitd_configure(config)  # creates the Maildir
    tmp = tmp_path / "mail" / "tmp"
    now = time.time()
    for name, age_hours in (("abandoned", 37), ("slow", 35), ("fresh", 0)):
        path = tmp / name
        path.write_bytes(b"partial")
        seconds = now - age_hours * 3600
        os.utime(path, (seconds, seconds))
    (tmp / "a-directory").mkdir()  # not ours to remove
    with caplog.at_level(logging.INFO, logger="submitd.plugins.maildir"):
        maildir.submitd_configure(make_config(tmp_path, {"path": "../mail"}))
    assert files(tmp_path / "mail", "tmp") == ["a-directory", "fresh", "slow"]
    assert "event=maildir_tmp_removed file=abandoned reason=stale" in caplog.text


async def test_write_failure_is_temporary_logged_with_the_os_error_and_leaves_no_file(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with caplog.at_level(logging.ERROR, logger="submitd.plugins.maildir"):
        outcomes = await maildir.submitd_deliver(
            config, envelope(), stored_message(tmp_path), RECIPIENTS
        )
    monkeypatch.undo()
    (record,) = [r for r in caplog.records if r.name == "submitd.plugins.maildir"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        f'event=maildir_write_failed queue_id={QUEUE_ID} error="Input/output error"'
    )
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
