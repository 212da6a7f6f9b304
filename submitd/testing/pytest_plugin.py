"""pytest fixtures for plugin projects: a CA, a user, a config, a running server, a smarthost.

Registered as the pytest plugin ``submitd`` (entry point group ``pytest11``), so installing
submitd makes the fixtures available to every test; they need pytest-trio with
``trio_mode = true``. Each fixture is named ``submitd_*``:

- ``submitd_ca``: a :class:`~submitd.testing.TestCA` in ``tmp_path/tls``.
- ``submitd_user``: a :class:`~submitd.testing.TestUser` (``tester``, sender
  ``tester@example.com``) in the users file ``tmp_path/users``.
- ``submitd_settings``: a dict of :func:`~submitd.testing.write_config` keywords; override
  it in your tests to enable your plugin, e.g. ``{"enable": ["mine"], "plugins": {"mine":
  {...}}}``. The names in ``enable`` come after ``passwdfile`` and ``maildir`` (so they are
  asked first).
- ``submitd_config``: the configuration file written from those settings.
- ``submitd_maildir``: where the ``maildir`` plugin delivers (read it with
  :func:`~submitd.testing.wait_for_delivery`).
- ``submitd_server``: a :class:`~submitd.testing.RunningServer` on that configuration,
  stopped after the test.
- ``submitd_smarthost``: a running :class:`~submitd.testing.FakeSmarthost` (STARTTLS, no
  AUTH) with the test CA's certificate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from . import FakeSmarthost, RunningServer, TestCA, TestUser

__all__ = [
    "submitd_ca",
    "submitd_config",
    "submitd_maildir",
    "submitd_server",
    "submitd_settings",
    "submitd_smarthost",
    "submitd_user",
]

#: The login, password and sender of the ``submitd_user`` fixture.
USER = ("tester", "tester's password", "tester@example.com")


@pytest.fixture
def submitd_ca(tmp_path: Path) -> TestCA:
    """A throwaway CA with a ``localhost`` server certificate."""
    from . import TestCA

    return TestCA(tmp_path / "tls")


@pytest.fixture
def submitd_user(tmp_path: Path) -> TestUser:
    """One login in ``tmp_path/users`` that may send as ``tester@example.com``."""
    from . import add_user

    login, password, sender = USER
    return add_user(tmp_path / "users", login, password, [sender])


@pytest.fixture
def submitd_settings() -> dict[str, Any]:
    """Keywords for :func:`~submitd.testing.write_config`; override to enable your plugin."""
    return {}


@pytest.fixture
def submitd_maildir(tmp_path: Path) -> Path:
    """The Maildir the ``maildir`` plugin of ``submitd_config`` delivers into."""
    return tmp_path / "mail"


@pytest.fixture
def submitd_config(
    tmp_path: Path, submitd_ca: TestCA, submitd_user: TestUser, submitd_maildir: Path,
    submitd_settings: dict[str, Any],
) -> Path:
    """``tmp_path/submitd.toml``: passwdfile, relay and maildir, then ``submitd_settings``."""
    from . import write_config

    settings = dict(submitd_settings)
    enable = ["passwdfile", "relay", "maildir", *settings.pop("enable", ())]
    plugins = {"passwdfile": {"path": str(tmp_path / "users")},
               "maildir": {"path": str(submitd_maildir)}, **settings.pop("plugins", {})}
    return write_config(tmp_path, ca=submitd_ca, enable=enable, plugins=plugins, **settings)


@pytest.fixture
async def submitd_server(submitd_config: Path) -> AsyncIterator[RunningServer]:
    """A server running ``submitd_config`` in this test's trio run."""
    from . import running_server

    async with running_server(submitd_config) as server:
        yield server


@pytest.fixture
async def submitd_smarthost(submitd_ca: TestCA) -> AsyncIterator[FakeSmarthost]:
    """A recording fake smarthost on loopback (``.address``, ``.wait_for_messages()``)."""
    from . import running_smarthost

    async with running_smarthost(ca=submitd_ca) as fake:
        yield fake
