"""docs/security.md §3: AUTH mechanisms, password guessing, argon2 cost and secrecy."""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import argon2
import pytest
import trio

from submitd import hookimpl
from submitd.protocol import Mechanism
from submitd.protocol._sasl import Credentials, SaslExchange
from submitd.secret import Secret
from submitd.testing import running_server
from tests.security.support import (
    MODES,
    PLAIN,
    WRONG,
    closed,
    connect,
    expect,
    expect_reply,
    plain,
)
from tests.support import PASSWORD, RECIPIENT, SENDER, USER

# Connection-rate and unauthenticated-session caps are not what these tests are about.
OPEN = {"max_connection_rate": 10_000, "max_unauthenticated": 10_000,
        "max_connections_per_ip": 1000}


class AuthSpy:
    """Counts the logins handed to plugins for verification."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def submitd_auth(self, session, credentials):  # type: ignore[no-untyped-def]
        self.calls += 1


@MODES
async def test_auth_exchange_follows_rfc_4954(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    limits = {"max_auth_failures": 10, "max_errors": 50}
    async with running_server(make_config(limits=limits)) as srv:
        async with await connect(srv, mode, client_tls, auth=False) as client:
            await client.send(b"AUTH PLAIN\r\n")
            with trio.fail_after(5):
                assert await client.read_line() == b"334 ", "exactly '334 ' then the response"
            await expect(client, "*", 501)  # cancelled
            for bad in ("YR==", "YWJj=", "YWJj====", "####", "YQ==YQ==", "YW\tJj"):
                await expect(client, f"AUTH PLAIN {bad}", 501, "5.5.2")
            await expect(client, "AUTH CRAM-MD5", 504, "5.5.4")
            await expect(client, "AUTH GSSAPI", 504, "5.5.4")
            await expect(client, f"AUTH PLAIN {WRONG}", 535, "5.7.8")
            await expect(client, f"AUTH PLAIN {PLAIN}", 235, "2.7.0")
            await expect(client, f"AUTH PLAIN {PLAIN}", 503, "5.5.1")  # a second AUTH
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            await expect(client, "AUTH LOGIN", 503, "5.5.1")  # inside a transaction


@MODES
async def test_plain_authzid_cannot_name_another_user(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits={"max_auth_failures": 10})) as srv:
        async with await connect(srv, mode, client_tls, auth=False) as client:
            await expect(client, f"AUTH PLAIN {plain(USER, PASSWORD, 'admin')}", 535, "5.7.8")
            extra_nul = base64.b64encode(f"\0{USER}\0{PASSWORD}\0".encode()).decode()
            await expect(client, f"AUTH PLAIN {extra_nul}", 501, "5.5.2")
            await expect(client, f"AUTH PLAIN {plain(USER, PASSWORD, USER)}", 235, "2.7.0")


@MODES
async def test_three_failed_logins_close_the_session(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    async with running_server(make_config(limits=OPEN)) as srv:
        async with await connect(srv, mode, client_tls, auth=False) as client:
            for _ in range(2):
                await expect(client, f"AUTH PLAIN {WRONG}", 535, "5.7.8")
            await client.send(f"AUTH PLAIN {WRONG}\r\n".encode())
            await expect_reply(client, 535, "5.7.8")
            await expect_reply(client, 421, "4.7.0")
            assert await closed(client)


async def fail_from(srv, tls, local: str, login: str, times: int):  # type: ignore[no-untyped-def]
    async with await connect(srv, "implicit", tls, auth=False, local=local) as client:
        for _ in range(times):
            await expect(client, f"AUTH PLAIN {plain(login, 'guess')}", 535, "5.7.8")


async def test_guessing_from_other_addresses_never_locks_the_user_out(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    # Five wrong passwords for the user from five addresses (the attack of issue 6, gap 8).
    limits = {**OPEN, "auth_fail_limit": 5, "auth_fail_max_delay": "1s"}
    async with running_server(make_config(limits=limits)) as srv:
        for n in range(2, 7):
            await fail_from(srv, client_tls, f"127.0.0.{n}", USER, 1)
        # The real user, from a clean address, gets in: slowed at most, never refused.
        start = trio.current_time()
        async with await connect(srv, "implicit", client_tls, auth=False,
                                 local="127.0.0.1") as client:
            await expect(client, f"AUTH PLAIN {PLAIN}", 235, "2.7.0")
        assert trio.current_time() - start < 3


async def test_a_valid_login_does_not_reset_its_address_counter(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    # limit 2 per address and login; an address gets four times that across logins.
    limits = {**OPEN, "auth_fail_limit": 2, "max_auth_failures": 20}
    async with running_server(make_config(limits=limits)) as srv:
        async with await connect(srv, "implicit", client_tls, auth=False,
                                 local="127.0.0.9") as client:
            for n in range(7):  # spraying one guess at each of many accounts
                await expect(client, f"AUTH PLAIN {plain(f'user{n}', 'guess')}", 535, "5.7.8")
            await expect(client, f"AUTH PLAIN {PLAIN}", 235, "2.7.0")  # the attacker's own
        async with await connect(srv, "implicit", client_tls, auth=False,
                                 local="127.0.0.9") as client:
            await expect(client, f"AUTH PLAIN {plain('user7', 'guess')}", 535, "5.7.8")
            # The 8th failure from this address: its own login did not wipe the first seven.
            await expect(client, f"AUTH PLAIN {plain('user8', 'guess')}", 454, "4.7.0")


async def test_throttled_attempt_is_refused_before_any_hashing(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    spy = AuthSpy()
    limits = {**OPEN, "auth_fail_limit": 2}
    async with running_server(make_config(limits=limits), extra_plugins=[("spy", spy)]) as srv:
        await fail_from(srv, client_tls, "127.0.0.3", USER, 2)
        before = spy.calls
        async with await connect(srv, "implicit", client_tls, auth=False,
                                 local="127.0.0.3") as client:
            await expect(client, f"AUTH PLAIN {PLAIN}", 454, "4.7.0")
        assert spy.calls == before, "no plugin (and no argon2) ran for the refused attempt"


async def test_argon2_runs_off_the_event_loop_behind_a_queue_deadline(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, users_file: Path,
) -> None:
    # Production-cost hashes (argon2-cffi defaults), one verification at a time, a short
    # queue. Four different logins: logins with the same credentials at once would share one
    # verification (and later ones would come from the verified-credentials cache).
    hasher = argon2.PasswordHasher()
    logins = [(f"{USER}{i}", f"{PASSWORD}-{i}") for i in range(4)]
    users_file.write_text("".join(f"{user} {hasher.hash(password)} {SENDER}\n"
                                  for user, password in logins))
    plugins = {"passwdfile": {"path": str(users_file), "max_parallel": 1,
                              "queue_timeout": "10ms"}}
    replies: list[int] = []
    async with running_server(make_config(limits=OPEN, plugins=plugins)) as srv:
        async with await connect(srv, "implicit", client_tls, auth=False) as watcher:

            async def login(user: str, password: str) -> None:
                async with await connect(srv, "implicit", client_tls, auth=False) as client:
                    reply = await client.command(f"AUTH PLAIN {plain(user, password)}")
                    assert reply is not None
                    replies.append(reply.code)
                    if reply.code == 454:
                        assert reply.status == "4.7.0"

            async with trio.open_nursery() as nursery:
                for user, password in logins:
                    nursery.start_soon(login, user, password)
                await trio.sleep(0.05)
                # While hashes run, another session is answered at once.
                start = trio.current_time()
                await expect(watcher, "NOOP", 250)
                assert trio.current_time() - start < 0.5
    assert 454 in replies, replies
    assert 235 in replies, replies


async def test_unknown_user_costs_a_hash_like_a_wrong_password(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verified: list[str] = []
    real = argon2.PasswordHasher.verify

    def counting(self, hash, password):  # type: ignore[no-untyped-def]
        verified.append(hash)
        return real(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting)
    async with running_server(make_config(limits=OPEN)) as srv:
        async with await connect(srv, "implicit", client_tls, auth=False) as client:
            await expect(client, f"AUTH PLAIN {WRONG}", 535, "5.7.8")
            await expect(client, f"AUTH PLAIN {plain('nobody', 'guess')}", 535, "5.7.8")
    assert len(verified) == 2, "the unknown login was verified against a dummy hash"
    assert verified[0] != verified[1]


async def test_credentials_never_reach_logs_or_reprs(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_server(make_config(limits=OPEN)) as srv:
        async with await connect(srv, "starttls", client_tls, auth=False) as client:
            await expect(client, "AUTH LOGIN", 334)
            await expect(client, base64.b64encode(USER.encode()), 334)
            await expect(client, base64.b64encode(b"wrong horse"), 535, "5.7.8")
            await expect(client, f"AUTH PLAIN {PLAIN}", 235, "2.7.0")
            await expect(client, f"MAIL FROM:<{SENDER}>", 250)
            await expect(client, f"RCPT TO:<{RECIPIENT}>", 250)
    secrets = [PASSWORD, "wrong horse", PLAIN, base64.b64encode(PASSWORD.encode()).decode(),
               base64.b64encode(b"wrong horse").decode()]
    for secret in secrets:
        assert secret not in caplog.text
    step = SaslExchange(Mechanism.PLAIN).start(PLAIN.encode())
    assert isinstance(step, Credentials)
    assert PASSWORD not in repr(step) and PASSWORD not in str(step)
    for shown in (repr(Secret(PASSWORD)), str(Secret(PASSWORD)), f"{Secret(PASSWORD)!r}"):
        assert PASSWORD not in shown and "***" in shown
