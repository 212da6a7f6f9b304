"""docs/security.md §6: a 250 means the message is on disk, and stays there through crashes.

The fuller versions: tests/unit/test_spool.py (every fsync failing in turn, recovery,
kill -9 between steps), tests/integration/test_durability.py and
tests/external/test_burst_kill.py (kill -9 during a burst of submissions).
"""

from __future__ import annotations

import errno
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

import submitd.durable
from submitd.testing import TestCA, running_server
from tests.security.support import (
    MESSAGE,
    begin,
    connect,
    expect,
    expect_reply,
    files,
    nothing_queued,
    send_ok,
)
from tests.support import PASSWORD, USER, ServerProcess, wait_for_mail, wait_for_mail_sync

NO_DELIVERY = ("passwdfile",)  # messages stay in the spool, deferred


async def test_250_only_after_message_and_envelope_are_fsynced_and_renamed(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    real_fsync, real_dir = os.fsync, submitd.durable.fsync_dir
    real_rename = os.rename

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append("fsync")

    def fsync_dir(path: Path) -> None:
        real_dir(path)
        events.append(f"fsync_dir {Path(path).name}")

    def rename(src: object, dst: object) -> None:
        real_rename(src, dst)  # type: ignore[arg-type]
        events.append(f"rename {Path(str(dst)).parent.name}")

    async with running_server(make_config(enable=NO_DELIVERY)) as srv:
        async with await connect(srv, "implicit", client_tls) as client:
            monkeypatch.setattr(os, "fsync", fsync)
            monkeypatch.setattr(os, "rename", rename)
            monkeypatch.setattr(submitd.durable, "fsync_dir", fsync_dir)
            await begin(client)
            await client.send(MESSAGE + b".\r\n")
            reply = await expect_reply(client, 250, "2.0.0")
            events.append("250")
            monkeypatch.undo()
            queue_id = reply.text.rsplit(" ", 1)[-1]
        spool = srv.server.spool.directory
        assert queue_id in files(spool / "msg") and f"{queue_id}.json" in files(spool / "env")
    before = events[: events.index("250")]
    # message and sidecar fsynced, message renamed + msg/ fsynced, sidecar renamed + env/ fsynced
    assert before.count("fsync") >= 2
    assert before.index("rename msg") < before.index("fsync_dir msg")
    assert before.index("rename env") < before.index("fsync_dir env")
    assert before[-1] == "fsync_dir env", before


@pytest.mark.parametrize("failing", [1, 2])
async def test_failed_fsync_is_451_never_retried_and_never_delivered(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
    monkeypatch: pytest.MonkeyPatch, failing: int,
) -> None:
    real_fsync = os.fsync
    synced: list[tuple[int, int]] = []
    failed: list[tuple[int, int]] = []

    def flaky(fd: int) -> None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        synced.append(key)
        if len(synced) == failing:
            failed.append(key)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    async with running_server(make_config()) as srv:
        async with await connect(srv, "implicit", client_tls) as client:
            monkeypatch.setattr(os, "fsync", flaky)
            await begin(client)
            await client.send(MESSAGE + b".\r\n")
            await expect_reply(client, 451, "4.3.0")
            monkeypatch.undo()
            await nothing_queued(srv, maildir)
            assert synced.count(failed[0]) == 1, "a failed fsync is not retried on that file"
            await expect(client, "NOOP", 250)


async def test_restart_resumes_complete_messages_and_removes_fragments(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    retry = {"retry": ["1s"]}
    async with running_server(make_config(enable=NO_DELIVERY, queue=retry)) as srv:
        async with await connect(srv, "implicit", client_tls) as client:
            queue_id = await send_ok(client)
        spool = srv.server.spool.directory
    # What a crash mid-receive leaves: a fragment in tmp/, a message without its sidecar.
    (spool / "tmp" / "fragment").write_bytes(b"Subject: half\r\n")
    (spool / "msg" / "0ORPHAN0000000").write_bytes(b"Subject: orphan\r\n\r\nx\r\n")
    async with running_server(make_config(queue=retry)) as srv:
        (stored,) = await wait_for_mail(maildir)
        assert b"Subject: fine" in stored
        assert files(spool / "tmp") == [] and "0ORPHAN0000000" not in files(spool / "msg")
    assert queue_id


def test_kill_9_after_250_loses_nothing(
    make_config: Callable[..., Path], ca: TestCA, maildir: Path,
) -> None:
    import smtplib

    first = ServerProcess(make_config(enable=NO_DELIVERY, queue={"retry": ["1s"]}))
    try:
        context = ssl.create_default_context(cafile=str(ca.ca_path))
        with smtplib.SMTP_SSL("localhost", first.ports["implicit"], context=context,
                              timeout=30) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.sendmail("demo@example.com", ["someone@example.net"],
                          b"From: <demo@example.com>\r\nSubject: survivor\r\n\r\nkeep\r\n")
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # at once after the 250
    second = ServerProcess(make_config(queue={"retry": ["1s"]}))
    try:
        (stored,) = wait_for_mail_sync(maildir)
        assert b"Subject: survivor" in stored
    finally:
        second.stop()
    assert len(files(maildir / "new")) == 1, "delivered once"
