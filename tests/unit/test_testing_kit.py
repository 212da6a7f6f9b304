"""submitd.testing: one-call sending, users, delivered mail, the pytest plugin's fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from submitd.config import load_config
from submitd.testing import (
    FakeSmarthost,
    RawSMTPClient,
    RunningServer,
    SMTPRefused,
    TestCA,
    TestUser,
    add_user,
    read_maildir,
    send_mail,
    wait_for_delivery,
    write_config,
)

BODY = "Subject: kit\r\nFrom: tester@example.com\r\n\r\nHello.\r\n.leading dot\r\n"


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
async def test_send_mail_logs_in_sends_and_the_message_is_delivered(
    submitd_server: RunningServer, submitd_user: TestUser, submitd_maildir: Path, mode: str,
) -> None:
    u = submitd_user
    reply = await send_mail(submitd_server, u.login, u.password, u.sender,
                            ["a@example.net"], BODY, mode=mode)  # type: ignore[arg-type]
    assert (reply.code, reply.status) == (250, "2.0.0") and "queued as" in reply.text
    (message,) = await wait_for_delivery(submitd_maildir)
    assert message["Subject"] == "kit" and message["Return-Path"] == "<tester@example.com>"
    assert message.get_content() == "Hello.\n.leading dot\n"  # dot-stuffing undone by the server


async def test_a_refusal_raises_with_the_stage_and_the_exact_reply(
    submitd_server: RunningServer, submitd_user: TestUser, submitd_maildir: Path,
) -> None:
    u = submitd_user
    with pytest.raises(SMTPRefused) as info:
        await send_mail(submitd_server, u.login, "wrong", u.sender, ["a@example.net"], BODY)
    assert info.value.stage == "auth" and info.value.reply is not None
    assert (info.value.reply.code, info.value.reply.status) == (535, "5.7.8")
    with pytest.raises(SMTPRefused) as info:
        await send_mail(submitd_server, u.login, u.password, "boss@example.com",
                        ["a@example.net"], BODY)
    assert info.value.stage == "mail" and info.value.reply is not None
    assert (info.value.reply.code, info.value.reply.status) == (550, "5.7.1")
    assert "mail refused: 550 5.7.1" in str(info.value)
    assert read_maildir(submitd_maildir) == []


async def test_add_user_while_the_server_runs_gives_a_working_login(
    submitd_server: RunningServer, tmp_path: Path, submitd_maildir: Path,
) -> None:
    second = add_user(tmp_path / "users", "second", "another password", ["@second.example"])
    assert second == TestUser(login="second", password="another password",
                              sender="@second.example")
    await send_mail(submitd_server, "second", "another password", "me@second.example",
                    ["a@example.net"], BODY.replace("tester@example.com", "me@second.example"))
    (message,) = await wait_for_delivery(submitd_maildir)
    assert message["Return-Path"] == "<me@second.example>"


class TestSettingsOverride:
    @pytest.fixture
    def submitd_settings(self) -> dict[str, Any]:
        return {"enable": ["headers"], "limits": {"max_recipients": 2}}

    async def test_overriding_submitd_settings_enables_plugins_and_limits(
        self, submitd_server: RunningServer, submitd_user: TestUser, submitd_maildir: Path,
    ) -> None:
        u = submitd_user
        assert submitd_server.config.plugins.enable == (
            "passwdfile", "relay", "maildir", "headers")
        await send_mail(submitd_server, u.login, u.password, u.sender, ["a@example.net"], BODY)
        (message,) = await wait_for_delivery(submitd_maildir)
        assert "with ESMTPSA" in message["Received"]  # the headers plugin ran
        with pytest.raises(SMTPRefused) as info:
            await send_mail(submitd_server, u.login, u.password, u.sender,
                            ["a@example.net", "b@example.net", "c@example.net"], BODY)
        assert info.value.stage == "rcpt" and info.value.recipient == "c@example.net"


async def test_the_smarthost_fixture_is_a_running_fake_relay(
    submitd_smarthost: FakeSmarthost,
) -> None:
    host, _, port = submitd_smarthost.address.rpartition(":")
    async with await RawSMTPClient.connect(host, int(port)) as client:
        greeting = await client.reply()
        assert greeting is not None and greeting.code == 220


def test_write_config_with_a_relative_directory_works_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_config(Path("rel"), ca=TestCA(Path("rel/tls")),
                        enable=["maildir"], plugins={"maildir": {"path": "mail"}})
    assert path.is_absolute()
    os.chdir("/")
    config = load_config(path)
    assert config.tls is not None and config.tls.cert.is_file() and config.tls.key.is_file()
    assert config.queue.dir == tmp_path / "rel" / "spool"
