"""size: message size limits per login or group, below ``[limits] max_message_size``.

Configuration (every key optional; the table itself may be left out)::

    [plugins.size]
    max_message_size = 10485760       # bytes, for every login (default: [limits] max_message_size)

    [plugins.size.group.press]        # these logins get their own limit
    logins = ["alice", "bob"]
    max_message_size = 26214400

Sizes are integers in bytes, like ``[limits] max_message_size``, which stays the ceiling for
everyone (it is the ``SIZE`` the server advertises, RFC 1870) and which no limit here may
exceed. A login may be in one group only. A login over its limit is refused twice over:

- at ``MAIL FROM`` when the client declares the size (``SIZE=``, RFC 1870 §6.2), before any
  byte of the message is sent;
- after ``DATA`` when the stored message turns out larger (the declared size is only a hint),
  so nothing is queued.

Both refusals read ``552 5.3.4 Message size exceeds the limit of user alice (10485760
bytes)``. Unknown keys and values that are not positive integers stop the server at start
(and ``check-config``).

Uses only the public API: the names exported by :mod:`submitd` and :mod:`submitd.passwords`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from submitd import (
    Config,
    ConfigError,
    Envelope,
    MailParams,
    MessageHandle,
    Reply,
    SessionInfo,
    StashKey,
    hookimpl,
)

from ._login_groups import login_groups, reject_unknown_keys

__all__ = [
    "LIMITS",
    "SizeLimits",
    "submitd_configure",
    "submitd_data_filter",
    "submitd_mail_from",
]

NAME = "size"
_KEYS = ("max_message_size", "group")
_GROUP_KEYS = ("logins", "max_message_size")


@dataclass(frozen=True, kw_only=True)
class SizeLimits:
    """The validated ``[plugins.size]`` table: the default limit and the logins' own."""

    default: int
    by_login: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def limit_for(self, login: str | None) -> int:
        """The largest message ``login`` may send, in bytes."""
        return self.by_login.get(login, self.default) if login is not None else self.default


#: Where :func:`submitd_configure` keeps the limits.
LIMITS = StashKey[SizeLimits]()


def _size(config: Config, where: str, value: object) -> int:
    ceiling = config.limits.max_message_size
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(config.path, where, "must be a positive integer (bytes)")
    if value > ceiling:
        raise ConfigError(config.path, where,
                          f"must not exceed [limits] max_message_size ({ceiling})")
    return value


def _groups(config: Config, table: object) -> Mapping[str, int]:
    by_login: dict[str, int] = {}
    groups = login_groups(config, f"plugins.{NAME}.group", table, _GROUP_KEYS,
                          required=_GROUP_KEYS)
    for key, group, logins in groups:
        limit = _size(config, f"{key}.max_message_size", group["max_message_size"])
        by_login.update(dict.fromkeys(logins, limit))
    return MappingProxyType(by_login)


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.size]`` into :class:`SizeLimits` in ``config.stash``."""
    table = config.plugin_table(NAME)
    reject_unknown_keys(config, f"plugins.{NAME}", table, _KEYS)
    default = config.limits.max_message_size
    if "max_message_size" in table:
        default = _size(config, f"plugins.{NAME}.max_message_size", table["max_message_size"])
    config.stash[LIMITS] = SizeLimits(default=default,
                                      by_login=_groups(config, table.get("group", {})))


def _refusal(session: SessionInfo, size: int) -> Reply | None:
    limits = session.config.stash.get(LIMITS, None)
    limit = limits.limit_for(session.username) if limits is not None else None
    if limit is None or size <= limit:
        return None
    user = "".join(c if c.isprintable() else "?" for c in session.username or "(none)")[:100]
    return Reply.make(552, "5.3.4", f"Message size exceeds the limit of user {user} "
                                    f"({limit} bytes)")


@hookimpl
def submitd_mail_from(session: SessionInfo, sender: str, params: MailParams) -> Reply | None:
    """Refuse a declared ``SIZE=`` above the login's limit (RFC 1870 §6.2)."""
    return None if params.size is None else _refusal(session, params.size)


@hookimpl
def submitd_data_filter(
    session: SessionInfo, envelope: Envelope, message: MessageHandle
) -> Reply | None:
    """Refuse a stored message larger than the login's limit (nothing is queued)."""
    return _refusal(session, message.size)
