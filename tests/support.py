"""Constants and helpers shared by the test tiers."""

from __future__ import annotations

import re
from pathlib import Path

import trio
from argon2 import PasswordHasher

USER = "demo"
PASSWORD = "correct horse battery staple"
SENDER = "demo@example.com"
RECIPIENT = "someone@example.net"

# Cheap parameters keep the suite fast; the production default is argon2-cffi's own.
HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


def delivered(maildir: Path, count: int) -> list[bytes] | None:
    """The messages in ``maildir/new``, oldest first, once there are ``count``; else None."""
    new = maildir / "new"
    files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.exists() else []
    return [p.read_bytes() for p in files] if len(files) >= count else None


async def wait_for_mail(maildir: Path, count: int = 1, timeout: float = 10.0) -> list[bytes]:
    """Wait until ``count`` messages sit in ``maildir/new`` and return their bytes, oldest first."""
    with trio.fail_after(timeout):
        while (messages := delivered(maildir, count)) is None:
            await trio.sleep(0.02)
        return messages


class ServerProcess:
    """``submitd serve`` as a child process, logging to a file; ports are read from the log."""

    def __init__(self, config: Path, *, timeout: float = 20.0) -> None:
        import os
        import subprocess
        import sys

        exe = Path(sys.executable).with_name("submitd")
        self.log_path = config.parent / f"submitd-{os.getpid()}-{id(self):x}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(exe), "serve", "-c", str(config)],
                stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.ports: dict[str, int] = {}
        try:
            self.wait_for_log("event=ready", timeout=timeout)
        except TimeoutError:
            self.stop(9)
            raise RuntimeError("submitd did not start:\n" + self.text()) from None
        for m in re.finditer(r"event=listening address=\S+ port=(\d+) mode=(\w+)", self.text()):
            self.ports.setdefault(m.group(2), int(m.group(1)))

    def text(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace")

    @property
    def log(self) -> list[str]:
        """The log, one entry per line."""
        return self.text().splitlines(keepends=True)

    def wait_for_log(self, pattern: str, *, count: int = 1, timeout: float = 15.0) -> str:
        """Wait until ``pattern`` (a regex) matched ``count`` log lines; return the last one."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(f".*{pattern}.*", self.text())
            if len(found) >= count:
                return str(found[count - 1])
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise TimeoutError(f"{pattern!r} not logged")

    def stop(self, sig: int | None = None) -> int:
        """Send ``sig`` (SIGTERM by default), wait, and return the exit status."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig if sig is not None else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_mail_sync(maildir: Path, count: int = 1, timeout: float = 15.0) -> list[bytes]:
    """Blocking variant of :func:`wait_for_mail` for tests that drive real programs."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (messages := delivered(maildir, count)) is not None:
            return messages
        time.sleep(0.05)
    raise TimeoutError(f"{count} message(s) did not arrive in {maildir}")
