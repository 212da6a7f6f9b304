"""Helpers for testing submitd and plugins against a real server on loopback.

- :class:`TestCA`: a throwaway CA (trustme) with a server certificate for ``localhost``,
  ``127.0.0.1`` and ``::1``, written to PEM files that external clients can use.
- :func:`write_config`: a complete ``submitd.toml`` with listeners on port 0.
- :func:`running_server`: start an in-process server in a nursery, stop it on exit.
- :class:`RawSMTPClient`: a byte-level SMTP client for protocol tests (raw lines, STARTTLS).
- :func:`running_smarthost` / :class:`FakeSmarthost`: a recording SMTP relay on loopback for
  delivery-plugin tests (see :mod:`submitd.testing.smarthost`).
- :func:`send_mail`: log in and send one message in one call; :class:`SMTPRefused` carries
  the exact reply of a refusal.
- :func:`add_user` / :class:`TestUser`: add a login to a users file (cheap hashing).
- :func:`read_maildir` / :func:`wait_for_delivery`: the delivered messages, parsed.
- :mod:`submitd.testing.pytest_plugin`: pytest fixtures (``submitd_server``, ...) loaded
  automatically through the ``pytest11`` entry point.

trustme is a test dependency (``pip install submitd[test]``); it is imported on use.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..config import Config, ListenMode, load_config
from ..protocol._replies import Reply, parse_reply
from ..server.app import BoundListener, Server
from .client import SMTPRefused, send_mail, server_tls_context
from .mailbox import TEST_HASHER, TestUser, add_user, read_maildir, wait_for_delivery
from .smarthost import FakeSmarthost, ReceivedMessage, running_smarthost

__all__ = [
    "TEST_HASHER",
    "FakeSmarthost",
    "RawSMTPClient",
    "ReceivedMessage",
    "RunningServer",
    "SMTPRefused",
    "TestCA",
    "TestUser",
    "add_user",
    "read_maildir",
    "running_server",
    "running_smarthost",
    "send_mail",
    "server_tls_context",
    "wait_for_delivery",
    "write_config",
]


class TestCA:
    """A trustme CA and a server certificate, written into ``directory``."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA()
        self._leaf = self._ca.issue_cert("localhost", "127.0.0.1", "::1")
        self.ca_path = directory / "ca.pem"
        self.cert_path = directory / "cert.pem"
        self.key_path = directory / "key.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        self._leaf.private_key_pem.write_to_path(str(self.key_path))
        with self.cert_path.open("wb") as f:
            for blob in self._leaf.cert_chain_pems:
                f.write(blob.bytes())

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks the host name."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        return ctx

    def reissue(self) -> None:
        """Write a fresh server certificate from the same CA (to test SIGHUP reloads)."""
        leaf = self._ca.issue_cert("localhost", "127.0.0.1", "::1")
        leaf.private_key_pem.write_to_path(str(self.key_path))
        with self.cert_path.open("wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def write_config(
    directory: Path,
    *,
    ca: TestCA,
    enable: Iterable[str] = (),
    plugins: Mapping[str, Mapping[str, object]] | None = None,
    limits: Mapping[str, object] | None = None,
    queue: Mapping[str, object] | None = None,
    hostname: str = "mx.test.example",
    host: str = "127.0.0.1",
) -> Path:
    """Write ``directory/submitd.toml`` with a STARTTLS and an implicit-TLS listener on port 0.

    ``limits``, ``queue`` and ``plugins`` add keys to those tables (values as TOML would read
    them: strings for durations, lists for ``retry``). ``directory`` may be relative: it and
    the certificate paths are made absolute, so the file works from any working directory.
    """
    directory = directory.resolve()
    lines = [
        f"hostname = {_toml_value(hostname)}",
        "[[listen]]",
        f'address = "{host}:0"',
        'mode = "starttls"',
        "[[listen]]",
        f'address = "{host}:0"',
        'mode = "implicit"',
        "[tls]",
        f"cert = {_toml_value(ca.cert_path.resolve())}",
        f"key = {_toml_value(ca.key_path.resolve())}",
        'handshake_timeout = "10s"',
        "[queue]",
    ]
    queue_table: dict[str, object] = {"dir": "spool", **(queue or {})}
    lines += [f"{k} = {_toml_value(v)}" for k, v in queue_table.items()]
    lines += ["[limits]"]
    # Tests should not wait long for sessions they left open.
    merged: dict[str, object] = {"shutdown_grace": "2s", **(limits or {})}
    lines += [f"{k} = {_toml_value(v)}" for k, v in merged.items()]
    lines += ["[plugins]", f"enable = {_toml_value(list(enable))}"]
    for name, table in (plugins or {}).items():
        lines.append(f"[plugins.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path = directory / "submitd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True, kw_only=True)
class RunningServer:
    """A server started by :func:`running_server` and where it listens."""

    server: Server
    listeners: tuple[BoundListener, ...]

    def port(self, mode: ListenMode | str) -> int:
        """The bound port of the first listener in ``mode`` (``"starttls"`` or ``"implicit"``)."""
        wanted = ListenMode(mode)
        for bound in self.listeners:
            if bound.config.mode is wanted:
                return bound.port
        raise LookupError(f"no {wanted.value} listener")

    @property
    def config(self) -> Config:
        """The server's current configuration."""
        return self.server.config


@asynccontextmanager
async def running_server(
    config: Config | Path, *, extra_plugins: Iterable[tuple[str, object]] = ()
) -> AsyncIterator[RunningServer]:
    """Start a server in the background; on exit request a shutdown and wait for it."""
    cfg = load_config(config) if isinstance(config, Path) else config
    server = Server(cfg, extra_plugins=extra_plugins)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve)
        try:
            yield RunningServer(server=server, listeners=tuple(bound))
        finally:
            server.request_shutdown()


class RawSMTPClient:
    """A minimal byte-level SMTP client for tests: send exact bytes, read parsed replies."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream: trio.abc.Stream = stream
        self._buffer = bytearray()

    @classmethod
    async def connect(
        cls, host: str, port: int, *, tls: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
    ) -> RawSMTPClient:
        """Open a TCP connection (TLS from the first byte when ``tls`` is given)."""
        tcp = await trio.open_tcp_stream(host, port)
        if tls is None:
            return cls(tcp)
        stream = trio.SSLStream(tcp, tls, server_hostname=server_hostname)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return cls(stream)

    async def send(self, data: bytes) -> None:
        """Send raw bytes."""
        await self.stream.send_all(data)

    async def read_line(self) -> bytes | None:
        """One CRLF-terminated line without the CRLF, or None at EOF."""
        while True:
            idx = self._buffer.find(b"\r\n")
            if idx >= 0:
                line = bytes(self._buffer[:idx])
                del self._buffer[: idx + 2]
                return line
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self._buffer += data

    async def reply(self) -> Reply | None:
        """Read one (possibly multi-line) reply; None at EOF."""
        lines: list[bytes] = []
        while True:
            line = await self.read_line()
            if line is None:
                return None
            lines.append(line)
            if line[3:4] != b"-":
                return parse_reply(lines)

    async def command(self, line: str | bytes) -> Reply | None:
        """Send ``line`` + CRLF and read the reply."""
        data = line.encode() if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        """Upgrade the stream after a ``220`` to STARTTLS."""
        stream = trio.SSLStream(self.stream, context, server_hostname=server_hostname)
        await stream.do_handshake()
        self.stream = stream
        self._buffer.clear()

    async def at_eof(self) -> bool:
        """True when the server closed the connection (after reading any leftovers)."""
        return await self.read_line() is None

    async def aclose(self) -> None:
        """Close the connection."""
        await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> RawSMTPClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
