"""Fixtures shared by the integration and external tiers: a CA, a users file, a config."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import argon2
import pytest

from submitd.testing import TestCA, write_config
from tests.support import HASHER, PASSWORD, SENDER, USER


@pytest.fixture(scope="session")
def user_hash() -> str:
    return HASHER.hash(PASSWORD)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "tls")


@pytest.fixture
def client_tls(ca: TestCA) -> ssl.SSLContext:
    return ca.client_context()


@pytest.fixture
def users_file(tmp_path: Path, user_hash: str) -> Path:
    path = tmp_path / "users"
    path.write_text(
        "# login  argon2id-hash  allowed senders\n"
        f"{USER} {user_hash} {SENDER} @alias.example\n"
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def make_config(tmp_path: Path, ca: TestCA, users_file: Path) -> Callable[..., Path]:
    """Write a config with passwdfile + relay + maildir; keyword arguments override the rest."""

    def make(
        *, enable: tuple[str, ...] = ("passwdfile", "relay", "maildir"),
        limits: dict[str, object] | None = None,
        plugins: dict[str, dict[str, object]] | None = None,
        queue: dict[str, object] | None = None,
    ) -> Path:
        tables: dict[str, dict[str, object]] = {}
        if "passwdfile" in enable:
            tables["passwdfile"] = {"path": str(users_file)}
        if "maildir" in enable:
            tables["maildir"] = {"path": "mail"}
        tables.update(plugins or {})
        return write_config(tmp_path, ca=ca, enable=enable, plugins=tables, limits=limits,
                            queue=queue)

    return make


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@dataclass
class Argon2Calls:
    """Every argon2 verification run during a test, in order (one entry per run)."""

    hashes: list[str] = field(default_factory=list)
    passwords: list[str] = field(default_factory=list)


@pytest.fixture
def argon2_calls(monkeypatch: pytest.MonkeyPatch) -> Argon2Calls:
    """Count argon2 verifications (a cache hit or a shared verification runs none)."""
    calls = Argon2Calls()
    real = argon2.PasswordHasher.verify

    def counting(self: argon2.PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        calls.hashes.append(str(hash))
        calls.passwords.append(str(password))
        return real(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting)
    return calls
