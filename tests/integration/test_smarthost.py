"""A real submitd relays through the smarthost plugin to a fake smarthost on loopback."""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trustme

from submitd import DeliveryOutcome, DsnReturn, MailParams, OutcomeKind, Reply, hookimpl
from submitd.testing import (
    RawSMTPClient,
    RunningServer,
    TestCA,
    running_server,
    running_smarthost,
)
from submitd.views import RecipientParams
from tests.support import PASSWORD, RECIPIENT, SENDER, USER

RELAY_USER = "relay-user"
RELAY_PASSWORD = "relay pass \u00e9 2024"
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
LOG = "submitd.plugins.smarthost"


def message(sender: str = SENDER, subject: str = "relayed") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n\r\n"
        "First line.\r\n..leading dot\r\n..\r\n"  # the last line is "." alone, stuffed
    ).encode()


class Recorder:
    """Sees every stored message before the smarthost does, and every outcome after."""

    def __init__(self) -> None:
        self.stored: list[bytes] = []
        self.envelopes: list[tuple[MailParams, tuple[RecipientParams, ...]]] = []
        self.outcomes: list[tuple[str, DeliveryOutcome]] = []
        self._changed = trio.Event()

    @hookimpl
    async def submitd_deliver(self, envelope, message, recipients):  # type: ignore[no-untyped-def]
        self.stored.append(await trio.to_thread.run_sync(message.path.read_bytes))
        self.envelopes.append((envelope.params, tuple(r.params for r in recipients)))

    @hookimpl
    def submitd_delivery_result(self, envelope, recipient, outcome):  # type: ignore[no-untyped-def]
        self.outcomes.append((recipient.address, outcome))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_outcomes(self, count: int) -> list[tuple[str, DeliveryOutcome]]:
        with trio.fail_after(15):
            while len(self.outcomes) < count:
                await self._changed.wait()
        return self.outcomes[:count]

    async def wait_for(self, *addresses: str) -> dict[str, DeliveryOutcome]:
        """The first outcome of each of ``addresses`` (a bounce may come in between)."""
        with trio.fail_after(15):
            while not set(addresses) <= {a for a, _ in self.outcomes}:
                await self._changed.wait()
        return {a: o for a, o in reversed(self.outcomes) if a in addresses}


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "smarthost.secret"
    path.write_text(RELAY_PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def relay_config(make_config: Callable[..., Path]) -> Callable[..., Path]:
    """A config with passwdfile + smarthost; ``routes`` become [[plugins.smarthost.route]]."""

    def make(table: dict[str, object], routes: tuple[dict[str, object], ...] = ()) -> Path:
        path = make_config(enable=("passwdfile", "smarthost"), plugins={"smarthost": table})
        text = path.read_text()
        for route in routes:
            text += "[[plugins.smarthost.route]]\n"
            text += "".join(f"{key} = {json.dumps(value)}\n" for key, value in route.items())
        path.write_text(text)
        return path

    return make


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def submit(srv: RunningServer, tls: ssl.SSLContext, *, sender: str = SENDER,
                 recipients: tuple[str, ...] = (RECIPIENT,), body: bytes | None = None,
                 mail_params: str = "", rcpt_params: dict[str, str] | None = None) -> str:
    """Submit one message over implicit TLS with AUTH; return the queue id.

    ``mail_params`` follows MAIL FROM, ``rcpt_params[address]`` that address's RCPT TO.
    """
    async with await RawSMTPClient.connect("127.0.0.1", srv.port("implicit"), tls=tls) as c:
        assert (await c.reply()).code == 220
        assert (await c.command("EHLO client.example")).code == 250
        assert (await c.command(f"AUTH PLAIN {PLAIN}")).code == 235
        assert (await c.command(f"MAIL FROM:<{sender}>{mail_params}")).code == 250
        for rcpt in recipients:
            more = (rcpt_params or {}).get(rcpt, "")
            assert (await c.command(f"RCPT TO:<{rcpt}>{more}")).code == 250
        assert (await c.command("DATA")).code == 354
        await c.send((body or message(sender)) + b".\r\n")
        reply = await c.reply()
        assert reply is not None and reply.code == 250, reply
        await c.command("QUIT")
        return reply.text.rsplit(" ", 1)[-1]


def starttls_table(port: int, ca: TestCA, secret_file: Path, **more: object
                   ) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": port, "tls": "starttls", "ca_file": str(ca.ca_path),
            "username": RELAY_USER, "password_file": str(secret_file), **more}


async def test_message_is_relayed_byte_exact_with_starttls_and_auth(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.DEBUG)
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD) as fake:
        config = relay_config(starttls_table(fake.port, ca, secret_file))
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            await submit(srv, client_tls, recipients=(RECIPIENT, "second@example.net"))
            ((first, outcome), (second, _)) = await recorder.wait_for_outcomes(2)
            (received,) = fake.messages
    assert received.data == recorder.stored[0], "byte for byte what the spool holds"
    assert received.data.endswith(b"First line.\r\n.leading dot\r\n.\r\n"), "unstuffed once"
    assert received.sender == SENDER
    assert received.recipients == (RECIPIENT, "second@example.net")
    assert received.username == RELAY_USER and received.tls
    assert {first, second} == {RECIPIENT, "second@example.net"}
    assert outcome.kind is OutcomeKind.DELIVERED and outcome.remote == "127.0.0.1"
    assert outcome.reply.code == 250 and "FAKE0" in outcome.reply.text
    assert fake.transcripts[0][1:3] == ["STARTTLS", "EHLO mx.test.example"]
    assert "AUTH PLAIN ***" in fake.transcripts[0]
    assert "event=smarthost_route" in caplog.text and "route=default" in caplog.text
    assert "event=smarthost_result" in caplog.text and "delivered=2" in caplog.text
    for secret in (RELAY_PASSWORD, base64.b64encode(RELAY_PASSWORD.encode()).decode()):
        assert secret not in caplog.text


SECOND = "second@example.net"
DSN_RCPT = {RECIPIENT: " NOTIFY=failure,success ORCPT=rfc822;old+2Bbox@example.net",
            SECOND: " NOTIFY=NEVER"}


@pytest.mark.parametrize("offer_dsn", [True, False])
async def test_dsn_parameters_reach_a_smarthost_offering_dsn_and_only_then(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path, offer_dsn: bool,
) -> None:
    recorder = Recorder()
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD,
                                 offer_dsn=offer_dsn) as fake:
        config = relay_config(starttls_table(fake.port, ca, secret_file))
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            await submit(srv, client_tls, recipients=(RECIPIENT, SECOND),
                         mail_params=" RET=hdrs ENVID=batch+207", rcpt_params=DSN_RCPT)
            outcomes = await recorder.wait_for(RECIPIENT, SECOND)
            await fake.wait_until(lambda: any(m.sender == SENDER for m in fake.messages))
    # What the client asked for went through the session and the spool to the delivery.
    params, recipient_params = recorder.envelopes[0]
    assert (params.ret, params.envid) == (DsnReturn.HDRS, "batch 7")
    assert recipient_params == (
        (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;old+2Bbox@example.net")),
        (("NOTIFY", "NEVER"),),
    )
    (received,) = [m for m in fake.messages if m.sender == SENDER]
    assert received.recipients == (RECIPIENT, SECOND)
    assert received.mail_params[0].startswith("SIZE=")
    if offer_dsn:  # passed on unchanged (RFC 3461 §4), ENVID in xtext again
        assert received.mail_params[1:] == ("RET=HDRS", "ENVID=batch+207")
        assert received.recipient_params == (
            ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;old+2Bbox@example.net"),
            ("NOTIFY=NEVER",),
        )
    else:  # the fake refuses them with 555 when not offered: none was sent
        assert received.mail_params[1:] == ()
        assert received.recipient_params == ((), ())
    assert {a: (o.kind, o.dsn_passed_on) for a, o in outcomes.items()} == {
        RECIPIENT: (OutcomeKind.DELIVERED, offer_dsn), SECOND: (OutcomeKind.DELIVERED, offer_dsn),
    }


async def test_refused_recipient_is_permanent_while_the_others_are_delivered(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path,
) -> None:
    recorder = Recorder()
    refusal = Reply.make(550, "5.1.1", "No such user here")
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD,
                                 recipient_replies={"Bad@Example.net": refusal}) as fake:
        config = relay_config(starttls_table(fake.port, ca, secret_file))
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            await submit(srv, client_tls, recipients=("bad@example.net", RECIPIENT))
            outcomes = await recorder.wait_for("bad@example.net", RECIPIENT)
            (received,) = await fake.wait_for_messages(1)
    assert received.recipients == (RECIPIENT,)
    assert outcomes[RECIPIENT].kind is OutcomeKind.DELIVERED
    bad = outcomes["bad@example.net"]
    assert bad.kind is OutcomeKind.PERMANENT and bad.reply == refusal
    assert bad.remote == "127.0.0.1"


async def test_temporary_refusal_keeps_the_message_queued(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    busy = Reply.make(451, "4.3.2", "System busy, try later")
    caplog.set_level(logging.INFO)
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD,
                                 mail_reply=busy) as fake:
        config = relay_config(starttls_table(fake.port, ca, secret_file))
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            queue_id = await submit(srv, client_tls)
            ((_, outcome),) = await recorder.wait_for_outcomes(1)
    assert outcome.kind is OutcomeKind.TEMPORARY and outcome.reply == busy
    assert not fake.messages
    assert any("event=deferred" in r.message and queue_id in r.message for r in caplog.records)


@pytest.mark.parametrize("case", ["wrong password", "untrusted certificate",
                                  "starttls not offered"])
async def test_connection_level_failures_defer_and_say_why(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path, caplog: pytest.LogCaptureFixture, case: str,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.INFO)
    fake_options: dict[str, object] = {"ca": ca, "username": RELAY_USER,
                                       "password": RELAY_PASSWORD}
    expected = {"wrong password": (535, "stage=auth"),
                "untrusted certificate": (454, "certificate did not verify"),
                "starttls not offered": (454, "STARTTLS")}[case]
    if case == "wrong password":
        fake_options["password"] = "something else"
    if case == "starttls not offered":
        fake_options.update(offer_starttls=False, require_tls=False)
    async with running_smarthost(**fake_options) as fake:
        table = starttls_table(fake.port, ca, secret_file)
        if case == "untrusted certificate":
            table["ca_file"] = str(TestCA(ca.ca_path.parent / "other").ca_path)
        async with running_server(relay_config(table), extra_plugins=[("recorder", recorder)]
                                  ) as srv:
            await submit(srv, client_tls)
            ((_, outcome),) = await recorder.wait_for_outcomes(1)
    assert outcome.kind is OutcomeKind.TEMPORARY, "stays queued"
    assert outcome.reply.code == expected[0] and outcome.remote == "127.0.0.1"
    assert not fake.messages
    assert not any(line.startswith("MAIL") for t in fake.transcripts for line in t)
    (down,) = [r.message for r in caplog.records if "event=smarthost_host_down" in r.message]
    assert f"host=127.0.0.1:{fake.port}" in down and expected[1] in down
    assert RELAY_PASSWORD not in caplog.text


async def test_first_host_down_delivers_through_the_second_and_skips_the_first_meanwhile(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.INFO, logger=LOG)
    dead = closed_port()
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD) as fake:
        table = starttls_table(fake.port, ca, secret_file, reuse_time="0s")
        del table["host"], table["port"]
        table["hosts"] = [f"127.0.0.1:{dead}", fake.address]
        async with running_server(relay_config(table), extra_plugins=[("recorder", recorder)]
                                  ) as srv:
            await submit(srv, client_tls)
            await recorder.wait_for_outcomes(1)
            await submit(srv, client_tls, body=message(subject="second"))
            outcomes = await recorder.wait_for_outcomes(2)
    assert [o.kind for _, o in outcomes] == [OutcomeKind.DELIVERED] * 2
    assert len(fake.messages) == 2 and fake.connections == 2
    (down,) = [r.message for r in caplog.records if "event=smarthost_host_down" in r.message]
    assert f"host=127.0.0.1:{dead}" in down and "stage=connect" in down
    tried = [r.message for r in caplog.records if "event=smarthost_connect" in r.message]
    assert [f"127.0.0.1:{dead}" in m for m in tried] == [True, False, False], \
        "the dead host is tried once, then skipped while marked down"


async def test_a_host_marked_down_stays_skipped_after_a_reload(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.INFO, logger=LOG)
    dead = closed_port()
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD) as fake:
        table = starttls_table(fake.port, ca, secret_file, reuse_time="0s")
        del table["host"], table["port"]
        table["hosts"] = [f"127.0.0.1:{dead}", fake.address]
        async with running_server(relay_config(table), extra_plugins=[("recorder", recorder)]
                                  ) as srv:
            await submit(srv, client_tls)
            await recorder.wait_for_outcomes(1)
            before = srv.server.config
            assert await srv.server.reload()
            assert srv.server.config is not before
            await submit(srv, client_tls, body=message(subject="after reload"))
            outcomes = await recorder.wait_for_outcomes(2)
    assert [o.kind for _, o in outcomes] == [OutcomeKind.DELIVERED] * 2
    assert fake.connections == 2
    tried = [r.message for r in caplog.records if "event=smarthost_connect" in r.message]
    assert [f"127.0.0.1:{dead}" in m for m in tried] == [True, False, False], \
        "the dead host is not tried again after the reload"
    assert len([r for r in caplog.records if "event=smarthost_configured" in r.message]) == 2


async def test_route_with_every_host_down_defers_at_once(
    relay_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.INFO, logger=LOG)
    dead = closed_port()
    table = {"hosts": [f"127.0.0.1:{dead}"], "tls": "none"}
    async with running_server(relay_config(table), extra_plugins=[("recorder", recorder)]
                              ) as srv:
        await submit(srv, client_tls)
        ((_, first),) = await recorder.wait_for_outcomes(1)
        await submit(srv, client_tls, body=message(subject="second"))
        (_, (_, second)) = await recorder.wait_for_outcomes(2)
    assert first.kind is OutcomeKind.TEMPORARY and (first.reply.code, first.reply.status) == (
        421, "4.4.1")
    assert second.kind is OutcomeKind.TEMPORARY
    assert (second.reply.code, second.reply.status) == (451, "4.4.1")
    assert second.reply.text.startswith("all smarthosts of route default marked down: connect:")
    assert len([r for r in caplog.records if "event=smarthost_connect" in r.message]) == 1
    assert "event=smarthost_route_down" in caplog.text


async def test_sender_routes_pick_their_own_smarthost(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path,
) -> None:
    recorder = Recorder()
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD
                                 ) as default, running_smarthost(ca=ca, tls="implicit") as partner:
        table = starttls_table(default.port, ca, secret_file)
        route = {"name": "alias", "senders": ["@ALIAS.example"], "hosts": [partner.address],
                 "tls": "implicit", "ca_file": str(ca.ca_path)}
        async with running_server(relay_config(table, (route,)),
                                  extra_plugins=[("recorder", recorder)]) as srv:
            await submit(srv, client_tls, sender="sales@alias.example")
            await submit(srv, client_tls)
            await recorder.wait_for_outcomes(2)
    (via_partner,) = partner.messages
    (via_default,) = default.messages
    assert via_partner.sender == "sales@alias.example" and via_partner.username is None
    assert via_default.sender == SENDER and via_default.username == RELAY_USER


async def test_consecutive_messages_share_one_connection_until_reload(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path,
) -> None:
    recorder = Recorder()
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD) as fake:
        config = relay_config(starttls_table(fake.port, ca, secret_file, reuse_time="30s"))
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            await submit(srv, client_tls)
            await recorder.wait_for_outcomes(1)
            await submit(srv, client_tls, body=message(subject="second"))
            await recorder.wait_for_outcomes(2)
            assert [m.connection for m in fake.messages] == [0, 0]
            assert fake.connections == 1
            assert await srv.server.reload()
            # The old configuration's idle connection is closed politely.
            await fake.wait_until(lambda: fake.transcripts[0][-1:] == ["QUIT"])
            await submit(srv, client_tls, body=message(subject="third"))
            await fake.wait_for_messages(3)
    assert fake.messages[2].connection == 1
    commands = [line.split(" ")[0] for line in fake.transcripts[0]]
    assert commands.count("MAIL") == 2 and commands.count("EHLO") == 2, "one login, two mails"


async def test_client_certificate_over_implicit_tls(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext, tmp_path: Path,
) -> None:
    recorder = Recorder()
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    leaf = client_ca.issue_cert("mx.test.example")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "client-key.pem"))
    async with running_smarthost(ca=ca, tls="implicit", client_ca=tmp_path / "client-ca.pem"
                                 ) as fake:
        table = {"host": "127.0.0.1", "port": fake.port, "tls": "implicit",
                 "ca_file": str(ca.ca_path), "client_cert": "client.pem",
                 "client_key": "client-key.pem"}
        async with running_server(relay_config(table), extra_plugins=[("recorder", recorder)]
                                  ) as srv:
            await submit(srv, client_tls)
            ((_, outcome),) = await recorder.wait_for_outcomes(1)
    assert outcome.kind is OutcomeKind.DELIVERED
    (received,) = fake.messages
    assert received.client_names == ("mx.test.example",)


async def test_plain_relay_with_tls_none_is_warned_and_never_authenticates(
    relay_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.INFO, logger=LOG)
    async with running_smarthost(tls="none") as fake:
        table = {"hosts": [fake.address], "tls": "none"}
        async with running_server(relay_config(table), extra_plugins=[("recorder", recorder)]
                                  ) as srv:
            await submit(srv, client_tls)
            ((_, outcome),) = await recorder.wait_for_outcomes(1)
    assert outcome.kind is OutcomeKind.DELIVERED
    assert not fake.messages[0].tls
    assert not any(line.startswith(("AUTH", "STARTTLS")) for line in fake.transcripts[0])
    warnings = [r for r in caplog.records if "event=smarthost_tls_none" in r.message]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)


async def test_idle_connection_closed_by_the_smarthost_is_replaced_without_mark_down(
    relay_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    secret_file: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    caplog.set_level(logging.INFO, logger=LOG)
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD) as fake:
        config = relay_config(starttls_table(fake.port, ca, secret_file, reuse_time="30s"))
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            await submit(srv, client_tls)
            await recorder.wait_for_outcomes(1)
            fake.drop_connections()  # the provider timed out our idle connection
            await fake.wait_until(lambda: len(fake.errors) == 1)
            await submit(srv, client_tls, body=message(subject="second"))
            (_, (_, outcome)) = await recorder.wait_for_outcomes(2)
    assert outcome.kind is OutcomeKind.DELIVERED
    assert [m.connection for m in fake.messages] == [0, 1]
    assert "event=smarthost_stale_connection" in caplog.text
    assert "event=smarthost_host_down" not in caplog.text
