"""Configuration: ``submitd.toml`` read with tomllib into frozen dataclasses.

Every part of submitd gets only its slice (the protocol core gets :class:`Limits`, the queue
:class:`QueueConfig`). Unknown keys, wrong types and bad values raise :class:`ConfigError`
naming the file and the dotted key. Relative paths resolve against the config file's directory.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .stash import Stash

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "Limits",
    "ListenMode",
    "ListenerConfig",
    "PluginsConfig",
    "QueueConfig",
    "TLSConfig",
    "default_config_path",
    "load_config",
    "parse_duration",
]

DEFAULT_CONFIG_PATH = Path("/etc/submitd/submitd.toml")


class ListenMode(enum.Enum):
    """How a listener starts TLS."""

    STARTTLS = "starttls"  # port 587: plain connect, STARTTLS required (RFC 3207, RFC 6409)
    IMPLICIT = "implicit"  # port 465: TLS from the first byte (RFC 8314)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    """One ``[[listen]]`` table."""

    host: str
    port: int
    mode: ListenMode
    proxy_protocol: bool = False
    proxy_trusted: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

    @property
    def address(self) -> str:
        """``host:port`` as written in the config (IPv6 hosts in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """``[tls]``: the server certificate chain and key (PEM), reloaded on SIGHUP."""

    cert: Path
    key: Path
    handshake_timeout: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """``[limits]``: every bound the server enforces."""

    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_header_size: int = 262_144
    max_transactions: int = 100
    max_auth_failures: int = 3
    max_errors: int = 10
    shutdown_grace: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """``[queue]``: where the spool lives and how delivery is retried."""

    dir: Path
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    max_age: float = 5 * 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsConfig:
    """``[plugins]``: the allow-list, hook deadlines and each plugin's own table.

    ``tables`` maps a plugin name to its ``[plugins.NAME]`` table, minus the reserved key
    ``hook_timeout`` (which lands in ``hook_timeouts``). Plugins validate their own table in
    ``submitd_configure``.
    """

    enable: tuple[str, ...] = ()
    hook_timeout: float = 30.0
    hook_timeouts: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    tables: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def timeout_for(self, plugin: str) -> float:
        """The hook deadline for ``plugin`` in seconds."""
        return self.hook_timeouts.get(plugin, self.hook_timeout)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole validated configuration.

    ``stash`` is where plugins keep what they parsed from their table in ``submitd_configure``
    (see :class:`submitd.stash.Stash`); it is not part of equality.
    """

    path: Path
    hostname: str
    listeners: tuple[ListenerConfig, ...]
    tls: TLSConfig | None
    limits: Limits
    queue: QueueConfig
    plugins: PluginsConfig
    stash: Stash = field(default_factory=Stash, compare=False, repr=False)

    @property
    def base_dir(self) -> Path:
        """The directory relative paths are resolved against."""
        return self.path.parent

    def plugin_table(self, name: str) -> Mapping[str, Any]:
        """The ``[plugins.NAME]`` table (empty when absent)."""
        return self.plugins.tables.get(name, MappingProxyType({}))

    def resolve(self, value: str | Path) -> Path:
        """Resolve a path from the config against the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


def parse_duration(value: object) -> float:  # implemented by the config loader
    """Parse ``"30s"``, ``"5m"``, ``"2h"``, ``"5d"`` or a bare number of seconds."""
    raise NotImplementedError


def default_config_path() -> Path:  # implemented by the config loader
    """``$SUBMITD_CONFIG``, else ``/etc/submitd/submitd.toml``."""
    raise NotImplementedError


def load_config(path: Path) -> Config:  # implemented by the config loader
    """Read and validate ``path``; raise ``ConfigError(path, dotted_key, message)``."""
    raise NotImplementedError
