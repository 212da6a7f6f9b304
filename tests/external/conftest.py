"""The external tier's server: a real ``submitd serve`` child process per test."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess


@pytest.fixture
def served(make_config: Callable[..., Path]) -> Iterator[ServerProcess]:
    """``submitd serve`` with passwdfile + maildir; on teardown it must exit 0 on SIGTERM."""
    server = ServerProcess(make_config())
    yield server
    status = server.stop(signal.SIGTERM)
    assert status == 0, "".join(server.log)
    assert not any("Traceback" in line for line in server.log), "".join(server.log)
