"""The verified-credentials cache: a client that logs in again does not pay for argon2 again.

An application that connects once per message sends the same login and password every time;
verifying them costs an argon2id hash (~100-250 ms of CPU) each time. The cache remembers
that a login and password were verified, for ``ttl`` seconds, without remembering the
password: its key is HMAC-SHA256 (RFC 2104) under a random key made when the cache is (one
per process, never written anywhere) over the login and the password, each prefixed with its
length so that no two pairs encode alike. Only that digest is kept, with the login and the
hash it was verified against.

Never weaker than verifying again:

* only successes are stored (the caller stores after a verification that succeeded), so a
  wrong password always costs a full verification;
* an entry counts only while the login's hash in the users file is the one it was verified
  against: a changed password or a deleted login misses at once;
* a new version of the users file (any edit, a rehash) clears every entry;
* an entry expires ``ttl`` seconds after it was stored, whatever its use; ``ttl = 0``
  disables the cache;
* at most ``max_entries`` entries, the least recently used going first. Entries come only
  from verified credentials, one valid password per login, so the bound is reached only with
  that many logins in the users file.

Plain object, no I/O, used from the event loop only; the clock can be injected for tests.
Failed-login throttling is done before any of this (docs/security.md §3).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .secret import Secret

if TYPE_CHECKING:
    from .passwords import UsersFile

__all__ = ["DEFAULT_CACHE_ENTRIES", "CredentialCache"]

#: The most entries a :class:`CredentialCache` holds by default. An entry is about 300 bytes,
#: so the bound is about 3 MiB; a users file with more logins than this in daily use only
#: makes the least recently used of them verify again.
DEFAULT_CACHE_ENTRIES = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class _Entry:
    login: str
    hash: str
    expires: float


class CredentialCache:
    """Verified login and password pairs, keyed by an HMAC digest (see the module).

    ``ttl`` is in seconds (0 disables the cache); ``clock`` returns seconds
    (``time.monotonic`` unless injected). ``hits`` counts the logins answered from the cache.
    """

    __slots__ = ("_clock", "_entries", "_key", "_signature", "hits", "max_entries", "ttl")

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or max_entries < 1:
            raise ValueError("ttl must be >= 0 and max_entries >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._signature: tuple[int, ...] | None = None  # the users file the entries came from
        #: Logins answered from the cache (for tests and the log; never the digests).
        self.hits = 0

    def __repr__(self) -> str:
        return f"<CredentialCache ttl={self.ttl:g}s entries={len(self._entries)}>"

    def __len__(self) -> int:
        """The number of entries held (expired ones included until they are looked up)."""
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        """False when ``ttl`` is 0: nothing is stored and nothing hits."""
        return self.ttl > 0

    def digest(self, login: str, password: Secret) -> bytes | None:
        """The key of ``login`` and ``password``, or None when the cache is disabled.

        HMAC-SHA256 over ``len(login) || login || len(password) || password`` (UTF-8, lengths
        as 4-byte big-endian integers). Microseconds: cheap enough for the event loop.
        """
        if not self.enabled:
            return None
        user = login.encode("utf-8", "surrogatepass")
        secret = password.reveal().encode("utf-8", "surrogatepass")
        message = b"".join(
            (len(user).to_bytes(4, "big"), user, len(secret).to_bytes(4, "big"), secret)
        )
        return hmac.digest(self._key, message, hashlib.sha256)

    def may_hold(self, digest: bytes | None) -> bool:
        """Whether ``digest`` has an unexpired entry (before the users file is consulted).

        A cheap first look: when it is False the caller verifies at once; when it is True the
        caller gets the users file in force and asks :meth:`verified`.
        """
        if digest is None:
            return False
        entry = self._entries.get(digest)
        if entry is None:
            return False
        if entry.expires <= self._clock():
            del self._entries[digest]
            return False
        return True

    def verified(self, digest: bytes | None, login: str, users: UsersFile) -> bool:
        """Whether ``login`` and the password behind ``digest`` were verified against ``users``.

        ``users`` is the users file in force now. A hit counts in :attr:`hits` and becomes the
        most recently used entry; a stale entry (expired, another login, a changed hash) is
        dropped; a new version of the file clears the cache.
        """
        if digest is None:
            return False
        self._follow(users)
        entry = self._entries.get(digest)
        if entry is None:
            return False
        current = users.lookup(login)
        if (
            entry.expires <= self._clock()
            or entry.login != login
            or current is None
            or not hmac.compare_digest(current.hash, entry.hash)
        ):
            del self._entries[digest]
            return False
        self._entries.move_to_end(digest)
        self.hits += 1
        return True

    def store(self, digest: bytes | None, login: str, users: UsersFile) -> None:
        """Remember that ``login`` just verified against ``users`` (successes only!).

        ``users`` is the version the password was verified against, after any rehash; the
        entry holds the login's hash in it. Nothing is stored when the cache is disabled or
        the login is not in ``users``.
        """
        if digest is None:
            return
        self._follow(users)
        current = users.lookup(login)
        if current is None:
            return
        self._entries[digest] = _Entry(
            login=login, hash=current.hash, expires=self._clock() + self.ttl
        )
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()

    def _follow(self, users: UsersFile) -> None:
        """Clear the cache when ``users`` is another version of the file than the entries'."""
        if users.signature != self._signature:
            self._entries.clear()
            self._signature = users.signature
