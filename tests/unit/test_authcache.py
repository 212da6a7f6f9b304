"""The verified-credentials cache: the class with an injected clock, then the passwdfile plugin
using it, driven through its AUTH hook as the session calls it (argon2 calls counted)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import argon2
import pytest

from submitd import AuthResult, Config, ConfigError, Credentials, Secret, SessionInfo
from submitd.config import load_config
from submitd.passwords import CredentialCache, UsersFile
from submitd_plugins import passwdfile
from tests.conftest import Argon2Calls
from tests.unit.test_passwdfile import CONFIG, PASSWORD

NEW_PASSWORD = "another passphrase"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def current_hash() -> str:
    """A hash with today's default parameters: logging in with it needs no rehash."""
    return argon2.PasswordHasher().hash(PASSWORD)


@pytest.fixture
def users_path(tmp_path: Path, current_hash: str) -> Path:
    path = tmp_path / "users"
    path.write_text(f"alice {current_hash} alice@example.com\nbob {current_hash}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def verifications(argon2_calls: Argon2Calls) -> list[str]:
    """Every argon2 verification the server runs, by hash (a hash means a cache miss)."""
    return argon2_calls.hashes


def make_config(tmp_path: Path, extra: str = "") -> Config:
    (tmp_path / "submitd.toml").write_text(CONFIG + extra)
    config = load_config(tmp_path / "submitd.toml")
    passwdfile.submitd_configure(config)
    return config


@pytest.fixture
def config(tmp_path: Path, users_path: Path) -> Config:
    return make_config(tmp_path)


def login(config: Config) -> Callable[..., Awaitable[AuthResult | None]]:
    async def attempt(user: str = "alice", password: str = PASSWORD) -> AuthResult | None:
        info = SessionInfo(
            session_id="S1", config=config, listener=config.listeners[0],
            peer_host="192.0.2.7", peer_port=40000, tls=True,
        )
        creds = Credentials(mechanism="PLAIN", username=user, authzid="",
                            password=Secret(password))
        return await passwdfile.submitd_auth(info, creds)

    return attempt


# --- the cache itself -----------------------------------------------------------------------


def users_with(tmp_path: Path, text: str) -> UsersFile:
    path = tmp_path / "u"
    path.write_text(text)
    return UsersFile.load(path)


def test_the_digest_is_keyed_unambiguous_and_never_the_password() -> None:
    cache = CredentialCache(ttl=60)
    a = cache.digest("ab", Secret("c"))
    b = cache.digest("a", Secret("bc"))
    assert a is not None and b is not None
    assert a != b, "login and password are length-prefixed"
    assert cache.digest("ab", Secret("c")) == a
    assert CredentialCache(ttl=60).digest("ab", Secret("c")) != a, "a random key per cache"
    assert len(a) == 32  # a SHA-256 digest: nothing of the password is kept
    assert PASSWORD not in repr(cache.digest("alice", Secret(PASSWORD))) + repr(cache)
    assert CredentialCache(ttl=0).digest("ab", Secret("c")) is None


def test_an_entry_holds_until_its_ttl_then_misses(tmp_path: Path, current_hash: str) -> None:
    clock = Clock()
    cache = CredentialCache(ttl=600, clock=clock)
    users = users_with(tmp_path, f"alice {current_hash}\n")
    digest = cache.digest("alice", Secret(PASSWORD))
    cache.store(digest, "alice", users)
    clock.now += 599
    assert cache.may_hold(digest) and cache.verified(digest, "alice", users)
    clock.now += 1  # use does not extend it
    assert not cache.may_hold(digest)
    assert not cache.verified(digest, "alice", users)
    assert len(cache) == 0 and cache.hits == 1


def test_a_changed_hash_or_another_file_version_misses(tmp_path: Path) -> None:
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    cache = CredentialCache(ttl=600)
    old = users_with(tmp_path, f"alice {hasher.hash(PASSWORD)}\nbob {hasher.hash('x')}\n")
    digest = cache.digest("alice", Secret(PASSWORD))
    cache.store(digest, "alice", old)
    assert not cache.verified(digest, "bob", old), "the digest belongs to alice"
    cache.store(digest, "alice", old)
    # Same signature, another hash for alice (as if a password change raced the file check).
    changed = UsersFile.parse(old.path, f"alice {hasher.hash('new')}\n".encode(),
                              signature=old.signature)
    assert not cache.verified(digest, "alice", changed)
    cache.store(digest, "alice", old)
    newer = UsersFile(path=old.path, lines=old.lines, signature=(0, 0, 0, 1))
    assert not cache.verified(digest, "alice", newer), "a new version clears the cache"
    assert len(cache) == 0


def test_the_least_recently_used_entry_goes_first(tmp_path: Path, current_hash: str) -> None:
    cache = CredentialCache(ttl=600, max_entries=2)
    users = users_with(tmp_path, "".join(f"u{i} {current_hash}\n" for i in range(3)))
    digests = [cache.digest(f"u{i}", Secret(PASSWORD)) for i in range(3)]
    cache.store(digests[0], "u0", users)
    cache.store(digests[1], "u1", users)
    assert cache.verified(digests[0], "u0", users)  # u0 is now the most recently used
    cache.store(digests[2], "u2", users)
    assert len(cache) == 2
    assert [cache.may_hold(d) for d in digests] == [True, False, True]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="ttl must be"):
        CredentialCache(ttl=-1)
    with pytest.raises(ValueError, match="ttl must be"):
        CredentialCache(ttl=1, max_entries=0)


# --- the passwdfile plugin with its cache ----------------------------------------------------


async def test_a_second_login_with_the_same_password_runs_no_argon2(
    config: Config, verifications: list[str]
) -> None:
    attempt = login(config)
    assert await attempt() == AuthResult.ok("alice")
    assert await attempt() == AuthResult.ok("alice")
    assert await attempt() == AuthResult.ok("alice")
    assert len(verifications) == 1
    assert config.stash[passwdfile.STATE].cache.hits == 2


async def test_a_wrong_password_after_a_cached_success_is_refused_every_time(
    config: Config, verifications: list[str]
) -> None:
    attempt = login(config)
    assert await attempt() == AuthResult.ok("alice")
    for _ in range(2):  # never cached: each wrong attempt is verified again
        assert await attempt(password="wrong") == AuthResult.deny()
    assert await attempt("bob") == AuthResult.ok("bob")  # another login: its own entry
    assert len(verifications) == 4
    assert await attempt() == AuthResult.ok("alice")
    assert len(verifications) == 4


async def test_a_password_change_or_a_deletion_ends_the_cached_login(
    config: Config, users_path: Path, verifications: list[str]
) -> None:
    attempt = login(config)
    assert await attempt() == AuthResult.ok("alice")
    assert await attempt("bob") == AuthResult.ok("bob")
    assert await attempt() == AuthResult.ok("alice")
    assert len(verifications) == 2
    UsersFile.load(users_path).set_password("alice", Secret(NEW_PASSWORD))
    assert await attempt() == AuthResult.deny()
    assert await attempt(password=NEW_PASSWORD) == AuthResult.ok("alice")
    assert await attempt(password=NEW_PASSWORD) == AuthResult.ok("alice")
    UsersFile.load(users_path).delete_user("bob")
    assert await attempt("bob") == AuthResult.deny()


async def test_cache_ttl_zero_verifies_every_login(
    tmp_path: Path, users_path: Path, verifications: list[str]
) -> None:
    config = make_config(tmp_path, "cache_ttl = 0\n")
    attempt = login(config)
    for _ in range(3):
        assert await attempt() == AuthResult.ok("alice")
    assert len(verifications) == 3


async def test_an_expired_entry_verifies_again(
    config: Config, verifications: list[str]
) -> None:
    clock = Clock()
    state = config.stash[passwdfile.STATE]
    state.cache = CredentialCache(ttl=600, clock=clock)
    attempt = login(config)
    assert await attempt() == AuthResult.ok("alice")
    clock.now += 599
    assert await attempt() == AuthResult.ok("alice")
    clock.now += 1
    assert await attempt() == AuthResult.ok("alice")
    assert len(verifications) == 2


async def test_an_outdated_hash_is_rehashed_before_anything_is_cached(
    tmp_path: Path, users_path: Path, verifications: list[str]
) -> None:
    cheap = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    users_path.write_text(f"alice {cheap.hash(PASSWORD)}\n")
    config = make_config(tmp_path)
    attempt = login(config)
    assert await attempt() == AuthResult.ok("alice")  # verified, then rehashed
    rehashed = UsersFile.load(users_path).lookup("alice")
    assert rehashed is not None and argon2.extract_parameters(rehashed.hash).memory_cost == (
        argon2.PasswordHasher().memory_cost)
    assert await attempt() == AuthResult.ok("alice")  # verified against the new hash
    assert await attempt() == AuthResult.ok("alice")  # from the cache
    assert verifications[1:] == [rehashed.hash]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [('"soon"', "not a duration"), ('"-5m"', "not a duration"), ("true", "")],
)
def test_a_bad_cache_ttl_is_a_config_error_naming_the_key(
    tmp_path: Path, users_path: Path, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, f"cache_ttl = {value}\n")
    assert info.value.key == "plugins.passwdfile.cache_ttl"
    assert fragment in info.value.message


def test_cache_ttl_is_a_duration_and_defaults_to_ten_minutes(
    tmp_path: Path, users_path: Path
) -> None:
    assert make_config(tmp_path).stash[passwdfile.STATE].cache.ttl == 600
    assert make_config(tmp_path, 'cache_ttl = "1h"\n').stash[passwdfile.STATE].cache.ttl == 3600
