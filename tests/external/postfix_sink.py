"""A private Postfix instance acting as a smarthost that stores every message it accepts.

The sink lives in its own directory and never touches the system's ``/etc/postfix``. Its smtpd
listens on ``127.0.0.1:<port>``, requires STARTTLS (``smtpd_tls_security_level = encrypt``, a
trustme certificate for ``localhost``) and AUTH (Cyrus SASL against a private ``sasldb``, PLAIN and
LOGIN, only after STARTTLS), and relays only for authenticated clients. Every accepted recipient is
delivered by Postfix's ``virtual`` agent into one Maildir, ``<root>/mail/catchall``, with a
``Delivered-To`` and a ``Return-Path`` header in front of the message.

Recipients whose local part is ``refuse`` are refused with ``550 5.1.1`` and those whose local part
is ``later`` with ``450 4.2.0`` (a ``check_recipient_access`` map), so tests can mix accepted and
refused recipients in one message. Variants: ``offer_starttls=False`` (no TLS at all; AUTH in
clear text), ``defer_all=True`` (every recipient gets ``450``) and ``offer_dsn=False`` (the EHLO
reply leaves out ``DSN``, so a client may not send ``NOTIFY``/``RET``/``ENVID``/``ORCPT``; with it,
as by default, Postfix reports delivery itself: a ``NOTIFY=SUCCESS`` recipient's success report goes
to the envelope sender, whose domain the catch-all Maildir also takes).

Postfix stores lines with LF endings (its queue file keeps records without terminators);
:attr:`SinkMessage.crlf` turns a stored message back into the CRLF form it had on the wire.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest

from submitd.testing import TestCA
from tests.external.postfix_support import MASTER_CF as CLIENT_MASTER_CF
from tests.external.postfix_support import (
    is_alive,
    master_pid,
    need_postfix,
    private_root,
    run_postfix,
    stop_instance,
)

SASLPASSWD2 = "/usr/sbin/saslpasswd2"

# The SASL realm the sink's users live in; logins are the plain name (smtpd_sasl_local_domain
# supplies the realm), and "name@realm" works as well.
REALM = "sink.test.example"

# What the refusal map answers (check_recipient_access keys "localpart@" match any domain).
REFUSED_LOCALPART = "refuse"
DEFERRED_LOCALPART = "later"
REFUSAL = "550 5.1.1 Mailbox unknown at the sink"
DEFERRAL = "450 4.2.0 Mailbox busy at the sink"

# The null client's services plus local delivery into the virtual mailbox; the smtpd listener
# is added per instance.
MASTER_CF = CLIENT_MASTER_CF + "virtual   unix  -       n       n       -       -       virtual\n"

# virtual(8) delivers as this uid/gid (nobody/nogroup on Debian).
MAIL_UID = 65534
MAIL_GID = 65534


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, kw_only=True)
class SinkOptions:
    """How a sink behaves towards its clients."""

    offer_starttls: bool = True
    defer_all: bool = False
    offer_dsn: bool = True
    user: str = "relay"
    password: str = "sink password 7"


def main_cf(root: Path, options: SinkOptions) -> str:
    """The ``main.cf`` of a sink rooted at ``root``."""
    etc = root / "etc"
    if options.offer_starttls:
        tls = [
            "smtpd_tls_security_level = encrypt",
            f"smtpd_tls_chain_files = {etc / 'key.pem'}, {etc / 'cert.pem'}",
            "smtpd_tls_auth_only = yes",
            "smtpd_tls_loglevel = 1",
            "smtpd_tls_received_header = yes",
        ]
    else:
        tls = ["smtpd_tls_security_level = none", "smtpd_tls_auth_only = no"]
    dsn = [] if options.offer_dsn else ["smtpd_discard_ehlo_keywords = dsn"]
    if options.defer_all:
        recipients = "defer"
    else:
        recipients = f"check_recipient_access texthash:{etc / 'recipient_access'}, permit"
    return "\n".join(
        [
            "compatibility_level = 3.6",
            f"queue_directory = {root / 'queue'}",
            f"data_directory = {root / 'data'}",
            "meta_directory = /etc/postfix",
            "myhostname = sink.test.example",
            "mydomain = test.example",
            "myorigin = sink.test.example",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mydestination =",
            "relay_domains =",
            "local_transport = error:5.1.1 this sink delivers nothing locally",
            "alias_maps =",
            "alias_database =",
            "biff = no",
            "smtpd_peername_lookup = no",
            "smtp_dns_support_level = disabled",
            # Leave the messages exactly as received: no header rewriting for loopback clients,
            # no added Message-ID/Date/From.
            "local_header_rewrite_clients =",
            "always_add_missing_headers = no",
            # Every recipient of every domain into one Maildir.
            "virtual_mailbox_domains = static:all",
            f"virtual_mailbox_base = {root / 'mail'}",
            "virtual_mailbox_maps = static:catchall/",
            f"virtual_uid_maps = static:{MAIL_UID}",
            f"virtual_gid_maps = static:{MAIL_GID}",
            "virtual_mailbox_limit = 0",
            # AUTH through Cyrus SASL with a private sasldb.
            "smtpd_sasl_auth_enable = yes",
            "smtpd_sasl_type = cyrus",
            "smtpd_sasl_path = smtpd",
            f"cyrus_sasl_config_path = {etc / 'sasl'}",
            f"smtpd_sasl_local_domain = {REALM}",
            "smtpd_sasl_security_options = noanonymous",
            "smtpd_sasl_tls_security_options = noanonymous",
            "broken_sasl_auth_clients = no",
            "smtpd_relay_restrictions = permit_sasl_authenticated, reject",
            f"smtpd_recipient_restrictions = {recipients}",
            # Tests send many refused recipients; never slow a client down for it.
            "smtpd_error_sleep_time = 0",
            "smtpd_soft_error_limit = 1000",
            "smtpd_hard_error_limit = 1000",
            "smtpd_client_connection_count_limit = 0",
            *tls,
            *dsn,
            # Logs to a file: no syslog in CI containers.
            f"maillog_file = {root / 'maillog'}",
            f"maillog_file_prefixes = {root}",
            "",
        ]
    )


SASL_SMTPD_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: {sasldb}
mech_list: PLAIN LOGIN
"""


@dataclass(frozen=True, kw_only=True)
class SinkMessage:
    """One stored message: what Postfix wrote into the Maildir."""

    path: Path
    raw: bytes  # as stored: LF line ends, Delivered-To and Return-Path first

    @property
    def crlf(self) -> bytes:
        """The stored message with CRLF line ends, as it travelled over SMTP."""
        return self.raw.replace(b"\n", b"\r\n")

    @property
    def body(self) -> bytes:
        """The body (CRLF), everything after the blank line ending the header section."""
        return self.crlf.partition(b"\r\n\r\n")[2]

    @property
    def headers(self) -> bytes:
        """The header section (CRLF), without the blank line."""
        return self.crlf.partition(b"\r\n\r\n")[0] + b"\r\n"

    @property
    def parsed(self) -> EmailMessage:
        """The message parsed with the ``email`` package's default (RFC 5322) policy."""
        message = email.message_from_bytes(self.crlf, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (unfolded), or None."""
        value = self.parsed[name]
        return None if value is None else str(value)

    @property
    def recipient(self) -> str:
        """The envelope recipient (``Delivered-To``, added by Postfix)."""
        return self.header("Delivered-To") or ""

    @property
    def sender(self) -> str:
        """The envelope sender without angle brackets (``Return-Path``; "" for a bounce)."""
        return (self.header("Return-Path") or "").strip().strip("<>")

    @property
    def message_id(self) -> str:
        """The ``Message-ID`` header, stripped ("" when absent)."""
        return (self.header("Message-ID") or "").strip()


@dataclass(kw_only=True)
class PostfixSink:
    """A private Postfix smarthost rooted at ``root``; :meth:`start` / :meth:`stop` it at will."""

    root: Path
    port: int
    ca: TestCA
    options: SinkOptions = field(default_factory=SinkOptions)
    _pid: int | None = None

    @property
    def etc(self) -> Path:
        """The instance's configuration directory (``-c``)."""
        return self.root / "etc"

    @property
    def maildir(self) -> Path:
        """The Maildir every accepted message lands in."""
        return self.root / "mail" / "catchall"

    @property
    def user(self) -> str:
        """The SASL login the sink accepts."""
        return self.options.user

    @property
    def password(self) -> str:
        """The SASL password the sink accepts."""
        return self.options.password

    @property
    def running(self) -> bool:
        """True while the instance's master process runs."""
        return self._pid is not None and is_alive(self._pid)

    def setup(self) -> None:
        """Write the instance's directories, configuration, certificate and sasldb."""
        etc = self.etc
        (etc / "sasl").mkdir(parents=True)
        # data_directory belongs to mail_owner (the master's lock file, tlsmgr's PRNG seed).
        (self.root / "data").mkdir()
        shutil.chown(self.root / "data", user="postfix", group="postfix")
        (self.root / "queue").mkdir()
        mail = self.root / "mail"
        mail.mkdir()
        shutil.chown(mail, user=MAIL_UID, group=MAIL_GID)
        shutil.copyfile(self.ca.cert_path, etc / "cert.pem")
        shutil.copyfile(self.ca.key_path, etc / "key.pem")
        (etc / "key.pem").chmod(0o600)
        (etc / "main.cf").write_text(main_cf(self.root, self.options))
        (etc / "master.cf").write_text(
            MASTER_CF + f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        )
        (etc / "recipient_access").write_text(
            f"{REFUSED_LOCALPART}@ {REFUSAL}\n{DEFERRED_LOCALPART}@ {DEFERRAL}\n"
        )
        sasldb = etc / "sasldb2"
        (etc / "sasl" / "smtpd.conf").write_text(SASL_SMTPD_CONF.format(sasldb=sasldb))
        result = subprocess.run(
            [SASLPASSWD2, "-p", "-c", "-f", str(sasldb), "-u", REALM, self.options.user],
            input=self.options.password.encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"saslpasswd2 failed: {result.stderr!r}")
        # smtpd reads the sasldb as the postfix user.
        shutil.chown(sasldb, user="root", group="postfix")
        sasldb.chmod(0o640)

    def start(self) -> None:
        """Start the instance; return once its listener accepts connections."""
        if self.running:
            return
        started = run_postfix(self.root, "start")
        self._pid = master_pid(self.root)
        if started.returncode != 0 or self._pid is None or not is_alive(self._pid):
            raise RuntimeError(
                f"postfix start failed ({started.returncode}):\n{started.stdout}"
                f"{started.stderr}\n{self.log()}"
            )
        # master(8) -w returns after it bound the listener; make sure it is there.
        with socket.create_connection(("127.0.0.1", self.port), timeout=10):
            pass

    def stop(self) -> None:
        """Stop the instance (its listener closes: clients get "connection refused")."""
        if self._pid is None and master_pid(self.root) is None:
            return
        stop_instance(self.root, self._pid)
        self._pid = None

    def log(self) -> str:
        """Everything Postfix logged so far."""
        maillog = self.root / "maillog"
        return maillog.read_text(errors="replace") if maillog.exists() else ""

    def messages(self) -> list[SinkMessage]:
        """Every stored message, oldest first."""
        files: list[Path] = []
        for sub in ("new", "cur"):
            directory = self.maildir / sub
            if directory.is_dir():
                files += [p for p in directory.iterdir() if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [SinkMessage(path=p, raw=p.read_bytes()) for p in files]

    def wait_for_messages(
        self, count: int, *, match: str = "", timeout: float = 30.0
    ) -> list[SinkMessage]:
        """Wait until ``count`` stored messages contain ``match`` (bytes as text) and return them.

        Messages from earlier tests stay in the Maildir, so tests pass a unique ``match`` (a
        Subject or Message-ID) to see only their own.
        """
        deadline = time.monotonic() + timeout
        needle = match.encode()
        while True:
            found = [m for m in self.messages() if needle in m.raw]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(found)} of {count} message(s) with {match!r} in the sink\n"
                    f"--- postfix log:\n{self.log()}"
                )
            time.sleep(0.05)


@contextmanager
def postfix_sink(
    *, ca: TestCA, options: SinkOptions | None = None, keep_log: Path | None = None
) -> Iterator[PostfixSink]:
    """Configure and start a sink; on exit stop it, copy its log to ``keep_log``, remove it."""
    need_postfix()
    if not Path(SASLPASSWD2).exists():  # .ci/run installs it; missing is a broken setup
        pytest.fail(f"{SASLPASSWD2} is not installed (apt-get install sasl2-bin)")
    root = private_root()
    sink = PostfixSink(root=root, port=free_port(), ca=ca, options=options or SinkOptions())
    try:
        sink.setup()
        sink.start()
        yield sink
    finally:
        try:
            sink.stop()
        finally:
            if keep_log is not None and (root / "maillog").exists():
                shutil.copyfile(root / "maillog", keep_log)
            shutil.rmtree(root, ignore_errors=True)
