"""The ratelimit plugin: its table, the SQLite counters on an injected clock, the hooks' replies."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from submitd import (
    Config,
    ConfigError,
    Envelope,
    MailParams,
    Recipient,
    Reply,
    SessionInfo,
)
from submitd.config import load_config
from submitd_plugins import _ratelimit_store, ratelimit
from submitd_plugins._ratelimit_store import CounterStore, Kind, StoreError, Usage
from submitd_plugins.ratelimit import STATE, STORES, LoginLimits

CONFIG = """\
hostname = "mail.example.org"
[[listen]]
address = "127.0.0.1:2587"
mode = "starttls"
[tls]
cert = "cert.pem"
key = "key.pem"
[queue]
dir = "spool"
[plugins]
enable = ["ratelimit"]
"""
T0 = 1_700_000_040.0  # a minute's start: 28_333_334 * 60
HOUR = 3600.0


class Clock:
    """A settable Unix time."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def load(tmp_path: Path, table: str | None = None) -> Config:
    path = tmp_path / "submitd.toml"
    path.write_text(CONFIG + (f"[plugins.ratelimit]\n{table}\n" if table is not None else ""))
    return load_config(path)


def configured(tmp_path: Path, table: str | None = None) -> Config:
    config = load(tmp_path, table)
    ratelimit.submitd_configure(config)
    return config


def refused(tmp_path: Path, table: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        configured(tmp_path, table)
    return info.value


# --- configuration ---------------------------------------------------------------------------


def test_defaults_are_200_messages_and_1000_recipients_in_the_spool(tmp_path: Path) -> None:
    settings = configured(tmp_path).stash[STATE].settings
    assert settings.limits_for("anyone") == LoginLimits(messages_per_hour=200,
                                                        recipients_per_hour=1000)
    assert settings.database == tmp_path / "spool" / "ratelimit.sqlite3"


def test_per_login_overrides_inherit_what_they_leave_out(tmp_path: Path) -> None:
    settings = configured(tmp_path, """\
messages_per_hour = 10
recipients_per_hour = 40
[plugins.ratelimit.logins]
newsletter = { messages_per_hour = 500, recipients_per_hour = 9000 }
intern = { messages_per_hour = 2 }
"alice@example.org" = { recipients_per_hour = 5 }
""").stash[STATE].settings
    assert settings.limits_for("bob") == LoginLimits(messages_per_hour=10, recipients_per_hour=40)
    assert settings.limits_for("newsletter") == LoginLimits(messages_per_hour=500,
                                                            recipients_per_hour=9000)
    assert settings.limits_for("intern") == LoginLimits(messages_per_hour=2,
                                                        recipients_per_hour=40)
    assert settings.limits_for("alice@example.org") == LoginLimits(messages_per_hour=10,
                                                                   recipients_per_hour=5)


def test_a_relative_database_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    settings = configured(tmp_path, 'database = "state/counts.db"').stash[STATE].settings
    assert settings.database == tmp_path / "state" / "counts.db"


@pytest.mark.parametrize(("table", "key"), [
    ("messages_per_hours = 5", "plugins.ratelimit.messages_per_hours"),
    ("[plugins.ratelimit.logins.alice]\nmessages = 5", "plugins.ratelimit.logins.alice.messages"),
    ("[plugins.ratelimit.logins.alice]\ndatabase = 'x'", "plugins.ratelimit.logins.alice.database"),
])
def test_unknown_keys_are_refused_by_name(tmp_path: Path, table: str, key: str) -> None:
    error = refused(tmp_path, table)
    assert error.key == key
    assert "unknown key" in str(error)


@pytest.mark.parametrize("value", ["0", "-3", "true", '"10"', "1.5"])
@pytest.mark.parametrize("key", ["messages_per_hour", "recipients_per_hour"])
def test_limits_are_whole_numbers_of_at_least_one(tmp_path: Path, key: str, value: str) -> None:
    assert refused(tmp_path, f"{key} = {value}").key == f"plugins.ratelimit.{key}"
    error = refused(tmp_path, f"[plugins.ratelimit.logins]\nbob = {{ {key} = {value} }}")
    assert error.key == f"plugins.ratelimit.logins.bob.{key}"


@pytest.mark.parametrize(("table", "key"), [
    ("logins = 5", "plugins.ratelimit.logins"),
    ("logins = { bob = 5 }", "plugins.ratelimit.logins.bob"),
    ('database = ""', "plugins.ratelimit.database"),
    ('database = "missing/counts.db"', "plugins.ratelimit.database"),
    ('database = "."', "plugins.ratelimit.database"),
])
def test_bad_shapes_are_refused_by_name(tmp_path: Path, table: str, key: str) -> None:
    assert refused(tmp_path, table).key == key


def test_configure_opens_nothing(tmp_path: Path) -> None:
    config = configured(tmp_path)  # what check-config does
    ratelimit.submitd_unconfigure(config)
    assert not (tmp_path / "spool").exists()


def test_a_reload_keeps_the_open_store_and_the_stop_closes_it(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    old = configured(tmp_path)
    store = old.stash[STATE].store
    store.store.record("alice")
    new = replace(load(tmp_path), server_stash=old.server_stash)  # what a reload does
    ratelimit.submitd_configure(new)
    assert new.stash[STATE].store is store
    ratelimit.submitd_unconfigure(old)
    assert store.store.is_open, "the old configuration's end is not the server's stop"
    ratelimit.submitd_unconfigure(new)
    assert not store.store.is_open
    assert store.store.usage("alice").total(Kind.MESSAGES) == 1, "opens again when used"
    store.store.close()
    assert list(old.server_stash[STORES]) == [tmp_path / "spool" / "ratelimit.sqlite3"]


# --- the counter store -----------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[CounterStore]:
    s = CounterStore(tmp_path / "counts.sqlite3", clock=clock)
    yield s
    s.close()


def totals(store: CounterStore, login: str) -> tuple[int, int]:
    usage = store.usage(login)
    return usage.total(Kind.MESSAGES), usage.total(Kind.RECIPIENTS)


def test_counts_add_up_per_login(store: CounterStore, clock: Clock) -> None:
    store.record("alice", recipients=3)
    clock.now += 90
    store.record("alice", recipients=2)
    store.record("bob", recipients=1)
    assert totals(store, "alice") == (2, 5)
    assert totals(store, "bob") == (1, 1)
    assert totals(store, "carol") == (0, 0)


def test_the_window_slides_minute_by_minute(store: CounterStore, clock: Clock) -> None:
    store.record("alice", recipients=1)          # minute 0
    clock.now += 30 * 60
    store.record("alice", recipients=4)          # minute 30
    clock.now = T0 + HOUR - 1                    # 59:59 later: both still count
    assert totals(store, "alice") == (2, 5)
    clock.now = T0 + HOUR                        # minute 0 left the window
    assert totals(store, "alice") == (1, 4)
    clock.now = T0 + 90 * 60
    assert totals(store, "alice") == (0, 0)


def test_the_wait_is_until_enough_has_left_the_window(store: CounterStore, clock: Clock) -> None:
    store.record("alice", recipients=5)          # leaves at T0 + 60 min
    clock.now += 20 * 60 + 15
    store.record("alice", recipients=1)          # leaves at T0 + 80 min
    clock.now = T0 + 45 * 60
    usage = store.usage("alice")
    assert usage.seconds_until_freed(Kind.MESSAGES, 1) == 15 * 60
    assert usage.seconds_until_freed(Kind.MESSAGES, 2) == 35 * 60
    assert usage.seconds_until_freed(Kind.RECIPIENTS, 5) == 15 * 60
    assert usage.seconds_until_freed(Kind.RECIPIENTS, 6) == 35 * 60
    assert usage.seconds_until_freed(Kind.RECIPIENTS, 7) == HOUR, "beyond the window: an hour"


def test_old_rows_are_pruned_so_the_file_stays_small(store: CounterStore, clock: Clock) -> None:
    for _ in range(3 * 60):                      # one message a minute for three hours
        store.record("alice", recipients=1)
        store.record("bob", recipients=1)
        clock.now += 60
    assert store.rows() <= 2 * 60
    assert totals(store, "alice") == (59, 59), "the last 59 minutes and this one (no mail yet)"
    clock.now += 2 * HOUR
    assert store.prune() > 0
    assert store.rows() == 0


def test_counts_survive_closing_and_reopening_the_file(
    tmp_path: Path, store: CounterStore, clock: Clock
) -> None:
    store.record("alice", recipients=7)
    store.close()                                 # a stop ...
    again = CounterStore(tmp_path / "counts.sqlite3", clock=clock)   # ... and a restart
    try:
        assert totals(again, "alice") == (1, 7)
    finally:
        again.close()


def test_two_processes_on_one_file_share_the_counts(
    tmp_path: Path, store: CounterStore, clock: Clock
) -> None:
    other = CounterStore(tmp_path / "counts.sqlite3", clock=clock)
    try:
        store.record("alice", recipients=1)
        other.record("alice", recipients=2)
        assert totals(store, "alice") == totals(other, "alice") == (2, 3)
    finally:
        other.close()


def test_the_file_is_owner_only_and_in_wal_mode(tmp_path: Path, store: CounterStore) -> None:
    store.record("alice")
    path = tmp_path / "counts.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_that_is_not_ours_is_a_store_error(tmp_path: Path, clock: Clock) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all\n" * 100)
    with pytest.raises(StoreError, match=r"junk\.sqlite3"):
        CounterStore(junk, clock=clock).usage("alice")
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(StoreError, match="layout 7"):
        CounterStore(newer, clock=clock).usage("alice")


# --- the hooks -------------------------------------------------------------------------------


def session(config: Config, username: str | None = "alice") -> SessionInfo:
    return SessionInfo(session_id="S1", config=config, listener=config.listeners[0],
                       peer_host="192.0.2.7", peer_port=40000, tls=True, username=username)


def envelope(recipients: int, login: str = "alice") -> Envelope:
    return Envelope(sender="alice@example.org", params=MailParams(), username=login,
                    recipients=tuple(Recipient(address=f"r{n}@example.net")
                                     for n in range(recipients)))


@pytest.fixture
def hooked(tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> Iterator[Config]:
    monkeypatch.setattr(_ratelimit_store, "wall_clock", clock)
    (tmp_path / "spool").mkdir()
    config = configured(tmp_path, """\
messages_per_hour = 2
recipients_per_hour = 3
[plugins.ratelimit.logins]
bob = { messages_per_hour = 5 }
""")
    yield config
    ratelimit.submitd_unconfigure(config)


async def accept(config: Config, recipients: int, login: str = "alice") -> None:
    await ratelimit.submitd_accepted(session(config, login), envelope(recipients, login),
                                     "Q1")


async def mail(config: Config, login: str = "alice") -> Reply | None:
    return await ratelimit.submitd_mail_from(session(config, login), "a@example.org",
                                             MailParams())


async def rcpt(config: Config, accepted: int) -> Reply | None:
    return await ratelimit.submitd_rcpt_check(session(config), envelope(accepted),
                                              Recipient(address="x@example.net"))


async def test_mail_is_refused_450_with_the_wait_once_messages_are_used_up(
    hooked: Config, clock: Clock
) -> None:
    assert await mail(hooked) is None
    await accept(hooked, 1)
    clock.now += 10 * 60 + 30
    assert await mail(hooked) is None
    await accept(hooked, 1)
    reply = await mail(hooked)
    assert reply == Reply.make(450, "4.7.1", "Rate limit of 2 messages per hour reached for "
                                             "alice, try again in 50 minutes")
    clock.now = T0 + HOUR - 30
    assert (await mail(hooked)).text.endswith("try again in 1 minute")  # type: ignore[union-attr]
    clock.now = T0 + HOUR
    assert await mail(hooked) is None, "the first message left the window"


async def test_rcpt_is_refused_when_one_more_would_pass_the_limit(
    hooked: Config, clock: Clock
) -> None:
    await accept(hooked, 1)
    clock.now += 5 * 60
    assert await rcpt(hooked, accepted=1) is None          # 1 committed + 1 + this one = 3
    reply = await rcpt(hooked, accepted=2)
    assert reply == Reply.make(450, "4.7.1", "Rate limit of 3 recipients per hour reached for "
                                             "alice, try again in 55 minutes")


async def test_a_message_that_fills_the_budget_itself_waits_an_hour(hooked: Config) -> None:
    reply = await rcpt(hooked, accepted=3)
    assert reply is not None and reply.text.endswith("try again in 60 minutes")


async def test_mail_is_refused_when_no_recipient_is_left(hooked: Config) -> None:
    await accept(hooked, 3)
    reply = await mail(hooked)
    assert reply is not None
    assert reply.text == ("Rate limit of 3 recipients per hour reached for alice, "
                          "try again in 60 minutes")


async def test_an_override_applies_to_its_login_only(hooked: Config) -> None:
    for _ in range(4):
        await accept(hooked, 0, login="bob")
    assert await mail(hooked, "bob") is None
    await accept(hooked, 0, login="bob")
    reply = await mail(hooked, "bob")
    assert reply is not None and reply.text.startswith("Rate limit of 5 messages per hour")
    assert await mail(hooked, "alice") is None


async def test_sessions_without_a_login_are_not_counted(hooked: Config) -> None:
    await ratelimit.submitd_accepted(session(hooked, None),
                                     Envelope(sender="", recipients=(), params=MailParams(),
                                              username=None), "Q1")
    assert await ratelimit.submitd_mail_from(session(hooked, None), "", MailParams()) is None
    assert hooked.stash[STATE].store.store.rows() == 0


def test_an_empty_window_refuses_nothing() -> None:
    assert ratelimit.check_mail(Usage(now=T0), LoginLimits(messages_per_hour=1), "alice") is None
    assert ratelimit.check_rcpt(Usage(now=T0), LoginLimits(recipients_per_hour=1), "alice",
                                0) is None


def test_the_reply_shows_a_login_as_printable_ascii_and_bounded() -> None:
    odd = ratelimit.refusal(Kind.MESSAGES, 1, "ünï code\r\n" + "y" * 100, 90)
    assert odd.text.startswith("Rate limit of 1 message per hour reached for ?n??code??yy")
    assert odd.text.endswith("y..., try again in 2 minutes")
    assert odd.to_bytes().count(b"\r\n") == 1
