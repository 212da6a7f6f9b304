"""A 250 survives ``kill -9``: the message is delivered after a restart."""

from __future__ import annotations

import signal
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path

from submitd.testing import TestCA
from tests.support import PASSWORD, RECIPIENT, SENDER, USER, ServerProcess, wait_for_mail_sync


def submit(port: int, ca: TestCA, subject: str) -> str:
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as smtp:
        smtp.login(USER, PASSWORD)
        smtp.sendmail(SENDER, [RECIPIENT],
                      f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\nkeep me\r\n")
        assert smtp.noop()[0] == 250
    return subject


def test_accepted_message_survives_kill_9_and_is_delivered_after_restart(
    make_config: Callable[..., Path], ca: TestCA, maildir: Path, tmp_path: Path,
) -> None:
    # First life: no delivery plugin, so the message is deferred and waits in the spool with
    # its retry state (a short retry interval keeps the second life quick).
    retry = {"retry": ["1s"]}
    first = ServerProcess(make_config(enable=("passwdfile",), queue=retry))
    try:
        submit(first.ports["implicit"], ca, "survivor")
        first.wait_for_log("event=deferred")
    finally:
        status = first.stop(signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert not maildir.exists() or not list((maildir / "new").iterdir())
    # Second life: same spool, maildir delivery enabled.
    second = ServerProcess(make_config(queue=retry))
    try:
        (stored,) = wait_for_mail_sync(maildir)
        assert b"Subject: survivor\r\n" in stored and b"keep me\r\n" in stored
    finally:
        assert second.stop() == 0
    assert any("spool_recovered" in line and "queued=1" in line for line in second.log), \
        "".join(second.log)
