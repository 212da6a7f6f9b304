"""Configuration: ``submitd.toml`` read with tomllib into frozen dataclasses.

Every part of submitd gets only its slice (the protocol core gets :class:`Limits`, the queue
:class:`QueueConfig`). Unknown keys, wrong types and bad values raise :class:`ConfigError`
naming the file and the dotted key. Relative paths resolve against the config file's directory.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ._config_table import (
    _default,
    _duration,
    _Table,
    format_duration,
    parse_duration,
)
from .errors import ConfigError
from .protocol._grammar import is_hostname
from .stash import Stash

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_WORKERS",
    "Config",
    "Limits",
    "ListenMode",
    "ListenerConfig",
    "PluginsConfig",
    "QueueConfig",
    "ServerConfig",
    "TLSConfig",
    "default_config_path",
    "format_duration",
    "load_config",
    "parse_duration",
    "usable_cpus",
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
    """``[limits]``: every bound the server enforces.

    Connections: ``max_connections`` in all, ``max_connections_per_ip`` at once from one
    address, at most ``max_connection_rate`` new connections from one address within
    ``connection_rate_window``, and at most ``max_unauthenticated`` sessions at once that have
    not logged in yet. Time: ``command_timeout`` runs from a command's first byte to its CRLF;
    ``preauth_timeout`` is the shorter idle deadline before a successful AUTH; the DATA phase
    ends after ``data_timeout`` or when it falls below ``min_data_rate`` bytes per second; when
    the server holds ``stress_threshold`` percent of ``max_connections`` or more, every idle
    deadline shrinks to ``stress_timeout`` (as Postfix's stress mode does). Abuse:
    ``max_junk_commands`` commands that do not advance a transaction, ``max_hops``
    ``Received:`` fields (a mail loop, RFC 5321 §6.3), and the failed-login throttle: after
    ``auth_fail_limit`` failures for one address and login (four times as many for one
    address, across logins) each further try from there waits longer, up to
    ``auth_fail_max_delay``; failures for a login from anywhere only slow it (at most 10 s),
    never refuse it; a count is forgotten after ``auth_fail_window`` without a new failure.
    """

    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    max_connection_rate: int = 30
    connection_rate_window: float = 10.0
    max_unauthenticated: int = 200
    command_timeout: float = 300.0
    preauth_timeout: float = 30.0
    data_timeout: float = 600.0
    min_data_rate: int = 500
    stress_threshold: int = 80
    stress_timeout: float = 10.0
    max_header_size: int = 262_144
    max_transactions: int = 100
    max_auth_failures: int = 3
    max_errors: int = 10
    max_junk_commands: int = 100
    max_hops: int = 50
    auth_fail_limit: int = 5
    auth_fail_max_delay: float = 300.0
    auth_fail_window: float = 3600.0
    shutdown_grace: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """``[queue]``: where the spool lives and how delivery is retried.

    ``max_parallel`` bounds the delivery attempts in flight at once; ``delay_warning``, when
    set, is how long a message may wait before its sender is told it is delayed (RFC 3464
    ``Action: delayed``); None sends no delay warnings. ``delivery_timeout`` is the deadline
    of one ``submitd_deliver`` call of a plugin without its own ``hook_timeout``: session
    hooks answer a waiting client within seconds, but handing a large message to a slow
    smarthost may rightly take minutes (RFC 5321 §4.5.3.2 allows 10 for the end of DATA).
    """

    dir: Path
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    max_age: float = 5 * 86400.0
    max_parallel: int = 16
    delay_warning: float | None = None
    delivery_timeout: float = 900.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """``[server]``: how the server runs.

    ``workers`` is the number of processes that accept connections (``"auto"`` in the file:
    one per CPU this process may run on). With more than one, the first process owns the
    spool (lock, recovery, queue runner, control socket) and starts the others
    (docs/workers.md); ``auto`` records that the number came from ``"auto"``.
    """

    workers: int = 1
    auto: bool = False


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

    def timeout_for(self, plugin: str, default: float | None = None) -> float:
        """Return the hook deadline for ``plugin`` in seconds.

        A ``hook_timeout`` in ``[plugins.NAME]`` wins; otherwise ``default`` (the queue's
        ``delivery_timeout`` for delivery hooks) or ``[plugins] hook_timeout``.
        """
        fallback = self.hook_timeout if default is None else default
        return self.hook_timeouts.get(plugin, fallback)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole validated configuration.

    ``stash`` is where plugins keep what they parsed from their table in ``submitd_configure``
    (see :class:`submitd.stash.Stash`); it belongs to this configuration and is replaced on
    reload. ``server_stash`` lives as long as the server: a reload hands the same one to the
    new configuration, so state that must survive a SIGHUP (a smarthost's mark-down table,
    counters) belongs there. Neither is part of equality.
    """

    path: Path
    hostname: str
    listeners: tuple[ListenerConfig, ...]
    tls: TLSConfig | None
    limits: Limits
    queue: QueueConfig
    plugins: PluginsConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    stash: Stash = field(default_factory=Stash, compare=False, repr=False)
    server_stash: Stash = field(default_factory=Stash, compare=False, repr=False)

    @property
    def base_dir(self) -> Path:
        """The directory relative paths are resolved against."""
        return self.path.parent

    def plugin_table(self, name: str) -> Mapping[str, Any]:
        """Return the ``[plugins.NAME]`` table (empty when absent)."""
        return self.plugins.tables.get(name, MappingProxyType({}))

    def resolve(self, value: str | Path) -> Path:
        """Resolve a path from the config against the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @staticmethod
    def parse_duration(value: object) -> float:
        """Parse a duration from a plugin table as the core does (see :func:`parse_duration`)."""
        return parse_duration(value)


def default_config_path() -> Path:
    """``$SUBMITD_CONFIG``, else ``/etc/submitd/submitd.toml``."""
    env = os.environ.get("SUBMITD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


# --- the loader -----------------------------------------------------------------------------

_PLUGIN_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise ``ConfigError(path, dotted_key, message)``.

    Only the config file itself is read: certificate and plugin files are checked by the
    code that loads them (``submitd check-config`` runs all of it).
    """
    path = Path(path).absolute()  # resolved paths must survive a later chdir
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the configuration: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"TOML syntax error: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "the file is not valid UTF-8") from None
    top = _Table(
        path, "", raw,
        ("hostname", "server", "listen", "tls", "limits", "queue", "plugins", "metrics"),
    )
    if "metrics" in raw:
        raise top.error("metrics", "not supported in this version (remove the [metrics] table)")
    listeners = _load_listeners(top)
    tls = _load_tls(top, required=bool(listeners))
    return Config(
        path=path,
        hostname=_load_hostname(top),
        listeners=listeners,
        tls=tls,
        limits=_load_limits(top),
        queue=_load_queue(top),
        plugins=_load_plugins(top),
        server=_load_server(top),
    )


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


#: The most ``[server] workers`` may be (each worker is a process with its own memory).
MAX_WORKERS = 256


def _load_server(top: _Table) -> ServerConfig:
    t = _Table(top.path, "server", top.get("server", {}), ("workers",))
    if t.get("workers", 1) == "auto":
        return ServerConfig(workers=min(usable_cpus(), MAX_WORKERS), auto=True)
    if isinstance(t.get("workers", 1), str):
        raise t.error("workers", f'must be a positive integer or "auto", not {t.get("workers")!r}')
    workers = t.integer("workers", _default(ServerConfig, "workers"))
    if workers > MAX_WORKERS:
        raise t.error("workers", f"must be at most {MAX_WORKERS}, got {workers}")
    return ServerConfig(workers=workers)


def _load_hostname(top: _Table) -> str:
    name = top.string("hostname") if "hostname" in top.data else socket.getfqdn()
    if not is_hostname(name):
        why = "" if "hostname" in top.data else f" (taken from the system: {name!r}; set it)"
        raise top.error("hostname", f"must be a fully qualified domain name{why}")
    return name


def _load_listeners(top: _Table) -> tuple[ListenerConfig, ...]:
    items = top.array("listen", [])
    out: list[ListenerConfig] = []
    seen: dict[tuple[str, int], str] = {}
    allowed = ("address", "mode", "proxy_protocol", "proxy_trusted")
    for i, item in enumerate(items):
        t = _Table(top.path, f"listen[{i}]", item, allowed)
        host, port = _parse_address(t, "address")
        if port and (host, port) in seen:
            raise t.error("address", f"the same address as {seen[host, port]}")
        seen[host, port] = t.key("address")
        mode_name = t.string("mode")
        try:
            mode = ListenMode(mode_name)
        except ValueError:
            raise t.error("mode", f"must be starttls or implicit, not {mode_name!r}") from None
        if t.boolean("proxy_protocol", False):
            raise t.error("proxy_protocol", "not supported in this version")
        trusted: list[str] = []
        default_trusted = list(_default(ListenerConfig, "proxy_trusted"))
        for j, cidr in enumerate(t.array("proxy_trusted", default_trusted)):
            try:
                trusted.append(str(ipaddress.ip_network(cidr)))
            except (TypeError, ValueError) as exc:
                raise t.error(f"proxy_trusted[{j}]", f"not a network: {exc}") from None
        out.append(ListenerConfig(host=host, port=port, mode=mode, proxy_trusted=tuple(trusted)))
    return tuple(out)


def _parse_address(t: _Table, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; port 0 asks the system for a free port (tests)."""
    text = t.string(key)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise t.error(key, f'must be "host:port" or "[ipv6]:port", not {text!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise t.error(key, f"not an IPv6 address in brackets: {text!r}") from None
    elif ":" in host:
        raise t.error(key, f'IPv6 addresses need brackets, e.g. "[::1]:587", not {text!r}')
    elif not is_hostname(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise t.error(key, f"not an IP address or host name: {host!r}") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise t.error(key, f"port must be a number from 0 to 65535, not {port_text!r}")
    return host, int(port_text)


def _load_tls(top: _Table, *, required: bool) -> TLSConfig | None:
    if "tls" not in top.data:
        if required:
            raise top.error("tls", "required key is missing (listeners need a certificate)")
        return None
    t = _Table(top.path, "tls", top.data["tls"], ("cert", "key", "handshake_timeout"))
    return TLSConfig(
        cert=t.path_value("cert"),
        key=t.path_value("key"),
        handshake_timeout=t.duration("handshake_timeout", _default(TLSConfig, "handshake_timeout")),
    )


def _load_limits(top: _Table) -> Limits:
    specs = fields(Limits)
    t = _Table(top.path, "limits", top.get("limits", {}), [f.name for f in specs])
    values: dict[str, Any] = {}
    for f in specs:
        if f.type in (float, "float"):  # every float limit is a duration
            grace = f.name == "shutdown_grace"  # zero: stop at once, no draining
            values[f.name] = t.duration(f.name, _default(Limits, f.name), allow_zero=grace)
        else:
            values[f.name] = t.integer(f.name, _default(Limits, f.name))
    if values["stress_threshold"] > 100:  # a percentage of max_connections
        got = values["stress_threshold"]
        raise t.error("stress_threshold", f"must be a percentage from 1 to 100, got {got}")
    return Limits(**values)


def _load_queue(top: _Table) -> QueueConfig:
    allowed = ("dir", "retry", "max_age", "max_parallel", "delay_warning", "delivery_timeout")
    t = _Table(top.path, "queue", top.get("queue", {}), allowed)
    retry = t.array("retry", list(_default(QueueConfig, "retry")))
    if not retry:
        raise t.error("retry", "needs at least one interval (the last one repeats)")
    return QueueConfig(
        dir=t.path_value("dir", "spool"),
        retry=tuple(_duration(t, f"retry[{i}]", v) for i, v in enumerate(retry)),
        max_age=t.duration("max_age", _default(QueueConfig, "max_age")),
        max_parallel=t.integer("max_parallel", _default(QueueConfig, "max_parallel")),
        delay_warning=t.duration("delay_warning", 0.0) if "delay_warning" in t.data else None,
        delivery_timeout=t.duration(
            "delivery_timeout", _default(QueueConfig, "delivery_timeout")
        ),
    )


def _load_plugins(top: _Table) -> PluginsConfig:
    t = _Table(top.path, "plugins", top.get("plugins", {}), None)
    enable: list[str] = []
    for i, name in enumerate(t.array("enable", [])):
        key = f"enable[{i}]"
        if not isinstance(name, str) or not _PLUGIN_NAME.match(name):
            raise t.error(key, f"not a plugin name: {name!r}")
        if name in enable:
            raise t.error(key, f"{name!r} is listed twice")
        enable.append(name)
    tables: dict[str, Mapping[str, Any]] = {}
    timeouts: dict[str, float] = {}
    for name, value in t.data.items():
        if name in ("enable", "hook_timeout"):
            continue
        if not isinstance(value, dict):
            raise t.error(name, "unknown key (plugin settings go in a [plugins.NAME] table)")
        sub = _Table(top.path, t.key(name), value, None)
        if "hook_timeout" in value:
            timeouts[name] = sub.duration("hook_timeout", 0.0)
        tables[name] = _freeze({k: v for k, v in value.items() if k != "hook_timeout"})
    return PluginsConfig(
        enable=tuple(enable),
        hook_timeout=t.duration("hook_timeout", _default(PluginsConfig, "hook_timeout")),
        hook_timeouts=MappingProxyType(timeouts),
        tables=MappingProxyType(tables),
    )


def _freeze(value: Any) -> Any:
    """Read-only copy of a TOML value: tables become mappings, arrays tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
