"""The verified-credentials cache over real sockets: an application that reconnects once per
message pays for argon2 once, and nothing about a wrong or changed password gets easier.

argon2 verifications are counted in-process (the server runs in this process); the debug log
names each login answered from the cache (``event=auth_cached``), never its password.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import argon2
import pytest
import trio

from submitd import Secret
from submitd.passwords import UsersFile
from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.conftest import Argon2Calls
from tests.support import PASSWORD, SENDER, USER

NEW_PASSWORD = "a brand new passphrase"
OK = 235
FAILED = 535


@pytest.fixture(scope="module")
def user_hash() -> str:
    """Today's default argon2id parameters: what a deployment has, so logins need no rehash."""
    return argon2.PasswordHasher().hash(PASSWORD)


@pytest.fixture
def verifications(argon2_calls: Argon2Calls) -> list[str]:
    """The hashes the server verified a password against, one per argon2 run."""
    return argon2_calls.hashes


async def connect_and_login(
    srv: RunningServer, tls: ssl.SSLContext, password: str = PASSWORD
) -> int:
    """One connection as an application sends one message: STARTTLS, AUTH, MAIL, QUIT."""
    with trio.fail_after(30):
        tcp = await trio.open_tcp_stream("127.0.0.1", srv.port("starttls"))
        async with RawSMTPClient(tcp) as client:
            assert (await client.reply()) is not None
            for line, code in (("EHLO app.example", 250), ("STARTTLS", 220)):
                reply = await client.command(line)
                assert reply is not None and reply.code == code
            await client.starttls(tls)
            reply = await client.command("EHLO app.example")
            assert reply is not None and reply.code == 250
            token = base64.b64encode(f"\0{USER}\0{password}".encode()).decode()
            reply = await client.command(f"AUTH PLAIN {token}")
            assert reply is not None
            if reply.code == OK:
                mail = await client.command(f"MAIL FROM:<{SENDER}>")
                assert mail is not None and mail.code == 250
            await client.command("QUIT")
            return reply.code


def cached(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("event=auth_cached ")]


async def test_an_application_reconnecting_per_message_pays_argon2_once(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, verifications: list[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="submitd")
    async with running_server(make_config()) as srv:
        for _ in range(5):
            assert await connect_and_login(srv, client_tls) == OK
    assert len(verifications) == 1
    hits = cached(caplog)
    assert len(hits) == 4 and all(f"user={USER}" in line for line in hits)
    assert PASSWORD not in caplog.text


async def test_a_wrong_password_after_a_cached_login_is_refused_and_verified_each_time(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    verifications: list[str],
) -> None:
    async with running_server(make_config()) as srv:
        assert await connect_and_login(srv, client_tls) == OK
        assert await connect_and_login(srv, client_tls, "not the password") == FAILED
        assert await connect_and_login(srv, client_tls, "not the password") == FAILED
        assert len(verifications) == 3, "failures are never cached"
        assert await connect_and_login(srv, client_tls) == OK
        assert len(verifications) == 3


async def test_a_password_changed_with_submitd_user_passwd_ends_the_cached_login(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, users_file: Path,
) -> None:
    async with running_server(make_config()) as srv:
        assert await connect_and_login(srv, client_tls) == OK
        assert await connect_and_login(srv, client_tls) == OK  # from the cache
        # What `submitd user passwd` does, from another process as far as the server knows.
        await trio.to_thread.run_sync(
            UsersFile.load(users_file).set_password, USER, Secret(NEW_PASSWORD)
        )
        assert await connect_and_login(srv, client_tls) == FAILED
        assert await connect_and_login(srv, client_tls, NEW_PASSWORD) == OK


async def test_cache_ttl_zero_verifies_every_login(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, users_file: Path,
    caplog: pytest.LogCaptureFixture, verifications: list[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="submitd")
    config = make_config(plugins={"passwdfile": {"path": str(users_file), "cache_ttl": "0"}})
    async with running_server(config) as srv:
        for _ in range(3):
            assert await connect_and_login(srv, client_tls) == OK
    assert len(verifications) == 3
    assert not cached(caplog)


async def test_an_application_reconnecting_fast_from_one_address_is_never_turned_away(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The default connection rate is 30 per 10 s per address: 60 connections that log in,
    # back to back, pass, since each login gives its connection's token back.
    caplog.set_level(logging.INFO)
    async with running_server(make_config()) as srv:
        for _ in range(60):
            assert await connect_and_login(srv, client_tls) == OK
    assert "event=connection_refused" not in caplog.text
