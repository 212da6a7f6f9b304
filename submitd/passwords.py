"""The users file: argon2id credentials and the senders each login may use.

One credential per line, ``#`` comments and blank lines allowed (``etc/users.example``
describes the format)::

    # login  argon2id hash                      senders (addresses, @domains, <>)
    alice    $argon2id$v=19$m=65536,t=3,p=4$...  alice@example.com @example.org

Everything here is synchronous and may block (argon2 costs ~100 ms and 64 MiB, rewrites
fsync): callers in the server run it with ``trio.to_thread.run_sync``. Edits re-read the file
under an exclusive lock, change it, and replace it atomically (temp file in the same
directory, fsync, rename, fsync the directory), keeping comments and the file's mode.
Passwords are :class:`~submitd.secret.Secret` values and never appear in messages or reprs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from ._authcache import DEFAULT_CACHE_ENTRIES, CredentialCache
from .durable import fsync_dir, write_all
from .errors import SubmitdError
from .protocol._grammar import has_control, is_hostname
from .secret import Secret

__all__ = [
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_MIN_PASSWORD_LENGTH",
    "NO_SENDER",
    "CredentialCache",
    "NoSuchUserError",
    "UserEntry",
    "UserExistsError",
    "UsersFile",
    "UsersFileError",
    "VerifyResult",
    "check_password_length",
    "file_signature",
    "hash_password",
    "min_password_length",
    "sender_matches",
    "validate_login",
    "validate_sender",
]

#: How the null reverse path ``<>`` (bounces) is written in a sender list.
NO_SENDER = "<>"

#: The shortest password ``submitd user add`` and ``user passwd`` accept, unless
#: ``[plugins.passwdfile] min_password_length`` says otherwise (NIST SP 800-63B §3.1.1.2
#: asks for at least 8; 12 leaves a margin for passwords people choose).
DEFAULT_MIN_PASSWORD_LENGTH = 12

# Logins are matched byte-for-byte against the SASL username: printable (no controls,
# has_control), no spaces.
_LOGIN = re.compile(r"\A[^\s#]\S{0,254}\Z")
# RFC 5321 §4.1.2 dot-string local part, kept permissive (and no controls); the domain is a
# qualified host name (is_hostname).
_LOCAL = re.compile(r"\A[^\s@\"]{1,64}\Z")


class UsersFileError(SubmitdError):
    """The users file cannot be read or parsed, or an edit makes no sense.

    ``path`` and ``line`` (1-based, or None) say where.
    """

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class UserExistsError(UsersFileError):
    """``add`` of a login that is already in the file."""


class NoSuchUserError(UsersFileError):
    """``passwd``, ``del`` or a senders change of a login that is not in the file."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UserEntry:
    """One credential line: the login, its argon2id hash and the senders it may use."""

    login: str
    hash: str = field(repr=False)
    senders: tuple[str, ...] = ()

    def render(self) -> str:
        """Return the line as written to the file (without the newline)."""
        return " ".join((self.login, self.hash, *self.senders))


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyResult:
    """The outcome of :meth:`UsersFile.verify`.

    ``needs_rehash`` is true when the password matched a hash made with parameters older
    than the current defaults: the caller should store a fresh hash.
    """

    ok: bool
    needs_rehash: bool = False


def validate_login(login: str) -> str:
    """Return ``login`` if it can be stored in the users file, else raise ValueError."""
    if not _LOGIN.match(login) or has_control(login):
        raise ValueError(
            f"invalid login {login!r}: 1-255 printable characters, no spaces, not starting with #"
        )
    return login


def validate_sender(pattern: str) -> str:
    """Normalise a sender pattern (``user@example.com``, ``@example.com`` or ``<>``).

    The domain is lower-cased (domains are case-insensitive, RFC 5321 §2.4); the local part
    is kept exactly. Raise ValueError for anything else.
    """
    if pattern == NO_SENDER:
        return pattern
    local, at, domain = pattern.rpartition("@")
    if not at or not is_hostname(domain, min_labels=2) or (
        local and (not _LOCAL.match(local) or has_control(local))
    ):
        raise ValueError(f"invalid sender {pattern!r}: use user@example.com, @example.com or <>")
    return f"{local}@{domain.lower()}"


def sender_matches(patterns: Collection[str], address: str) -> bool:
    """Tell whether ``address`` (``""`` for ``<>``) matches one of the sender ``patterns``.

    ``patterns`` are normalised as :func:`validate_sender` returns them: ``user@example.com``
    (the local part must match exactly, the domain case-insensitively), ``@example.com`` (any
    local part at that domain) or ``<>`` (the null reverse path, for bounces).
    """
    if address in ("", NO_SENDER):
        return NO_SENDER in patterns
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    domain = domain.lower()
    return f"{local}@{domain}" in patterns or f"@{domain}" in patterns


def min_password_length(table: Mapping[str, object]) -> int:
    """Return ``min_password_length`` of a ``[plugins.passwdfile]`` table (default 12).

    Raise ValueError unless it is a positive integer.
    """
    value = table.get("min_password_length", DEFAULT_MIN_PASSWORD_LENGTH)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


def check_password_length(password: Secret, minimum: int) -> None:
    """Raise ValueError if ``password`` has fewer than ``minimum`` characters.

    Characters are Unicode code points, as typed. Only new passwords are checked: a login
    whose password predates the rule keeps working.
    """
    if len(password.reveal()) < minimum:
        raise ValueError(f"the password is too short: at least {minimum} characters")


def hash_password(password: Secret, hasher: argon2.PasswordHasher | None = None) -> str:
    """Hash ``password`` with argon2id (argon2-cffi's default parameters unless given)."""
    return (hasher or argon2.PasswordHasher()).hash(password.reveal())


@functools.cache
def _dummy_hash(time_cost: int, memory_cost: int, parallelism: int) -> str:
    """Hash a random password, so unknown logins cost as much as wrong passwords."""
    hasher = argon2.PasswordHasher(
        time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
    )
    return hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, kw_only=True)
class UsersFile:
    """A parsed users file.

    ``lines`` keeps every line in order: an entry, or the verbatim text of a comment or blank
    line, so that a rewrite preserves what the administrator wrote. ``signature`` identifies the
    version on disk (device, inode, size, mtime) to notice changes cheaply. ``hasher`` sets the
    argon2id parameters for new hashes and for ``needs_rehash`` (default: argon2-cffi's).
    """

    path: Path
    lines: tuple[UserEntry | str, ...] = ()
    signature: tuple[int, ...] | None = None
    hasher: argon2.PasswordHasher | None = field(default=None, repr=False, compare=False)
    _by_login: dict[str, UserEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {e.login: e for e in self.lines if isinstance(e, UserEntry)}
        object.__setattr__(self, "_by_login", index)

    # --- reading ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        missing_ok: bool = False,
        hasher: argon2.PasswordHasher | None = None,
    ) -> UsersFile:
        """Read and parse ``path``; a missing file is empty when ``missing_ok``."""
        try:
            with path.open("rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            if missing_ok:
                return cls(path=path, hasher=hasher)
            raise UsersFileError(path, "no such file") from None
        except OSError as exc:
            raise UsersFileError(path, f"cannot read: {exc.strerror}") from None
        return cls.parse(path, data, signature=file_signature(st), hasher=hasher)

    @classmethod
    def parse(
        cls,
        path: Path,
        data: bytes,
        *,
        signature: tuple[int, ...] | None = None,
        hasher: argon2.PasswordHasher | None = None,
    ) -> UsersFile:
        """Parse the bytes of a users file; errors name ``path`` and the line number."""
        lines: list[UserEntry | str] = []
        seen: set[str] = set()
        for number, raw in enumerate(data.split(b"\n"), start=1):
            try:
                text = raw.decode("utf-8").removesuffix("\r")
            except UnicodeDecodeError:
                raise UsersFileError(path, "not valid UTF-8", number) from None
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                lines.append(text)
                continue
            entry = _parse_entry(path, number, stripped)
            if entry.login in seen:
                raise UsersFileError(path, f"login {entry.login!r} appears twice", number)
            seen.add(entry.login)
            lines.append(entry)
        if lines and lines[-1] == "":  # the newline ending the last line
            lines.pop()
        return cls(path=path, lines=tuple(lines), signature=signature, hasher=hasher)

    @property
    def entries(self) -> tuple[UserEntry, ...]:
        """Every credential, in file order."""
        return tuple(e for e in self.lines if isinstance(e, UserEntry))

    def lookup(self, login: str) -> UserEntry | None:
        """Return the entry for ``login`` (exact match), or None."""
        return self._by_login.get(login)

    def __contains__(self, login: object) -> bool:
        return login in self._by_login

    def __len__(self) -> int:
        return len(self._by_login)

    def verify(self, login: str, password: Secret) -> VerifyResult:
        """Check a password; blocking (argon2), run it in a worker thread.

        An unknown login is verified against a dummy hash made with the current default
        parameters, so that it costs about as much as a wrong password (docs/security.md §3).
        """
        hasher = self._hasher
        entry = self.lookup(login)
        if entry is None:
            dummy = _dummy_hash(hasher.time_cost, hasher.memory_cost, hasher.parallelism)
            with contextlib.suppress(VerificationError, InvalidHashError):
                hasher.verify(dummy, password.reveal())
            return VerifyResult(ok=False)
        try:
            hasher.verify(entry.hash, password.reveal())
        except (VerificationError, InvalidHashError):
            return VerifyResult(ok=False)
        return VerifyResult(ok=True, needs_rehash=hasher.check_needs_rehash(entry.hash))

    def sender_allowed(self, login: str, address: str) -> bool:
        """Tell whether ``login`` may use ``address`` (``""`` for ``<>``) as sender.

        The local part must match exactly, the domain case-insensitively; ``@domain`` allows
        any local part at that domain. Unknown logins may use nothing.
        """
        entry = self.lookup(login)
        return entry is not None and sender_matches(entry.senders, address)

    # --- editing (each call locks, re-reads the file, rewrites it atomically) ----------------

    def add_user(self, login: str, password: Secret, senders: Iterable[str] = ()) -> UsersFile:
        """Add ``login``; the file is created (mode 0600) if missing. Blocking."""
        entry = UserEntry(
            login=validate_login(login),
            hash=hash_password(password, self._hasher),
            senders=tuple(dict.fromkeys(validate_sender(s) for s in senders)),
        )

        def change(current: UsersFile) -> tuple[UserEntry | str, ...]:
            if login in current:
                raise UserExistsError(self.path, f"user {login!r} already exists")
            return (*current.lines, entry)

        return self._edit(change, create=True)

    def set_password(self, login: str, password: Secret) -> UsersFile:
        """Replace the hash of ``login``. Blocking."""
        new_hash = hash_password(password, self._hasher)
        return self._edit(lambda cur: _replace_hash(cur, login, new_hash, None))

    def rehash(self, login: str, password: Secret, old_hash: str) -> UsersFile:
        """Store a fresh hash for ``login`` if its hash on disk is still ``old_hash``.

        Used after a successful login whose hash had outdated parameters; if the password
        was changed meanwhile, the file is left alone. Blocking.
        """
        new_hash = hash_password(password, self._hasher)
        return self._edit(lambda cur: _replace_hash(cur, login, new_hash, old_hash))

    def set_senders(self, login: str, senders: Iterable[str]) -> UsersFile:
        """Replace the senders of ``login`` (an empty list: it may log in but not send). Blocking.

        The password hash stays as it is.
        """
        wanted = tuple(dict.fromkeys(validate_sender(s) for s in senders))
        return self._edit(lambda cur: _replace_senders(cur, login, lambda _old: wanted))

    def change_senders(
        self, login: str, *, add: Iterable[str] = (), remove: Iterable[str] = ()
    ) -> UsersFile:
        """Remove then add senders of ``login``, keeping the others in order. Blocking.

        Adding a sender already listed changes nothing; removing one that is not listed raises
        UsersFileError and leaves the file alone.
        """
        adding = [validate_sender(s) for s in add]
        removing = [validate_sender(s) for s in remove]

        def edit(old: tuple[str, ...]) -> tuple[str, ...]:
            for sender in removing:
                if sender not in old:
                    listed = " ".join(old) or "none"
                    raise UsersFileError(
                        self.path, f"user {login!r} has no sender {sender!r} (senders: {listed})"
                    )
            kept = tuple(s for s in old if s not in removing)
            return tuple(dict.fromkeys((*kept, *adding)))

        return self._edit(lambda cur: _replace_senders(cur, login, edit))

    def delete_user(self, login: str) -> UsersFile:
        """Remove ``login``. Blocking."""

        def change(current: UsersFile) -> tuple[UserEntry | str, ...]:
            if login not in current:
                raise NoSuchUserError(self.path, f"no user {login!r}")
            return tuple(e for e in current.lines if not _is_login(e, login))

        return self._edit(change)

    @property
    def _hasher(self) -> argon2.PasswordHasher:
        return self.hasher or argon2.PasswordHasher()

    def _edit(
        self,
        change: Callable[[UsersFile], tuple[UserEntry | str, ...] | None],
        *,
        create: bool = False,
    ) -> UsersFile:
        """Lock, re-read, apply ``change`` (None: nothing to do), write atomically."""
        with _locked_dir(self.path.parent):
            current = UsersFile.load(self.path, missing_ok=create, hasher=self.hasher)
            lines = change(current)
            if lines is None:
                return current
            data = UsersFile(path=self.path, lines=lines).render()
            signature = _write_atomically(self.path, data)
            return UsersFile(path=self.path, lines=lines, signature=signature, hasher=self.hasher)

    def render(self) -> bytes:
        """Return the file's content."""
        out = [e.render() if isinstance(e, UserEntry) else e for e in self.lines]
        return "".join(line + "\n" for line in out).encode("utf-8")


def file_signature(st: os.stat_result) -> tuple[int, ...]:
    """Return what identifies one version of a file: device, inode, size, mtime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _parse_entry(path: Path, number: int, text: str) -> UserEntry:
    login, *rest = text.split()
    if not rest:
        raise UsersFileError(path, "expected: LOGIN HASH [SENDER ...]", number)
    hash_, *senders = rest
    try:
        validate_login(login)
    except ValueError as exc:
        raise UsersFileError(path, str(exc), number) from None
    try:
        params = argon2.extract_parameters(hash_)
    except (InvalidHashError, ValueError):
        raise UsersFileError(path, f"the hash of {login!r} is not an argon2 hash", number) from None
    if params.type is not argon2.Type.ID:
        raise UsersFileError(path, f"the hash of {login!r} is not argon2id", number)
    try:
        normalised = tuple(dict.fromkeys(validate_sender(s) for s in senders))
    except ValueError as exc:
        raise UsersFileError(path, str(exc), number) from None
    return UserEntry(login=login, hash=hash_, senders=normalised)


def _is_login(line: UserEntry | str, login: str) -> bool:
    return isinstance(line, UserEntry) and line.login == login


def _replace_hash(
    current: UsersFile, login: str, new_hash: str, expect: str | None
) -> tuple[UserEntry | str, ...] | None:
    entry = current.lookup(login)
    if entry is None:
        raise NoSuchUserError(current.path, f"no user {login!r}")
    if expect is not None and entry.hash != expect:
        return None  # changed meanwhile: keep what is there
    updated = UserEntry(login=login, hash=new_hash, senders=entry.senders)
    return tuple(updated if _is_login(e, login) else e for e in current.lines)


def _replace_senders(
    current: UsersFile, login: str, edit: Callable[[tuple[str, ...]], tuple[str, ...]]
) -> tuple[UserEntry | str, ...]:
    entry = current.lookup(login)
    if entry is None:
        raise NoSuchUserError(current.path, f"no user {login!r}")
    updated = UserEntry(login=login, hash=entry.hash, senders=edit(entry.senders))
    return tuple(updated if _is_login(e, login) else e for e in current.lines)


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[None]:
    """Serialise writers (the CLI and the server's rehash) on the file's directory.

    The file itself cannot carry the lock: every rewrite replaces its inode.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomically(path: Path, data: bytes) -> tuple[int, ...]:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory.

    The new file keeps the old one's owner (when permitted) and its owner/group permission
    bits, never more than 0660; a new file is 0600 (it holds password hashes).
    """
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    mode = 0o600 if old is None else (old.st_mode & 0o660) | 0o600
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            if old is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, old.st_uid, old.st_gid)
            write_all(fd, data)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)  # make the rename itself durable
    return file_signature(st)
