"""Load plugins from the ``submitd`` entry-point group, restricted to ``[plugins] enable``.

An installed package cannot add a hook to a mail server unnoticed: only the names the
operator lists are registered, in the order listed (so later names run first, as pluggy calls
the most recently registered implementation first).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable

import pluggy

from . import hookspec
from .config import Config
from .errors import ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_plugins",
    "configure_plugins",
    "create_plugin_manager",
    "unconfigure_plugins",
]

#: The entry-point group every plugin, built-in or third-party, is registered under.
ENTRY_POINT_GROUP = "submitd"


def available_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Every plugin installed under the ``submitd`` entry-point group, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def create_plugin_manager(
    config: Config, *, extra: Iterable[tuple[str, object]] = ()
) -> pluggy.PluginManager:
    """Build the plugin manager: the hookspecs, the enabled entry points, then ``extra``.

    ``extra`` registers in-process plugins by name (tests, embedding applications); they are
    registered after the enabled ones and so run first. Raises :class:`ConfigError` naming
    ``plugins.enable`` for a name that is not installed or fails to import.
    """
    pm = pluggy.PluginManager("submitd")
    pm.add_hookspecs(hookspec)
    installed = available_plugins()
    for index, name in enumerate(config.plugins.enable):
        key = f"plugins.enable[{index}]"
        ep = installed.get(name)
        if ep is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigError(config.path, key, f"no plugin named {name!r} is installed ({known})")
        try:
            plugin = ep.load()
        except Exception as exc:  # an import error in a plugin is a configuration problem
            raise ConfigError(config.path, key, f"plugin {name!r} failed to load: {exc}") from exc
        _register(pm, config, key, name, plugin)
    for name, plugin in extra:
        _register(pm, config, "plugins", name, plugin)
    return pm


def _register(
    pm: pluggy.PluginManager, config: Config, key: str, name: str, plugin: object
) -> None:
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise ConfigError(config.path, key, f"plugin {name!r} cannot be registered: {exc}") from exc


def configure_plugins(pm: pluggy.PluginManager, config: Config) -> None:
    """Call every ``submitd_configure`` with ``config``; a plugin's ConfigError propagates.

    A table under ``[plugins.NAME]`` for a plugin that is not enabled is an error too: it is
    almost always a typo or a forgotten entry in ``enable``.
    """
    registered = {name for name, _ in pm.list_name_plugin()}
    for name in config.plugins.tables:
        if name not in registered:
            raise ConfigError(
                config.path, f"plugins.{name}", f"plugin {name!r} is configured but not enabled"
            )
    pm.hook.submitd_configure(config=config)


def unconfigure_plugins(pm: pluggy.PluginManager, config: Config) -> None:
    """Call every ``submitd_unconfigure`` with ``config``."""
    pm.hook.submitd_unconfigure(config=config)
