"""``[server] workers = 2``: real ``submitd serve`` processes sharing listeners and one spool."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from submitd.testing import TestCA
from tests.support import PASSWORD, RECIPIENT, SENDER, USER, ServerProcess, wait_for_mail_sync

# Enough connections at once from one address for the tests below (the defaults are for
# production: 30 per 10 s).
_LIMITS = {"max_connection_rate": 10_000, "connection_rate_window": "1s", "shutdown_grace": "2s"}


def _with_workers(config: Path, workers: int | str) -> Path:
    value = f'"{workers}"' if isinstance(workers, str) else str(workers)
    with config.open("a") as f:
        f.write(f"[server]\nworkers = {value}\n")
    return config


def _worker_pid(server: ServerProcess, *, count: int = 1) -> int:
    line = server.wait_for_log(r"event=worker_started worker=1 pid=\d+", count=count)
    match = re.search(r"pid=(\d+)", line)
    assert match is not None
    return int(match.group(1))


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _flocks(path: Path) -> list[tuple[str, int]]:
    """The flock(2) locks held on ``path``: (READ or WRITE, pid), from /proc/locks."""
    inode = path.stat().st_ino
    held = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) == inode:
            held.append((fields[3], int(fields[4])))
    return held


def _send(port: int, context: ssl.SSLContext, subject: str) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30) as smtp:
        smtp.login(USER, PASSWORD)
        smtp.sendmail(SENDER, [RECIPIENT],
                      f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\nbody {subject}\r\n")


def _send_until_both_accept(server: ServerProcess, ca: TestCA) -> list[str]:
    """Send batches of messages at once until both processes logged a session; the subjects."""
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    port = server.ports["implicit"]
    subjects: list[str] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for batch in range(20):
            names = [f"m{batch}-{i}" for i in range(8)]
            list(pool.map(lambda s: _send(port, context, s), names))
            subjects += names
            text = server.text()
            if "worker=0 event=connect " in text and "worker=1 event=connect " in text:
                return subjects
    raise AssertionError("the second process never accepted a connection")


def _submitd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("submitd")
    return subprocess.run([str(exe), *args, "-c", str(config)], capture_output=True, text=True,
                          timeout=30, check=False)


def test_two_workers_accept_on_the_same_sockets_and_deliver_each_message_once(
    make_config: Callable[..., Path], ca: TestCA, maildir: Path, tmp_path: Path,
) -> None:
    config = _with_workers(make_config(limits=_LIMITS), 2)
    server = ServerProcess(config)
    try:
        worker = _worker_pid(server)
        subjects = _send_until_both_accept(server, ca)
        messages = wait_for_mail_sync(maildir, len(subjects))
        got = sorted(re.search(rb"Subject: (\S+)", m).group(1).decode()  # type: ignore[union-attr]
                     for m in messages)
        assert got == sorted(subjects)  # every message once, none twice
        # Operator commands reach the one runner through the control socket.
        flushed = _submitd(config, "queue", "flush")
        assert flushed.returncode == 0, flushed.stderr
        listed = _submitd(config, "queue", "list")
        assert listed.returncode == 0, listed.stderr
        # Only the owner holds the spool's lock, recovers it and runs the queue runner.
        owner = server.proc.pid
        assert (tmp_path / "spool" / "lock").read_text().strip() == str(owner)
        assert _flocks(tmp_path / "spool" / "lock") == [("WRITE", owner)]
        # The worker commits under a shared lock on the spool directory, which the owner
        # would need exclusively to recover it.
        assert _flocks(tmp_path / "spool") == [("READ", worker)]
        log = server.text()
        assert log.count("event=spool_recovered") == 1
        assert log.count("event=queue_runner_started") == 1
        assert "worker=0 event=queue_runner_started" in log
        assert re.findall(r"worker=1 event=accepted", log)
        assert not re.findall(r"worker=1 event=delivered", log)
    finally:
        assert server.stop() == 0
    log = server.text()
    assert "event=worker_stopped worker=1 exit_code=0" in log
    assert "Traceback" not in log
    assert _gone(worker)
    assert len(messages) == len(subjects) == len(list((maildir / "new").iterdir()))


def test_a_killed_worker_is_restarted_and_service_goes_on(
    make_config: Callable[..., Path], ca: TestCA, maildir: Path,
) -> None:
    server = ServerProcess(_with_workers(make_config(limits=_LIMITS), 2))
    try:
        first = _worker_pid(server)
        os.kill(first, signal.SIGKILL)
        server.wait_for_log("event=worker_died worker=1 signal=SIGKILL restart_in=")
        second = _worker_pid(server, count=2)
        assert second != first
        subjects = _send_until_both_accept_after(server, ca, second)
        wait_for_mail_sync(maildir, len(subjects))
    finally:
        assert server.stop() == 0
    assert _gone(second)
    assert "Traceback" not in server.text()


def _send_until_both_accept_after(server: ServerProcess, ca: TestCA, pid: int) -> list[str]:
    """Wait for the restarted worker to serve a session (its own log line), then return."""
    before = server.text().count("worker=1 event=connect ")
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    subjects: list[str] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for batch in range(20):
            names = [f"r{batch}-{i}" for i in range(8)]
            list(pool.map(lambda s: _send(server.ports["implicit"], context, s), names))
            subjects += names
            if server.text().count("worker=1 event=connect ") > before:
                assert not _gone(pid)
                return subjects
    raise AssertionError("the restarted worker never accepted a connection")


def test_when_the_owner_dies_the_workers_exit(
    make_config: Callable[..., Path],
) -> None:
    server = ServerProcess(_with_workers(make_config(limits=_LIMITS), 2))
    worker = _worker_pid(server)
    server.wait_for_log("worker=1 event=ready")
    server.stop(signal.SIGKILL)
    # The owner is gone, so ServerProcess.wait_for_log would stop looking: poll the log here.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (
        _gone(worker) and "worker=1 event=shutdown_complete" in server.text()
    ):
        time.sleep(0.02)
    assert "worker=1 event=owner_gone action=shut_down" in server.text()
    assert "worker=1 event=shutdown_complete" in server.text()
    assert _gone(worker)


def test_the_per_address_cap_holds_across_workers(
    make_config: Callable[..., Path],
) -> None:
    limits = {**_LIMITS, "max_connections_per_ip": 2}
    server = ServerProcess(_with_workers(make_config(limits=limits), 2))
    port = server.ports["starttls"]
    try:
        server.wait_for_log("worker=1 event=ready")
        opened = [smtplib.SMTP("127.0.0.1", port, timeout=30) for _ in range(2)]
        try:
            for smtp in opened:
                assert smtp.ehlo()[0] == 250
            # Whichever process accepts it, the third connection is over the server's cap.
            third = smtplib.SMTP(timeout=30)
            code, text = third.connect("127.0.0.1", port)
            assert (code, text[:5]) == (421, b"4.7.0")
            third.close()
        finally:
            for smtp in opened:
                smtp.quit()
    finally:
        assert server.stop() == 0
    assert "limit 2" in server.text()


def test_one_worker_starts_no_other_process(
    make_config: Callable[..., Path], ca: TestCA, maildir: Path,
) -> None:
    server = ServerProcess(_with_workers(make_config(limits=_LIMITS), 1))
    try:
        context = ssl.create_default_context(cafile=str(ca.ca_path))
        _send(server.ports["implicit"], context, "single")
        wait_for_mail_sync(maildir, 1)
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
        assert children.read_text().split() == []
    finally:
        assert server.stop() == 0
    log = server.text()
    assert "worker=" not in log and "event=worker_started" not in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_owner_stops_every_process_with_status_0(
    make_config: Callable[..., Path], sig: signal.Signals,
) -> None:
    server = ServerProcess(_with_workers(make_config(limits=_LIMITS), 2))
    worker = _worker_pid(server)
    server.wait_for_log("worker=1 event=ready")
    assert server.stop(sig) == 0
    log = server.text()
    assert "worker=1 event=shutdown_complete" in log
    assert "event=worker_stopped worker=1 exit_code=0" in log
    assert _gone(worker)


def test_sighup_to_the_owner_reloads_every_process(
    make_config: Callable[..., Path],
) -> None:
    config = _with_workers(make_config(limits=_LIMITS), 2)
    server = ServerProcess(config)
    try:
        server.wait_for_log("worker=1 event=ready")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log("worker=0 event=reloaded")
        server.wait_for_log("worker=1 event=reloaded")
    finally:
        assert server.stop() == 0


def test_a_second_sigterm_stops_every_process_at_once(
    make_config: Callable[..., Path], ca: TestCA,
) -> None:
    config = _with_workers(make_config(limits={**_LIMITS, "shutdown_grace": "60s"}), 2)
    server = ServerProcess(config)
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    server.wait_for_log("worker=1 event=ready")
    sessions = []
    try:
        # Idle logged-in sessions until both processes hold one.
        for _ in range(40):
            smtp = smtplib.SMTP_SSL("127.0.0.1", server.ports["implicit"], context=context,
                                    timeout=30)
            smtp.login(USER, PASSWORD)
            sessions.append(smtp)
            text = server.text()
            if "worker=0 event=auth_ok" in text and "worker=1 event=auth_ok" in text:
                break
        else:
            raise AssertionError("the sessions all went to one process")
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log("worker=1 event=shutdown_waiting")
        server.proc.send_signal(signal.SIGTERM)  # stop now, in every process
        for smtp in sessions:
            code, reply = smtp.getreply()
            assert (code, reply[:5]) == (421, b"4.3.2")
        assert server.proc.wait(timeout=20) == 0  # well before the 60 s grace
    finally:
        for smtp in sessions:
            smtp.close()
        server.stop()
    assert "worker=1 event=shutdown_wait_over outcome=forced" in server.text()
