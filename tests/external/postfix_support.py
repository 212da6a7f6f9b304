"""A private Postfix "null client" that relays every message through submitd.

The instance lives in its own directory (``etc/``, ``queue/``, ``data/``, ``maillog``) and never
touches the system's ``/etc/postfix``. It has no smtpd listener: mail enters through Postfix's own
``sendmail`` (postdrop -> pickup -> cleanup -> qmgr) and leaves through the ``smtp`` client to
``relayhost``, with STARTTLS or implicit TLS (``smtp_tls_wrappermode``), the certificate verified
against the test CA for the name ``localhost``, and AUTH PLAIN from a ``texthash`` password map.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# The Debian build installs these; .ci/run installs the packages.
POSTFIX = "/usr/sbin/postfix"
SENDMAIL = "/usr/sbin/sendmail"  # Postfix's own, not some other MTA's
POSTQUEUE = "/usr/sbin/postqueue"

# Only the services a null client uses; chroot "n" everywhere because the queue is private.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
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


def need_postfix() -> None:
    """Fail (never skip) when Postfix is missing: .ci/run installs it."""
    for program in (POSTFIX, SENDMAIL, POSTQUEUE):
        if not os.access(program, os.X_OK):
            pytest.fail(f"{program} is not installed (apt-get install postfix libsasl2-modules)")
    if shutil.which("script") is None:
        pytest.fail("script (util-linux) is not installed")


def main_cf(root: Path, *, relay_port: int, ca_file: Path, wrappermode: bool) -> str:
    """The ``main.cf`` of a null client relaying everything to ``[localhost]:relay_port``."""
    etc = root / "etc"
    return "\n".join(
        [
            "compatibility_level = 3.6",
            f"queue_directory = {root / 'queue'}",
            f"data_directory = {root / 'data'}",
            "meta_directory = /etc/postfix",
            "myhostname = postfix-client.test.example",
            "myorigin = example.com",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mydestination =",
            "local_transport = error:5.1.1 this null client delivers nothing locally",
            "alias_maps =",
            "alias_database =",
            "biff = no",
            # No DNS: "localhost" resolves through the system resolver (/etc/hosts).
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            f"relayhost = [localhost]:{relay_port}",
            # SASL client: PLAIN only, from a plain-text map (no postmap needed).
            "smtp_sasl_auth_enable = yes",
            f"smtp_sasl_password_maps = texthash:{etc / 'sasl_passwd'}",
            "smtp_sasl_security_options = noanonymous",
            "smtp_sasl_tls_security_options = noanonymous",
            "smtp_sasl_mechanism_filter = plain",
            # TLS: always, with the chain and the name "localhost" verified against the test CA.
            "smtp_tls_security_level = secure",
            f"smtp_tls_CAfile = {ca_file}",
            f"smtp_tls_policy_maps = texthash:{etc / 'tls_policy'}",
            f"smtp_tls_wrappermode = {'yes' if wrappermode else 'no'}",
            "smtp_tls_loglevel = 1",
            # Logs to a file: no syslog in CI containers.
            f"maillog_file = {root / 'maillog'}",
            f"maillog_file_prefixes = {root}",
            # Keep failures visible in the queue instead of retrying or bouncing during a test.
            "minimal_backoff_time = 300s",
            "maximal_backoff_time = 600s",
            "",
        ]
    )


@dataclass(frozen=True, kw_only=True)
class PostfixClient:
    """A running private Postfix instance rooted at ``root``."""

    root: Path

    @property
    def etc(self) -> Path:
        """The instance's configuration directory (``-c`` / ``-C``)."""
        return self.root / "etc"

    @property
    def maillog(self) -> Path:
        """The instance's log file."""
        return self.root / "maillog"

    def log(self) -> str:
        """Everything Postfix logged so far."""
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def sendmail(self, message: bytes, *, sender: str, recipient: str) -> None:
        """Submit ``message`` with Postfix's own sendmail, envelope ``sender`` -> ``recipient``."""
        result = subprocess.run(
            [SENDMAIL, "-C", str(self.etc), "-f", sender, "-i", "--", recipient],
            input=message,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"sendmail exited {result.returncode}: {result.stderr!r}"

    def flush(self) -> None:
        """Ask the queue manager to attempt delivery of everything queued now."""
        self._postqueue("-f")

    def queue(self) -> str:
        """The queue listing (``postqueue -p``), with deferral reasons."""
        return self._postqueue("-p")

    def wait_for_log(self, pattern: str, *, timeout: float = 30.0) -> str:
        """Wait until a maillog line matches ``pattern`` (a regex) and return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(f".*{pattern}.*", self.log())
            if match:
                return match.group(0)
            time.sleep(0.05)
        raise TimeoutError(f"{pattern!r} not in the Postfix log:\n{self.log()}")

    def wait_for_queue(self, pattern: str, *, timeout: float = 30.0) -> str:
        """Wait until the queue listing matches ``pattern`` (a regex) and return the listing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listing = self.queue()
            if re.search(pattern, listing):
                return listing
            time.sleep(0.05)
        raise TimeoutError(f"{pattern!r} not in the Postfix queue:\n{self.queue()}")

    def _postqueue(self, flag: str) -> str:
        result = subprocess.run(
            [POSTQUEUE, "-c", str(self.etc), flag],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, (
            f"postqueue {flag} exited {result.returncode}: {result.stdout}{result.stderr}"
        )
        return result.stdout


def master_pid(root: Path) -> int | None:
    try:
        return int((root / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (PID 1 in a container may not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def run_postfix(root: Path, command: str) -> subprocess.CompletedProcess[str]:
    # postfix-script reports some start errors only to a terminal: give it one with script(1).
    line = f"{POSTFIX} -c {root / 'etc'} {command}"
    return subprocess.run(
        ["script", "-qec", line, "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def stop_instance(root: Path, pid: int | None) -> None:
    """Stop the instance; kill its own master (by its pid file) if it outlives ``stop``."""
    run_postfix(root, "stop")
    pid = pid or master_pid(root)
    if pid is None:
        return
    deadline = time.monotonic() + 10
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid):
        os.kill(pid, signal.SIGKILL)


def private_root() -> Path:
    """A fresh directory the ``postfix`` user can reach.

    Postfix daemons drop to ``mail_owner`` and open ``data_directory`` by its full path, so every
    ancestor must be searchable by others; pytest's ``tmp_path`` sits under a 0700 directory.
    """
    for parent in (tempfile.gettempdir(), "/tmp"):
        path = Path(parent).resolve()
        if all(p.stat().st_mode & 0o001 for p in (path, *path.parents)):
            root = Path(tempfile.mkdtemp(prefix="submitd-postfix-", dir=parent))
            root.chmod(0o755)
            return root
    pytest.fail("no temporary directory that the postfix user can reach")


@contextmanager
def null_client(
    *,
    relay_port: int,
    ca_file: Path,
    user: str,
    password: str,
    wrappermode: bool = False,
    keep_log: Path,
) -> Iterator[PostfixClient]:
    """Configure and start a null client; on exit stop it, copy its log to ``keep_log``, and
    remove its directory."""
    need_postfix()
    root = private_root()
    try:
        with _started(
            root,
            relay_port=relay_port,
            ca_file=ca_file,
            user=user,
            password=password,
            wrappermode=wrappermode,
        ) as client:
            yield client
    finally:
        if (root / "maillog").exists():
            shutil.copyfile(root / "maillog", keep_log)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _started(
    root: Path, *, relay_port: int, ca_file: Path, user: str, password: str, wrappermode: bool
) -> Iterator[PostfixClient]:
    etc = root / "etc"
    etc.mkdir(parents=True)
    # data_directory belongs to mail_owner (the master's lock file, tlsmgr's PRNG seed).
    (root / "data").mkdir()
    shutil.chown(root / "data", user="postfix", group="postfix")
    (root / "queue").mkdir()
    (etc / "main.cf").write_text(
        main_cf(root, relay_port=relay_port, ca_file=ca_file, wrappermode=wrappermode)
    )
    (etc / "master.cf").write_text(MASTER_CF)
    nexthop = f"[localhost]:{relay_port}"
    passwd = etc / "sasl_passwd"
    passwd.write_text(f"{nexthop} {user}:{password}\n")
    passwd.chmod(0o600)
    # Postfix verifies by DNS name; spell out that the relay must present "localhost".
    (etc / "tls_policy").write_text(f"{nexthop} secure match=localhost\n")
    started = run_postfix(root, "start")
    pid = master_pid(root)
    try:
        if started.returncode != 0 or pid is None or not is_alive(pid):
            raise RuntimeError(
                f"postfix start failed ({started.returncode}):\n{started.stdout}"
                f"{started.stderr}\n{PostfixClient(root=root).log()}"
            )
        yield PostfixClient(root=root)
    finally:
        stop_instance(root, pid)
