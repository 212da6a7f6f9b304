"""Real signals to a real ``submitd serve``: SIGHUP reloads mid-session, SIGTERM drains."""

from __future__ import annotations

import signal
import smtplib
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from submitd.testing import TestCA
from tests.support import HASHER, PASSWORD, RECIPIENT, SENDER, USER, ServerProcess


def test_sighup_reloads_certificate_and_users_without_dropping_the_session(
    make_config: Callable[..., Path], ca: TestCA, users_file: Path,
) -> None:
    server = ServerProcess(make_config())
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    try:
        port = server.ports["implicit"]
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as open_session:
            open_session.login(USER, PASSWORD)
            old_cert = open_session.sock.getpeercert(binary_form=True)
            ca.reissue()
            with users_file.open("a") as f:
                f.write(f"later {HASHER.hash('later password')} later@example.com\n")
            server.proc.send_signal(signal.SIGHUP)
            server.wait_for_log("event=reloaded")
            # The session opened before the reload goes on as if nothing happened.
            open_session.sendmail(SENDER, [RECIPIENT], f"From: <{SENDER}>\r\n\r\nstill here\r\n")
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as fresh:
            assert fresh.sock.getpeercert(binary_form=True) != old_cert
            fresh.login("later", "later password")
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.text()


def test_sigterm_drains_then_says_421_and_exits_0(
    make_config: Callable[..., Path], ca: TestCA,
) -> None:
    server = ServerProcess(make_config(limits={"shutdown_grace": "1s"}))
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    try:
        with smtplib.SMTP_SSL("localhost", server.ports["implicit"], context=context,
                              timeout=30) as idle:
            idle.login(USER, PASSWORD)
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for_log("event=shutdown_waiting sessions=1 deliveries=0 grace=1s")
            # After the grace period the idle session is told why it is being closed.
            code, text = idle.getreply()
            assert (code, text[:5]) == (421, b"4.3.2")
            with pytest.raises(smtplib.SMTPServerDisconnected):
                idle.noop()
    finally:
        status = server.stop()
    assert status == 0
    assert "event=shutdown_complete" in server.text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once_and_keeps_committed_mail_queued(
    make_config: Callable[..., Path], ca: TestCA, tmp_path: Path, sig: signal.Signals,
) -> None:
    # No delivery plugin: the committed message waits in the spool, like one whose smarthost
    # is down.
    server = ServerProcess(make_config(enable=("passwdfile",), limits={"shutdown_grace": "60s"}))
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    try:
        with smtplib.SMTP_SSL("localhost", server.ports["implicit"], context=context,
                              timeout=30) as open_session:
            open_session.login(USER, PASSWORD)
            open_session.sendmail(SENDER, [RECIPIENT], f"From: <{SENDER}>\r\n\r\nkeep me\r\n")
            server.proc.send_signal(sig)
            server.wait_for_log("event=shutdown_waiting sessions=1 .* grace=60s")
            assert open_session.noop()[0] == 250  # draining: the session is still served
            started = time.monotonic()
            server.proc.send_signal(sig)  # Ctrl-C again: stop now
            code, text = open_session.getreply()
            assert (code, text[:5]) == (421, b"4.3.2")
            assert time.monotonic() - started < 10  # at once, not after the 60 s grace
            open_session.close()
        assert server.proc.wait(timeout=10) == 0
    finally:
        status = server.stop()
    assert status == 0
    log = server.text()
    assert "event=shutdown_wait_over outcome=forced closing_sessions=1" in log
    assert "event=shutdown_complete" in log and "Traceback" not in log
    assert len(list((tmp_path / "spool" / "env").iterdir())) == 1  # still queued
