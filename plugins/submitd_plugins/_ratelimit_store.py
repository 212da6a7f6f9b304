"""The counters behind the ``ratelimit`` plugin: one SQLite file of one-minute buckets per login.

Why SQLite: :mod:`sqlite3` is in the standard library (no new dependency); a committed
write survives a crash of the process and a restart; and any number of processes may open
the same file at once, SQLite's own file locks keeping their updates whole. Journal mode is
WAL (readers never wait for the writer) with ``synchronous = NORMAL``: a commit survives the
process being killed, and a power cut can lose at most the last few counts, never corrupt
the file. A writer that finds the file locked waits up to :data:`BUSY_TIMEOUT` seconds.

Layout (``PRAGMA user_version = 1``)::

    CREATE TABLE buckets (login TEXT, minute INTEGER, messages INTEGER, recipients INTEGER,
                          PRIMARY KEY (login, minute)) WITHOUT ROWID;
    CREATE INDEX buckets_by_minute ON buckets (minute);

``minute`` is the Unix time divided by 60. The window is the :data:`WINDOW_MINUTES` buckets
up to and including the current one, so what counts is the last 59 to 60 minutes: a sliding
hour with one-minute steps. Recording adds to the current bucket with one upsert, so
concurrent writers never lose an update. Rows that left the window are deleted at most once
a minute by each process that records; the file holds at most 60 rows per login that sent
in the last hour (about 30 bytes each).

:class:`CounterStore` is blocking and thread-safe (a lock serialises its calls);
:class:`SharedStore` is what the hooks use: every call runs in a worker thread
(:func:`trio.to_thread.run_sync`) under a ``CapacityLimiter(1)``, never on the event loop.
The connection opens on first use, in that worker thread, so ``check-config`` creates no
file; a closed store opens again on its next use.
"""

from __future__ import annotations

import enum
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

__all__ = [
    "BUSY_TIMEOUT",
    "WINDOW_MINUTES",
    "Bucket",
    "CounterStore",
    "Kind",
    "SharedStore",
    "StoreError",
    "Usage",
    "wall_clock",
]

#: Seconds a write waits for another process's lock before failing (below any hook deadline).
BUSY_TIMEOUT = 5.0
#: One-minute buckets in the sliding window (one hour).
WINDOW_MINUTES = 60
SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS buckets (login TEXT NOT NULL, minute INTEGER NOT NULL, "
    "messages INTEGER NOT NULL, recipients INTEGER NOT NULL, PRIMARY KEY (login, minute)) "
    "WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS buckets_by_minute ON buckets (minute)",
)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

T = TypeVar("T")


class StoreError(Exception):
    """The counter file cannot be used (unreadable, not SQLite, a newer layout, locked too long)."""


class Kind(enum.Enum):
    """What a limit counts."""

    MESSAGES = "messages"
    RECIPIENTS = "recipients"


@dataclass(frozen=True, kw_only=True)
class Bucket:
    """What one login committed during one minute (``minute`` = Unix time // 60)."""

    minute: int
    messages: int
    recipients: int

    def count(self, kind: Kind) -> int:
        """The messages or the recipients of this bucket."""
        return self.messages if kind is Kind.MESSAGES else self.recipients


@dataclass(frozen=True, kw_only=True)
class Usage:
    """One login's committed counts in the window at ``now``; ``buckets`` oldest first."""

    now: float
    buckets: tuple[Bucket, ...] = ()

    def total(self, kind: Kind) -> int:
        """Messages or recipients committed in the window."""
        return sum(b.count(kind) for b in self.buckets)

    def seconds_until_freed(self, kind: Kind, amount: int) -> float:
        """Seconds until ``amount`` units of ``kind`` have left the window.

        A bucket leaves the window :data:`WINDOW_MINUTES` minutes after its minute began. When
        the window does not hold ``amount`` (what must leave is still in flight, not yet
        committed), the answer is a whole window: it will leave an hour after its commit.
        """
        freed = 0
        for bucket in self.buckets:
            freed += bucket.count(kind)
            if freed >= amount:
                return max(0.0, (bucket.minute + WINDOW_MINUTES) * 60.0 - self.now)
        return WINDOW_MINUTES * 60.0


def wall_clock() -> float:
    """The Unix time: what counts are stamped with (shared by processes, kept over restarts)."""
    return time.time()


def _minute(now: float) -> int:
    return math.floor(now / 60.0)


class CounterStore:
    """Per-login counters in the SQLite file ``path`` (blocking; call from a worker thread).

    ``clock`` gives the Unix time (default :func:`wall_clock`; tests inject one). The
    connection opens on first use and may be shared by threads: every call holds the lock.
    """

    def __init__(
        self, path: Path, *, clock: Callable[[], float] | None = None,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        self.path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pruned_minute: int | None = None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else wall_clock()

    @property
    def is_open(self) -> bool:
        """Whether the file is open now (it opens again on the next call after :meth:`close`)."""
        return self._db is not None

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            # Created owner-only: it names every login that sent mail. SQLite gives the -wal
            # and -shm files the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o600))
            db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                                 check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                (version,) = db.execute("PRAGMA user_version").fetchone()
                if version not in (0, SCHEMA_VERSION):
                    raise StoreError(f"{self.path} has layout {version}, this version reads "
                                     f"{SCHEMA_VERSION}")
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot use {self.path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            db = self._open()
            try:
                return work(db)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    def usage(self, login: str) -> Usage:
        """``login``'s counts in the window now."""
        now = self._now()
        first = _minute(now) - WINDOW_MINUTES + 1

        def read(db: sqlite3.Connection) -> Usage:
            rows = db.execute(
                "SELECT minute, messages, recipients FROM buckets "
                "WHERE login = ? AND minute >= ? ORDER BY minute", (login, first),
            ).fetchall()
            return Usage(now=now, buckets=tuple(
                Bucket(minute=m, messages=n, recipients=r) for m, n, r in rows))

        return self._call(read)

    def record(self, login: str, *, messages: int = 1, recipients: int = 0) -> None:
        """Add a committed message (and its recipients) to ``login``'s current minute."""
        minute = _minute(self._now())

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO buckets (login, minute, messages, recipients) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (login, minute) DO UPDATE SET "
                "messages = messages + excluded.messages, "
                "recipients = recipients + excluded.recipients",
                (login, minute, messages, recipients),
            )
            if self._pruned_minute != minute:
                self._prune(db, minute)

        self._call(write)

    def prune(self) -> int:
        """Delete the rows that left the window; the number deleted."""
        minute = _minute(self._now())
        return self._call(lambda db: self._prune(db, minute))

    def _prune(self, db: sqlite3.Connection, minute: int) -> int:
        cursor = db.execute("DELETE FROM buckets WHERE minute <= ?",
                            (minute - WINDOW_MINUTES,))
        self._pruned_minute = minute
        return cursor.rowcount

    def rows(self) -> int:
        """How many rows the file holds (every login)."""
        return self._call(lambda db: int(db.execute("SELECT count(*) FROM buckets")
                                         .fetchone()[0]))

    def close(self) -> None:
        """Close the file (SQLite folds the WAL back in); the next call opens it again."""
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()


class SharedStore:
    """A :class:`CounterStore` for async hooks: one worker thread at a time per database.

    ``owner`` is the configuration that last configured it; the plugin uses it to tell the
    server's stop (close) from the end of a configuration replaced by a reload (keep).
    """

    def __init__(self, store: CounterStore) -> None:
        self.store = store
        self.owner: weakref.ref[Any] | None = None
        self._limiter: trio.CapacityLimiter | None = None

    def _one_at_a_time(self) -> trio.CapacityLimiter:
        # Made on first use, on the event loop (configure may run in a worker thread).
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(1)
        return self._limiter

    async def usage(self, login: str) -> Usage:
        """``login``'s counts in the window (read in a worker thread)."""
        limiter = self._one_at_a_time()
        return await trio.to_thread.run_sync(self.store.usage, login, limiter=limiter)

    async def record(self, login: str, *, messages: int = 1, recipients: int = 0) -> None:
        """Count a committed message and its recipients (written in a worker thread)."""
        limiter = self._one_at_a_time()
        await trio.to_thread.run_sync(
            lambda: self.store.record(login, messages=messages, recipients=recipients),
            limiter=limiter,
        )
