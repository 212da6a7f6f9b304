"""Users and delivered mail for tests: :func:`add_user`, :func:`read_maildir`."""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import trio
from argon2 import PasswordHasher

from ..passwords import UsersFile
from ..secret import Secret

__all__ = ["TEST_HASHER", "TestUser", "add_user", "read_maildir", "wait_for_delivery"]

#: Cheap argon2id parameters for test users (a login takes milliseconds); never for real ones.
TEST_HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


@dataclass(frozen=True, kw_only=True)
class TestUser:
    """A login of a test users file and the sender address it may use."""

    __test__ = False  # not a pytest test class

    login: str
    password: str
    sender: str


def add_user(
    users_file: Path, login: str, password: str, senders: tuple[str, ...] | list[str] = ()
) -> TestUser:
    """Add ``login`` to ``users_file`` (created, mode 0600, if missing) with cheap hashing.

    ``senders`` are the addresses or ``@domains`` it may send as (the users file's third
    column). Blocking, but fast. Returns the user, with the first sender (or ``login``).
    """
    UsersFile(path=users_file, hasher=TEST_HASHER).add_user(login, Secret(password), senders)
    return TestUser(login=login, password=password, sender=next(iter(senders), login))


_PARSER = email.parser.BytesParser(policy=email.policy.default)


def read_maildir(maildir: Path) -> list[EmailMessage]:
    """The messages in ``maildir/new`` and ``cur``, oldest first, parsed.

    Each message starts with the ``Return-Path:`` the maildir plugin writes (the envelope
    sender): ``message["Return-Path"]``. Line endings are read as LF (the stored
    message has CRLF), so ``message.get_content()`` is plain text.
    """
    files = [p for sub in ("new", "cur") if (maildir / sub).is_dir()
             for p in (maildir / sub).iterdir()]
    files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
    out = []
    for path in files:
        message = _PARSER.parsebytes(path.read_bytes().replace(b"\r\n", b"\n"))
        assert isinstance(message, EmailMessage)
        out.append(message)
    return out


async def wait_for_delivery(
    maildir: Path, count: int = 1, *, within: float = 10.0
) -> list[EmailMessage]:
    """Wait until ``maildir`` holds ``count`` messages; return them all (oldest first).

    Delivery happens in the background after the ``250``, so a test waits for it; this
    polls the directory every 20 ms and raises ``trio.TooSlowError`` after ``within`` seconds.
    """
    with trio.fail_after(within):
        while True:
            messages = read_maildir(maildir)
            if len(messages) >= count:
                return messages
            await trio.sleep(0.02)
