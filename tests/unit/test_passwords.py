"""The users file: parsing, verification, sender ownership and atomic rewrites."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import argon2
import pytest

from submitd.passwords import (
    DEFAULT_MIN_PASSWORD_LENGTH,
    NoSuchUserError,
    UserEntry,
    UserExistsError,
    UsersFile,
    UsersFileError,
    VerifyResult,
    check_password_length,
    min_password_length,
    validate_sender,
)
from submitd.secret import Secret

ETC = Path(__file__).resolve().parents[2] / "etc"
# Cheap parameters keep the tests fast; by argon2-cffi's defaults they are "outdated".
CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
STRONGER = argon2.PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1)
ALICE_PW = "alice's secret"
ALICE_HASH = CHEAP.hash(ALICE_PW)
BOB_HASH = CHEAP.hash("bob's secret")
ARGON2I_HASH = argon2.PasswordHasher(time_cost=1, memory_cost=1024, type=argon2.Type.I).hash("x")


def write_users(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "users"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    return write_users(tmp_path, (
        "# submitd users\n"
        "\n"
        f"alice {ALICE_HASH} alice@Example.COM @example.org\n"
        f"  bob   {BOB_HASH}   bob@example.com <>\n"
        f"carol {CHEAP.hash('x')}\n"
    ))


def test_parse_keeps_entries_comments_and_normalises_sender_domains(users_path: Path) -> None:
    users = UsersFile.load(users_path, hasher=CHEAP)
    assert [e.login for e in users.entries] == ["alice", "bob", "carol"]
    assert users.lookup("alice") == UserEntry(
        login="alice", hash=ALICE_HASH, senders=("alice@example.com", "@example.org")
    )
    bob, carol = users.lookup("bob"), users.lookup("carol")
    assert bob is not None and bob.senders == ("bob@example.com", "<>")
    assert carol is not None and carol.senders == ()
    assert users.lookup("Alice") is None  # logins match exactly
    assert users.lines[:2] == ("# submitd users", "")
    assert len(users) == 3 and "bob" in users


def test_commented_examples_in_etc_parse_once_uncommented() -> None:
    text = (ETC / "users.example").read_text()
    examples = [
        line.removeprefix("# ") for line in text.splitlines()
        if line.startswith("# ") and " $argon2id$" in line
    ]
    assert len(examples) == 2
    users = UsersFile.parse(ETC / "users.example", text.encode())
    assert len(users) == 0  # nothing active in the shipped example
    enabled = UsersFile.parse(Path("users"), "\n".join(examples).encode())
    assert enabled.sender_allowed("newsletter", "")
    assert enabled.sender_allowed("alice", "alice@example.com")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("alice", "expected: LOGIN HASH"),
        ("alice notahash", "not an argon2 hash"),
        ("alice $argon2id$v=19$garbage", "not an argon2 hash"),
        (f"alice {ARGON2I_HASH}", "not argon2id"),
        (f"alice {ALICE_HASH} not-an-address", "invalid sender"),
        (f"alice {ALICE_HASH} user@localhost", "invalid sender"),
        (f"alice {ALICE_HASH} a b@example.com", "invalid sender"),
        (f"alice {ALICE_HASH}\nalice {BOB_HASH}", "appears twice"),
    ],
)
def test_parse_errors_name_the_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    path = write_users(tmp_path, f"# header\n{line}\n")
    with pytest.raises(UsersFileError) as info:
        UsersFile.load(path)
    err = info.value
    assert err.path == path
    assert err.line == line.count("\n") + 2
    assert str(err).startswith(f"{path}:{err.line}: ")
    assert fragment in str(err)


def test_invalid_utf8_is_a_parse_error(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"# ok\n\xff\n")
    with pytest.raises(UsersFileError, match=r":2: not valid UTF-8"):
        UsersFile.load(path)


def test_missing_file_is_an_error_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="no such file"):
        UsersFile.load(tmp_path / "absent")
    assert len(UsersFile.load(tmp_path / "absent", missing_ok=True)) == 0


def test_correct_password_verifies_and_old_parameters_ask_for_a_rehash(users_path: Path) -> None:
    assert UsersFile.load(users_path, hasher=CHEAP).verify("alice", Secret(ALICE_PW)) == (
        VerifyResult(ok=True, needs_rehash=False)
    )
    # By default the current parameters are argon2-cffi's, stronger than CHEAP.
    assert UsersFile.load(users_path).verify("alice", Secret(ALICE_PW)) == (
        VerifyResult(ok=True, needs_rehash=True)
    )


def test_wrong_password_and_unknown_login_are_refused(users_path: Path) -> None:
    users = UsersFile.load(users_path)  # the dummy hash for unknown logins: default parameters
    assert users.verify("alice", Secret("wrong")) == VerifyResult(ok=False)
    assert users.verify("mallory", Secret(ALICE_PW)) == VerifyResult(ok=False)
    assert users.verify("Alice", Secret(ALICE_PW)) == VerifyResult(ok=False)


def test_hash_with_current_parameters_needs_no_rehash(tmp_path: Path) -> None:
    users = UsersFile(path=tmp_path / "users", hasher=CHEAP).add_user("dave", Secret("pw"))
    assert users.verify("dave", Secret("pw")) == VerifyResult(ok=True, needs_rehash=False)


@pytest.mark.parametrize(
    ("login", "address", "allowed"),
    [
        ("alice", "alice@example.com", True),
        ("alice", "alice@EXAMPLE.com", True),  # domains are case-insensitive
        ("alice", "Alice@example.com", False),  # local parts are not
        ("alice", "bob@example.com", False),
        ("alice", "anyone@example.org", True),  # @domain wildcard
        ("alice", "anyone@EXAMPLE.ORG", True),
        ("alice", "anyone@sub.example.org", False),  # no subdomains
        ("alice", "alice@example.com.evil.test", False),
        ("alice", "", False),  # <> only when listed
        ("alice", "<>", False),
        ("bob", "", True),
        ("bob", "bob@example.com", True),
        ("carol", "carol@example.com", False),  # no senders: may not send
        ("mallory", "alice@example.com", False),
        ("alice", "example.org", False),
        ("alice", "@example.org", False),
    ],
)
def test_sender_allowed(users_path: Path, login: str, address: str, allowed: bool) -> None:
    assert UsersFile.load(users_path, hasher=CHEAP).sender_allowed(login, address) is allowed


@pytest.mark.parametrize(
    ("pattern", "normal"),
    [("a@Example.COM", "a@example.com"), ("@Example.org", "@example.org"), ("<>", "<>"),
     ("First.Last+tag@example.com", "First.Last+tag@example.com")],
)
def test_validate_sender_normalises_the_domain_only(pattern: str, normal: str) -> None:
    assert validate_sender(pattern) == normal


def test_add_user_creates_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    users = UsersFile(path=path, hasher=CHEAP).add_user("dave", Secret("pw"), ["dave@example.com"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert users.sender_allowed("dave", "dave@example.com")
    reloaded = UsersFile.load(path)
    assert reloaded.entries == users.entries
    assert reloaded.signature == users.signature


def test_edits_keep_comments_and_other_users(users_path: Path) -> None:
    before = users_path.read_text()
    UsersFile.load(users_path, hasher=CHEAP).add_user("dave", Secret("pw"), ["@example.net"])
    after = users_path.read_text()
    assert after.startswith("# submitd users\n\nalice ")
    assert f"alice {ALICE_HASH} alice@example.com @example.org\n" in after
    assert after.endswith("@example.net\n")
    assert len(after.splitlines()) == len(before.splitlines()) + 1
    assert [p.name for p in users_path.parent.iterdir()] == ["users"]  # no temp file left


def test_add_of_an_existing_user_is_refused_without_touching_the_file(users_path: Path) -> None:
    before = users_path.read_bytes()
    with pytest.raises(UserExistsError, match="'alice' already exists") as info:
        UsersFile.load(users_path, hasher=CHEAP).add_user("alice", Secret("hunter2"))
    assert "hunter2" not in str(info.value)
    assert users_path.read_bytes() == before


def test_set_password_replaces_the_hash(users_path: Path) -> None:
    users = UsersFile.load(users_path, hasher=CHEAP).set_password("alice", Secret("new password"))
    assert users.verify("alice", Secret("new password")).ok
    assert not users.verify("alice", Secret(ALICE_PW)).ok
    assert UsersFile.load(users_path, hasher=CHEAP).lookup("alice") == users.lookup("alice")
    assert users.lookup("alice").senders == ("alice@example.com", "@example.org")


def test_delete_user_removes_only_that_line(users_path: Path) -> None:
    users = UsersFile.load(users_path, hasher=CHEAP).delete_user("bob")
    assert [e.login for e in users.entries] == ["alice", "carol"]
    assert [e.login for e in UsersFile.load(users_path, hasher=CHEAP).entries] == ["alice", "carol"]


def test_edits_of_a_missing_user_are_refused(users_path: Path) -> None:
    users = UsersFile.load(users_path, hasher=CHEAP)
    with pytest.raises(NoSuchUserError):
        users.set_password("mallory", Secret("pw"))
    with pytest.raises(NoSuchUserError):
        users.delete_user("mallory")


def test_rewrite_keeps_group_read_but_never_world_access(users_path: Path) -> None:
    users_path.chmod(0o644)
    UsersFile.load(users_path, hasher=CHEAP).delete_user("carol")
    assert stat.S_IMODE(users_path.stat().st_mode) == 0o640


def test_rehash_upgrades_the_parameters(users_path: Path) -> None:
    users = UsersFile.load(users_path, hasher=STRONGER)
    assert users.verify("alice", Secret(ALICE_PW)) == VerifyResult(ok=True, needs_rehash=True)
    upgraded = users.rehash("alice", Secret(ALICE_PW), ALICE_HASH)
    assert upgraded.verify("alice", Secret(ALICE_PW)) == VerifyResult(ok=True, needs_rehash=False)
    stored = UsersFile.load(users_path).lookup("alice")
    assert stored == upgraded.lookup("alice")
    assert stored is not None and argon2.extract_parameters(stored.hash).time_cost == 2


def test_rehash_leaves_a_password_changed_meanwhile_alone(users_path: Path) -> None:
    stale = UsersFile.load(users_path, hasher=CHEAP)
    changed = stale.set_password("alice", Secret("changed"))
    after = stale.rehash("alice", Secret(ALICE_PW), ALICE_HASH)
    assert after.lookup("alice") == changed.lookup("alice")
    assert UsersFile.load(users_path, hasher=CHEAP).verify("alice", Secret("changed")).ok


def test_concurrent_edits_do_not_lose_users(tmp_path: Path) -> None:
    path = tmp_path / "users"
    errors: list[BaseException] = []

    def add(n: int) -> None:
        try:
            UsersFile(path=path, hasher=CHEAP).add_user(f"user{n}", Secret("pw"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(e.login for e in UsersFile.load(path).entries) == [f"user{n}" for n in range(4)]


def test_failed_write_leaves_the_old_file_and_no_temp_file(
    users_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = users_path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        UsersFile.load(users_path, hasher=CHEAP).delete_user("bob")
    assert users_path.read_bytes() == before
    assert [p.name for p in users_path.parent.iterdir()] == ["users"]


def test_reprs_never_show_hashes_or_passwords(users_path: Path) -> None:
    users = UsersFile.load(users_path, hasher=CHEAP)
    assert ALICE_HASH not in repr(users)
    assert ALICE_HASH not in repr(users.lookup("alice"))
    assert ALICE_PW not in repr(users.verify("alice", Secret(ALICE_PW)))


def test_unknown_login_still_pays_for_a_verification(
    users_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_verify = argon2.PasswordHasher.verify

    def spy(self: argon2.PasswordHasher, hash: str, password: str) -> bool:
        calls.append(hash)
        return real_verify(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", spy)
    users = UsersFile.load(users_path, hasher=CHEAP)
    assert not users.verify("mallory", Secret("guess")).ok
    assert not users.verify("alice", Secret("guess")).ok
    assert len(calls) == 2
    assert argon2.extract_parameters(calls[0]) == argon2.extract_parameters(
        CHEAP.hash("anything")
    )  # the dummy hash uses the same parameters as new hashes


def test_set_senders_replaces_the_list_and_keeps_the_hash_and_comments(users_path: Path) -> None:
    before = UsersFile.load(users_path, hasher=CHEAP)
    after = before.set_senders("alice", ["new@Example.NET", "<>", "new@example.net"])
    entry = after.lookup("alice")
    assert entry is not None and entry.senders == ("new@example.net", "<>")
    assert entry.hash == ALICE_HASH
    reread = UsersFile.load(users_path, hasher=CHEAP)
    assert reread.lines[0] == "# submitd users" and reread.lookup("alice") == entry
    assert reread.sender_allowed("alice", "new@EXAMPLE.net")
    assert not reread.sender_allowed("alice", "alice@example.com")
    assert reread.verify("alice", Secret(ALICE_PW)).ok
    emptied = reread.set_senders("alice", []).lookup("alice")
    assert emptied is not None and emptied.senders == ()


def test_change_senders_removes_then_adds_in_order(users_path: Path) -> None:
    users = UsersFile.load(users_path, hasher=CHEAP)
    changed = users.change_senders("alice", add=["x@example.net", "@example.org"],
                                   remove=["alice@EXAMPLE.com"])
    entry = changed.lookup("alice")
    assert entry is not None and entry.senders == ("@example.org", "x@example.net")
    assert UsersFile.load(users_path).lookup("alice") == entry


def test_change_senders_refuses_to_remove_an_unlisted_sender(users_path: Path) -> None:
    before = users_path.read_bytes()
    users = UsersFile.load(users_path, hasher=CHEAP)
    with pytest.raises(UsersFileError, match="user 'bob' has no sender 'x@example.com' "
                       r"\(senders: bob@example.com <>\)"):
        users.change_senders("bob", remove=["x@example.com"], add=["y@example.com"])
    with pytest.raises(NoSuchUserError):
        users.set_senders("nobody", ["x@example.com"])
    with pytest.raises(ValueError, match="invalid sender"):
        users.set_senders("bob", ["not an address"])
    assert users_path.read_bytes() == before


def test_password_length_counts_characters_not_bytes() -> None:
    assert DEFAULT_MIN_PASSWORD_LENGTH == 12
    check_password_length(Secret("éééééééééééé"), 12)  # 12 characters, 24 bytes
    with pytest.raises(ValueError, match=r"^the password is too short: at least 12 characters$"):
        check_password_length(Secret("x" * 11), 12)


@pytest.mark.parametrize(
    ("table", "expected"), [({}, 12), ({"min_password_length": 8}, 8), ({"path": "u"}, 12)]
)
def test_min_password_length_reads_the_table(table: dict[str, object], expected: int) -> None:
    assert min_password_length(table) == expected


@pytest.mark.parametrize("value", [0, -4, True, "12", 12.0])
def test_min_password_length_refuses_what_is_not_a_positive_integer(value: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        min_password_length({"min_password_length": value})
