"""The failed-login throttle: each rule of docs/security.md §3, on trio's autojump clock.

Time passes with ``trio.sleep`` (the throttle reads ``trio.current_time``), so hours of
guessing take no real time.
"""

from __future__ import annotations

import pytest
import trio

from submitd.config import Limits
from submitd.server.throttle import (
    ADDRESS_SHARE,
    BRAKE_MAX,
    Admission,
    AuthThrottle,
    ThrottleSettings,
)

ATTACKER = "198.51.100.66"
USER_HOME = "192.0.2.10"
LOGIN = "alice"
DEFAULTS = ThrottleSettings.from_limits(Limits())


def fresh(limit: int = 5, max_delay: float = 300.0, window: float = 3600.0) -> AuthThrottle:
    return AuthThrottle(ThrottleSettings(limit=limit, max_delay=max_delay, window=window))


async def test_the_numbers_come_from_the_limits_table(autojump_clock: trio.abc.Clock) -> None:
    assert ThrottleSettings(limit=5, max_delay=300.0, window=3600.0) == DEFAULTS
    assert AuthThrottle(DEFAULTS).free == 5


async def test_an_address_and_login_gets_growing_delays_up_to_the_cap(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = fresh(limit=5, max_delay=60.0)
    for _ in range(4):
        t.failed(ATTACKER, LOGIN)
    assert t.check(ATTACKER, LOGIN).refused_for == 0, "the first failures cost nothing"
    t.failed(ATTACKER, LOGIN)
    assert t.check(ATTACKER, LOGIN).refused_for == 1.0
    t.failed(ATTACKER, LOGIN)
    assert t.check(ATTACKER, LOGIN).refused_for == 2.0
    t.failed(ATTACKER, LOGIN)
    assert t.check(ATTACKER, LOGIN).refused_for == 4.0
    for _ in range(100):
        t.failed(ATTACKER, LOGIN)
    assert t.check(ATTACKER, LOGIN).refused_for == 60.0, "capped at auth_fail_max_delay"
    await trio.sleep(59.5)
    assert t.check(ATTACKER, LOGIN).refused_for == pytest.approx(0.5)
    await trio.sleep(0.5)
    assert t.check(ATTACKER, LOGIN) == Admission(), "a delay, not a lockout"


async def test_failures_from_other_addresses_never_refuse_a_clean_address(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    for i in range(5):  # five wrong passwords from five addresses
        t.failed(f"198.51.100.{i}", LOGIN)
    home = t.check(USER_HOME, LOGIN)
    assert home.refused_for == 0, "the real user is not refused at a clean address"
    assert 0 < home.slowed_for <= BRAKE_MAX, "the login-wide brake only slows"


async def test_the_login_wide_brake_slows_but_never_refuses_or_exceeds_its_cap(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    for i in range(500):  # a botnet: one guess per address, far beyond every limit
        t.failed(f"10.{i // 256}.{i % 256}.1", LOGIN)
    home = t.check(USER_HOME, LOGIN)
    assert home == Admission(slowed_for=BRAKE_MAX)
    assert t.check(USER_HOME, "bob") == Admission(), "other logins are not braked"
    short = fresh(max_delay=3.0)
    for i in range(50):
        short.failed(f"10.0.0.{i}", LOGIN)
    assert short.check(USER_HOME, LOGIN).slowed_for == 3.0, "never more than max_delay either"


async def test_one_wrong_try_every_few_minutes_never_blocks_the_real_user(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    for i in range(30):  # two and a half hours of slow guessing from a few addresses
        t.failed(f"198.51.100.{i % 3}", LOGIN)
        await trio.sleep(290)
        home = t.check(USER_HOME, LOGIN)
        assert home.refused_for == 0
        assert home.slowed_for <= BRAKE_MAX
    # The guessing addresses themselves are held back after each of their tries.
    t.failed("198.51.100.0", LOGIN)
    assert t.check("198.51.100.0", LOGIN).refused_for == 64.0


async def test_one_address_guessing_at_many_logins_is_refused_for_all_of_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    assert DEFAULTS.address_limit == ADDRESS_SHARE * 5 == 20, "room for a few users behind NAT"
    for i in range(19):
        t.failed(ATTACKER, f"user{i}")
    assert t.check(ATTACKER, "user99") == Admission()
    t.failed(ATTACKER, "user19")
    for login in ("user99", LOGIN):
        assert t.check(ATTACKER, login).refused_for == 1.0
    assert t.check(USER_HOME, "user99") == Admission(), "other addresses are untouched"


async def test_a_valid_login_does_not_reset_its_address_so_spraying_stays_throttled(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    for i in range(19):
        t.failed(ATTACKER, f"victim{i}")
    t.succeeded(ATTACKER, "mallory")  # the attacker's own, valid account
    t.failed(ATTACKER, "victim19")
    assert t.check(ATTACKER, "victim20").refused_for == 1.0
    t.succeeded(ATTACKER, "mallory")
    assert t.check(ATTACKER, "victim20").refused_for == 1.0, "the address key stays"


async def test_a_success_clears_only_its_own_address_and_login_key(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    for _ in range(4):
        t.failed(USER_HOME, LOGIN)
    t.succeeded(USER_HOME, LOGIN)
    for _ in range(4):
        t.failed(USER_HOME, LOGIN)
    # Eight failures for this address and login, but the success started its count afresh.
    assert t.check(USER_HOME, LOGIN).refused_for == 0
    t.failed(USER_HOME, LOGIN)
    assert t.check(USER_HOME, LOGIN).refused_for == 1.0, "five since the success"
    # The address kept all nine: eleven more for other logins reach its twenty.
    for i in range(10):
        t.failed(USER_HOME, f"other{i}")
    assert t.check(USER_HOME, "someone").refused_for == 0
    t.failed(USER_HOME, "other10")
    assert t.check(USER_HOME, "someone").refused_for == 1.0


async def test_a_success_leaves_other_addresses_of_the_same_login_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    for _ in range(5):
        t.failed(ATTACKER, LOGIN)
    t.succeeded(USER_HOME, LOGIN)
    assert t.check(ATTACKER, LOGIN).refused_for == 1.0


async def test_logins_are_compared_case_insensitively(autojump_clock: trio.abc.Clock) -> None:
    t = AuthThrottle(DEFAULTS)
    for name in ("Alice", "ALICE", "alice", "aLiCe", "alicE"):
        t.failed(ATTACKER, name)
    assert t.check(ATTACKER, "ALICE").refused_for == 1.0


async def test_failures_are_forgotten_after_a_quiet_window(autojump_clock: trio.abc.Clock) -> None:
    t = fresh(window=600.0)
    for _ in range(8):
        t.failed(ATTACKER, LOGIN)
    assert t.check(ATTACKER, LOGIN).refused_for > 0
    await trio.sleep(601)
    assert t.check(ATTACKER, LOGIN) == Admission()
    t.failed(ATTACKER, LOGIN)
    assert t.check(ATTACKER, LOGIN) == Admission(), "counting starts again from one"
    assert len(t) == 3, "the expired keys were pruned"


async def test_a_reload_changes_the_numbers_and_keeps_the_counts(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    for _ in range(3):
        t.failed(ATTACKER, LOGIN)
    assert t.check(ATTACKER, LOGIN).refused_for == 0
    t.configure(ThrottleSettings(limit=3, max_delay=10.0, window=60.0))
    assert t.free == 3
    assert t.check(ATTACKER, LOGIN).refused_for == 1.0


async def test_memory_is_bounded_and_the_oldest_keys_go_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS, max_keys=300)
    for _ in range(6):
        t.failed(ATTACKER, LOGIN)  # blocked now ...
    for i in range(1000):  # ... then a flood of one-off failures
        await trio.sleep(1)
        t.failed(f"10.0.{i // 256}.{i % 256}", f"user{i}")
        assert len(t) <= 300
    assert t.check(ATTACKER, LOGIN).refused_for == 0, "its delay ran out long before eviction"
    assert t.check("10.0.3.231", "user999").refused_for == 0
    for _ in range(4):
        t.failed("10.0.3.231", "user999")
    assert t.check("10.0.3.231", "user999").refused_for == 1.0, "recent keys are kept"


async def test_a_huge_login_name_costs_no_more_memory_than_a_short_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    t = AuthThrottle(DEFAULTS)
    huge = "x" * 12_000
    for _ in range(5):
        t.failed(ATTACKER, huge)
    assert t.check(ATTACKER, huge.upper()).refused_for == 1.0
    assert all(len(key) < 200 for key in t._table)
    assert t.check(ATTACKER + "1", "x" * 11_999) == Admission()
