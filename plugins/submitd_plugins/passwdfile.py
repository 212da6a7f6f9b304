"""passwdfile: AUTH against an argon2id users file, and sender ownership checks.

Configuration::

    [plugins.passwdfile]
    path = "users"          # required; relative to the config file (see etc/users.example)
    max_parallel = 4        # concurrent argon2 verifications (default: number of CPUs)
    queue_timeout = "10s"   # longest wait for a verification slot before 454 4.7.0
    min_password_length = 12  # `submitd user add|passwd` refuse shorter new passwords

The file is re-read when it changes (no restart). A password hashed with outdated argon2
parameters is rehashed on the next successful login (see etc/users.example). A login may use as
envelope sender, and in the ``From:`` and ``Sender:`` header fields, only the addresses and
``@domains`` listed for it (docs/security.md §4).

Uses only the public API: the names exported by :mod:`submitd` and :mod:`submitd.passwords`.
"""

from __future__ import annotations

import email.utils
import logging
import os
import threading
from pathlib import Path

import trio

from submitd import (
    AuthResult,
    Config,
    ConfigError,
    Credentials,
    Envelope,
    MailParams,
    MessageHandle,
    Reply,
    Secret,
    SessionInfo,
    StashKey,
    hookimpl,
    logfmt,
)
from submitd.passwords import UsersFile, UsersFileError, file_signature, min_password_length

__all__ = [
    "STATE",
    "PasswdFileState",
    "submitd_auth",
    "submitd_configure",
    "submitd_data_filter",
    "submitd_mail_from",
]

NAME = "passwdfile"
_KEYS = ("path", "max_parallel", "queue_timeout", "min_password_length")
_DEFAULT_QUEUE_TIMEOUT = "10s"

log = logging.getLogger("submitd.plugins.passwdfile")
_UNREADABLE: tuple[int, ...] = ()  # stands for "stat failed" where a signature is expected


class PasswdFileState:
    """What this plugin keeps in ``config.stash``: the users, and the verification limiter.

    ``users`` is replaced (never mutated) from worker threads under ``lock`` when the file
    changes; readers on the event loop see either the old or the new version.
    """

    __slots__ = ("_broken", "limiter", "lock", "path", "queue_timeout", "rehash_failed", "users")

    def __init__(
        self, *, path: Path, users: UsersFile, max_parallel: int, queue_timeout: float
    ) -> None:
        self.path = path
        self.users = users
        self.limiter = trio.CapacityLimiter(max_parallel)
        self.queue_timeout = queue_timeout
        self.lock = threading.Lock()
        self._broken: tuple[int, ...] | None = None  # version that failed to parse (log once)
        self.rehash_failed: tuple[int, ...] | None = None  # version we could not rewrite

    def current_users(self) -> UsersFile:
        """Return the users, re-reading the file if it changed (blocking: worker thread).

        A file that became unreadable or invalid is logged once and the previous version stays
        in force, as a bad reload of the configuration would.
        """
        with self.lock:
            try:
                signature = file_signature(os.stat(self.path))
            except OSError as exc:
                if self._broken != _UNREADABLE:
                    log.error(logfmt("users_file_unreadable", path=self.path,
                                     error=exc.strerror, action="keeping the loaded one"))
                    self._broken = _UNREADABLE
                return self.users
            if signature == self.users.signature:
                self._broken = None
                return self.users
            if signature == self._broken:
                return self.users
            try:
                self.users = UsersFile.load(self.path)
            except UsersFileError as exc:
                log.error(logfmt("users_file_invalid", error=exc,
                                 action="keeping the loaded one"))
                self._broken = signature
            else:
                self._broken = None
                log.info(logfmt("users_file_reloaded", path=self.path, users=len(self.users)))
            return self.users

    def rehash(self, users: UsersFile, login: str, password: Secret) -> None:
        """Store a fresh hash for ``login`` after a successful login (blocking)."""
        entry = users.lookup(login)
        if entry is None or self.rehash_failed == users.signature:
            return  # a read-only file: do not pay for a hash that cannot be stored
        try:
            updated = users.rehash(login, password, entry.hash)
        except (OSError, UsersFileError) as exc:
            log.warning(logfmt("rehash_not_stored", user=login, path=self.path, error=exc))
            self.rehash_failed = users.signature
            return
        with self.lock:
            self.users = updated
        log.info(logfmt("rehashed", user=login))


#: Where :func:`submitd_configure` keeps this plugin's state.
STATE = StashKey[PasswdFileState]()


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.passwdfile]``, load the users file, and set up the limiter."""
    table = config.plugin_table(NAME)

    def key(name: str) -> str:
        return f"plugins.{NAME}.{name}"

    for name in table:
        if name not in _KEYS:
            raise ConfigError(config.path, key(name), f"unknown key (known: {', '.join(_KEYS)})")
    raw_path = table.get("path")
    if not isinstance(raw_path, str) or not raw_path:
        raise ConfigError(config.path, key("path"), "required: the users file (a string)")
    max_parallel = table.get("max_parallel", os.cpu_count() or 1)
    if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
        raise ConfigError(config.path, key("max_parallel"), "must be a positive integer")
    try:
        queue_timeout = config.parse_duration(table.get("queue_timeout", _DEFAULT_QUEUE_TIMEOUT))
    except ValueError as exc:
        raise ConfigError(config.path, key("queue_timeout"), str(exc)) from None
    if queue_timeout <= 0:
        raise ConfigError(config.path, key("queue_timeout"), "must be longer than zero")
    try:
        min_password_length(table)  # used by `submitd user`; checked here so start-up says so
    except ValueError as exc:
        raise ConfigError(config.path, key("min_password_length"), str(exc)) from None
    path = config.resolve(raw_path)
    try:
        users = UsersFile.load(path)
    except UsersFileError as exc:
        raise ConfigError(config.path, key("path"), str(exc)) from None
    config.stash[STATE] = PasswdFileState(
        path=path, users=users, max_parallel=max_parallel, queue_timeout=queue_timeout
    )


def _authenticate(state: PasswdFileState, login: str, password: Secret) -> AuthResult:
    """Verify in a worker thread; rehash on success if the parameters are outdated."""
    users = state.current_users()
    result = users.verify(login, password)
    if not result.ok:
        return AuthResult.deny()
    if result.needs_rehash:
        state.rehash(users, login, password)
    return AuthResult.ok(login)


@hookimpl
async def submitd_auth(session: SessionInfo, credentials: Credentials) -> AuthResult | None:
    """Check the login and password against the users file (off the event loop).

    At most ``max_parallel`` verifications run at once; a login that waits longer than
    ``queue_timeout`` for a slot is refused with ``454 4.7.0`` (docs/security.md §3).
    """
    state = session.config.stash[STATE]
    with trio.move_on_after(state.queue_timeout) as waiting:
        await state.limiter.acquire()
    if waiting.cancelled_caught:  # a cancelled acquire() never holds the limiter
        return AuthResult.deny(
            Reply.make(454, "4.7.0", "Temporary authentication failure, try again later")
        )
    try:
        return await trio.to_thread.run_sync(
            _authenticate, state, credentials.username, credentials.password
        )
    finally:
        state.limiter.release()


def _printable(text: str, limit: int = 200) -> str:
    """Make client-supplied text safe for a reply line (no controls, bounded length)."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _refuse(what: str, address: str, login: str | None) -> Reply:
    user = _printable(login or "(none)", 100)
    return Reply.make(550, "5.7.1", f"{what} <{_printable(address)}> not owned by user {user}")


def _allowed(session: SessionInfo, address: str) -> bool:
    login = session.username
    users = session.config.stash[STATE].users
    return login is not None and users.sender_allowed(login, address)


@hookimpl
def submitd_mail_from(session: SessionInfo, sender: str, params: MailParams) -> Reply | None:
    """Refuse an envelope sender the login may not use (``<>`` only if listed as ``<>``)."""
    if _allowed(session, sender):
        return None
    return _refuse("Sender address", sender, session.username)


@hookimpl
def submitd_data_filter(
    session: SessionInfo, envelope: Envelope, message: MessageHandle
) -> Reply | None:
    """Refuse a message whose ``From:`` or ``Sender:`` names an address the login may not use.

    Addresses are taken from the parsed fields, never from display names. A message without
    ``From:`` passes (a later plugin adds one); a field without a usable address does not.
    """
    for field in ("From", "Sender"):
        values = message.get_all(field)
        if not values:
            continue
        addresses = [addr for _name, addr in email.utils.getaddresses(values)]
        if not addresses:
            return Reply.make(550, "5.7.1", f"Header {field}: holds no address")
        for address in addresses:
            if not address or not _allowed(session, address):
                return _refuse(f"Header {field}: address", address, session.username)
    return None
