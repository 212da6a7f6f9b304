"""Constants and helpers shared by the test tiers."""

from __future__ import annotations

from pathlib import Path

import trio
from argon2 import PasswordHasher

USER = "demo"
PASSWORD = "correct horse battery staple"
SENDER = "demo@example.com"
RECIPIENT = "someone@example.net"

# Cheap parameters keep the suite fast; the production default is argon2-cffi's own.
HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


async def wait_for_mail(maildir: Path, count: int = 1, timeout: float = 10.0) -> list[bytes]:
    """Wait until ``count`` messages sit in ``maildir/new`` and return their bytes, oldest first."""
    new = maildir / "new"
    with trio.fail_after(timeout):
        while True:
            files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.exists() else []
            if len(files) >= count:
                return [p.read_bytes() for p in files]
            await trio.sleep(0.02)


class ServerProcess:
    """``submitd serve`` as a child process; ports are read from its log lines."""

    def __init__(self, config: Path, *, timeout: float = 20.0) -> None:
        import os
        import re
        import subprocess
        import sys
        import time

        exe = Path(sys.executable).with_name("submitd")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.ports: dict[str, int] = {}
        self.log: list[str] = []
        deadline = time.monotonic() + timeout
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"listening address=\S+ port=(\d+) mode=(\w+)", line)
            if m:
                self.ports.setdefault(m.group(2), int(m.group(1)))
            if "event=ready" in line:
                return
        self.stop(9)
        raise RuntimeError("submitd did not start:\n" + "".join(self.log))

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
        assert self.proc.stderr is not None
        self.log.extend(self.proc.stderr.readlines())
        self.proc.stderr.close()
        return self.proc.returncode


def wait_for_mail_sync(maildir: Path, count: int = 1, timeout: float = 15.0) -> list[bytes]:
    """Blocking variant of :func:`wait_for_mail` for tests that drive real programs."""
    import time

    new = maildir / "new"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.exists() else []
        if len(files) >= count:
            return [p.read_bytes() for p in files]
        time.sleep(0.05)
    raise TimeoutError(f"{count} message(s) did not arrive in {maildir}")
