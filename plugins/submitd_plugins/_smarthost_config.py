"""``[plugins.smarthost]`` and its ``[[plugins.smarthost.route]]`` tables, validated.

Everything is checked in ``submitd_configure``: host lists, TLS files (loaded into one
``ssl.SSLContext`` per route), the password source (read once; held as a :class:`Secret`),
durations. Every error names the dotted key, e.g. ``plugins.smarthost.route[1].hosts[0]``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitd import Config, ConfigError, Secret, logfmt
from submitd.client import ClientTimeouts, ClientTLSMode

from ._smarthost_oauth import OAuthSettings, parse_oauth, read_secret_line

__all__ = [
    "DEFAULT_ROUTE",
    "HostAddress",
    "Route",
    "SmarthostSettings",
    "parse_settings",
]

NAME = "smarthost"
#: The name of the route built from the top-level keys of ``[plugins.smarthost]``.
DEFAULT_ROUTE = "default"

log = logging.getLogger("submitd.plugins.smarthost")

# Keys a route may set; the top-level table may set them too (they form the default route).
_CONNECTION_KEYS = (
    "host", "hosts", "port", "tls", "ca_file", "tls_server_name", "username", "password_file",
    "password_env", "client_cert", "client_key", "oauth",
)
_TOP_ONLY_KEYS = (
    "host_down_time", "connect_timeout", "command_timeout", "data_timeout", "reuse_time",
    "max_messages_per_connection", "route",
)
_ROUTE_KEYS = ("name", "senders", *_CONNECTION_KEYS)
_DEFAULT_PORTS = {
    ClientTLSMode.STARTTLS: 587,  # RFC 6409 §3.1
    ClientTLSMode.IMPLICIT: 465,  # RFC 8314 §7.3
    ClientTLSMode.NONE: 25,
}
# RFC 1035 §2.3.1 labels (digits first allowed, RFC 1123 §2.1); no trailing dot.
_HOSTNAME = re.compile(
    r"\A(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_ROUTE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_NO_SPACE_OR_CONTROL = re.compile(r"\A[^\x00-\x20\x7f]+\Z")


@dataclass(frozen=True, kw_only=True)
class HostAddress:
    """One smarthost: a host name or IP address and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class Route:
    """Where mail from some senders goes: hosts tried in order, TLS and credentials.

    ``senders`` holds lower-case exact addresses, ``@domain`` entries and ``<>`` (bounces);
    the default route has none and matches every sender. ``fingerprint`` is a digest of how
    the route reaches its hosts (TLS mode, certificate name, credentials, the contents of the
    TLS files): a reload that changes it gives the route's hosts a fresh start (mark-down).
    """

    name: str
    senders: tuple[str, ...]
    hosts: tuple[HostAddress, ...]
    tls: ClientTLSMode
    ssl_context: ssl.SSLContext | None = field(compare=False, repr=False)
    server_name: str | None = None
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    fingerprint: str = field(default="", repr=False, compare=False)
    oauth: OAuthSettings | None = field(default=None, repr=False, compare=False)

    def matches(self, sender: str) -> bool:
        """True if this route's ``senders`` list names ``sender`` ("" is ``<>``)."""
        if not sender:
            return "<>" in self.senders
        address = sender.lower()
        domain = "@" + address.rpartition("@")[2]
        return address in self.senders or domain in self.senders


@dataclass(frozen=True, kw_only=True)
class SmarthostSettings:
    """The whole validated ``[plugins.smarthost]`` table."""

    routes: tuple[Route, ...]
    default: Route | None
    helo_name: str
    timeouts: ClientTimeouts
    host_down_time: float = 60.0
    reuse_time: float = 10.0
    max_messages_per_connection: int = 100

    def route_for(self, sender: str) -> Route | None:
        """The first route whose senders match, else the default route (None if there is none)."""
        for route in self.routes:
            if route.matches(sender):
                return route
        return self.default


class _Table:
    """One table under validation, with its dotted prefix for error messages."""

    def __init__(self, config: Config, prefix: str, data: Mapping[str, Any]) -> None:
        self.config = config
        self.prefix = prefix
        self.data = data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.config.path, self.key(name), message)

    def string(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not _NO_SPACE_OR_CONTROL.match(value):
            raise self.error(name, "must be a non-empty string without spaces or control "
                                   "characters")
        return value

    def path(self, name: str) -> Path | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value or any(ord(c) < 0x20 for c in value):
            raise self.error(name, "must be a file name (a non-empty string)")
        return self.config.resolve(value)

    def duration(self, name: str, default: str, *, allow_zero: bool = False) -> float:
        try:
            seconds = self.config.parse_duration(self.data.get(name, default))
        except ValueError as exc:
            raise self.error(name, str(exc)) from None
        if seconds == 0 and not allow_zero:
            raise self.error(name, "must be longer than zero")
        return seconds

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, "must be an integer")
        if not minimum <= value <= maximum:
            raise self.error(name, f"must be from {minimum} to {maximum}, not {value}")
        return value


def parse_settings(config: Config) -> SmarthostSettings:
    """Validate ``[plugins.smarthost]``; raise ``ConfigError`` naming the dotted key.

    Logs a warning for every route with ``tls = "none"``.
    """
    top = _Table(config, f"plugins.{NAME}", config.plugin_table(NAME))
    for name in top.data:
        if name not in _CONNECTION_KEYS and name not in _TOP_ONLY_KEYS:
            raise top.error(name, "unknown key")
    routes = tuple(_parse_routes(top))
    default: Route | None = None
    if "host" in top.data or "hosts" in top.data:
        default = _parse_route(top, DEFAULT_ROUTE, senders=())
    else:
        stray = [k for k in _CONNECTION_KEYS if k in top.data]
        if stray:
            raise top.error(stray[0], "belongs to the default route, which needs host or hosts")
        if not routes:
            raise top.error("host", "required: the smarthost (host or hosts), or at least one "
                                    "[[plugins.smarthost.route]]")
    command = top.duration("command_timeout", "5m")
    timeouts = ClientTimeouts(
        connect=top.duration("connect_timeout", "30s"),
        greeting=command,
        mail=command,
        rcpt=command,
        data_init=min(120.0, command),  # RFC 5321 §4.5.3.2.4 (2 minutes) at most
        data_block=min(180.0, command),  # RFC 5321 §4.5.3.2.5 (3 minutes) at most
        data_end=top.duration("data_timeout", "10m"),
    )
    settings = SmarthostSettings(
        routes=routes,
        default=default,
        helo_name=config.hostname,
        timeouts=timeouts,
        host_down_time=top.duration("host_down_time", "1m", allow_zero=True),
        reuse_time=top.duration("reuse_time", "10s", allow_zero=True),
        max_messages_per_connection=top.integer(
            "max_messages_per_connection", 100, minimum=1, maximum=100_000
        ),
    )
    for route in (*settings.routes, *((default,) if default else ())):
        if route.tls is ClientTLSMode.NONE:
            log.warning(logfmt("smarthost_tls_none", route=route.name,
                               hosts=",".join(str(h) for h in route.hosts),
                               risk="mail travels unencrypted; no AUTH is ever sent"))
    return settings


def _parse_routes(top: _Table) -> list[Route]:
    raw = top.data.get("route", ())
    if not isinstance(raw, tuple | list):
        raise top.error("route", "must be an array of tables ([[plugins.smarthost.route]])")
    routes: list[Route] = []
    names = {DEFAULT_ROUTE}
    for index, item in enumerate(raw):
        prefix = top.key(f"route[{index}]")
        if not isinstance(item, Mapping):
            raise ConfigError(top.config.path, prefix, "must be a table")
        table = _Table(top.config, prefix, item)
        for name in table.data:
            if name in _TOP_ONLY_KEYS:
                raise table.error(name, "set it in [plugins.smarthost]: every route inherits it")
            if name not in _ROUTE_KEYS:
                raise table.error(name, "unknown key")
        name = table.data.get("name", f"route-{index + 1}")
        if not isinstance(name, str) or not _ROUTE_NAME.match(name):
            raise table.error("name", "must be letters, digits, '.', '_' or '-' (at most 64)")
        if name in names:
            raise table.error("name", f"{name!r} is already used by another route")
        names.add(name)
        if "host" not in table.data and "hosts" not in table.data:
            raise table.error("hosts", "required: the smarthost(s) of this route")
        routes.append(_parse_route(table, name, senders=_parse_senders(table)))
    return routes


def _parse_senders(table: _Table) -> tuple[str, ...]:
    raw = table.data.get("senders")
    if raw is None:
        raise table.error("senders", 'required: addresses, "@domain" entries or "<>"')
    if not isinstance(raw, tuple | list) or not raw:
        raise table.error("senders", "must be a non-empty array of strings")
    out: list[str] = []
    for i, entry in enumerate(raw):
        key = f"senders[{i}]"
        if not isinstance(entry, str) or not _NO_SPACE_OR_CONTROL.match(entry):
            raise table.error(key, "must be a non-empty string without spaces")
        value = entry.lower()
        local, at, domain = value.rpartition("@")
        if value != "<>" and (not at or not domain or "@" in local or "<" in value):
            raise table.error(key, f'must be an address, "@domain" or "<>", not {entry!r}')
        out.append(value)
    return tuple(out)


def _parse_route(table: _Table, name: str, *, senders: tuple[str, ...]) -> Route:
    tls_name = table.data.get("tls", "starttls")
    try:
        tls = ClientTLSMode(tls_name)
    except ValueError:
        raise table.error("tls", f'must be "starttls", "implicit" or "none", not {tls_name!r}'
                          ) from None
    hosts = _parse_hosts(table, tls)
    oauth = None
    if "oauth" in table.data:
        # The token is the credential (RFC 7628); the mailbox is the AUTH identity.
        for key in ("username", "password_file", "password_env"):
            if key in table.data:
                raise table.error(key, "has no use with oauth (the mailbox is the login)")
        if tls is ClientTLSMode.NONE:
            raise table.error("oauth", 'AUTH is never sent with tls = "none"; use starttls '
                                       "or implicit")
        oauth = parse_oauth(table.config, table.key("oauth"), table.data["oauth"])
    username, password = _parse_credentials(table, tls)
    server_name = table.string("tls_server_name")
    if server_name is not None and not _is_host(server_name):
        raise table.error("tls_server_name", f"not a host name: {server_name!r}")
    if tls is ClientTLSMode.NONE:
        for key in ("ca_file", "tls_server_name", "client_cert", "client_key"):
            if key in table.data:
                raise table.error(key, 'has no use with tls = "none"')
        context = None
    else:
        context = _ssl_context(table)
    return Route(name=name, senders=senders, hosts=hosts, tls=tls, ssl_context=context,
                 server_name=server_name, username=username, password=password,
                 fingerprint=_fingerprint(table, tls, server_name, username, password, oauth),
                 oauth=oauth)


def _fingerprint(table: _Table, tls: ClientTLSMode, server_name: str | None,
                 username: str | None, password: Secret | None,
                 oauth: OAuthSettings | None = None) -> str:
    """A digest of the connection settings; it holds no secret a log line could reveal."""
    digest = hashlib.sha256()
    for part in (tls.value, server_name or "", username or "",
                 password.reveal() if password is not None else "",
                 oauth.fingerprint if oauth is not None else ""):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    for key in ("ca_file", "client_cert", "client_key"):
        path = table.path(key)
        try:
            content = path.read_bytes() if path is not None else b""
        except OSError:  # already reported by the TLS set-up; the path alone will do
            content = b""
        digest.update(f"{key}={path}".encode("utf-8", "surrogateescape") + b"\0" + content)
    return digest.hexdigest()


def _is_host(text: str) -> bool:
    if _HOSTNAME.match(text):
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_hosts(table: _Table, tls: ClientTLSMode) -> tuple[HostAddress, ...]:
    port = table.integer("port", _DEFAULT_PORTS[tls], minimum=1, maximum=65535)
    if "host" in table.data:
        if "hosts" in table.data:
            raise table.error("hosts", "give host or hosts, not both")
        host = table.string("host") or ""
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not _is_host(host):
            raise table.error("host", f'not a host name or IP address: {host!r} (a port goes '
                                      f'in "port", several hosts in "hosts")')
        return (HostAddress(host=host, port=port),)
    raw = table.data.get("hosts")
    if not isinstance(raw, tuple | list) or not raw:
        raise table.error("hosts", 'must be a non-empty array of "host:port" strings')
    hosts: list[HostAddress] = []
    for i, entry in enumerate(raw):
        address = _parse_host_port(table, f"hosts[{i}]", entry, port)
        if address in hosts:
            raise table.error(f"hosts[{i}]", f"{address} is listed twice")
        hosts.append(address)
    return tuple(hosts)


def _parse_host_port(table: _Table, key: str, entry: object, default_port: int) -> HostAddress:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if not isinstance(entry, str) or not _NO_SPACE_OR_CONTROL.match(entry):
        raise table.error(key, 'must be "host:port" or "[ipv6]:port"')
    host, port_text = entry, ""
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise table.error(key, f'IPv6 addresses are written "[::1]:25", not {entry!r}')
        host, port_text = inside, rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise table.error(key, f"not an IPv6 address in brackets: {entry!r}") from None
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    elif ":" in entry:
        raise table.error(key, f'IPv6 addresses need brackets, e.g. "[::1]:25", not {entry!r}')
    if not _is_host(host):
        raise table.error(key, f"not a host name or IP address: {host!r}")
    if not port_text and entry.endswith(":"):
        raise table.error(key, f"the port is missing in {entry!r}")
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise table.error(key, f"port must be a number from 1 to 65535, not {port_text!r}")
        return HostAddress(host=host, port=int(port_text))
    return HostAddress(host=host, port=default_port)


def _parse_credentials(table: _Table, tls: ClientTLSMode) -> tuple[str | None, Secret | None]:
    username = table.data.get("username")
    if username is not None and (
        not isinstance(username, str) or not username
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in username)
    ):
        raise table.error("username", "must be a non-empty string without control characters")
    sources = [k for k in ("password_file", "password_env") if k in table.data]
    if len(sources) == 2:
        raise table.error("password_env", "give password_file or password_env, not both")
    if tls is ClientTLSMode.NONE and (username is not None or sources):
        # RFC 4954 §4: credentials never travel without TLS.
        raise table.error(sources[0] if username is None else "username",
                          'AUTH is never sent with tls = "none"; use starttls or implicit')
    if username is None:
        if sources:
            raise table.error(sources[0], "needs a username")
        return None, None
    if not sources:
        raise table.error("username", "needs a password: password_file or password_env")
    if sources[0] == "password_file":
        path = table.path("password_file")
        assert path is not None
        return username, read_secret_line(path, lambda m: table.error("password_file", m))
    return username, Secret(_read_password_env(table))


def _read_password_env(table: _Table) -> str:
    name = table.data.get("password_env")
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise table.error("password_env", "must be the name of an environment variable")
    value = os.environ.get(name)
    if value is None:
        raise table.error("password_env", f"the environment variable {name} is not set")
    if not value:
        raise table.error("password_env", f"the environment variable {name} is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise table.error("password_env", f"{name}: the password holds control characters")
    return value


def _readable(table: _Table, key: str) -> Path | None:
    path = table.path(key)
    if path is None:
        return None
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise table.error(key, f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def _ssl_context(table: _Table) -> ssl.SSLContext:
    """Verification on, against ``ca_file`` or the system store; TLS 1.2 at least."""
    ca_file = _readable(table, "ca_file")
    cert = _readable(table, "client_cert")
    key = _readable(table, "client_key")
    if key is not None and cert is None:
        raise table.error("client_key", "needs client_cert")
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except ssl.SSLError as exc:
        raise table.error("ca_file", f"not a PEM CA certificate: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is None and not context.get_ca_certs() and not _has_default_paths():
        log.warning(logfmt("smarthost_no_trust_store", key=table.key("ca_file"),
                           hint="set ca_file: no system CA certificates were found"))
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), str(key) if key else None)
        except (ssl.SSLError, ValueError) as exc:
            where = "client_key" if key is not None and "key" in str(exc).lower() else "client_cert"
            raise table.error(where, f"cannot load the client certificate and key: {exc}"
                              ) from None
    return context


def _has_default_paths() -> bool:
    paths = ssl.get_default_verify_paths()
    return any(p and os.path.exists(p) for p in (paths.cafile, paths.capath))
