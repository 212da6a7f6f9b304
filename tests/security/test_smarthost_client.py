"""docs/security.md §7: the smarthost client does not trust the relay it talks to."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd import DeliveryOutcome, MailParams, OutcomeKind, Recipient, Reply, hookimpl
from submitd.client import ClientTimeouts, ClientTLSMode, SMTPClient, SMTPClientError
from submitd.protocol import AddressError
from submitd.testing import TestCA, running_server, running_smarthost
from tests.integration.client_support import MESSAGE, SENDER, Script, rcpts, serve, settings, stored
from tests.security.support import connect, send_ok


class Outcomes:
    """Records each recipient's delivery outcome."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, DeliveryOutcome]] = []

    @hookimpl
    def submitd_delivery_result(self, envelope, recipient, outcome):  # type: ignore[no-untyped-def]
        self.seen.append((recipient.address, outcome))

    async def wait(self, count: int) -> dict[str, DeliveryOutcome]:
        with trio.fail_after(15):
            while len(self.seen) < count:
                await trio.sleep(0.02)
        return dict(self.seen)


async def test_starttls_stripping_fails_the_delivery_not_downgrades_it(
    make_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext, tmp_path: Path,
) -> None:
    secret = tmp_path / "relay.secret"
    secret.write_text("relay pass\n")
    outcomes = Outcomes()
    async with running_smarthost(ca=ca, username="relay", password="relay pass",
                                 offer_starttls=False, require_tls=False) as fake:
        table = {"host": "127.0.0.1", "port": fake.port, "tls": "starttls",
                 "ca_file": str(ca.ca_path), "username": "relay", "password_file": str(secret)}
        config = make_config(enable=("passwdfile", "smarthost"), plugins={"smarthost": table})
        async with running_server(config, extra_plugins=[("outcomes", outcomes)]) as srv:
            async with await connect(srv, "implicit", client_tls) as client:
                queue_id = await send_ok(client)
            outcome = (await outcomes.wait(1))["someone@example.net"]
            assert outcome.kind is OutcomeKind.TEMPORARY
            assert (outcome.reply.code, outcome.reply.status) == (454, "4.7.0")
            assert await srv.server.spool.queued_ids() == [queue_id], "kept for a retry"
        assert fake.messages == [], "nothing went out in plain text"


@pytest.mark.parametrize("tls", [ClientTLSMode.STARTTLS, ClientTLSMode.IMPLICIT])
async def test_unverified_certificate_fails_before_any_secret(
    ca: TestCA, tmp_path: Path, tls: ClientTLSMode,
) -> None:
    script = Script(tls=tls.value)
    other = TestCA(tmp_path / "other-ca")
    async with serve(script, ca) as port:
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca, tls=tls, context=other.client_context()))
    assert (info.value.stage, info.value.reply.code, info.value.reply.status) == (
        "tls", 454, "4.7.5")
    assert script.credentials == [] and "AUTH" not in script.commands


async def test_starttls_response_injection_is_never_read_as_a_reply(
    ca: TestCA, tmp_path: Path,
) -> None:
    script = Script(after_starttls=b"250-evil.example\r\n250 AUTH PLAIN\r\n",
                    rcpt_replies={"b@example.net": b"550 5.1.1 no\r\n"})
    async with serve(script, ca) as port:
        client = await SMTPClient.connect(settings(port, ca))
        result = await client.send(sender=SENDER,
                                   recipients=rcpts("a@example.net", "b@example.net"),
                                   message=stored(tmp_path, MESSAGE), params=MailParams())
        await client.aclose()
    got = {a: (r.code, r.status) for a, r in result.replies.items()}
    assert got == {"a@example.net": (250, "2.0.0"), "b@example.net": (550, "5.1.1")}


@pytest.mark.parametrize("reply", [
    b"250-PIPELINING\r\n" * 5000,  # endless multi-line reply
    b"250-" + b"A" * 5000 + b"\r\n250 OK\r\n",  # a line over 512 octets
    b"250-PIPELINING\r\n550 changed code\r\n",  # the code changes mid-reply
    b"250-PIPELINING\n250 OK\r\n",  # bare LF
])
async def test_hostile_replies_are_bounded_protocol_errors(ca: TestCA, reply: bytes) -> None:
    script = Script(tls="none", ehlo_reply=reply)
    async with serve(script, ca) as port:
        with trio.fail_after(10), pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca, tls=ClientTLSMode.NONE, auth=False))
    assert (info.value.stage, info.value.reply.code, info.value.reply.status) == (
        "protocol", 451, "4.5.0")


@pytest.mark.parametrize("bad", ["a@example.net\r\nRCPT TO:<x@evil.example>",
                                 "a@example.net\nDATA", "a\x00@example.net"])
async def test_envelope_line_breaks_are_refused_before_writing(
    ca: TestCA, tmp_path: Path, bad: str,
) -> None:
    script = Script()
    async with serve(script, ca) as port:
        client = await SMTPClient.connect(settings(port, ca))
        try:
            result = await client.send(sender=SENDER, recipients=[Recipient(address=bad)],
                                       message=stored(tmp_path, MESSAGE), params=MailParams())
        except (AddressError, SMTPClientError, ValueError):
            pass
        else:  # refused for that recipient alone, before anything was written
            assert 500 <= result.replies[bad].code < 600, result.replies
        try:
            result = await client.send(sender=bad, recipients=rcpts("a@example.net"),
                                       message=stored(tmp_path, MESSAGE, "m2"),
                                       params=MailParams())
        except (AddressError, SMTPClientError, ValueError):
            pass
        else:
            assert 500 <= result.replies["a@example.net"].code < 600, result.replies
        await client.aclose()
    assert not any("evil" in c or c.startswith(("MAIL", "RCPT")) for c in script.commands)


async def test_outcomes_are_per_recipient_4xx_temporary_5xx_permanent(
    make_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext, tmp_path: Path,
) -> None:
    secret = tmp_path / "relay.secret"
    secret.write_text("relay pass\n")
    outcomes = Outcomes()
    replies = {"temp@example.net": Reply.make(450, "4.2.0", "mailbox busy"),
               "perm@example.net": Reply.make(550, "5.1.1", "no such user")}
    async with running_smarthost(ca=ca, username="relay", password="relay pass",
                                 recipient_replies=replies) as fake:
        table = {"host": "127.0.0.1", "port": fake.port, "tls": "starttls",
                 "ca_file": str(ca.ca_path), "username": "relay", "password_file": str(secret)}
        config = make_config(enable=("passwdfile", "smarthost"), plugins={"smarthost": table})
        async with running_server(config, extra_plugins=[("outcomes", outcomes)]) as srv:
            async with await connect(srv, "implicit", client_tls) as client:
                await client.command("MAIL FROM:<demo@example.com>")
                for rcpt in ("ok@example.net", "temp@example.net", "perm@example.net"):
                    await client.command(f"RCPT TO:<{rcpt}>")
                await client.command("DATA")
                await client.send(b"From: <demo@example.com>\r\nSubject: x\r\n\r\nx\r\n.\r\n")
                reply = await client.reply()
                assert reply is not None and reply.code == 250
            got = await outcomes.wait(3)
    assert got["ok@example.net"].kind is OutcomeKind.DELIVERED
    assert got["temp@example.net"].kind is OutcomeKind.TEMPORARY
    assert got["perm@example.net"].kind is OutcomeKind.PERMANENT
    relayed = [m.recipients for m in fake.messages]
    assert relayed[0] == ("ok@example.net",)
    # (the rest is the bounce for perm@ going back to the sender)
    assert not any({"temp@example.net", "perm@example.net"} & set(r) for r in relayed)


@pytest.mark.parametrize("failure", ["refused", "timeout"])
async def test_connection_failures_and_timeouts_are_temporary(
    ca: TestCA, tmp_path: Path, failure: str,
) -> None:
    import socket

    if failure == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca, tls=ClientTLSMode.NONE, auth=False))
    else:
        script = Script(tls="none", stall_on="MAIL")
        async with serve(script, ca) as port:
            client = await SMTPClient.connect(settings(
                port, ca, tls=ClientTLSMode.NONE, auth=False, timeouts=ClientTimeouts(mail=0.3)))
            with trio.fail_after(5), pytest.raises(SMTPClientError) as info:
                await client.send(sender=SENDER, recipients=rcpts("a@example.net"),
                                  message=stored(tmp_path, MESSAGE), params=MailParams())
            await client.aclose()
    assert 400 <= info.value.reply.code < 500, info.value.reply
