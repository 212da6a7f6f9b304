r"""ratelimit: messages and recipients per login per hour, counted across reloads and restarts.

Configuration (every key optional)::

    [plugins.ratelimit]
    messages_per_hour = 200      # messages one login may submit in any hour
    recipients_per_hour = 1000   # recipients, summed over those messages
    # database = "ratelimit.sqlite3"   # default: ratelimit.sqlite3 in the [queue] dir;
    #                                  # relative paths are relative to the config file

    [plugins.ratelimit.logins]   # per-login overrides; a key left out keeps the default
    newsletter = { messages_per_hour = 2000, recipients_per_hour = 20000 }
    intern = { messages_per_hour = 20 }

Limits are positive integers; logins are matched exactly as the authentication plugin named
them (case included), and a session without a login is never counted. Unknown keys stop
the server at start (and ``check-config``) with an error naming the key.

Replies (RFC 3463 ``4.7.1``: delivery not authorized, temporary; a client queues the message
and tries again)::

    450 4.7.1 Rate limit of 200 messages per hour reached for alice, try again in 12 minutes
    450 4.7.1 Rate limit of 1000 recipients per hour reached for alice, try again in 3 minutes

The first answers ``MAIL FROM`` when the login's messages of the last hour reached the limit;
the second answers ``MAIL FROM`` when its recipients did, and ``RCPT TO`` when one more
recipient (counting those already accepted in the transaction) would pass the limit. The
wait is the time until enough of the hour's counts leave the window, rounded up to whole
minutes; when the transaction itself fills the budget, the wait is a whole hour (its
recipients count from its commit). Each refusal is logged as ``ratelimit_refused``.

What counts: a message and its recipients count when the message is committed to the queue
(the ``submitd_accepted`` observer), so a refused or abandoned transaction costs nothing.
The checks compare against committed counts; a login with several transactions in flight at
once can overshoot the limit by those transactions, at most (what the per-address session
limits in ``[limits]`` allow). Nothing is reserved at ``MAIL FROM``: there is no hook for the
end of an abandoned transaction that would give a reservation back.

Storage: a SQLite file (see :mod:`submitd_plugins._ratelimit_store` for the layout) with a
sliding hour of one-minute buckets per login. SQLite because it is in the standard library,
its commits are durable, and every server process that opens the same file shares the same
counts safely. Every database call runs in a worker thread, one at a time per file. The
open file is kept in ``config.server_stash``, so a reload keeps it (and the counts); it is
closed when the server stops. A counter file that cannot be read makes ``MAIL FROM`` fail
closed with ``451 4.3.0`` (and is logged); a count that cannot be written is logged and the
message, already queued, is accepted.

The plugin checks ``RCPT TO`` before other plugins (``tryfirst``), since one that accepts a
recipient ends that walk; at ``MAIL FROM`` it runs last, so a sender refusal (``550``) wins.
Uses only the public API: the names exported by :mod:`submitd`.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from submitd import (
    Config,
    ConfigError,
    Envelope,
    MailParams,
    Recipient,
    Reply,
    SessionInfo,
    StashKey,
    hookimpl,
    logfmt,
)

from ._login_groups import reject_unknown_keys
from ._ratelimit_store import CounterStore, Kind, SharedStore, StoreError, Usage

__all__ = [
    "DEFAULT_DATABASE",
    "LoginLimits",
    "RateLimitSettings",
    "check_mail",
    "check_rcpt",
    "refusal",
    "submitd_accepted",
    "submitd_configure",
    "submitd_mail_from",
    "submitd_rcpt_check",
    "submitd_unconfigure",
]

NAME = "ratelimit"
#: The counter file's name in the ``[queue]`` directory when ``database`` is not given.
DEFAULT_DATABASE = "ratelimit.sqlite3"
#: Longest login written into a reply (characters).
MAX_LOGIN = 64

log = logging.getLogger("submitd.plugins.ratelimit")


@dataclass(frozen=True, kw_only=True)
class LoginLimits:
    """The hourly limits of one login."""

    messages_per_hour: int = 200
    recipients_per_hour: int = 1000

    def limit(self, kind: Kind) -> int:
        """The limit on ``kind``."""
        return self.messages_per_hour if kind is Kind.MESSAGES else self.recipients_per_hour


@dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    """The validated ``[plugins.ratelimit]`` table."""

    default: LoginLimits = LoginLimits()
    logins: Mapping[str, LoginLimits] = field(default_factory=lambda: MappingProxyType({}))
    database: Path

    def limits_for(self, login: str) -> LoginLimits:
        """``login``'s limits: its override, else the defaults."""
        return self.logins.get(login, self.default)


@dataclass(frozen=True, kw_only=True)
class _State:
    settings: RateLimitSettings
    store: SharedStore


#: This configuration's settings and counter store.
STATE = StashKey[_State]()
#: Open counter stores by database path, for the server's lifetime (``config.server_stash``).
STORES = StashKey[dict[Path, SharedStore]]()

_TOP_KEYS = ("messages_per_hour", "recipients_per_hour", "logins", "database")
_LIMIT_KEYS = ("messages_per_hour", "recipients_per_hour")


def _limit(config: Config, where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(config.path, where, "must be a whole number of at least 1")
    return value


def _limits(config: Config, where: str, table: Mapping[str, Any], base: LoginLimits,
            known: tuple[str, ...]) -> tuple[LoginLimits, dict[str, Any]]:
    """Read the limit keys of ``table`` over ``base``; the other known keys are returned."""
    values: dict[str, int] = {}
    rest: dict[str, Any] = {}
    reject_unknown_keys(config, where, table, known)
    for key, value in table.items():
        if key in _LIMIT_KEYS:
            values[key] = _limit(config, f"{where}.{key}", value)
        else:
            rest[key] = value
    merged = {"messages_per_hour": base.messages_per_hour,
              "recipients_per_hour": base.recipients_per_hour, **values}
    return LoginLimits(**merged), rest


def _settings(config: Config) -> RateLimitSettings:
    where = f"plugins.{NAME}"
    default, rest = _limits(config, where, config.plugin_table(NAME), LoginLimits(), _TOP_KEYS)
    logins: dict[str, LoginLimits] = {}
    raw_logins = rest.get("logins", {})
    if not isinstance(raw_logins, Mapping):
        raise ConfigError(config.path, f"{where}.logins",
                          "must be a table of login = { messages_per_hour = N, ... }")
    for login, table in raw_logins.items():
        at = f"{where}.logins.{login}"
        if not isinstance(table, Mapping):
            raise ConfigError(config.path, at, "must be a table such as { messages_per_hour = 50 }")
        logins[login] = _limits(config, at, table, default, _LIMIT_KEYS)[0]
    raw_db = rest.get("database")
    if raw_db is None:
        database = config.queue.dir / DEFAULT_DATABASE
    else:
        if not isinstance(raw_db, str) or not raw_db:
            raise ConfigError(config.path, f"{where}.database", "must be a non-empty string")
        database = config.resolve(raw_db)
        if not database.parent.is_dir():
            raise ConfigError(config.path, f"{where}.database",
                              f"the directory {database.parent} does not exist")
        if database.is_dir():
            raise ConfigError(config.path, f"{where}.database", f"{database} is a directory")
    return RateLimitSettings(default=default, logins=MappingProxyType(logins), database=database)


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.ratelimit]``; share the counter store kept in ``server_stash``.

    Nothing is opened here: the file opens on first use, in a worker thread.
    """
    settings = _settings(config)
    stores = config.server_stash.setdefault(STORES, {})
    store = stores.get(settings.database)
    if store is None:
        store = stores[settings.database] = SharedStore(CounterStore(settings.database))
    for each in stores.values():
        each.owner = weakref.ref(config)  # the newest configuration; see submitd_unconfigure
    config.stash[STATE] = _State(settings=settings, store=store)


@hookimpl
def submitd_unconfigure(config: Config) -> None:
    """At the server's stop, close the counter files; after a reload, keep them.

    A reload configures the new configuration before it unconfigures the old one, so the
    old one is no longer the stores' owner. A reload that failed in another plugin after
    this one configured leaves an owner nobody holds, which counts as gone. Closing takes a
    moment at most (SQLite folds its WAL back into the file) and happens once the sessions
    have ended; a store used again after it was closed simply opens again.
    """
    for store in config.server_stash.get(STORES, {}).values():
        owner = store.owner() if store.owner is not None else None
        if owner is None or owner is config:
            store.store.close()


def _login_text(login: str) -> str:
    """``login`` as a reply shows it: printable ASCII, at most :data:`MAX_LOGIN` characters."""
    shown = "".join(ch if "!" <= ch <= "~" else "?" for ch in login[:MAX_LOGIN])
    return shown + ("..." if len(login) > MAX_LOGIN else "")


def refusal(kind: Kind, limit: int, login: str, wait: float) -> Reply:
    """``450 4.7.1 Rate limit of N KIND per hour reached for LOGIN, try again in M minutes``."""
    minutes = max(1, math.ceil(wait / 60.0))
    counted = kind.value if limit != 1 else kind.value.removesuffix("s")
    unit = "minute" if minutes == 1 else "minutes"
    return Reply.make(450, "4.7.1", f"Rate limit of {limit} {counted} per hour reached for "
                                    f"{_login_text(login)}, try again in {minutes} {unit}")


def _over(usage: Usage, kind: Kind, limit: int, login: str, adding: int) -> Reply | None:
    """A refusal if ``adding`` more of ``kind`` would pass ``limit``, else None."""
    excess = usage.total(kind) + adding - limit
    if excess <= 0:
        return None
    return refusal(kind, limit, login, usage.seconds_until_freed(kind, excess))


def check_mail(usage: Usage, limits: LoginLimits, login: str) -> Reply | None:
    """The ``MAIL FROM`` check: no message left this hour, or no recipient left."""
    return (_over(usage, Kind.MESSAGES, limits.messages_per_hour, login, 1)
            or _over(usage, Kind.RECIPIENTS, limits.recipients_per_hour, login, 1))


def check_rcpt(usage: Usage, limits: LoginLimits, login: str, accepted: int) -> Reply | None:
    """The ``RCPT TO`` check: room for one more recipient after the ``accepted`` ones."""
    return _over(usage, Kind.RECIPIENTS, limits.recipients_per_hour, login, accepted + 1)


async def _usage(state: _State, session: SessionInfo, login: str) -> Usage:
    try:
        return await state.store.usage(login)
    except StoreError as exc:
        log.error(logfmt("ratelimit_store_failed", session=session.session_id, error=exc))
        raise


def _log_refusal(session: SessionInfo, login: str, stage: str, reply: Reply) -> None:
    log.info(logfmt("ratelimit_refused", session=session.session_id, login=login, stage=stage,
                    reply=f"{reply.code} {reply.status} {reply.text}"))


@hookimpl(trylast=True)
async def submitd_mail_from(session: SessionInfo, sender: str, params: MailParams) -> Reply | None:
    """Refuse ``450 4.7.1`` when the login's messages (or recipients) of the hour are used up."""
    state = session.config.stash.get(STATE, None)
    login = session.username
    if state is None or login is None:
        return None
    reply = check_mail(await _usage(state, session, login), state.settings.limits_for(login),
                       login)
    if reply is not None:
        _log_refusal(session, login, "mail", reply)
    return reply


@hookimpl(tryfirst=True)
async def submitd_rcpt_check(
    session: SessionInfo, envelope: Envelope, recipient: Recipient
) -> Reply | None:
    """Refuse ``450 4.7.1`` when one more recipient would pass the login's hourly limit."""
    state = session.config.stash.get(STATE, None)
    login = session.username
    if state is None or login is None:
        return None
    usage = await _usage(state, session, login)
    reply = check_rcpt(usage, state.settings.limits_for(login), login, len(envelope.recipients))
    if reply is not None:
        _log_refusal(session, login, "rcpt", reply)
    return reply


@hookimpl
async def submitd_accepted(session: SessionInfo, envelope: Envelope, queue_id: str) -> None:
    """Count the committed message and its recipients for the login that submitted it."""
    state = session.config.stash.get(STATE, None)
    login = envelope.username or session.username
    if state is None or login is None:
        return
    try:
        await state.store.record(login, messages=1, recipients=len(envelope.recipients))
    except StoreError as exc:
        log.error(logfmt("ratelimit_store_failed", session=session.session_id,
                         queue_id=queue_id, error=exc))
        raise
