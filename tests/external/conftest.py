"""The external tier's server: a real ``submitd serve`` child process per test, and a real Postfix
smarthost for the forwarding tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from submitd.testing import TestCA
from tests.external.postfix_sink import PostfixSink, postfix_sink
from tests.support import ServerProcess


@pytest.fixture
def served(make_config: Callable[..., Path]) -> Iterator[ServerProcess]:
    """``submitd serve`` with passwdfile + maildir; on teardown it must exit 0 on SIGTERM."""
    server = ServerProcess(make_config())
    yield server
    status = server.stop(signal.SIGTERM)
    assert status == 0, "".join(server.log)
    assert not any("Traceback" in line for line in server.log), "".join(server.log)


@pytest.fixture(scope="module")
def sink_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """The smarthost's own CA: a different one from the ``ca`` of submitd's listeners."""
    return TestCA(tmp_path_factory.mktemp("sink-tls"))


@pytest.fixture(scope="module")
def smarthost(
    sink_ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostfixSink]:
    """A Postfix smarthost requiring STARTTLS and AUTH, shared by one test module.

    Tests filter its Maildir by their own Subject or Message-ID; a test that stops it must start
    it again.
    """
    keep = tmp_path_factory.mktemp("sink-log") / "maillog"
    with postfix_sink(ca=sink_ca, keep_log=keep) as sink:
        yield sink


@pytest.fixture
def relay_config(make_config: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """Write a config whose ``smarthost`` plugin forwards to a sink.

    ``relay_config(sink, password=..., queue={...}, **smarthost_keys)``: keys override the
    ``[plugins.smarthost]`` table (``None`` leaves a key out); retries and mark-down are short.
    """

    def make(
        sink: PostfixSink,
        *,
        password: str | None = None,
        queue: dict[str, object] | None = None,
        **keys: object,
    ) -> Path:
        secret = tmp_path / "smarthost.secret"
        secret.write_text((sink.password if password is None else password) + "\n")
        secret.chmod(0o600)
        table: dict[str, object | None] = {
            "host": "localhost",
            "port": sink.port,
            "tls": "starttls",
            "ca_file": str(sink.ca.ca_path),
            "username": sink.user,
            "password_file": str(secret),
            "host_down_time": "1s",
            "connect_timeout": "5s",
            "command_timeout": "15s",
            **keys,
        }
        return make_config(
            enable=("passwdfile", "smarthost"),
            plugins={"smarthost": {k: v for k, v in table.items() if v is not None}},
            queue={"retry": ["1s"], **(queue or {})},
        )

    return make


@pytest.fixture
def serve() -> Iterator[Callable[[Path], ServerProcess]]:
    """Start ``submitd serve`` processes; on teardown each must exit 0 on SIGTERM, no traceback."""
    servers: list[ServerProcess] = []

    def start(config: Path) -> ServerProcess:
        server = ServerProcess(config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        status = server.stop(signal.SIGTERM)
        assert status == 0, server.text()
        assert "Traceback" not in server.text(), server.text()


def _submitd_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``submitd ARGS -c CONFIG`` (the installed command line) and return its result."""
    exe = Path(sys.executable).with_name("submitd")
    return subprocess.run(
        [str(exe), *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def queue_list() -> Callable[[Path], list[dict[str, Any]]]:
    """``queue_list(config)``: the messages of ``submitd queue list --json``."""

    def run(config: Path) -> list[dict[str, Any]]:
        result = _submitd_command(config, "queue", "list", "--json")
        assert result.returncode == 0, f"queue list failed:\n{result.stdout}{result.stderr}"
        messages = json.loads(result.stdout)["messages"]
        assert isinstance(messages, list)
        return messages

    return run


@pytest.fixture
def queue_command() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``queue_command(config, "delete", ID)``: run ``submitd queue ARGS -c CONFIG``."""

    def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return _submitd_command(config, "queue", *args)

    return run
