"""What several ``submitd`` subcommands share.

The help for a command given without its action, the configuration named by ``--config``,
and the plugins loaded and configured exactly as ``submitd serve`` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pluggy

from .config import Config, default_config_path, load_config
from .plugin_manager import configure_plugins, create_plugin_manager, unconfigure_plugins


def config_from_args(args: argparse.Namespace) -> Config:
    """Load ``--config FILE``, else ``$SUBMITD_CONFIG``, else the default path."""
    path: Path | None = args.config
    return load_config(path if path is not None else default_config_path())


@contextmanager
def configured_plugins(
    config: Config, *, extra: Sequence[tuple[str, object]] = ()
) -> Iterator[pluggy.PluginManager]:
    """The enabled plugins (plus ``extra``), configured for ``config``; unconfigured on exit."""
    pm = create_plugin_manager(config, extra=extra)
    configure_plugins(pm, config)
    try:
        yield pm
    finally:
        unconfigure_plugins(pm, config)


def help_handler(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """A handler for a command given without its action: its help on stderr, exit 2 (usage)."""

    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show
