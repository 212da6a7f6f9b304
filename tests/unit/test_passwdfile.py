"""The passwdfile plugin, driven through its hooks as the session would call them."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import argon2
import pytest
import trio

from submitd import (
    SENDERS,
    AuthResult,
    Config,
    ConfigError,
    Credentials,
    Secret,
    SessionInfo,
)
from submitd.config import load_config
from submitd.passwords import UsersFile
from submitd_plugins import passwdfile
from tests.conftest import Argon2Calls

CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PASSWORD = "s3cret passphrase"
CONFIG = """\
hostname = "mail.example.org"
[[listen]]
address = "127.0.0.1:2587"
mode = "starttls"
[tls]
cert = "cert.pem"
key = "key.pem"
[plugins]
enable = ["passwdfile"]
[plugins.passwdfile]
path = "users"
"""


@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(
        "# test users\n"
        f"alice {CHEAP.hash(PASSWORD)} alice@example.com @alias.example\n"
        f"bounces {CHEAP.hash(PASSWORD)} <> notify@example.com\n"
    )
    path.chmod(0o600)
    return path


def make_config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "submitd.toml"
    path.write_text(CONFIG + extra)
    return load_config(path)


@pytest.fixture
def config(tmp_path: Path, users_path: Path) -> Config:
    config = make_config(tmp_path)
    passwdfile.submitd_configure(config)
    return config


def session(config: Config, username: str | None = "alice") -> SessionInfo:
    return SessionInfo(
        session_id="S1", config=config, listener=config.listeners[0], peer_host="192.0.2.7",
        peer_port=40000, tls=True, username=username,
    )


def creds(username: str, password: str = PASSWORD) -> Credentials:
    return Credentials(mechanism="PLAIN", username=username, authzid="", password=Secret(password))


# --- configuration --------------------------------------------------------------------------


def test_configure_loads_the_users_file_relative_to_the_config(config: Config) -> None:
    state = config.stash[passwdfile.STATE]
    assert state.path == config.path.parent / "users"
    assert [e.login for e in state.users.entries] == ["alice", "bounces"]
    assert state.queue_timeout == 10.0


def test_min_password_length_is_a_known_setting(tmp_path: Path, users_path: Path) -> None:
    (tmp_path / "submitd.toml").write_text(CONFIG + "min_password_length = 16\n")
    config = load_config(tmp_path / "submitd.toml")
    passwdfile.submitd_configure(config)  # the key is not refused as unknown at start
    assert passwdfile.min_password_length(config.plugin_table("passwdfile")) == 16


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ('colour = "red"', "plugins.passwdfile.colour", "unknown key"),
        ("max_parallel = 0", "plugins.passwdfile.max_parallel", "positive integer"),
        ('max_parallel = "4"', "plugins.passwdfile.max_parallel", "positive integer"),
        ('queue_timeout = "soon"', "plugins.passwdfile.queue_timeout", "not a duration"),
        ("queue_timeout = 0", "plugins.passwdfile.queue_timeout", "longer than zero"),
        ('path = "absent"', "plugins.passwdfile.path", "no such file"),
        ("min_password_length = 0", "plugins.passwdfile.min_password_length", "positive integer"),
        ('min_password_length = "12"', "plugins.passwdfile.min_password_length",
         "positive integer"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(
    tmp_path: Path, users_path: Path, table: str, key: str, fragment: str
) -> None:
    text = CONFIG.replace('path = "users"\n', "") if table.startswith("path") else CONFIG
    (tmp_path / "submitd.toml").write_text(text + table + "\n")
    config = load_config(tmp_path / "submitd.toml")
    with pytest.raises(ConfigError) as info:
        passwdfile.submitd_configure(config)
    assert info.value.key == key
    assert info.value.path == config.path
    assert fragment in info.value.message


def test_missing_path_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "submitd.toml").write_text(CONFIG.replace('path = "users"\n', "max_parallel = 2\n"))
    with pytest.raises(ConfigError, match="required") as info:
        passwdfile.submitd_configure(load_config(tmp_path / "submitd.toml"))
    assert info.value.key == "plugins.passwdfile.path"


def test_invalid_users_file_is_a_config_error_with_the_line(
    tmp_path: Path, users_path: Path
) -> None:
    users_path.write_text("# ok\nalice nothash\n")
    with pytest.raises(ConfigError, match=r"users:2: the hash of 'alice'") as info:
        passwdfile.submitd_configure(make_config(tmp_path))
    assert info.value.key == "plugins.passwdfile.path"


# --- AUTH -----------------------------------------------------------------------------------


async def test_correct_password_logs_in_and_upgrades_an_outdated_hash(
    config: Config, users_path: Path
) -> None:
    result = await passwdfile.submitd_auth(session(config, None), creds("alice"))
    assert result == AuthResult.ok("alice")
    entry = UsersFile.load(users_path).lookup("alice")
    assert entry is not None
    assert argon2.extract_parameters(entry.hash).memory_cost == argon2.PasswordHasher().memory_cost
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o600
    assert users_path.read_text().startswith("# test users\n")
    # The upgraded hash still takes the same password.
    again = await passwdfile.submitd_auth(session(config, None), creds("alice"))
    assert again == AuthResult.ok("alice")


async def test_wrong_password_and_unknown_login_are_denied(config: Config) -> None:
    denied = AuthResult.deny()
    assert await passwdfile.submitd_auth(session(config, None), creds("alice", "wrong")) == denied
    assert await passwdfile.submitd_auth(session(config, None), creds("mallory")) == denied
    assert await passwdfile.submitd_auth(session(config, None), creds("ALICE")) == denied


async def test_login_waits_at_most_queue_timeout_for_a_free_slot(
    tmp_path: Path, users_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path, 'max_parallel = 1\nqueue_timeout = "3s"\n')
    passwdfile.submitd_configure(config)
    limiter = config.stash[passwdfile.STATE].limiter
    busy = object()
    await limiter.acquire_on_behalf_of(busy)
    start = trio.current_time()
    result = await passwdfile.submitd_auth(session(config, None), creds("alice"))
    assert trio.current_time() - start == pytest.approx(3.0)
    assert result is not None and result.accepted is False
    assert result.reply is not None
    assert str(result.reply) == "454 4.7.0 Temporary authentication failure, try again later"
    assert limiter.borrowed_tokens == 1  # the refused login holds nothing

    limiter.release_on_behalf_of(busy)
    assert await passwdfile.submitd_auth(session(config, None), creds("bounces")) == (
        AuthResult.ok("bounces")
    )
    assert limiter.borrowed_tokens == 0


async def test_a_login_queued_behind_a_busy_slot_runs_when_it_frees(
    tmp_path: Path, users_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(tmp_path, 'max_parallel = 1\nqueue_timeout = "3s"\n')
    passwdfile.submitd_configure(config)
    limiter = config.stash[passwdfile.STATE].limiter
    busy = object()
    await limiter.acquire_on_behalf_of(busy)
    results: list[AuthResult | None] = []

    async def login() -> None:
        results.append(await passwdfile.submitd_auth(session(config, None), creds("bounces")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(login)
        await trio.sleep(2)
        limiter.release_on_behalf_of(busy)
    assert results == [AuthResult.ok("bounces")]


async def test_users_file_changes_apply_without_a_restart(
    config: Config, users_path: Path
) -> None:
    UsersFile(path=users_path, hasher=CHEAP).add_user("dave", Secret("pw"), ["dave@example.com"])
    assert await passwdfile.submitd_auth(session(config, None), creds("dave", "pw")) == (
        AuthResult.ok("dave")
    )
    assert config.stash[SENDERS]["passwdfile"]["dave"] == ("dave@example.com",)
    UsersFile.load(users_path).delete_user("dave")
    assert await passwdfile.submitd_auth(session(config, None), creds("dave", "pw")) == (
        AuthResult.deny()
    )
    assert "dave" not in config.stash[SENDERS]["passwdfile"]


async def test_a_broken_users_file_keeps_the_previous_users(
    config: Config, users_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    users_path.write_text(users_path.read_text() + "broken line\n")
    with caplog.at_level(logging.ERROR, logger="submitd.plugins.passwdfile"):
        first = await passwdfile.submitd_auth(session(config, None), creds("bounces"))
        second = await passwdfile.submitd_auth(session(config, None), creds("bounces"))
    assert first == second == AuthResult.ok("bounces")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once per broken version, not per login
    assert ":4:" in errors[0].getMessage()


async def test_a_vanished_users_file_keeps_the_previous_users(
    config: Config, users_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    users_path.unlink()
    with caplog.at_level(logging.ERROR, logger="submitd.plugins.passwdfile"):
        for _ in range(2):
            assert await passwdfile.submitd_auth(session(config, None), creds("bounces")) == (
                AuthResult.ok("bounces")
            )
    assert ["unreadable" in r.getMessage() for r in caplog.records] == [True]


async def test_unwritable_users_file_still_logs_in_and_stops_trying_to_rehash(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []

    def read_only(self: UsersFile, login: str, password: Secret, old_hash: str) -> UsersFile:
        attempts.append(login)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(UsersFile, "rehash", read_only)
    for _ in range(2):
        assert await passwdfile.submitd_auth(session(config, None), creds("alice")) == (
            AuthResult.ok("alice")
        )
    assert attempts == ["alice"]


# --- senders: published for the relay plugin, not checked here --------------------------------


def test_the_logins_senders_are_published_for_the_policy_plugins(config: Config) -> None:
    published = config.stash[SENDERS]["passwdfile"]
    assert dict(published) == {
        "alice": ("alice@example.com", "@alias.example"),
        "bounces": ("<>", "notify@example.com"),
    }
    assert published.get("mallory") is None
    assert "ALICE" not in published  # logins match exactly


def test_passwdfile_only_authenticates_and_leaves_senders_to_relay() -> None:
    assert hasattr(passwdfile, "submitd_auth")
    for hook in ("submitd_mail_from", "submitd_rcpt_check", "submitd_data_filter"):
        assert not hasattr(passwdfile, hook), hook


def test_plugin_state_lives_in_the_config_stash_not_in_module_globals(
    tmp_path: Path, users_path: Path
) -> None:
    first, second = make_config(tmp_path), make_config(tmp_path)
    passwdfile.submitd_configure(first)
    passwdfile.submitd_configure(second)
    assert first.stash[passwdfile.STATE] is not second.stash[passwdfile.STATE]


# --- logins that arrive together share one verification --------------------------------------


@pytest.fixture
def verifications(argon2_calls: Argon2Calls) -> list[str]:
    """The passwords argon2 was run on, one entry per verification."""
    return argon2_calls.passwords


async def concurrent_logins(config: Config, attempts: list[Credentials]) -> list[AuthResult | None]:
    results: list[AuthResult | None] = [None] * len(attempts)

    async def login(index: int) -> None:
        results[index] = await passwdfile.submitd_auth(session(config, None), attempts[index])

    async with trio.open_nursery() as nursery:
        for index in range(len(attempts)):
            nursery.start_soon(login, index)
    return results


async def test_twenty_logins_at_once_with_an_empty_cache_run_argon2_once(
    config: Config, verifications: list[str]
) -> None:
    results = await concurrent_logins(config, [creds("bounces")] * 20)
    assert results == [AuthResult.ok("bounces")] * 20
    assert verifications == [PASSWORD]
    assert config.stash[passwdfile.STATE].in_flight == {}


async def test_a_wrong_password_never_rides_on_a_concurrent_right_one(
    config: Config, verifications: list[str]
) -> None:
    attempts = [creds("bounces", "wrong password"), creds("bounces")] * 5 + [
        creds("bounces", PASSWORD + " "), creds("alice", PASSWORD)
    ]
    results = await concurrent_logins(config, attempts)
    expected = [AuthResult.deny(), AuthResult.ok("bounces")] * 5 + [
        AuthResult.deny(), AuthResult.ok("alice")
    ]
    assert results == expected
    # One verification per distinct login and password, each answer only to its own kind.
    assert sorted(verifications) == sorted(
        ["wrong password", PASSWORD, PASSWORD + " ", PASSWORD]
    )


async def test_logins_waiting_on_a_refused_password_are_each_refused_and_not_remembered(
    config: Config, verifications: list[str]
) -> None:
    results = await concurrent_logins(config, [creds("bounces", "wrong")] * 5)
    assert results == [AuthResult.deny()] * 5
    assert verifications == ["wrong"]
    assert await passwdfile.submitd_auth(session(config, None), creds("bounces", "wrong")) == (
        AuthResult.deny()
    )
    assert verifications == ["wrong", "wrong"], "a refusal is never cached"


async def test_a_waiter_verifies_itself_when_the_first_login_goes_away(
    tmp_path: Path, users_path: Path, autojump_clock: trio.testing.MockClock,
    verifications: list[str],
) -> None:
    config = make_config(tmp_path, 'max_parallel = 1\nqueue_timeout = "30s"\n')
    passwdfile.submitd_configure(config)
    limiter = config.stash[passwdfile.STATE].limiter
    busy = object()
    await limiter.acquire_on_behalf_of(busy)
    results: list[AuthResult | None] = []

    async def first() -> None:
        with trio.move_on_after(1):  # the client hangs up while queued for a slot
            await passwdfile.submitd_auth(session(config, None), creds("bounces"))

    async def second() -> None:
        results.append(await passwdfile.submitd_auth(session(config, None), creds("bounces")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.sleep(2)
        limiter.release_on_behalf_of(busy)
    assert results == [AuthResult.ok("bounces")]
    assert verifications == [PASSWORD]
    assert limiter.borrowed_tokens == 0


async def test_cache_ttl_zero_verifies_each_concurrent_login(
    tmp_path: Path, users_path: Path, verifications: list[str]
) -> None:
    config = make_config(tmp_path, "cache_ttl = 0\n")
    passwdfile.submitd_configure(config)
    results = await concurrent_logins(config, [creds("bounces")] * 3)
    assert results == [AuthResult.ok("bounces")] * 3
    assert verifications == [PASSWORD] * 3
