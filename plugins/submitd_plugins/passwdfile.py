"""passwdfile: AUTH against an argon2id users file.

Configuration::

    [plugins.passwdfile]
    path = "users"          # required; relative to the config file (see etc/users.example)
    max_parallel = 4        # concurrent argon2 verifications (default: number of CPUs)
    queue_timeout = "10s"   # longest wait for a verification slot before 454 4.7.0
    min_password_length = 12  # `submitd user add|passwd` refuse shorter new passwords
    cache_ttl = "10m"       # how long a verified login and password skip argon2 (0: never)

The file is re-read when it changes (no restart). A password hashed with outdated argon2
parameters is rehashed on the next successful login (see etc/users.example).

A successful verification is remembered for ``cache_ttl`` in a
:class:`~submitd.passwords.CredentialCache` (an HMAC digest under a per-process random key,
never the password), so an application that logs in once per message pays for argon2 once.
Failures are never remembered; a password change, a deleted login or any new version of the
users file ends what was remembered at once. The failed-login throttle applies to every
attempt as before: the server checks it before this plugin is asked.

Logins that arrive together with the same login and password (twenty connections of one
application just after a start, before anything is remembered) are verified once: the first
runs argon2 and the others wait for its answer, matched by the same HMAC digest, so only an
identical password shares it. A success is shared; a refusal is shared as a refusal (each
waiter is refused, and counted by the throttle, on its own); if the first login goes away
before it has an answer, a waiter verifies in its place. With ``cache_ttl = 0`` every login
verifies on its own.

The senders listed for each login (addresses, ``@domains``, ``<>``) are published as
:data:`submitd.SENDERS` under the name ``passwdfile``; this plugin does not check them itself.
The ``relay`` plugin enforces them at MAIL FROM and on the ``From:`` and ``Sender:`` header
fields, whichever plugin authenticated the login (docs/security.md §4).

Uses only the public API: the names exported by :mod:`submitd`, :mod:`submitd.passwords` and
:mod:`submitd.durable`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import trio

from submitd import (
    SENDERS,
    AuthResult,
    Config,
    ConfigError,
    Credentials,
    Reply,
    Secret,
    SessionInfo,
    StashKey,
    hookimpl,
    logfmt,
)
from submitd.durable import run_blocking
from submitd.passwords import (
    CredentialCache,
    UsersFile,
    UsersFileError,
    file_signature,
    min_password_length,
)

from ._login_groups import reject_unknown_keys

__all__ = [
    "STATE",
    "PasswdFileState",
    "UsersSenders",
    "submitd_auth",
    "submitd_configure",
]

NAME = "passwdfile"
_KEYS = ("path", "max_parallel", "queue_timeout", "min_password_length", "cache_ttl")
_DEFAULT_QUEUE_TIMEOUT = "10s"
_DEFAULT_CACHE_TTL = "10m"

log = logging.getLogger("submitd.plugins.passwdfile")
_UNREADABLE: tuple[int, ...] = ()  # stands for "stat failed" where a signature is expected


class PasswdFileState:
    """What this plugin keeps in ``config.stash``: the users, the verification limiter, the cache.

    ``users`` is replaced (never mutated) from worker threads under ``lock`` when the file
    changes; readers on the event loop see either the old or the new version. ``cache`` is
    used on the event loop only. A reload builds a new state, with an empty cache.
    """

    __slots__ = ("_broken", "cache", "in_flight", "limiter", "lock", "path", "queue_timeout",
                 "rehash_failed", "users")

    def __init__(
        self,
        *,
        path: Path,
        users: UsersFile,
        max_parallel: int,
        queue_timeout: float,
        cache: CredentialCache | None = None,
    ) -> None:
        self.path = path
        self.users = users
        self.limiter = trio.CapacityLimiter(max_parallel)
        self.cache = cache if cache is not None else CredentialCache(ttl=0)
        #: Verifications under way, by credentials digest (event loop only).
        self.in_flight: dict[bytes, _Verification] = {}
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

    def rehash(self, users: UsersFile, login: str, password: Secret) -> bool:
        """Store a fresh hash for ``login`` after a successful login (blocking).

        Return True when the file may have changed (the login's hash in ``users`` is no
        longer the one on disk), False when ``users`` stays in force (a read-only file).
        """
        entry = users.lookup(login)
        if entry is None:
            return True
        if self.rehash_failed == users.signature:
            return False  # a read-only file: do not pay for a hash that cannot be stored
        try:
            updated = users.rehash(login, password, entry.hash)
        except (OSError, UsersFileError) as exc:
            log.warning(logfmt("rehash_not_stored", user=login, path=self.path, error=exc))
            self.rehash_failed = users.signature
            return False
        with self.lock:
            self.users = updated
        log.info(logfmt("rehashed", user=login))
        return True


class _Verification:
    """One verification under way, which logins with the same digest wait for."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        #: The answer; None until ``done``, and still None if the verifier went away.
        self.result: AuthResult | None = None


class UsersSenders(Mapping[str, tuple[str, ...]]):
    """The senders of each login, read from the users file currently in force.

    What this plugin publishes as :data:`submitd.SENDERS`: a live view, so a users file
    re-read after an edit applies to the next MAIL FROM without a reload.
    """

    __slots__ = ("_state",)

    def __init__(self, state: PasswdFileState) -> None:
        self._state = state

    def __getitem__(self, login: str) -> tuple[str, ...]:
        entry = self._state.users.lookup(login)
        if entry is None:
            raise KeyError(login)
        return entry.senders

    def __iter__(self) -> Iterator[str]:
        return (entry.login for entry in self._state.users.entries)

    def __len__(self) -> int:
        return len(self._state.users)


#: Where :func:`submitd_configure` keeps this plugin's state.
STATE = StashKey[PasswdFileState]()


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.passwdfile]``, load the users file, set up the limiter.

    Publishes the logins' senders as :data:`submitd.SENDERS` ``["passwdfile"]``.
    """
    table = config.plugin_table(NAME)

    def key(name: str) -> str:
        return f"plugins.{NAME}.{name}"

    reject_unknown_keys(config, f"plugins.{NAME}", table, _KEYS)
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
        cache_ttl = config.parse_duration(table.get("cache_ttl", _DEFAULT_CACHE_TTL))
    except ValueError as exc:
        raise ConfigError(config.path, key("cache_ttl"), str(exc)) from None
    if cache_ttl < 0:
        raise ConfigError(config.path, key("cache_ttl"), "must be zero (no cache) or longer")
    try:
        min_password_length(table)  # used by `submitd user`; checked here so start-up says so
    except ValueError as exc:
        raise ConfigError(config.path, key("min_password_length"), str(exc)) from None
    path = config.resolve(raw_path)
    try:
        users = UsersFile.load(path)
    except UsersFileError as exc:
        raise ConfigError(config.path, key("path"), str(exc)) from None
    state = PasswdFileState(
        path=path, users=users, max_parallel=max_parallel, queue_timeout=queue_timeout,
        cache=CredentialCache(ttl=cache_ttl),
    )
    config.stash[STATE] = state
    config.stash.setdefault(SENDERS, {})[NAME] = UsersSenders(state)


def _authenticate(
    state: PasswdFileState, login: str, password: Secret
) -> tuple[AuthResult, UsersFile | None]:
    """Verify in a worker thread; rehash on success if the parameters are outdated.

    Also return the users file the password was verified against, when it is still the
    version in force (what the cache may remember the success against), else None.
    """
    users = state.current_users()
    result = users.verify(login, password)
    if not result.ok:
        return AuthResult.deny(), None
    if result.needs_rehash and state.rehash(users, login, password):
        # A new version of the file: the next login verifies once against it, then hits.
        return AuthResult.ok(login), None
    return AuthResult.ok(login), users


@hookimpl
async def submitd_auth(session: SessionInfo, credentials: Credentials) -> AuthResult | None:
    """Check the login and password against the users file (off the event loop).

    A login and password verified less than ``cache_ttl`` ago against the same users file
    are accepted without argon2 (one ``stat`` of the file, in a worker thread). A login whose
    login and password are being verified for another connection right now waits for that
    answer instead of verifying again. Otherwise at most ``max_parallel`` verifications run
    at once; a login that waits longer than ``queue_timeout`` for a slot is refused with
    ``454 4.7.0`` (docs/security.md §3).
    """
    state = session.config.stash[STATE]
    login, password = credentials.username, credentials.password
    cache = state.cache
    digest = cache.digest(login, password)  # None when the cache is disabled
    while True:
        if cache.may_hold(digest):
            users = await run_blocking(state.current_users)
            if cache.verified(digest, login, users):
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(logfmt("auth_cached", session=session.session_id, user=login))
                return AuthResult.ok(login)
        if digest is None:
            return await _verify(state, login, password, None)
        flight = state.in_flight.get(digest)
        if flight is None:
            break
        await flight.done.wait()
        if flight.result is not None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(logfmt("auth_shared", session=session.session_id, user=login,
                                 accepted=flight.result.accepted))
            return flight.result
        # The verifier went away without an answer: look again, and verify if nobody does.
    flight = state.in_flight[digest] = _Verification()
    try:
        flight.result = await _verify(state, login, password, digest)
    finally:
        del state.in_flight[digest]
        flight.done.set()
    return flight.result


async def _verify(
    state: PasswdFileState, login: str, password: Secret, digest: bytes | None
) -> AuthResult:
    """Run one verification under the limiter; remember a success under ``digest``."""
    with trio.move_on_after(state.queue_timeout) as waiting:
        await state.limiter.acquire()
    if waiting.cancelled_caught:  # a cancelled acquire() never holds the limiter
        return AuthResult.deny(
            Reply.make(454, "4.7.0", "Temporary authentication failure, try again later")
        )
    try:
        result, verified_against = await trio.to_thread.run_sync(
            _authenticate, state, login, password
        )
    finally:
        state.limiter.release()
    if verified_against is not None:
        state.cache.store(digest, login, verified_against)
    return result
