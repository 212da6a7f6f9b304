"""``submitd quickstart DIR``: a complete, working local setup in one directory.

DIR receives ``submitd.toml`` (listeners on 127.0.0.1:2587 STARTTLS and 127.0.0.1:2465
implicit TLS), a self-signed certificate for ``localhost`` and ``127.0.0.1`` in ``tls/``, a
users file with one login ``demo`` and a random password that may send as
``demo@example.com`` (the ``relay`` plugin binds logins to their senders), the ``headers``
fix-ups (``Received:``, ``Date:``, ``Message-ID:``) and maildir delivery into ``mail/`` (with a
commented-out smarthost route to show how to relay instead). Nothing existing is overwritten.
Blocking (key generation, argon2, fsync).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .certs import CERT_FILENAME, KEY_FILENAME, write_selfsigned
from .config import load_config
from .errors import UsageError
from .passwords import UsersFile
from .secret import Secret

__all__ = ["DEMO_LOGIN", "DEMO_SENDER", "QuickstartResult", "quickstart", "submitd_executable"]

DEMO_LOGIN = "demo"
DEMO_SENDER = "demo@example.com"
SUBMISSION_PORT = 2587
SUBMISSIONS_PORT = 2465

CONFIG_TEMPLATE = f"""\
# submitd configuration written by `submitd quickstart`: a local test setup.
# Run it with: @SUBMITD@ serve -c @CONFIG@
# Relative paths are relative to this file.
hostname = "localhost"

[[listen]]                  # submission: plain connect, STARTTLS required (RFC 6409)
address = "127.0.0.1:{SUBMISSION_PORT}"
mode = "starttls"

[[listen]]                  # submissions: TLS from the first byte (RFC 8314)
address = "127.0.0.1:{SUBMISSIONS_PORT}"
mode = "implicit"

[tls]                       # self-signed for localhost and 127.0.0.1
cert = "tls/{CERT_FILENAME}"
key = "tls/{KEY_FILENAME}"

[queue]
dir = "spool"

[plugins]
enable = ["passwdfile", "relay", "headers", "maildir"]

# Manage logins with: @SUBMITD@ user add|passwd|senders|del|list -c @CONFIG@
[plugins.passwdfile]
path = "users"
# min_password_length = 12  # `user add` and `user passwd` refuse shorter passwords

# relay: a login may send only as the senders the users file lists for it (MAIL FROM, From:,
# Sender:), plus shared mailboxes listed here. Without "relay" in `enable` a login may send as
# any address.
# [plugins.relay.senders]
# "info@example.com" = ["{DEMO_LOGIN}"]

# Received:, Date: and Message-ID: fix-ups (RFC 6409); these are the defaults.
# [plugins.headers]
# hide_client = true        # the Received: field does not show the client's IP address
# show_login = false        # true: it names the login

[plugins.maildir]           # every accepted message lands in this Maildir
path = "mail"

# To forward mail through your provider's relay instead (README "Relay through your
# provider", docs/smarthost.md): put "smarthost" in `enable` above (in place of "maildir", or
# after it to relay only the senders a route names), put the relay's password alone in
# smarthost.secret (mode 0600), and uncomment the default route, the sender route, or both.
# [plugins.smarthost]       # the default route: every sender no route below matches
# host = "smtp.provider.example"
# port = 587
# tls = "starttls"          # verified against the system's trust store
# username = "relay-user"
# password_file = "smarthost.secret"
#
# [[plugins.smarthost.route]]   # only these senders; others go to the default route or maildir
# senders = ["{DEMO_SENDER}"]
# host = "smtp.provider.example"
# port = 587
# tls = "starttls"
# username = "relay-user"
# password_file = "smarthost.secret"
"""

USERS_HEADER = """\
# submitd users: LOGIN ARGON2ID-HASH [SENDER ...]; edit with `submitd user ...`.
"""


@dataclass(frozen=True, kw_only=True)
class QuickstartResult:
    """What ``quickstart`` wrote, and the demo credentials (the password exists only here)."""

    directory: Path
    config_path: Path
    users_path: Path
    cert_path: Path
    key_path: Path
    login: str
    sender: str
    password: Secret = field(repr=False)

    def swaks_command(self) -> str:
        """Return a ready swaks command line sending a test message (reveals the password)."""
        return shlex.join([
            "swaks", "--server", "127.0.0.1", "--port", str(SUBMISSION_PORT),
            "--tls", "--tls-verify", "--tls-ca-path", str(self.cert_path),
            "--auth", "PLAIN", "--auth-user", self.login,
            "--auth-password", self.password.reveal(),
            "--from", self.sender, "--to", "someone@example.com",
        ])


def submitd_executable() -> str:
    """The absolute path of the ``submitd`` command running now, for commands to paste.

    ``submitd`` is usually not on ``$PATH`` (it lives in a virtual environment's ``bin``):
    the script being run (``sys.argv[0]``), else the one next to this Python, else whatever
    ``$PATH`` finds, else the bare name.
    """
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "submitd" and script.is_file():
        return os.path.abspath(script)
    beside = Path(sys.executable).with_name("submitd")  # not resolved: the venv's bin
    if sys.executable and beside.is_file():
        return os.path.abspath(beside)
    return shutil.which("submitd") or "submitd"


def _new_password() -> Secret:
    while True:
        candidate = secrets.token_urlsafe(12)
        if not candidate.startswith("-"):  # would read as an option on a command line
            return Secret(candidate)


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` completely or not at all, never replacing an existing file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if the file appeared meanwhile
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def quickstart(directory: Path) -> QuickstartResult:
    """Write the setup into ``directory`` (created if needed) and return what was made.

    Raise UsageError if any file it would write exists already; OSError on I/O failures.
    """
    directory = directory.absolute()
    config_path = directory / "submitd.toml"
    users_path = directory / "users"
    tls_dir = directory / "tls"
    cert_path, key_path = tls_dir / CERT_FILENAME, tls_dir / KEY_FILENAME
    for target in (config_path, users_path, cert_path, key_path):
        if target.exists():
            raise UsageError(f"{target} already exists; choose an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    tls_dir.mkdir(exist_ok=True)
    write_selfsigned(tls_dir, ["localhost", "127.0.0.1"])

    password = _new_password()
    _create_exclusive(users_path, USERS_HEADER.encode(), 0o600)
    UsersFile(path=users_path).add_user(DEMO_LOGIN, password, [DEMO_SENDER])

    # Written last: its presence marks a complete setup (`make run` tests for it).
    config_text = CONFIG_TEMPLATE.replace("@SUBMITD@", shlex.quote(submitd_executable()))
    config_text = config_text.replace("@CONFIG@", shlex.quote(str(config_path)))
    _create_exclusive(config_path, config_text.encode(), 0o644)
    load_config(config_path)  # the written file must pass the loader
    return QuickstartResult(
        directory=directory,
        config_path=config_path,
        users_path=users_path,
        cert_path=cert_path,
        key_path=key_path,
        login=DEMO_LOGIN,
        sender=DEMO_SENDER,
        password=password,
    )
