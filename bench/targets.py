"""The four servers of the issue workloads, each started fresh per workload and always stopped.

- ``postfix``: a private Postfix (:mod:`peer_postfix`) relaying to its own ``smtp-sink``;
- ``aiosmtpd``: ``bench/peer_aiosmtpd.py`` storing into an fsynced Maildir before its 250;
- ``submitd-smarthost``: ``submitd serve`` with ``passwdfile`` + ``smarthost`` forwarding to its
  own ``smtp-sink`` (``tls = "none"`` on loopback, like Postfix's relay to its sink);
- ``submitd-maildir``: ``submitd serve`` with ``passwdfile`` + ``maildir``.

Every server uses the same trustme certificate and the same login; a message counts as
delivered once it is in the sink (``smtp-sink`` counters) or in the Maildir's ``new/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from peer_postfix import PostfixOptions, PostfixServer, SmtpSink, free_port
from servers import (
    HERE,
    PASSWORD,
    SENDER,
    USER,
    Workspace,
    count_delivered,
    log_tail,
    wait_submitd_ready,
)

from submitd.testing import write_config

SERVERS = ("postfix", "aiosmtpd", "submitd-smarthost", "submitd-maildir")


@dataclass(frozen=True, kw_only=True)
class Setup:
    """What a workload asks of every server."""

    max_size: int
    # submitd's [limits] (None: the defaults, only shutdown_grace shortened)
    submitd_limits: Mapping[str, object] | None = None
    workers: int | None = None  # [server] workers (only written when given and != 1)
    idle_connections: int = 0  # > 0: room and long timeouts for this many idle sessions


@dataclass(kw_only=True)
class Target:
    """A running server: where to connect, its process tree, how many messages it delivered."""

    key: str
    port: int
    pid: int  # root of the server's process tree
    delivered: Callable[[], int]
    log: Callable[[], str]
    proc: subprocess.Popen[bytes] | None = None
    details: dict[str, object] = field(default_factory=dict)

    def check_alive(self) -> None:
        """Raise with the log's tail if the server is gone."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.key} exited with {self.proc.returncode}:\n{self.log()}")

    def wait_delivered(self, count: int, timeout: float = 300.0) -> float:
        """Wait until ``count`` messages were delivered; return when (``time.perf_counter``)."""
        deadline = time.monotonic() + timeout
        while self.delivered() < count:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.key}: {self.delivered()} of {count} messages "
                                   f"delivered\n{self.log()}")
            time.sleep(0.002)
        return time.perf_counter()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def start_target(key: str, ws: Workspace, directory: Path, setup: Setup) -> Iterator[Target]:
    """Start server ``key`` (one of :data:`SERVERS`) in ``directory``; stop it on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if key == "postfix":
            yield _start_postfix(stack, ws, directory, setup)
        elif key == "aiosmtpd":
            yield _start_aiosmtpd(stack, ws, directory, setup)
        elif key in ("submitd-smarthost", "submitd-maildir"):
            yield _start_submitd(stack, ws, directory, setup, smarthost=key.endswith("smarthost"))
        else:
            raise ValueError(f"unknown server {key!r}")


def _start_sink(stack: ExitStack, setup: Setup) -> SmtpSink:
    sink = SmtpSink.start(max_connections=max(256, setup.idle_connections + 100))
    stack.callback(sink.stop)
    return sink


def _start_postfix(stack: ExitStack, ws: Workspace, directory: Path, setup: Setup) -> Target:
    if os.geteuid() != 0:
        raise RuntimeError("the postfix server needs root (its daemons switch to the postfix "
                           "user); run as root or leave it out with --servers")
    sink = _start_sink(stack, setup)
    # Postfix's daemons run as the postfix user and open their directories by full path.
    directory.chmod(0o755)
    k = setup.idle_connections
    options = PostfixOptions(
        max_size=setup.max_size,
        process_limit=max(100, k + 100),
        idle_timeout="3600s" if k else "300s",
    )
    server = PostfixServer(root=directory, port=free_port(), sink_port=sink.port, user=USER,
                           password=PASSWORD, sender=SENDER, cert=ws.ca.cert_path,
                           key=ws.ca.key_path, options=options)
    server.setup()
    stack.callback(server.stop)
    server.start()
    assert server.pid is not None
    return Target(key="postfix", port=server.port, pid=server.pid,
                  delivered=lambda: sink.count, log=server.log_tail,
                  details={"relay": f"smtp-sink on 127.0.0.1:{sink.port}"})


def _start_aiosmtpd(stack: ExitStack, ws: Workspace, directory: Path, setup: Setup) -> Target:
    log = directory / "server.log"
    maildir = directory / "mail"
    argv = [sys.executable, str(HERE / "peer_aiosmtpd.py"), "--cert", str(ws.ca.cert_path),
            "--key", str(ws.ca.key_path), "--users", str(ws.users), "--maildir", str(maildir),
            "--log", str(log), "--max-size", str(setup.max_size), "--plain-password", PASSWORD]
    if setup.idle_connections:
        argv += ["--timeout", "3600"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=out)
    stack.callback(_stop, proc)
    assert proc.stdout is not None
    stack.callback(proc.stdout.close)
    line = proc.stdout.readline().decode(errors="replace")
    if not line.startswith("PORT "):
        raise RuntimeError(f"the aiosmtpd peer did not start ({line!r}):\n{log_tail(log)}")
    return Target(key="aiosmtpd", port=int(line.split()[1]), pid=proc.pid, proc=proc,
                  delivered=lambda: count_delivered(maildir), log=lambda: log_tail(log))


def submitd_limits(setup: Setup) -> dict[str, object]:
    """The ``[limits]`` table the bench writes for ``setup``."""
    limits: dict[str, object] = {"shutdown_grace": "5s"}
    if setup.max_size > 26_214_400:
        limits["max_message_size"] = setup.max_size
    limits.update(setup.submitd_limits or {})
    k = setup.idle_connections
    if k:
        # Room for k idle authenticated sessions from one address, kept open: no cap, no
        # rate limit, no stress mode (which would shorten the idle deadline), long deadlines.
        limits.update({
            "max_connections": max(1000, k + 1000),
            "max_connections_per_ip": k + 100,
            "max_unauthenticated": max(200, k + 100),
            "max_connection_rate": 10_000_000,
            "stress_threshold": 100,
            "preauth_timeout": "1h",
            "command_timeout": "1h",
        })
    return limits


def _start_submitd(
    stack: ExitStack, ws: Workspace, directory: Path, setup: Setup, *, smarthost: bool
) -> Target:
    plugins: dict[str, dict[str, object]] = {"passwdfile": {"path": str(ws.users)}}
    delivered: Callable[[], int]
    if smarthost:
        sink = _start_sink(stack, setup)
        plugins["smarthost"] = {"host": "127.0.0.1", "port": sink.port, "tls": "none"}
        delivered = lambda: sink.count  # noqa: E731
        enable = ("passwdfile", "relay", "headers", "smarthost")
    else:
        plugins["maildir"] = {"path": "mail"}
        maildir = directory / "mail"
        delivered = lambda: count_delivered(maildir)  # noqa: E731
        enable = ("passwdfile", "relay", "headers", "maildir")
    config = write_config(directory, ca=ws.ca, enable=enable, plugins=plugins,
                          limits=submitd_limits(setup), hostname="submitd.bench.example")
    if setup.workers is not None and setup.workers != 1:
        with config.open("a") as f:
            f.write(f"[server]\nworkers = {setup.workers}\n")
    log = directory / "server.log"
    exe = Path(sys.executable).with_name("submitd")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(exe), "serve", "-c", str(config)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stack.callback(_stop, proc)
    port = wait_submitd_ready(proc, log, 60.0)
    key = "submitd-smarthost" if smarthost else "submitd-maildir"
    return Target(key=key, port=port, pid=proc.pid, proc=proc, delivered=delivered,
                  log=lambda: log_tail(log),
                  details={"limits": submitd_limits(setup), "workers": setup.workers or 1})
