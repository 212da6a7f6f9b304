"""``submitd explain``: a dry run through the configured plugins, stage by stage."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from submitd import Reply, SessionInfo, hookimpl
from submitd._cli_explain import ExplainRequest, explain, synthetic_message
from submitd.cli import main
from submitd.config import load_config
from submitd.testing import TestCA, write_config
from tests.support import HASHER, PASSWORD, SENDER, USER


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    users = tmp_path / "users"
    users.write_text(f"{USER} {HASHER.hash(PASSWORD)} {SENDER}\n")
    return write_config(tmp_path, ca=TestCA(tmp_path / "tls"),
                        enable=["passwdfile", "relay", "headers", "maildir"],
                        plugins={"passwdfile": {"path": "users"}, "maildir": {"path": "mail"}})


async def run(config_path: Path, *, plugins: tuple[tuple[str, object], ...] = (),
              **request: object) -> tuple[bool, str]:
    fields: dict[str, object] = {"user": USER, "sender": SENDER,
                                 "recipients": ("someone@example.net",), **request}
    out = io.StringIO()
    accepted = await explain(load_config(config_path), ExplainRequest(**fields),  # type: ignore[arg-type]
                             out, extra_plugins=plugins)
    return accepted, out.getvalue()


def stage(output: str, prefix: str) -> str:
    (line,) = [ln for ln in output.splitlines() if ln.startswith(prefix)]
    return line[30:].strip()


async def test_an_allowed_message_passes_every_stage_and_names_the_delivery_plugin(
    config_path: Path,
) -> None:
    accepted, out = await run(config_path, recipients=("a@example.net", "b@example.org"))
    assert accepted
    assert stage(out, "connect") == "accepted (no plugin objected)"
    assert stage(out, "auth").startswith(f"assumed successful for '{USER}' (no password checked")
    assert stage(out, f"MAIL FROM:<{SENDER}>") == (
        "accepted (no plugin objected): 250 2.1.0 Sender OK")
    assert stage(out, "RCPT TO:<b@example.org>") == (
        "accepted (no plugin objected): 250 2.1.5 Recipient OK")
    assert stage(out, "data_filter").startswith("accepted (no plugin objected): 250 2.0.0")
    # The headers plugin's edit is shown, with the dry run's placeholder TLS version.
    assert "Received: from dry-run.invalid" in stage(out, "  header added")
    assert stage(out, "delivery") == "would be offered to maildir (not attempted)"
    assert out.splitlines()[-1] == "result: accepted"
    assert not (config_path.parent / "mail" / "new").exists() or not any(
        (config_path.parent / "mail" / "new").iterdir())


async def test_a_foreign_envelope_sender_names_the_plugin_and_its_exact_reply(
    config_path: Path,
) -> None:
    accepted, out = await run(config_path, sender="boss@example.com")
    assert not accepted
    assert stage(out, "MAIL FROM:<boss@example.com>") == (
        "REFUSED by relay: 550 5.7.1 Sender address <boss@example.com> not owned by user "
        f"{USER}")
    assert "RCPT TO" not in out and "data_filter" not in out  # the transaction never started
    assert out.splitlines()[-1] == "result: refused at MAIL FROM:<boss@example.com>"


async def test_a_foreign_header_from_is_refused_at_data(config_path: Path) -> None:
    accepted, out = await run(config_path, header_from="boss@example.com")
    assert not accepted
    assert "550 5.7.1 Header From: address <boss@example.com> not owned" in stage(
        out, "data_filter")
    assert "delivery" not in out


async def test_the_core_refuses_a_size_above_the_global_limit_before_any_plugin(
    config_path: Path,
) -> None:
    accepted, out = await run(config_path, size=10**9)
    assert not accepted
    assert stage(out, f"MAIL FROM:<{SENDER}>") == (
        "REFUSED by the protocol core: 552 5.3.4 Message size exceeds fixed limit")


async def test_a_relay_trick_is_refused_by_the_core_and_the_other_recipients_go_on(
    config_path: Path,
) -> None:
    accepted, out = await run(config_path, recipients=("x%y@example.net", "ok@example.net"))
    assert not accepted
    assert stage(out, "RCPT TO:<x%y@example.net>").startswith(
        "REFUSED by the protocol core: 554 5.7.1 Relay access denied")
    assert stage(out, "RCPT TO:<ok@example.net>").startswith("accepted")
    assert stage(out, "data_filter").startswith("accepted")


class NoPartners:
    """A test policy: refuses one domain, accepts another with its own 250 reply."""

    @hookimpl
    def submitd_rcpt_check(self, recipient):
        if recipient.address.endswith("@partner.example"):
            return Reply.make(550, "5.7.1", "Partners are reached through the extranet")
        if recipient.address.endswith("@vip.example"):
            return Reply.make(250, "2.1.5", "VIP recipient")
        return None


async def test_a_recipient_refused_by_a_plugin_shows_its_reply_and_the_rest_is_explained(
    config_path: Path,
) -> None:
    accepted, out = await run(config_path, plugins=(("nopartners", NoPartners()),),
                              recipients=("a@partner.example", "b@vip.example"))
    assert not accepted
    assert stage(out, "RCPT TO:<a@partner.example>") == (
        "REFUSED by nopartners: 550 5.7.1 Partners are reached through the extranet")
    assert stage(out, "RCPT TO:<b@vip.example>") == (
        "accepted by nopartners: 250 2.1.5 VIP recipient")
    assert stage(out, "data_filter").startswith("accepted")


async def test_every_recipient_refused_means_no_data(config_path: Path) -> None:
    accepted, out = await run(config_path, plugins=(("nopartners", NoPartners()),),
                              recipients=("a@partner.example",))
    assert not accepted
    assert stage(out, "DATA") == "REFUSED by the protocol core: 554 5.5.1 No valid recipients"


async def test_the_hooks_see_a_session_that_says_it_is_a_dry_run(config_path: Path) -> None:
    seen: list[SessionInfo] = []

    class Spy:
        @hookimpl
        def submitd_mail_from(self, session):
            seen.append(session)

    accepted, _ = await run(config_path, plugins=(("spy", Spy()),))
    assert accepted
    (session,) = seen
    assert (session.session_id, session.peer_host, session.tls, session.tls_version,
            session.username) == ("dry-run", "127.0.0.1", True, "dry-run", USER)
    assert session.listener == load_config(config_path).listeners[0]


async def test_a_failing_plugin_shows_the_451_the_server_would_send(config_path: Path) -> None:
    class Broken:
        @hookimpl
        async def submitd_data_filter(self):
            raise RuntimeError("spam scanner unreachable")

    accepted, out = await run(config_path, plugins=(("scanner", Broken()),))
    assert not accepted
    line = stage(out, "data_filter")
    assert "plugin 'scanner'" in line and "spam scanner unreachable" in line
    assert line.endswith("the server answers 451 4.3.0 Temporary local problem, try again later")


@pytest.mark.parametrize("size", [0, 300, 301, 302, 379, 380, 5000])
def test_the_synthetic_message_has_the_requested_size_and_from(size: int) -> None:
    from submitd import Envelope, MailParams, Recipient

    envelope = Envelope(sender="a@b.example", recipients=(Recipient(address="c@d.example"),),
                        params=MailParams(), username="a")
    data = synthetic_message(envelope, "x@y.example", size)
    assert data.startswith(b"From: <x@y.example>\r\n")
    assert len(data) == max(size, len(synthetic_message(envelope, "x@y.example", None)))
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert data.endswith(b"\r\n") and b"\n" not in data.replace(b"\r\n", b"")


def test_the_command_exits_0_when_accepted_and_1_when_refused(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["explain", "-c", str(config_path), "--user", USER, "--rcpt", "a@example.net"]
    assert main([*base, "--from", SENDER]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "result: accepted"
    assert main([*base, "--from", "boss@example.com"]) == 1
    assert "REFUSED by relay: 550 5.7.1" in capsys.readouterr().out


def test_usage_and_configuration_errors_exit_2(
    config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "-c", str(config_path), "--user", USER, "--from", SENDER]) == 2
    assert "--rcpt" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(config_path.read_text().replace('"passwdfile", ', '"nosuch", '))
    assert main(["explain", "-c", str(bad), "--user", USER, "--from", SENDER,
                 "--rcpt", "a@example.net"]) == 2
    assert "plugins.enable[0]" in capsys.readouterr().err
