"""Table checks the built-in plugins share, and ``[plugins.NAME.group.GROUP]`` tables.

``relay`` and ``size`` both let an operator give several logins their own rule. The tables
are read the same way: known keys only, ``logins`` required, every login valid and in one
group at most. Each error names the file and the dotted key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from submitd import Config, ConfigError
from submitd.passwords import validate_login

__all__ = ["login_groups", "reject_unknown_keys", "string_list"]


def reject_unknown_keys(
    config: Config, where: str, table: Mapping[str, Any], known: Sequence[str]
) -> None:
    """Raise a ConfigError naming ``where.KEY`` for the first key of ``table`` not in ``known``."""
    for key in table:
        if key not in known:
            raise ConfigError(config.path, f"{where}.{key}",
                              f"unknown key (known: {', '.join(known)})")


def string_list(config: Config, where: str, value: object) -> list[str]:
    """``value`` as a list of strings, or a ConfigError naming ``where``."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(config.path, where, "must be a list of strings")
    return list(value)


def login_groups(
    config: Config, where: str, table: object, keys: Sequence[str], *, required: Sequence[str]
) -> Iterator[tuple[str, Mapping[str, Any], list[str]]]:
    """Walk the group tables under ``where``; yield each group's dotted key, table and logins.

    ``keys`` are the keys a group may hold (``logins`` among them), ``required`` those it
    must hold. A login listed in two groups is an error naming the first group.
    """
    plugin = where.rsplit(".", 1)[0]
    if not isinstance(table, Mapping):
        raise ConfigError(config.path, where, f"must hold [{plugin}.group.NAME] tables")
    owner: dict[str, str] = {}
    for name, group in table.items():
        key = f"{where}.{name}"
        if not isinstance(group, Mapping):
            raise ConfigError(config.path, key, "must be a table")
        reject_unknown_keys(config, key, group, keys)
        for item in required:
            if item not in group:
                raise ConfigError(config.path, f"{key}.{item}", "required")
        logins = string_list(config, f"{key}.logins", group["logins"])
        for login in logins:
            try:
                validate_login(login)
            except ValueError as exc:
                raise ConfigError(config.path, f"{key}.logins", str(exc)) from None
            if login in owner:
                raise ConfigError(config.path, f"{key}.logins",
                                  f"login {login!r} is already in group {owner[login]!r}")
            owner[login] = name
        yield key, group, logins
