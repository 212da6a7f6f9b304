"""A private Postfix submission server and Postfix's ``smtp-sink``, both for the benchmark.

:class:`PostfixServer` is an instance of its own (``config_directory``, ``queue_directory``,
``data_directory`` and log under one directory; the system's ``/etc/postfix`` and a system
Postfix, if one runs, are never touched): smtpd on ``127.0.0.1:<port>`` with STARTTLS required
(``smtpd_tls_security_level = encrypt``, the benchmark's trustme certificate), AUTH through
Cyrus SASL against a private sasldb (``saslpasswd2``; PLAIN, only after STARTTLS), the
envelope sender checked against the login (``reject_sender_login_mismatch``), and everything
relayed to ``relayhost = [127.0.0.1]:<sink port>`` without TLS. The queue is fsynced as Postfix
always does. Started with ``postfix -c DIR start``, stopped with ``postfix -c DIR stop`` and,
if its master outlives that, SIGKILL by the PID in its pid file.

:class:`SmtpSink` runs ``/usr/sbin/smtp-sink -c``: it accepts and discards every message and
prints running counters (``sess=N quit=N mesg=N``, one ``\\r``-terminated record per event) that
a reader thread follows, so the benchmark knows when every message of a round has arrived.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
SMTP_SINK = "/usr/sbin/smtp-sink"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"
REALM = "bench.example"

MASTER_CF = """\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

SASL_SMTPD_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: {sasldb}
mech_list: PLAIN LOGIN
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass(kw_only=True)
class SmtpSink:
    """``smtp-sink`` on a loopback port, counting the messages it received."""

    port: int
    proc: subprocess.Popen[bytes]
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, *, max_connections: int = 1000) -> SmtpSink:
        """Start a sink on a free port (as ``nobody`` when we are root); return once it listens."""
        port = free_port()
        argv = [SMTP_SINK, "-c", "-a", "-4", "-m", str(max_connections), "-t", "600"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [f"127.0.0.1:{port}", "1024"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        sink = cls(port=port, proc=proc)
        threading.Thread(target=sink._follow, daemon=True).start()
        try:
            _wait_listening(port)
        except OSError:
            sink.stop()
            raise RuntimeError("smtp-sink did not start") from None
        return sink

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # closed by stop()
                return
            if not chunk:
                return
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in reversed(records):
                m = re.search(rb"mesg=(\d+)", record)
                if m:
                    with self._lock:
                        self._count = max(self._count, int(m.group(1)))
                    break

    @property
    def count(self) -> int:
        """Messages received so far (each ``.`` the sink answered)."""
        with self._lock:
            return self._count

    def stop(self) -> None:
        """Stop the sink by PID."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass(frozen=True, kw_only=True)
class PostfixOptions:
    """Sizes the instance is set up for."""

    max_size: int
    process_limit: int = 100  # Postfix's default_process_limit
    idle_timeout: str = "300s"  # smtpd_timeout


@dataclass(kw_only=True)
class PostfixServer:
    """A private Postfix instance rooted at ``root`` (every ancestor searchable by others)."""

    root: Path
    port: int
    sink_port: int
    user: str
    password: str
    sender: str
    cert: Path
    key: Path
    options: PostfixOptions
    pid: int | None = None

    @property
    def etc(self) -> Path:
        """The instance's ``config_directory``."""
        return self.root / "etc"

    @property
    def log(self) -> Path:
        """The instance's log file (``maillog_file``)."""
        return self.root / "maillog"

    def main_cf(self) -> str:
        """The instance's ``main.cf``."""
        etc, o = self.etc, self.options
        return "\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {self.root / 'queue'}",
            f"data_directory = {self.root / 'data'}",
            "meta_directory = /etc/postfix",
            "myhostname = postfix.bench.example",
            "mydomain = bench.example",
            "myorigin = $myhostname",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mydestination =",
            "relay_domains =",
            "local_transport = error:5.1.1 no local delivery",
            "alias_maps =",
            "alias_database =",
            "biff = no",
            "smtpd_peername_lookup = no",
            "smtp_dns_support_level = disabled",
            f"relayhost = [127.0.0.1]:{self.sink_port}",
            "smtp_tls_security_level = none",
            f"message_size_limit = {o.max_size}",
            "mailbox_size_limit = 0",
            "local_header_rewrite_clients =",
            "always_add_missing_headers = no",
            # Submission: STARTTLS required, then AUTH; relay for logged-in users only.
            "smtpd_tls_security_level = encrypt",
            f"smtpd_tls_chain_files = {etc / 'key.pem'}, {etc / 'cert.pem'}",
            "smtpd_tls_auth_only = yes",
            "smtpd_tls_loglevel = 0",
            "smtpd_sasl_auth_enable = yes",
            "smtpd_sasl_type = cyrus",
            "smtpd_sasl_path = smtpd",
            f"cyrus_sasl_config_path = {etc / 'sasl'}",
            f"smtpd_sasl_local_domain = {REALM}",
            "smtpd_sasl_security_options = noanonymous",
            "smtpd_sasl_tls_security_options = noanonymous",
            f"smtpd_sender_login_maps = texthash:{etc / 'senders'}",
            "smtpd_sender_restrictions = reject_sender_login_mismatch",
            "smtpd_relay_restrictions = permit_sasl_authenticated, reject",
            "smtpd_recipient_restrictions = permit_sasl_authenticated, reject",
            # Room for the idle workload: one smtpd per connection, none refused or rushed.
            f"default_process_limit = {o.process_limit}",
            "smtpd_client_connection_count_limit = 0",
            "smtpd_client_connection_rate_limit = 0",
            "smtpd_client_message_rate_limit = 0",
            "smtpd_client_new_tls_session_rate_limit = 0",
            "smtpd_client_auth_rate_limit = 0",
            f"smtpd_timeout = {o.idle_timeout}",
            "smtpd_error_sleep_time = 0",
            f"maillog_file = {self.log}",
            f"maillog_file_prefixes = {self.root}",
            "",
        ])

    def setup(self) -> None:
        """Write directories, configuration, certificate and the sasldb."""
        etc = self.etc
        (etc / "sasl").mkdir(parents=True)
        (self.root / "data").mkdir()
        shutil.chown(self.root / "data", user="postfix", group="postfix")
        (self.root / "queue").mkdir()
        shutil.copyfile(self.cert, etc / "cert.pem")
        shutil.copyfile(self.key, etc / "key.pem")
        (etc / "key.pem").chmod(0o600)
        (etc / "main.cf").write_text(self.main_cf())
        (etc / "master.cf").write_text(
            MASTER_CF + f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        )
        (etc / "senders").write_text(f"{self.sender} {self.user}, {self.user}@{REALM}\n")
        sasldb = etc / "sasldb2"
        (etc / "sasl" / "smtpd.conf").write_text(SASL_SMTPD_CONF.format(sasldb=sasldb))
        result = subprocess.run(
            [SASLPASSWD2, "-p", "-c", "-f", str(sasldb), "-u", REALM, self.user],
            input=self.password.encode(), capture_output=True, timeout=30, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"saslpasswd2 failed: {result.stderr!r}")
        shutil.chown(sasldb, user="root", group="postfix")
        sasldb.chmod(0o640)

    def _postfix(self, command: str) -> subprocess.CompletedProcess[str]:
        # postfix-script reports some start errors only to a terminal: give it one (script(1)).
        line = f"{POSTFIX} -c {self.etc} {command}"
        return subprocess.run(["script", "-qec", line, "/dev/null"], capture_output=True,
                              text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)

    def _master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        """Start the instance; return once smtpd's listener accepts connections."""
        started = self._postfix("start")
        self.pid = self._master_pid()
        if started.returncode != 0 or self.pid is None or not _alive(self.pid):
            raise RuntimeError(f"postfix start failed ({started.returncode}):\n"
                               f"{started.stdout}{started.stderr}\n{self.log_tail()}")
        _wait_listening(self.port)

    def stop(self) -> None:
        """``postfix stop``; SIGKILL the master by PID if it is still there after 10 s."""
        pid = self.pid or self._master_pid()
        self._postfix("stop")
        if pid is None:
            return
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the instance's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
