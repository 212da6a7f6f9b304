"""The SMTP client driver against small scripted servers on loopback (real TCP, trustme TLS).

Each :class:`Script` is one server's behaviour; :func:`serve` runs it on 127.0.0.1 port 0 and
records what the client sent, so the tests check what a smarthost operator would see on the
other side: commands, the decoded AUTH, and the message bytes after dot-unstuffing.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
import trio

from submitd import DsnReturn, MailParams, Recipient, Secret
from submitd.client import (
    CHUNK_SIZE,
    ClientSettings,
    ClientTimeouts,
    ClientTLSMode,
    SMTPClient,
    SMTPClientError,
)
from submitd.testing import TestCA, running_server
from tests.integration.client_support import (
    EXTENSIONS,
    MAILBOX,
    MESSAGE,
    PASSWORD,
    SENDER,
    TOKEN,
    Script,
    rcpts,
    serve,
    settings,
    stored,
)
from tests.support import PASSWORD as USER_PASSWORD
from tests.support import RECIPIENT, USER, wait_for_mail
from tests.support import SENDER as USER_SENDER


async def test_starttls_auth_plain_and_per_recipient_replies(
    ca: TestCA, tmp_path: Path
) -> None:
    script = Script(rcpt_replies={"b@example.net": b"550 5.1.1 No such user\r\n"})
    async with serve(script, ca) as port:
        client = await SMTPClient.connect(settings(port, ca))
        assert client.usable and client.remote == "127.0.0.1"
        assert "PIPELINING" in client.extensions and "STARTTLS" not in client.extensions
        assert client.extensions["AUTH"] == "PLAIN LOGIN"
        result = await client.send(
            sender=SENDER, recipients=rcpts("a@example.net", "b@example.net", "c@example.net"),
            message=stored(tmp_path, MESSAGE), params=MailParams(),
        )
        await client.aclose()
    assert {a: (r.code, r.status) for a, r in result.replies.items()} == {
        "a@example.net": (250, "2.0.0"),
        "b@example.net": (550, "5.1.1"),
        "c@example.net": (250, "2.0.0"),
    }
    assert script.credentials == [("relay-user", PASSWORD)]
    assert script.messages == [MESSAGE]
    assert script.commands[:3] == ["EHLO relay.example.org", "STARTTLS", "EHLO relay.example.org"]
    assert f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}" in script.commands
    assert script.commands[-1] == "QUIT"
    assert not client.usable


async def send_one(port: int, ca: TestCA, tmp_path: Path, data: bytes = MESSAGE,
                   *addresses: str, **kw: object) -> dict[str, tuple[int, str]]:
    """Connect, send one message, QUIT; the (code, status) per recipient."""
    client = await SMTPClient.connect(settings(port, ca, **kw))  # type: ignore[arg-type]
    try:
        result = await client.send(
            sender=SENDER, recipients=rcpts(*(addresses or ("a@example.net",))),
            message=stored(tmp_path, data), params=MailParams(),
        )
    finally:
        await client.aclose()
    return {a: (r.code, r.status) for a, r in result.replies.items()}


async def test_implicit_tls_from_the_first_byte(ca: TestCA, tmp_path: Path) -> None:
    script = Script(tls="implicit")
    async with serve(script, ca) as port:
        got = await send_one(port, ca, tmp_path, tls=ClientTLSMode.IMPLICIT)
    assert got == {"a@example.net": (250, "2.0.0")}
    assert script.commands[0] == "EHLO relay.example.org" and "STARTTLS" not in script.commands
    assert script.credentials == [("relay-user", PASSWORD)]


@pytest.mark.parametrize("tls", [ClientTLSMode.STARTTLS, ClientTLSMode.IMPLICIT])
async def test_untrusted_certificate_fails_at_stage_tls_before_any_secret(
    ca: TestCA, tmp_path: Path, tls: ClientTLSMode
) -> None:
    script = Script(tls=tls.value)
    other = TestCA(tmp_path / "other-ca")
    async with serve(script, ca) as port:
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca, tls=tls, context=other.client_context()))
    assert info.value.stage == "tls"
    assert (info.value.reply.code, info.value.reply.status) == (454, "4.7.5")
    assert "certificate verify failed" in str(info.value) or "unable to get" in str(info.value)
    assert script.credentials == [] and "AUTH" not in script.commands


async def test_wrong_host_name_in_certificate_fails_at_stage_tls(ca: TestCA) -> None:
    async with serve(Script(), ca) as port:
        config = settings(port, ca)
        wrong = ClientSettings(**{**config.__dict__, "server_hostname": "other.example"})
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(wrong)
    assert (info.value.stage, info.value.reply.status) == ("tls", "4.7.5")
    assert "other.example" in str(info.value) or "mismatch" in str(info.value)


async def test_starttls_not_offered_is_an_error_never_a_downgrade(ca: TestCA) -> None:
    script = Script(tls="none")
    async with serve(script, ca) as port:
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca))
    assert info.value.stage == "starttls"
    assert (info.value.reply.code, info.value.reply.status) == (454, "4.7.0")
    assert script.commands == ["EHLO relay.example.org"] or script.commands[-1] == "QUIT"
    assert "AUTH" not in script.commands and not any(c.startswith("MAIL") for c in script.commands)


async def test_reply_injected_behind_the_starttls_220_is_ignored(
    ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    injected = b"250-evil.example\r\n250 AUTH PLAIN\r\n"
    script = Script(after_starttls=injected, rcpt_replies={"b@example.net": b"550 5.1.1 no\r\n"})
    async with serve(script, ca) as port:
        got = await send_one(port, ca, tmp_path, MESSAGE, "a@example.net", "b@example.net")
    # Had the injected 250 answered the second EHLO, every later reply would be off by one.
    assert got == {"a@example.net": (250, "2.0.0"), "b@example.net": (550, "5.1.1")}
    assert script.messages == [MESSAGE]
    assert f"discarded={len(injected)}" in caplog.text


@pytest.mark.parametrize(("verb", "stage"), [("EHLO", "ehlo"), ("MAIL", "mail"),
                                              ("RCPT", "rcpt"), ("DATA", "data")])
async def test_a_stalled_server_times_out_with_451_4_4_2(
    ca: TestCA, tmp_path: Path, verb: str, stage: str
) -> None:
    short = ClientTimeouts(greeting=0.5, mail=0.3, rcpt=0.3, data_init=0.3, data_end=0.3)
    script = Script(tls="none", stall_on=verb)
    async with serve(script, ca) as port:
        with trio.fail_after(5), pytest.raises(SMTPClientError) as info:
            await send_one(port, ca, tmp_path, tls=ClientTLSMode.NONE, auth=False,
                           timeouts=short)
    assert info.value.stage == stage
    assert (info.value.reply.code, info.value.reply.status) == (451, "4.4.2")
    assert "timed out" in str(info.value)


@pytest.mark.parametrize("reset", [False, True], ids=["eof", "reset"])
async def test_tls_cut_mid_transaction_is_a_lost_connection_at_that_stage(
    ca: TestCA, tmp_path: Path, reset: bool
) -> None:
    script = Script(cut_after="MAIL", cut_with_reset=reset)
    async with serve(script, ca) as port:
        client = await SMTPClient.connect(settings(port, ca))
        with trio.fail_after(5), pytest.raises(SMTPClientError) as info:
            await client.send(sender=SENDER, recipients=rcpts("a@example.net"),
                              message=stored(tmp_path, MESSAGE), params=MailParams())
        assert not client.usable
        await client.aclose()
    assert info.value.stage in ("mail", "rcpt"), "the step in progress, not the handshake"
    assert (info.value.reply.code, info.value.reply.status) == (451, "4.4.2")
    assert "connection lost" in str(info.value) and "TLS failed" not in str(info.value)


async def test_one_connection_carries_two_transactions(ca: TestCA, tmp_path: Path) -> None:
    script = Script()
    second = b"Subject: second\r\n\r\nbody two\r\n"
    async with serve(script, ca) as port:
        client = await SMTPClient.connect(settings(port, ca))
        for i, data in enumerate((MESSAGE, second)):
            result = await client.send(sender=SENDER, recipients=rcpts(f"r{i}@example.net"),
                                       message=stored(tmp_path, data, f"m{i}"),
                                       params=MailParams())
            assert result.replies[f"r{i}@example.net"].code == 250
            assert client.usable
        await client.aclose()
    assert script.connections == 1 and script.messages == [MESSAGE, second]
    assert script.commands.count("EHLO relay.example.org") == 2  # before and after STARTTLS


async def test_body_arrives_byte_exact_with_dots_and_a_megabyte(
    ca: TestCA, tmp_path: Path
) -> None:
    line = b"." * 20 + b"x" * 50 + b"\r\n"
    body = b"Subject: big\r\n\r\n.\r\n..\r\n.x\r\n" + line * (1024 * 1024 // len(line) + 1)
    assert len(body) > 1024 * 1024
    script = Script()
    async with serve(script, ca) as port:
        got = await send_one(port, ca, tmp_path, body)
    assert got == {"a@example.net": (250, "2.0.0")}
    assert script.messages == [body]


@pytest.mark.parametrize("size", [CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1])
async def test_body_around_one_chunk_arrives_byte_exact(
    ca: TestCA, tmp_path: Path, size: int
) -> None:
    # A message that fits in one chunk is sent from the scan's read, a longer one from the
    # file: both give the same bytes, dot lines included, at the edge between the two.
    head = b"Subject: edge\r\n\r\n.\r\n"
    line = b".dot line\r\n"
    body = head + line * ((size - len(head)) // len(line))
    body += b"x" * (size - len(body) - 2) + b"\r\n"
    assert len(body) == size
    script = Script()
    async with serve(script, ca) as port:
        got = await send_one(port, ca, tmp_path, body)
    assert got == {"a@example.net": (250, "2.0.0")}
    assert script.messages == [body]


async def test_size_over_the_servers_limit_is_552_5_3_4_without_mail_or_data(
    ca: TestCA, tmp_path: Path
) -> None:
    script = Script(extensions=("PIPELINING", "SIZE 100", "8BITMIME"))
    async with serve(script, ca) as port:
        got = await send_one(port, ca, tmp_path, MESSAGE + b"x" * 100, "a@example.net",
                             "b@example.net")
    assert got == {"a@example.net": (552, "5.3.4"), "b@example.net": (552, "5.3.4")}
    assert not any(c.startswith(("MAIL", "DATA")) for c in script.commands)


async def test_auth_login_when_plain_is_not_offered(ca: TestCA, tmp_path: Path) -> None:
    script = Script(auth=("LOGIN",))
    async with serve(script, ca) as port:
        await send_one(port, ca, tmp_path)
    assert script.credentials == [("relay-user", PASSWORD)]


async def test_refused_auth_carries_the_server_reply_and_never_the_password(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="submitd.client")
    echo = f"535 5.7.8 bad credentials for relay-user/{PASSWORD}\r\n".encode()
    script = Script(auth_reply=echo)
    async with serve(script, ca) as port:
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca))
    assert info.value.stage == "auth"
    assert (info.value.reply.code, info.value.reply.status) == (535, "5.7.8")
    plain = base64.b64encode(f"\0relay-user\0{PASSWORD}".encode()).decode()
    for text in (str(info.value), repr(info.value), caplog.text):
        assert PASSWORD not in text and plain not in text
    assert "bad credentials" in str(info.value)


async def test_xoauth2_logs_in_as_the_mailbox_and_the_message_goes_through(
    ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="submitd")
    script = Script(auth=("PLAIN", "LOGIN", "XOAUTH2"))
    async with serve(script, ca) as port:
        got = await send_one(port, ca, tmp_path, token=TOKEN)
    assert got == {"a@example.net": (250, "2.0.0")}
    assert script.credentials == [(MAILBOX, TOKEN)]  # XOAUTH2, not PLAIN, though both offered
    assert script.messages == [MESSAGE] and script.sasl_responses == []
    assert "mechanism=XOAUTH2" in caplog.text
    assert TOKEN not in caplog.text


async def test_xoauth2_refused_with_googles_json_challenge(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="submitd")
    # The server echoes the token in its final reply: it is blanked like a password.
    script = Script(auth=("XOAUTH2",), tokens=(),
                    oauth_final=f"535 5.7.8 Username and Password not accepted: {TOKEN}\r\n"
                    .encode())
    async with serve(script, ca) as port:
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca, token=TOKEN))
    error = info.value
    assert error.stage == "auth" and (error.reply.code, error.reply.status) == (535, "5.7.8")
    assert error.oauth_error == "status=401 schemes=bearer scope=https://mail.google.com/"
    assert script.sasl_responses == [b""]  # the challenge was answered with an empty line
    assert script.credentials == [(MAILBOX, TOKEN)]
    assert str(error) == ("auth: 535 5.7.8 Username and Password not accepted: *** (XOAUTH2 "
                          "status=401 schemes=bearer scope=https://mail.google.com/)")
    initial = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {TOKEN}\x01\x01".encode())
    for text in (str(error), repr(error), caplog.text):
        assert TOKEN not in text and initial.decode() not in text
    assert not any(c.startswith("MAIL") for c in script.commands)
    assert script.commands[-1] == "AUTH"  # no QUIT: the attempt ended at the refusal


async def test_xoauth2_not_offered_is_504_at_stage_auth_never_a_password_fallback(
    ca: TestCA,
) -> None:
    script = Script(auth=("PLAIN", "LOGIN"))
    async with serve(script, ca) as port:
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca, token=TOKEN))
    assert info.value.stage == "auth" and info.value.oauth_error is None
    assert str(info.value.reply) == "504 5.5.4 XOAUTH2 not offered by 127.0.0.1"
    assert "AUTH" not in script.commands and script.credentials == []


async def test_a_refusal_without_challenge_has_no_oauth_error(ca: TestCA) -> None:
    # Exchange Online answers a bad token at once with 535 5.7.3, no 334.
    script = Script(auth=("LOGIN", "XOAUTH2"), tokens=(), oauth_error=b"",
                    oauth_final=b"535 5.7.3 Authentication unsuccessful\r\n")
    async with serve(script, ca) as port:
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca, token=TOKEN))
    assert info.value.stage == "auth" and info.value.oauth_error is None
    assert str(info.value) == "auth: 535 5.7.3 Authentication unsuccessful"
    assert script.sasl_responses == [] and script.credentials == [(MAILBOX, TOKEN)]


async def test_without_pipelining_a_refused_mail_answers_every_recipient_then_rset(
    ca: TestCA, tmp_path: Path
) -> None:
    script = Script(extensions=("8BITMIME",), mail_reply=b"553 5.7.1 sender not allowed\r\n")
    async with serve(script, ca) as port:
        client = await SMTPClient.connect(settings(port, ca))
        result = await client.send(sender=SENDER, recipients=rcpts("a@example.net", "b@x.org"),
                                   message=stored(tmp_path, MESSAGE), params=MailParams())
        assert client.usable
        await client.aclose()
    assert {a: r.code for a, r in result.replies.items()} == {"a@example.net": 553,
                                                             "b@x.org": 553}
    assert not any(c.startswith(("RCPT", "DATA")) for c in script.commands)
    assert "RSET" in script.commands


async def test_no_recipient_accepted_means_no_data_and_an_rset(
    ca: TestCA, tmp_path: Path
) -> None:
    script = Script(rcpt_replies={"a@example.net": b"450 4.2.1 try later\r\n"})
    async with serve(script, ca) as port:
        got = await send_one(port, ca, tmp_path)
    assert got == {"a@example.net": (450, "4.2.1")}
    assert "DATA" not in script.commands and "RSET" in script.commands


async def test_eight_bit_body_needs_8bitmime(ca: TestCA, tmp_path: Path) -> None:
    data = "Subject: x\r\n\r\nGrüße\r\n".encode()
    without = Script(extensions=("PIPELINING",))
    async with serve(without, ca) as port:
        assert await send_one(port, ca, tmp_path, data) == {"a@example.net": (554, "5.6.3")}
    with_8bit = Script()
    async with serve(with_8bit, ca) as port:
        assert await send_one(port, ca, tmp_path, data) == {"a@example.net": (250, "2.0.0")}
    assert f"MAIL FROM:<{SENDER}> SIZE={len(data)} BODY=8BITMIME" in with_8bit.commands
    assert with_8bit.messages == [data]


async def test_smtputf8_only_when_needed_and_offered(ca: TestCA, tmp_path: Path) -> None:
    script = Script()  # no SMTPUTF8
    async with serve(script, ca) as port:
        got = await send_one(port, ca, tmp_path, MESSAGE, "a@example.net", "jürgen@example.net")
    assert got == {"a@example.net": (250, "2.0.0"), "jürgen@example.net": (553, "5.6.7")}
    utf8_headers = "Subject: Grüße\r\n\r\nx\r\n".encode()
    async with serve(Script(), ca) as port:
        got = await send_one(port, ca, tmp_path, utf8_headers, "a@example.net", "b@example.net")
    assert got == {"a@example.net": (553, "5.6.7"), "b@example.net": (553, "5.6.7")}
    offered = Script(extensions=(*EXTENSIONS, "SMTPUTF8"))
    async with serve(offered, ca) as port:
        got = await send_one(port, ca, tmp_path, MESSAGE, "jürgen@example.net")
    assert got == {"jürgen@example.net": (250, "2.0.0")}
    assert any(c.endswith(" SMTPUTF8") and c.startswith("MAIL") for c in offered.commands)


DSN_PARAMS = MailParams(ret=DsnReturn.HDRS, envid="batch 7+1")
DSN_RECIPIENTS = [
    Recipient(address="a@example.net",
              params=(("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;old+2Ba@example.net"))),
    Recipient(address="b@example.net", params=(("NOTIFY", "NEVER"),)),
]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_dsn_parameters_are_sent_exactly_when_the_server_offers_dsn(
    ca: TestCA, tmp_path: Path, pipelining: bool
) -> None:
    base = EXTENSIONS if pipelining else tuple(e for e in EXTENSIONS if e != "PIPELINING")
    results = {}
    for offered in (True, False):
        script = Script(extensions=(*base, "DSN") if offered else base)
        async with serve(script, ca) as port:
            client = await SMTPClient.connect(settings(port, ca))
            result = await client.send(sender=SENDER, recipients=DSN_RECIPIENTS,
                                       message=stored(tmp_path, MESSAGE), params=DSN_PARAMS)
            await client.aclose()
        assert {r.code for r in result.replies.values()} == {250}
        envelope = [c for c in script.commands if c.startswith(("MAIL", "RCPT"))]
        results[offered] = (envelope, result.dsn_passed_on)
    size = f"SIZE={len(MESSAGE)}"
    assert results[True] == ([
        f"MAIL FROM:<{SENDER}> {size} RET=HDRS ENVID=batch+207+2B1",
        "RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;old+2Ba@example.net",
        "RCPT TO:<b@example.net> NOTIFY=NEVER",
    ], True)
    assert results[False] == ([
        f"MAIL FROM:<{SENDER}> {size}",
        "RCPT TO:<a@example.net>",
        "RCPT TO:<b@example.net>",
    ], False)


async def test_plaintext_mode_never_sends_starttls_or_auth(ca: TestCA, tmp_path: Path) -> None:
    script = Script(tls="starttls")
    async with serve(script, ca) as port:
        await send_one(port, ca, tmp_path, tls=ClientTLSMode.NONE, auth=False)
    assert "STARTTLS" not in script.commands and "AUTH" not in script.commands
    with pytest.raises(ValueError, match="without TLS"):
        settings(25, ca, tls=ClientTLSMode.NONE, auth=True)


async def test_connection_refused_is_421_4_4_1_at_stage_connect(ca: TestCA) -> None:
    async with serve(Script(), ca) as port:
        pass  # the port is closed again
    with pytest.raises(SMTPClientError) as info:
        await SMTPClient.connect(settings(port, ca))
    assert info.value.stage == "connect"
    assert (info.value.reply.code, info.value.reply.status) == (421, "4.4.1")
    # The operator reads the system's reason, not just "all attempts failed".
    assert str(info.value).endswith(f"cannot connect to 127.0.0.1:{port}: Connection refused")


async def test_relays_through_a_real_submitd_server(
    make_config, ca: TestCA, tmp_path: Path, maildir: Path  # type: ignore[no-untyped-def]
) -> None:
    data = f"From: <{USER_SENDER}>\r\nSubject: relayed\r\n\r\n.dot\r\nend".encode()
    async with running_server(make_config()) as srv:
        for tls, mode in ((ClientTLSMode.STARTTLS, "starttls"),
                          (ClientTLSMode.IMPLICIT, "implicit")):
            config = ClientSettings(
                host="127.0.0.1", port=srv.port(mode), tls=tls, ssl_context=ca.client_context(),
                server_hostname="localhost", helo_name="relay.example.org", username=USER,
                password=Secret(USER_PASSWORD),
            )
            client = await SMTPClient.connect(config)
            assert {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8"} <= set(client.extensions)
            result = await client.send(sender=USER_SENDER, recipients=rcpts(RECIPIENT),
                                       message=stored(tmp_path, data), params=MailParams())
            await client.aclose()
            reply = result.replies[RECIPIENT]
            assert (reply.code, reply.status) == (250, "2.0.0"), reply
        messages = await wait_for_mail(maildir, 2)
    for message in messages:
        assert message.endswith(b"Subject: relayed\r\n\r\n.dot\r\nend\r\n")


async def test_an_endless_ehlo_reply_is_cut_off_as_a_protocol_error(ca: TestCA) -> None:
    script = Script(tls="none", ehlo_reply=b"250-PIPELINING\r\n" * 5000)
    async with serve(script, ca) as port:
        with pytest.raises(SMTPClientError) as info:
            await SMTPClient.connect(settings(port, ca, tls=ClientTLSMode.NONE, auth=False))
    assert info.value.stage == "protocol"
    assert (info.value.reply.code, info.value.reply.status) == (451, "4.5.0")
    assert "more than 100 lines" in str(info.value)


async def test_421_to_a_recipient_ends_the_connection(ca: TestCA, tmp_path: Path) -> None:
    script = Script(rcpt_replies={"b@example.net": b"421 4.3.0 shutting down\r\n"})
    async with serve(script, ca) as port:
        client = await SMTPClient.connect(settings(port, ca))
        with pytest.raises(SMTPClientError) as info:
            await client.send(sender=SENDER, recipients=rcpts("a@example.net", "b@example.net"),
                              message=stored(tmp_path, MESSAGE), params=MailParams())
        assert not client.usable
        with pytest.raises(SMTPClientError):
            await client.reset()
        await client.aclose()
    assert (info.value.stage, info.value.reply.code) == ("rcpt", 421)
    assert "DATA" not in script.commands and "QUIT" not in script.commands


def test_settings_refuse_half_credentials_and_missing_tls_context(ca: TestCA) -> None:
    with pytest.raises(ValueError, match="go together"):
        ClientSettings(host="h.example", port=587, tls=ClientTLSMode.STARTTLS,
                       ssl_context=ca.client_context(), helo_name="me.example", username="u")
    with pytest.raises(ValueError, match="needs an ssl_context"):
        ClientSettings(host="h.example", port=465, tls=ClientTLSMode.IMPLICIT, ssl_context=None,
                       helo_name="me.example")
    with pytest.raises(ValueError, match="helo_name"):
        ClientSettings(host="h.example", port=25, tls=ClientTLSMode.NONE, ssl_context=None,
                       helo_name="bad name")
    with pytest.raises(ValueError, match="positive"):
        ClientTimeouts(connect=0)
    shown = repr(ClientSettings(host="h.example", port=587, tls=ClientTLSMode.STARTTLS,
                                ssl_context=ca.client_context(), helo_name="me.example",
                                username="u", password=Secret(PASSWORD)))
    assert PASSWORD not in shown


def test_settings_take_a_token_or_a_password_never_both_never_without_tls(ca: TestCA) -> None:
    def make(*, username: str | None = None, password: Secret | None = None,
             oauth_token: Secret | None = None,
             tls: ClientTLSMode = ClientTLSMode.STARTTLS) -> ClientSettings:
        context = None if tls is ClientTLSMode.NONE else ca.client_context()
        return ClientSettings(host="h.example", port=587, tls=tls, ssl_context=context,
                              helo_name="me.example", username=username, password=password,
                              oauth_token=oauth_token)

    with pytest.raises(ValueError, match="exclude each other"):
        make(username=MAILBOX, password=Secret(PASSWORD), oauth_token=Secret(TOKEN))
    with pytest.raises(ValueError, match="needs username"):
        make(oauth_token=Secret(TOKEN))
    with pytest.raises(ValueError, match="never sent without TLS"):
        make(tls=ClientTLSMode.NONE, username=MAILBOX, oauth_token=Secret(TOKEN))
    for bad in ("", "two words", "tab\there", "ünïcode"):
        with pytest.raises(ValueError, match="bearer token") as info:
            make(username=MAILBOX, oauth_token=Secret(bad))
        assert str(info.value) == "oauth_token is not an RFC 6750 bearer token"
    ok = make(username=MAILBOX, oauth_token=Secret(TOKEN))
    assert ok.password is None and TOKEN not in repr(ok) and TOKEN not in str(ok)
