"""Load plugins from the ``submitd`` entry-point group, restricted to ``[plugins] enable``.

An installed package cannot add a hook to a mail server unnoticed: only the names the
operator lists are registered, in the order listed (so later names run first, as pluggy calls
the most recently registered implementation first).

A plugin that implements a hook submitd does not know (``submitd_data_filer``) or defines a
``submitd_*`` hook function without ``@submitd.hookimpl`` would silently never be called: both
are refused with a :class:`ConfigError` naming the plugin's ``plugins.enable[i]`` entry, at
start-up and by ``submitd check-config``.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
from collections.abc import Iterable

import pluggy

from . import hookspec
from ._logfmt import logfmt
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

_PREFIX = "submitd_"
#: The attribute ``@submitd.hookimpl`` sets on an implementation.
_IMPL_ATTR = "submitd_impl"

log = logging.getLogger("submitd.plugins")


def available_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Every plugin installed under the ``submitd`` entry-point group, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def create_plugin_manager(
    config: Config, *, extra: Iterable[tuple[str, object]] = ()
) -> pluggy.PluginManager:
    """Build the plugin manager: the hookspecs, the enabled entry points, then ``extra``.

    ``extra`` registers in-process plugins by name (tests, embedding applications); they are
    registered after the enabled ones and so run first. Raises :class:`ConfigError` naming
    ``plugins.enable[i]`` for a name that is not installed, fails to import, or implements a
    hook submitd does not know. Logs ``event=plugins_loaded`` with each plugin and its
    distribution's version.
    """
    pm = pluggy.PluginManager("submitd")
    pm.add_hookspecs(hookspec)
    installed = available_plugins()
    loaded: list[str] = []
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
        loaded.append(f"{name}:{ep.dist.version if ep.dist is not None else '-'}")
    for name, plugin in extra:
        _register(pm, config, "plugins", name, plugin)
        loaded.append(f"{name}:{getattr(plugin, '__version__', 'in-process')}")
    log.info(logfmt("plugins_loaded", names=",".join(loaded) or "-", count=len(loaded)))
    return pm


def _register(
    pm: pluggy.PluginManager, config: Config, key: str, name: str, plugin: object
) -> None:
    _check_unmarked(config, key, name, plugin)
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise ConfigError(config.path, key, f"plugin {name!r} cannot be registered: {exc}") from exc
    for hook_name in _hook_names(pm, name):
        if not hasattr(hookspec, hook_name):
            pm.unregister(name=name)
            raise ConfigError(config.path, key, _unknown_hook(name, hook_name))


def _hook_names(pm: pluggy.PluginManager, name: str) -> list[str]:
    """The hook names ``name`` implements (pluggy's ``check_pending``, for one plugin)."""
    callers = pm.get_hookcallers(pm.get_plugin(name)) or []
    return [caller.name for caller in callers]


def _known_hooks() -> list[str]:
    return [n for n in vars(hookspec) if n.startswith(_PREFIX)]


def _unknown_hook(plugin: str, hook_name: str) -> str:
    close = difflib.get_close_matches(hook_name, _known_hooks(), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return (f"plugin {plugin!r} implements {hook_name}, which is not a submitd hook and would "
            f"never be called{hint}")


def _check_unmarked(config: Config, key: str, name: str, plugin: object) -> None:
    """Refuse a ``submitd_*`` function that lacks ``@submitd.hookimpl`` (never called)."""
    for attr in dir(plugin):
        if not attr.startswith(_PREFIX) or attr == _IMPL_ATTR:
            continue
        value = inspect.getattr_static(plugin, attr, None)
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if inspect.isfunction(value) and not hasattr(value, _IMPL_ATTR):
            what = (f"{attr} is not marked with @submitd.hookimpl and would never be called"
                    if hasattr(hookspec, attr) else _unknown_hook(name, attr))
            raise ConfigError(config.path, key, f"plugin {name!r}: {what}")


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
