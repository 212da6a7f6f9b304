"""``submitd smarthost test``: can a smarthost route log in? One line says what worked.

The configuration is loaded and the plugins are loaded and configured exactly as ``submitd
serve`` does (:func:`create_plugin_manager`, :func:`configure_plugins`), so a password file,
a client certificate, a CA file or an OAuth2 key that start-up would refuse is refused here
with the same message. Then the ``smarthost`` plugin's ``probe(config, route)`` runs: for an
OAuth2 route it fetches a token, then it connects to the route's hosts in order until one
answers, starts TLS and authenticates (password, or XOAUTH2 with the token), and quits. No mail
is sent.

The whole test runs under :data:`DEADLINE`; the route's own timeouts (``connect_timeout``,
``command_timeout``, the OAuth2 ``timeout``) apply inside it.

Exit status: 0 when the route logged in (or connected, for a route without a login), 1 when a
stage failed (DNS, connect, TLS, token, AUTH, ...), 2 for a usage or configuration error,
including a route name that does not exist.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, TextIO

import trio

from ._cli_common import config_from_args, configured_plugins, help_handler
from .config import Config, format_duration
from .errors import ConfigError

__all__ = ["DEADLINE", "add_smarthost_commands", "smarthost_test"]

#: The longest ``smarthost test`` waits for its one line (token, connect, TLS, AUTH), seconds.
DEADLINE = 120.0

EXIT_OK = 0
EXIT_FAILED = 1

_PLUGIN = "smarthost"


class ProbeResult(Protocol):
    """What the smarthost plugin's ``probe`` returns (its ``ProbeResult``)."""

    @property
    def ok(self) -> bool:
        """True when every stage worked."""

    @property
    def stage(self) -> str:
        """The stage that failed ("token", "dns", "connect", "tls", "auth", ...)."""

    @property
    def detail(self) -> str:
        """What happened, readable, never a password or a token."""


_Probe = Callable[..., Awaitable[ProbeResult]]


def add_smarthost_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    config_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``submitd smarthost ACTION`` under ``commands``; ``config_option`` adds ``-c``."""
    parser = commands.add_parser("smarthost", help="check the smarthost plugin's routes")
    parser.set_defaults(handler=help_handler(parser))  # alone: list the actions
    actions = parser.add_subparsers(dest="smarthost_command", metavar="ACTION")
    p = actions.add_parser(
        "test", help="log in to a route's relay (fetching an OAuth2 token first); sends no mail",
        description="Fetch the route's OAuth2 token (if it uses one), connect to its hosts in "
        "order, start TLS and authenticate, then quit without sending mail. Prints one line: "
        "what worked, or the stage that failed. Exit 0 ok, 1 failed, 2 for a usage or "
        "configuration error.",
    )
    config_option(p)
    p.add_argument("route", nargs="?", metavar="ROUTE",
                   help="a [[plugins.smarthost.route]] name (default: the default route)")
    p.add_argument("--mailbox", metavar="ADDR",
                   help='the mailbox to authenticate as, for an OAuth2 route with mailbox = '
                   '"sender" (the envelope sender it would use)')
    p.set_defaults(handler=cmd_smarthost_test)


def cmd_smarthost_test(args: argparse.Namespace) -> int:
    """``submitd smarthost test [ROUTE]``: print the probe's line; 0 ok, 1 failed."""
    config = config_from_args(args)
    ok = trio.run(smarthost_test, config, args.route, args.mailbox, sys.stdout)
    return EXIT_OK if ok else EXIT_FAILED


async def smarthost_test(config: Config, route: str | None, mailbox: str | None,
                         out: TextIO, *, deadline: float = DEADLINE) -> bool:
    """Configure the plugins as the server does, probe ``route``, print one line to ``out``.

    Returns True when the probe succeeded. Raises :class:`ConfigError` when the smarthost
    plugin is not enabled, or for whatever its configuration (or the route name) gets wrong.
    """
    with configured_plugins(config) as pm:
        probe = _probe_of(config, pm.get_plugin(_PLUGIN))
        options = {} if mailbox is None else {"mailbox": mailbox}
        with trio.move_on_after(deadline):
            result = await probe(config, route, **options)
            print(_line(result), file=out)
            return result.ok
        print(f"failed at timeout: no result within {format_duration(deadline)}", file=out)
        return False


def _probe_of(config: Config, plugin: object) -> _Probe:
    if plugin is None:
        raise ConfigError(config.path, "plugins.enable",
                          f"{_PLUGIN!r} is not enabled: there is no smarthost route to test")
    probe: _Probe | None = getattr(plugin, "probe", None)
    if probe is None:
        raise ConfigError(config.path, "plugins.enable",
                          f"the plugin named {_PLUGIN!r} has no probe to test a route with")
    return probe


def _line(result: ProbeResult) -> str:
    detail = " ".join(result.detail.split())  # one line, whatever the relay put in its reply
    return f"ok: {detail}" if result.ok else f"failed at {result.stage}: {detail}"
