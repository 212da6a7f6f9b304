"""The benchmark's peer: an aiosmtpd submission server set up as much like submitd as it allows.

Run as a child process by ``bench/run.py``::

    python bench/peer_aiosmtpd.py --cert C --key K --users FILE --maildir DIR --log FILE

It listens on 127.0.0.1 on a port chosen by the OS, prints ``PORT <n>`` on stdout once it
accepts connections, and serves until SIGTERM or SIGINT.

What it shares with the ``submitd serve`` it is compared with:

- TLS: STARTTLS required before AUTH and MAIL, the same trustme certificate, and the very
  context submitd builds (``submitd.server.tls.make_server_context``: TLS 1.2+, AEAD only).
- AUTH PLAIN: the login and argon2id hash come from the same users file, verified with
  argon2-cffi's default parameters in a worker thread (aiosmtpd's own ``authenticator`` hook is
  synchronous and would stall the event loop, which submitd never does).
- MAIL FROM: refused unless the logged-in user's users-file line lists the address (the rule
  ``relay`` applies, :func:`submitd.passwords.sender_matches`).
- Storage: before answering ``250`` the message goes into a Maildir (``tmp/``, fsync, rename
  into ``new/``, fsync ``new/``), in a worker thread. submitd does *more* before its 250 (spool
  file and sidecar fsynced, two directories fsynced) and delivers to the Maildir afterwards.
- Logging: INFO lines to a file, as submitd logs one line per event.

What it does not do: limit concurrent argon2 runs, check ``From:`` headers, queue, retry.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import argon2
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from argon2.exceptions import InvalidHashError, VerificationError

from submitd.passwords import UsersFile, sender_matches

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class Maildir:
    """One Maildir written like ``submitd_plugins.maildir`` writes it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._host = os.uname().nodename.replace("/", r"\057").replace(":", r"\072")

    def deliver(self, sender: str, content: bytes) -> None:
        """Write, fsync, rename into ``new/`` and fsync ``new/`` (blocking: worker thread)."""
        now = time.time()
        name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}R{secrets.token_hex(4)}.{self._host}"
        tmp, final = self.root / "tmp" / name, self.root / "new" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(f"Return-Path: <{sender}>\r\n".encode())
                f.write(content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        dfd = os.open(final.parent, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class Handler:
    """aiosmtpd hooks: sender ownership, any recipient, Maildir storage before 250."""

    def __init__(self, users: UsersFile, maildir: Maildir) -> None:
        self.users = users
        self.maildir = maildir

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        login = session.auth_data
        entry = self.users.lookup(login) if isinstance(login, str) else None
        if entry is None or not sender_matches(entry.senders, address):
            return f"550 5.7.1 Sender address <{address}> not owned by user {login}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope,
    ) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                None, self.maildir.deliver, envelope.mail_from or "", content
            )
        except OSError:
            return "451 4.3.0 Maildir write failed"
        return "250 2.0.0 Stored in Maildir"


class SubmissionSMTP(SMTP):
    """aiosmtpd's SMTP with AUTH PLAIN verified off the event loop."""

    hasher = argon2.PasswordHasher()  # argon2-cffi's defaults, as submitd's users file uses
    users: UsersFile = UsersFile(path=Path("users"))
    plain_password: bytes | None = None  # --plain-password: compare instead of argon2

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False)
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        try:
            _authzid, login, password = blob.split(b"\x00")
        except ValueError:
            await self.push("501 5.5.2 Cannot split the credentials")
            return AuthResult(success=False, handled=True)
        name = login.decode("utf-8", "replace")
        entry = self.users.lookup(name)
        if entry is None:
            return AuthResult(success=False)
        if self.plain_password is not None:
            # Like Postfix's sasldb (a stored plain-text secret): a constant-time compare.
            ok = hmac.compare_digest(password, self.plain_password)
        else:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(None, self._verify, entry.hash, password)
        if not ok:
            return AuthResult(success=False)
        return AuthResult(success=True, auth_data=name)

    def _verify(self, hashed: str, password: bytes) -> bool:
        try:
            return self.hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False


async def serve(args: argparse.Namespace) -> None:
    from submitd.config import TLSConfig
    from submitd.server.tls import make_server_context

    tls = make_server_context(TLSConfig(cert=Path(args.cert), key=Path(args.key)))
    users = UsersFile.load(Path(args.users))
    handler = Handler(users, Maildir(Path(args.maildir)))
    SubmissionSMTP.users = users
    if args.plain_password is not None:
        SubmissionSMTP.plain_password = args.plain_password.encode()
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SubmissionSMTP(
            handler,
            hostname="peer.bench.example",
            data_size_limit=args.max_size,
            tls_context=tls,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN"],
            timeout=args.timeout,
            loop=loop,
        )

    server = await loop.create_server(factory, host="127.0.0.1", port=0)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--users", required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--max-size", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--timeout", type=int, default=300,
                        help="idle seconds before a session is closed")
    parser.add_argument("--plain-password", help="compare AUTH PLAIN passwords with this "
                        "one (constant time) instead of the users file's argon2 hash")
    args = parser.parse_args()
    logging.basicConfig(
        filename=args.log, level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # Refusing login without TLS is what we ask for; aiosmtpd warns about it anyway.
    logging.getLogger("mail.log").setLevel(logging.INFO)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
