"""The two servers under test, each a child process this benchmark starts and always stops.

- :func:`start_submitd`: ``submitd serve`` with ``passwdfile`` + ``maildir`` (spool fsync as
  always), configured through :func:`submitd.testing.write_config`.
- :func:`start_peer`: ``bench/peer_aiosmtpd.py`` (see its docstring for what it matches).

Both bind 127.0.0.1 on a port the OS picks, log to a file in the work directory, and are
stopped by PID (SIGTERM, then SIGKILL) when their ``with`` block ends, whatever happened.
Also here: the /proc readers used for memory and CPU figures.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import argon2

from submitd.testing import TestCA, write_config

USER = "bench"
PASSWORD = "correct horse battery staple"
SENDER = "bench@example.com"
RECIPIENT = "someone@example.net"
HERE = Path(__file__).resolve().parent
START_TIMEOUT = 30.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, kw_only=True)
class Workspace:
    """What both servers share: the trustme CA and certificate, and the users file."""

    root: Path
    ca: TestCA
    users: Path

    @classmethod
    def create(cls, root: Path) -> Workspace:
        """Write a CA and a users file whose hash uses argon2-cffi's default parameters.

        The defaults are what submitd's users file expects: with cheaper parameters submitd
        would rehash (and rewrite the file) on the first login, and each side would pay a
        different price per AUTH.
        """
        ca = TestCA(root / "tls")
        users = root / "users"
        users.write_text(f"{USER} {argon2.PasswordHasher().hash(PASSWORD)} {SENDER}\n")
        users.chmod(0o600)
        return cls(root=root, ca=ca, users=users)


@dataclass(frozen=True, kw_only=True)
class ServerHandle:
    """A running server: what to connect to, where its mail lands, which process it is."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int  # the STARTTLS (submission) port
    maildir: Path
    log: Path
    start_s: float = 0.0  # from the process start until it was ready to accept

    @property
    def pid(self) -> int:
        """The server's process id (for /proc readings)."""
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise with the log's tail if the server exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                               + log_tail(self.log))


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def start_submitd(
    ws: Workspace, directory: Path, *, max_size: int, start_timeout: float = START_TIMEOUT,
) -> Iterator[ServerHandle]:
    """Run ``submitd serve`` with its config, spool and Maildir in ``directory``.

    The spool is ``directory/spool``; a caller may have filled it already (the backlog
    workload does), and then waits for the server's recovery with ``start_timeout``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(
        directory, ca=ws.ca, enable=("passwdfile", "maildir"),
        plugins={"passwdfile": {"path": str(ws.users)}, "maildir": {"path": "mail"}},
        # Every load connects from 127.0.0.1, a round of sessions after another: the default
        # rate (30 new connections per 10 s from one address) would refuse the clients.
        limits={"max_message_size": max_size, "shutdown_grace": "5s",
                "max_connection_rate": 100_000},
        hostname="submitd.bench.example",
    )
    log = directory / "server.log"
    exe = Path(sys.executable).with_name("submitd")
    started = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(exe), "serve", "-c", str(config)], stdin=subprocess.DEVNULL,
            stdout=sink, stderr=sink, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        port = wait_submitd_ready(proc, log, start_timeout)
        yield ServerHandle(name="submitd", proc=proc, port=port, maildir=directory / "mail",
                           log=log, start_s=time.perf_counter() - started)
    finally:
        _stop(proc)


def wait_submitd_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    """Wait for ``event=ready`` in submitd's log; return its STARTTLS port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "event=ready" in text:
            m = re.search(r"event=listening address=\S+ port=(\d+) mode=starttls", text)
            if m is None:
                raise RuntimeError("submitd is ready but logged no starttls port:\n" + text)
            return int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("submitd did not start:\n" + log_tail(log))


@contextmanager
def start_peer(ws: Workspace, directory: Path, *, max_size: int) -> Iterator[ServerHandle]:
    """Run the aiosmtpd peer with its Maildir in ``directory``."""
    directory.mkdir(parents=True)
    log = directory / "server.log"
    maildir = directory / "mail"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "peer_aiosmtpd.py"), "--cert", str(ws.ca.cert_path),
             "--key", str(ws.ca.key_path), "--users", str(ws.users), "--maildir", str(maildir),
             "--log", str(log), "--max-size", str(max_size)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sink,
        )
    try:
        port = _wait_peer_ready(proc, log)
        yield ServerHandle(name="aiosmtpd", proc=proc, port=port, maildir=maildir, log=log)
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def _wait_peer_ready(proc: subprocess.Popen[bytes], log: Path) -> int:
    # The peer prints one line and nothing else on stdout, so this read cannot fill a pipe;
    # a peer that dies closes stdout and the read returns b"".
    assert proc.stdout is not None
    line = proc.stdout.readline().decode(errors="replace")
    m = re.fullmatch(r"PORT (\d+)\s*", line)
    if m is None:
        _stop(proc)
        raise RuntimeError(f"the aiosmtpd peer did not start ({line!r}):\n" + log_tail(log))
    return int(m.group(1))


# --- /proc readings ------------------------------------------------------------------------


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, our own child); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after its closing paren are fixed.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def count_delivered(maildir: Path) -> int:
    """How many messages sit in ``maildir/new``."""
    try:
        return sum(1 for _ in os.scandir(maildir / "new"))
    except FileNotFoundError:
        return 0


def wait_delivered(server: ServerHandle, count: int, timeout: float = 120.0) -> float:
    """Wait until ``count`` messages are in the Maildir; return when (``time.perf_counter``)."""
    deadline = time.monotonic() + timeout
    while count_delivered(server.maildir) < count:
        server.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name}: only {count_delivered(server.maildir)} of "
                               f"{count} messages reached the Maildir\n" + log_tail(server.log))
        time.sleep(0.005)
    return time.perf_counter()
