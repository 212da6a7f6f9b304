"""The client role of the sans-I/O core, driven with byte tables (no sockets).

What a hostile or broken server sends must never turn into a reply the client acts on: bounded
lines and replies, CRLF only, nothing parsed from behind a STARTTLS 220. What the client sends
must never break a command line, whatever the envelope holds.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from submitd import Secret
from submitd.protocol import (
    NEED_DATA,
    AddressError,
    ClientConnection,
    ClientState,
    ContentScanner,
    DataEncoder,
    DsnReturn,
    LocalProtocolError,
    MailParams,
    Mechanism,
    NeedData,
    RemoteProtocolError,
    Reply,
    ReplyTo,
    ServerConnection,
    ServerReply,
    TransactionPlan,
    blank_secret,
    choose_mechanism,
    parse_extensions,
    plan_transaction,
)
from submitd.protocol import BodyType as Body
from submitd.protocol._client_oauth import offers_xoauth2, xoauth2_error
from tests.unit.protocol_support import make, pump

settings.register_profile("default", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SUBMITD_HYPOTHESIS_PROFILE", "default"))

GREETING = b"220 smtp.example.net ESMTP\r\n"
EHLO_REPLY = (
    b"250-smtp.example.net greets you\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n"
    b"250-8BITMIME\r\n250-auth=LOGIN\r\n250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n"
    b"250 SMTPUTF8\r\n"
)


def replies(conn: ClientConnection, data: bytes = b"") -> list[ServerReply]:
    """Feed ``data`` and collect every complete reply."""
    if data:
        conn.receive_data(data)
    out: list[ServerReply] = []
    while conn.expected and not isinstance(event := conn.next_event(), NeedData):
        out.append(event)
    return out


def greeted(*, tls_active: bool = False) -> ClientConnection:
    conn = ClientConnection(tls_active=tls_active)
    (event,) = replies(conn, GREETING)
    assert event.to is ReplyTo.GREETING and event.reply.code == 220
    return conn


def refused(conn: ClientConnection, data: bytes) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()  # at once: the core must not wait for more bytes
    assert conn.state is ClientState.CLOSED
    return info.value


# -- replies -------------------------------------------------------------------------------


def test_ehlo_reply_becomes_an_extension_map() -> None:
    conn = greeted()
    assert conn.send_ehlo("relay.example.org") == b"EHLO relay.example.org\r\n"
    (event,) = replies(conn, EHLO_REPLY)
    assert event.to is ReplyTo.EHLO
    assert dict(parse_extensions(event.reply)) == {
        "PIPELINING": "", "SIZE": "1000000", "8BITMIME": "", "AUTH": "LOGIN PLAIN LOGIN",
        "STARTTLS": "", "SMTPUTF8": "",
    }


def test_helo_fallback_after_ehlo_is_refused() -> None:
    conn = greeted()
    conn.send_ehlo("relay.example.org")
    (event,) = replies(conn, b"502 5.5.1 EHLO not implemented\r\n")
    assert event.reply.code == 502 and conn.state is ClientState.READY
    assert conn.send_helo("relay.example.org") == b"HELO relay.example.org\r\n"
    (event,) = replies(conn, b"250 smtp.example.net\r\n")
    assert event.to is ReplyTo.HELO and parse_extensions(event.reply) == {}


@pytest.mark.parametrize("split", range(1, len(b"250 2.1.0 Sender ok\r\n")))
def test_a_reply_split_across_reads_is_assembled(split: int) -> None:
    conn = greeted(tls_active=True)
    conn.send_mail("a@example.org", MailParams())
    data = b"250 2.1.0 Sender ok\r\n"
    assert replies(conn, data[:split]) == []
    (event,) = replies(conn, data[split:])
    assert (event.to, event.reply.code, event.reply.status) == (ReplyTo.MAIL, 250, "2.1.0")


def test_multi_line_reply_across_reads() -> None:
    conn = greeted()
    conn.send_ehlo("relay.example.org")
    assert replies(conn, EHLO_REPLY[:40]) == []
    assert replies(conn, EHLO_REPLY[40:-5]) == []
    (event,) = replies(conn, EHLO_REPLY[-5:])
    assert len(event.reply.lines) == 8


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"250-x\r\n" * 100 + b"250 x\r\n", "more than 100 lines"),
        (b"250-" + b"x" * 600 + b"\r\n", "longer than 512"),
        (b"250 " + b"x" * 507 + b"\r\n", "longer than 512"),  # 513 octets with CRLF
        (b"250 ok\n", "bare LF"),
        (b"250-ok\r\n250 ok\n", "bare LF"),
        (b"250 o\rk\r\n", "bare CR"),
        (b"hello there\r\n", "not a reply line"),
        (b"250-ok\r\n550 no\r\n", "code changes"),
        (b"999 what\r\n", "out of range"),
    ],
)
def test_malformed_replies_are_refused_451_4_5_0(data: bytes, reason: str) -> None:
    conn = greeted()
    conn.send_ehlo("relay.example.org")
    error = refused(conn, data)
    assert (error.reply.code, error.reply.status) == (451, "4.5.0")
    assert reason in error.reply.text


def test_an_endless_multi_line_reply_is_cut_off_without_waiting_for_its_end() -> None:
    conn = greeted()
    conn.send_ehlo("relay.example.org")
    conn.receive_data(b"250-x\r\n" * 100)
    assert conn.next_event() is NEED_DATA  # 100 lines is the limit, not yet exceeded
    error = refused(conn, b"250-x\r\n")
    assert "more than 100 lines" in error.reply.text


def test_a_long_line_is_refused_before_its_end_arrives() -> None:
    conn = greeted()
    conn.send_ehlo("relay.example.org")
    assert replies(conn, b"250 " + b"x" * 500) == []
    error = refused(conn, b"x" * 100)
    assert "longer than 512" in error.reply.text


def test_a_full_512_octet_line_is_accepted() -> None:
    conn = greeted()
    conn.send_noop()
    (event,) = replies(conn, b"250 " + b"x" * 506 + b"\r\n")
    assert event.reply.code == 250


def test_eof_while_a_reply_is_due_is_a_lost_connection() -> None:
    conn = greeted()
    conn.send_noop()
    conn.receive_data(b"250 2.0")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert (info.value.reply.code, info.value.reply.status) == (451, "4.4.2")


def test_421_closes_the_conversation() -> None:
    conn = greeted(tls_active=True)
    conn.send_envelope("a@example.org", MailParams(), ["b@example.net", "c@example.net"])
    (event,) = replies(conn, b"421 4.3.0 shutting down\r\n")
    assert event.reply.code == 421 and conn.state is ClientState.CLOSED
    assert conn.expected == ()
    with pytest.raises(LocalProtocolError):
        conn.send_rset()


@pytest.mark.parametrize(
    ("send", "data"),
    [
        (lambda c: c.send_mail("a@example.org", MailParams()), b"354 go ahead\r\n"),
        (lambda c: c.send_noop(), b"334 VXNlcm5hbWU6\r\n"),
        (lambda c: c.send_data(), b"250 2.0.0 ok\r\n"),
    ],
)
def test_a_reply_that_cannot_answer_the_command_is_a_protocol_error(send, data) -> None:  # type: ignore[no-untyped-def]
    conn = greeted(tls_active=True)
    send(conn)
    assert refused(conn, data).reply.status == "4.5.0"


# -- STARTTLS ------------------------------------------------------------------------------


def test_reply_injected_behind_the_starttls_220_is_discarded_and_never_parsed() -> None:
    conn = greeted()
    conn.send_ehlo("relay.example.org")
    replies(conn, EHLO_REPLY)
    assert conn.send_starttls() == b"STARTTLS\r\n"
    injected = b"250-smtp.example.net\r\n250 AUTH PLAIN\r\n"
    (event,) = replies(conn, b"220 2.0.0 Ready to start TLS\r\n" + injected)
    assert event.to is ReplyTo.STARTTLS
    assert conn.state is ClientState.TLS_HANDSHAKE
    assert conn.trailing_data == len(injected)
    conn.receive_data(b"250 more plaintext\r\n")  # arrives before the handshake: also dropped
    assert conn.trailing_data == len(injected) + 20
    with pytest.raises(LocalProtocolError):
        conn.send_ehlo("relay.example.org")
    conn.tls_started()
    assert conn.tls_active and conn.state is ClientState.READY
    conn.send_ehlo("relay.example.org")
    assert conn.next_event() is NEED_DATA  # the injected 250 did not answer this EHLO
    (event,) = replies(conn, b"250-smtp.example.net\r\n250 AUTH LOGIN\r\n")
    assert parse_extensions(event.reply) == {"AUTH": "LOGIN"}


def test_starttls_refused_keeps_plaintext_and_auth_stays_impossible() -> None:
    conn = greeted()
    conn.send_starttls()
    replies(conn, b"454 4.7.0 TLS not available\r\n")
    assert conn.state is ClientState.READY and not conn.tls_active
    with pytest.raises(LocalProtocolError, match="inside TLS"):
        conn.send_auth(Mechanism.PLAIN, "user", Secret("pw"))
    with pytest.raises(LocalProtocolError):
        conn.tls_started()


# -- AUTH ----------------------------------------------------------------------------------


def test_auth_plain_sends_the_initial_response() -> None:
    conn = greeted(tls_active=True)
    line = conn.send_auth(Mechanism.PLAIN, "relay-user", Secret("pässword"))
    assert line == b"AUTH PLAIN " + base64.b64encode("\0relay-user\0pässword".encode()) + b"\r\n"
    (event,) = replies(conn, b"235 2.7.0 Authentication successful\r\n")
    assert event.to is ReplyTo.AUTH and conn.state is ClientState.READY


def test_auth_login_answers_both_challenges() -> None:
    conn = greeted(tls_active=True)
    assert conn.send_auth(Mechanism.LOGIN, "relay-user", Secret("pw")) == b"AUTH LOGIN\r\n"
    replies(conn, b"334 VXNlcm5hbWU6\r\n")
    assert conn.state is ClientState.AUTH_CHALLENGE
    with pytest.raises(LocalProtocolError):
        conn.send_mail("a@example.org", MailParams())
    assert conn.send_auth_response() == base64.b64encode(b"relay-user") + b"\r\n"
    replies(conn, b"334 UGFzc3dvcmQ6\r\n")
    assert conn.send_auth_response() == base64.b64encode(b"pw") + b"\r\n"
    (event,) = replies(conn, b"235 2.7.0 ok\r\n")
    assert event.reply.code == 235
    # A server that keeps challenging gets "*" (cancel, RFC 4954 §4), never a guess.
    conn.send_auth(Mechanism.PLAIN, "relay-user", Secret("pw"))
    replies(conn, b"334 \r\n")
    assert conn.send_auth_response() == b"*\r\n"


def test_auth_refusal_never_shows_the_password_in_errors() -> None:
    conn = greeted(tls_active=True)
    with pytest.raises(ValueError, match="password contains NUL") as info:
        conn.send_auth(Mechanism.PLAIN, "user", Secret("sec\0ret"))
    assert "sec" not in str(info.value)
    with pytest.raises(ValueError, match="not valid UTF-8") as info:
        conn.send_auth(Mechanism.PLAIN, "user", Secret("bad\udc80pw"))
    assert "bad" not in str(info.value) and info.value.__cause__ is None
    assert conn.expected == ()


# -- AUTH XOAUTH2 --------------------------------------------------------------------------

TOKEN = "ya29.a0AfH6SMB-token_value~x/y+z=="
XOAUTH2_LINE = (
    b"AUTH XOAUTH2 dXNlcj1zb21lb25lQGV4YW1wbGUuY29tAWF1dGg9QmVhcmVyIHlhMjkuYTBBZkg2U01CLXRva2Vu"
    b"X3ZhbHVlfngveSt6PT0BAQ==\r\n"
)
GOOGLE_ERROR = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
# RFC 7628 §3.2.2 / Google's XOAUTH2 page: the JSON error, base64, in a 334.
GOOGLE_CHALLENGE = (
    b"334 eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xl"
    b"LmNvbS8ifQ==\r\n"
)


def test_auth_xoauth2_sends_the_exact_initial_response_and_succeeds_on_235() -> None:
    conn = greeted(tls_active=True)
    line = conn.send_auth_xoauth2("someone@example.com", Secret(TOKEN))
    assert line == XOAUTH2_LINE
    decoded = base64.b64decode(line.split()[2])
    assert decoded == f"user=someone@example.com\x01auth=Bearer {TOKEN}\x01\x01".encode()
    (event,) = replies(conn, b"235 2.7.0 Accepted\r\n")
    assert event.to is ReplyTo.AUTH and event.reply.code == 235
    assert conn.state is ClientState.READY and conn.expected == ()
    conn.send_mail("someone@example.com", MailParams())  # the conversation goes on


def test_auth_xoauth2_error_challenge_is_answered_with_an_empty_line_then_535() -> None:
    conn = greeted(tls_active=True)
    conn.send_auth_xoauth2("someone@example.com", Secret(TOKEN))
    (challenge,) = replies(conn, GOOGLE_CHALLENGE)
    assert challenge.reply.code == 334 and conn.state is ClientState.AUTH_CHALLENGE
    assert json.loads(base64.b64decode(challenge.reply.text)) == GOOGLE_ERROR
    with pytest.raises(LocalProtocolError):
        conn.send_mail("a@example.org", MailParams())  # the challenge must be answered first
    empty = conn.send_auth_response()
    assert empty == b"\r\n"
    (final,) = replies(conn, b"535-5.7.8 Username and Password not accepted.\r\n"
                             b"535 5.7.8 https://support.google.com/mail/?p=BadCredentials\r\n")
    assert (final.to, final.reply.code, final.reply.status) == (ReplyTo.AUTH, 535, "5.7.8")
    assert conn.state is ClientState.READY and conn.expected == ()
    assert xoauth2_error(challenge.reply) == (
        "status=401 schemes=bearer scope=https://mail.google.com/"
    )
    # The token went out once, inside the AUTH line, and nowhere else.
    assert TOKEN not in empty.decode() and TOKEN not in str(challenge.reply)
    assert TOKEN not in str(final.reply)
    # A server that challenges again gets "*" (cancel, RFC 4954 §4), never the token.
    conn.send_auth_xoauth2("someone@example.com", Secret(TOKEN))
    replies(conn, GOOGLE_CHALLENGE)
    assert conn.send_auth_response() == b"\r\n"
    replies(conn, b"334 \r\n")
    assert conn.send_auth_response() == b"*\r\n"


def test_auth_xoauth2_carries_an_entra_sized_jwt_on_one_line() -> None:
    # Exchange Online access tokens are JWTs of 2-3 KB; RFC 4954 §4 allows 12288 octets.
    jwt = ".".join(base64.urlsafe_b64encode(os.urandom(n)).decode().rstrip("=")
                   for n in (60, 1800, 256))
    line = greeted(tls_active=True).send_auth_xoauth2("someone@example.com", Secret(jwt))
    assert 2500 < len(line) < 12288 and line.count(b"\r\n") == 1
    assert base64.b64decode(line.split()[2]).split(b"\x01")[1] == f"auth=Bearer {jwt}".encode()


def test_auth_xoauth2_only_inside_tls_and_with_a_well_formed_token() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="inside TLS"):
        conn.send_auth_xoauth2("someone@example.com", Secret(TOKEN))
    conn = greeted(tls_active=True)
    for bad in ("to ken", "tok\x01en", "", "tök"):
        with pytest.raises(ValueError, match="bearer token") as info:
            conn.send_auth_xoauth2("someone@example.com", Secret(bad))
        assert str(info.value) == "oauth token is not an RFC 6750 bearer token"
    with pytest.raises(ValueError, match="username"):
        conn.send_auth_xoauth2("some\x01one@example.com", Secret(TOKEN))
    assert conn.expected == ()


@pytest.mark.parametrize(("challenge", "summary"), [
    ({"status": "400", "schemes": "Bearer mac", "scope": "https://mail.google.com/"},
     'status=400 schemes="Bearer mac" scope=https://mail.google.com/'),
    ({"status": 401}, "status=401"),
    ({"status": "401\r\n250 ok", "extra": "ignored"}, 'status="401??250 ok"'),
    ({"status": f"echo {TOKEN}"}, 'status="echo ***"'),
    ({}, "error challenge without status, schemes or scope"),
    (["not", "an", "object"], "unreadable error challenge (not a JSON object)"),
])
def test_xoauth2_error_summarises_the_challenge_and_never_the_token(
    challenge: object, summary: str
) -> None:
    text = base64.b64encode(json.dumps(challenge).encode()).decode()
    assert xoauth2_error(Reply(code=334, lines=(text,)), secrets=(TOKEN,)) == summary
    assert xoauth2_error(Reply(code=334, lines=("%%%",))) == (
        "unreadable error challenge (not base64 JSON)"
    )


def test_offers_xoauth2_reads_the_auth_keyword() -> None:
    assert offers_xoauth2({"AUTH": "LOGIN PLAIN xoauth2"})
    assert not offers_xoauth2({"AUTH": "PLAIN LOGIN OAUTHBEARER"})
    assert not offers_xoauth2({})


def test_a_server_echoing_the_token_has_it_blanked() -> None:
    initial = XOAUTH2_LINE.split()[2].decode()
    reply = Reply.make(535, "5.7.8", f"bad token {TOKEN}", f"for {initial}")
    blanked = blank_secret(reply, "someone@example.com", None, oauth_token=Secret(TOKEN))
    assert blanked.lines == ("bad token ***", "for ***")


# -- envelope ------------------------------------------------------------------------------


def test_pipelined_mail_and_rcpt_replies_are_matched_in_order() -> None:
    conn = greeted(tls_active=True)
    data = conn.send_envelope(
        "a@example.org", MailParams(size=1234, body=Body.EIGHT_BIT_MIME, auth="evil@x"),
        ["b@example.net", "c@example.net"],
        [(("NOTIFY", "FAILURE"),), ()],
    )
    assert data == (
        b"MAIL FROM:<a@example.org> SIZE=1234 BODY=8BITMIME\r\n"
        b"RCPT TO:<b@example.net> NOTIFY=FAILURE\r\nRCPT TO:<c@example.net>\r\n"
    )
    assert conn.expected == (ReplyTo.MAIL, ReplyTo.RCPT, ReplyTo.RCPT)
    events = replies(conn, b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n")
    assert [(e.to, e.reply.code) for e in events] == [
        (ReplyTo.MAIL, 250), (ReplyTo.RCPT, 550), (ReplyTo.RCPT, 250)
    ]
    with pytest.raises(LocalProtocolError):
        conn.send_body(b"too early")
    assert conn.send_data() == b"DATA\r\n"
    with pytest.raises(LocalProtocolError, match="wait for the reply to DATA"):
        conn.send_rset()


@pytest.mark.parametrize(
    "bad",
    [
        "a@example.org\r\nRCPT TO:<x@evil.example>",
        "a@example.org\nDATA",
        "a@exa\rmple.org",
        "a\x00@example.org",
        "a\x1b@example.org",
        "not an address",
    ],
)
def test_control_characters_in_the_envelope_are_refused_before_any_output(bad: str) -> None:
    conn = greeted(tls_active=True)
    with pytest.raises(AddressError):
        conn.send_envelope(bad, MailParams(), ["b@example.net"])
    with pytest.raises(AddressError):
        conn.send_envelope("a@example.org", MailParams(), ["b@example.net", bad])
    with pytest.raises(AddressError):
        conn.send_rcpt(bad)
    with pytest.raises(ValueError, match="ESMTP parameter"):
        conn.send_rcpt("b@example.net", (("NOTIFY", "FAILURE\r\nDATA"),))
    assert conn.expected == ()
    assert conn.send_noop() == b"NOOP\r\n"


def test_commands_wait_for_replies_that_end_a_pipelined_group() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="greeting"):
        conn.send_ehlo("relay.example.org")
    replies(conn, GREETING)
    conn.send_ehlo("relay.example.org")
    with pytest.raises(LocalProtocolError, match="EHLO"):
        conn.send_mail("a@example.org", MailParams())
    with pytest.raises(ValueError, match="EHLO name"):
        greeted().send_ehlo("bad name\r\n")


def test_null_sender_and_a_whole_transaction() -> None:
    conn = greeted(tls_active=True)
    out = conn.send_envelope("", MailParams(smtputf8=True), ["ü@example.net"])
    assert out == "MAIL FROM:<> SMTPUTF8\r\nRCPT TO:<ü@example.net>\r\n".encode()
    replies(conn, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
    conn.send_data()
    replies(conn, b"354 go\r\n")
    assert conn.state is ClientState.BODY
    assert conn.send_body(b"Subject: x\r\n\r\n.hi") == b"Subject: x\r\n\r\n..hi"
    assert conn.end_body() == b"\r\n.\r\n"
    (event,) = replies(conn, b"250 2.0.0 queued\r\n")
    assert event.to is ReplyTo.MESSAGE
    conn.send_quit()
    replies(conn, b"221 2.0.0 bye\r\n")
    assert conn.state is ClientState.CLOSED


# -- the client against our own server core ------------------------------------------------


def test_client_and_server_cores_talk_to_each_other() -> None:
    server: ServerConnection = make(tls_active=True)
    client = greeted(tls_active=True)

    def exchange(data: bytes) -> list[ServerReply]:
        out, _ = pump(server, data)
        return replies(client, out)

    (ehlo,) = exchange(client.send_ehlo("relay.example.org"))
    assert "AUTH" in parse_extensions(ehlo.reply)
    (auth,) = exchange(client.send_auth(Mechanism.LOGIN, "user", Secret("pw")))
    (auth,) = exchange(client.send_auth_response())
    (auth,) = exchange(client.send_auth_response())
    assert (auth.reply.code, auth.reply.status) == (235, "2.7.0")
    events = exchange(client.send_envelope("a@example.org", MailParams(),
                                           ["b@example.net", "c@example.net"]))
    assert [e.reply.code for e in events] == [250, 250, 250]
    (start,) = exchange(client.send_data())
    assert start.reply.code == 354
    (done,) = exchange(client.send_body(b"Subject: t\r\n\r\n.\r\n..x") + client.end_body())
    assert done.to is ReplyTo.MESSAGE and done.reply.code == 250


# -- the message body ----------------------------------------------------------------------


def encode(chunks: list[bytes]) -> bytes:
    encoder = DataEncoder()
    return b"".join(encoder.feed(c) for c in chunks) + encoder.end()


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),  # the final CRLF is added
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),  # no early end of data
        (b"..x\r\n", b"...x\r\n.\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),  # bare LF canonicalised
        (b"a\rb\r", b"a\r\nb\r\n.\r\n"),  # bare CR canonicalised
        (b"a\r\n.\n.\r.", b"a\r\n..\r\n..\r\n..\r\n.\r\n"),
        (b"x\r\n\r\n.", b"x\r\n\r\n..\r\n.\r\n"),
    ],
)
def test_data_encoder_stuffs_dots_and_canonicalises_line_ends(message: bytes, wire: bytes) -> None:
    assert encode([message]) == wire
    for split in range(len(message) + 1):
        assert encode([message[:split], message[split:]]) == wire, split


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"x.y", b"\xff"]),
                max_size=40),
       st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_any_split_gives_the_same_output_and_one_terminator(
    pieces: list[bytes], cuts: list[int]
) -> None:
    message = b"".join(pieces)
    whole = encode([message])
    points = sorted({min(c, len(message)) for c in cuts})
    chunks = [message[a:b] for a, b in zip([0, *points], [*points, len(message)], strict=True)]
    assert encode(chunks) == whole
    body = whole[: -len(b".\r\n")]
    assert whole.endswith(b".\r\n") and (body == b"" or body.endswith(b"\r\n"))
    assert b"\r\n.\r\n" not in b"\r\n" + body, "an early end of data"
    assert body.replace(b"\r\n", b"").count(b"\r") == 0
    assert body.replace(b"\r\n", b"").count(b"\n") == 0
    # Unstuffing gives back the message with canonical line ends.
    lines = body.split(b"\r\n")[:-1]
    unstuffed = b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    canonical = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if canonical and not canonical.endswith(b"\r\n"):
        canonical += b"\r\n"
    assert unstuffed == canonical


def test_data_encoder_refuses_use_after_end() -> None:
    encoder = DataEncoder()
    encoder.feed(b"x\r\n")
    assert encoder.size == 3
    encoder.end()
    with pytest.raises(ValueError, match="after end"):
        encoder.feed(b"y")
    with pytest.raises(ValueError, match="twice"):
        encoder.end()


# -- planning a transaction ----------------------------------------------------------------

FULL = {"PIPELINING": "", "SIZE": "1000", "8BITMIME": "", "SMTPUTF8": "", "DSN": ""}


def plan(extensions: dict[str, str], *addresses: str, sender: str = "a@example.org",
         size: int = 100, eight_bit: bool = False, utf8_headers: bool = False) -> TransactionPlan:
    return plan_transaction(
        extensions=extensions, sender=sender,
        recipients=[(a, (("NOTIFY", "FAILURE"), ("X-OTHER", "1"))) for a in addresses],
        size=size, eight_bit=eight_bit, utf8_headers=utf8_headers,
    )


@pytest.mark.parametrize(
    ("extensions", "kwargs", "expected"),
    [
        ({"SIZE": "1000"}, {"size": 1001}, (552, "5.3.4")),
        ({"SIZE": "0"}, {"size": 10**9}, None),  # 0: no announced limit
        ({}, {"eight_bit": True}, (554, "5.6.3")),
        ({"8BITMIME": ""}, {"utf8_headers": True, "eight_bit": True}, (553, "5.6.7")),
        ({}, {"sender": "jürgen@example.org"}, (553, "5.6.7")),
        ({}, {"sender": "bad\r\n@example.org"}, (553, "5.1.7")),
    ],
)
def test_capability_failures_refuse_every_recipient(extensions, kwargs, expected) -> None:  # type: ignore[no-untyped-def]
    result = plan(extensions, "b@example.net", "c@example.net", **kwargs)
    if expected is None:
        assert result.recipients == ("b@example.net", "c@example.net")
    else:
        assert result.recipients == ()
        assert {(r.code, r.status) for r in result.refused.values()} == {expected}
        assert set(result.refused) == {"b@example.net", "c@example.net"}


def test_plan_picks_parameters_from_what_the_server_offers() -> None:
    result = plan(FULL, "b@example.net", "ü@example.net", eight_bit=True)
    assert result.params == MailParams(size=100, body=Body.EIGHT_BIT_MIME, smtputf8=True)
    assert result.recipient_params == ((("NOTIFY", "FAILURE"),), (("NOTIFY", "FAILURE"),))
    plain = plan({}, "b@example.net", "ü@example.net", "x\n@example.net")
    assert plain.params == MailParams()
    assert plain.recipients == ("b@example.net",) and plain.recipient_params == ((),)
    assert (plain.refused["ü@example.net"].code, plain.refused["ü@example.net"].status) == (
        553, "5.6.7")
    assert plain.refused["x\n@example.net"].status == "5.1.3"


DSN_RCPT = (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;b+2Bx@example.net"))


def dsn_plan(extensions: dict[str, str], envid: str = "batch 7") -> TransactionPlan:
    return plan_transaction(
        extensions=extensions, sender="a@example.org",
        recipients=[("b@example.net", DSN_RCPT), ("c@example.net", ())],
        size=100, eight_bit=False, utf8_headers=False, ret=DsnReturn.HDRS, envid=envid,
    )


def test_dsn_parameters_go_only_to_a_server_that_offers_dsn() -> None:
    offered = dsn_plan({"PIPELINING": "", "DSN": ""})
    assert offered.dsn
    assert (offered.params.ret, offered.params.envid) == (DsnReturn.HDRS, "batch 7")
    assert offered.recipient_params == (DSN_RCPT, ())
    data = greeted().send_envelope("a@example.org", offered.params, offered.recipients,
                                   offered.recipient_params)
    assert data == (
        b"MAIL FROM:<a@example.org> RET=HDRS ENVID=batch+207\r\n"
        b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@example.net\r\n"
        b"RCPT TO:<c@example.net>\r\n"
    )
    # RFC 3461 §4: none of them to a server without DSN.
    silent = dsn_plan({"PIPELINING": ""})
    assert not silent.dsn
    assert silent.params == MailParams()
    assert silent.recipient_params == ((), ())
    data = greeted().send_envelope("a@example.org", silent.params, silent.recipients,
                                   silent.recipient_params)
    assert data == (
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n"
    )


@pytest.mark.parametrize("envid", ["x" * 101, "line\r\nbreak", "caf\u00e9"])
def test_an_envid_that_cannot_be_sent_is_dropped_not_the_message(envid: str) -> None:
    result = dsn_plan({"DSN": ""}, envid=envid)
    assert result.recipients == ("b@example.net", "c@example.net")
    assert (result.params.ret, result.params.envid) == (DsnReturn.HDRS, None)


def test_content_scanner_finds_8bit_in_headers_and_body() -> None:
    scanner = ContentScanner(header_end=12)
    scanner.feed(b"Subject: x\r\n")
    assert not scanner.eight_bit and not scanner.done
    scanner.feed("Grüße".encode())
    assert scanner.eight_bit and not scanner.utf8_headers and scanner.done
    header = ContentScanner(header_end=100)
    header.feed("Subject: ü".encode())
    assert header.utf8_headers and header.done


def test_choose_mechanism_prefers_plain() -> None:
    assert choose_mechanism({"AUTH": "LOGIN PLAIN CRAM-MD5"}) is Mechanism.PLAIN
    assert choose_mechanism({"AUTH": "login"}) is Mechanism.LOGIN
    assert choose_mechanism({"AUTH": "CRAM-MD5"}) is None
    assert choose_mechanism({}) is None


def test_a_server_echoing_the_password_has_it_blanked() -> None:
    pw = "hunter2-secret"
    plain = base64.b64encode(f"\0user\0{pw}".encode()).decode()
    reply = Reply.make(535, "5.7.8", f"bad: {pw}", f"token {plain}")
    blanked = blank_secret(reply, "user", Secret(pw))
    assert pw not in str(blanked) and plain not in str(blanked)
    assert blanked.lines == ("bad: ***", "token ***")
    assert blank_secret(reply, None, None) is reply


def test_large_canonical_chunks_and_odd_ones_encode_like_the_whole() -> None:
    # Canonical chunks take the shortcut (no rewriting); a dot line or a bare CR/LF in one
    # chunk, or a CR/LF pair split between two, must come out exactly as the whole would.
    line = b"l" * 70 + b"\r\n"
    clean = line * 4000
    message = clean + b".dot\r\n" + clean + b"bare\nlf\r\n" + clean + b"bare\rcr\r\n" + clean
    expected = (
        clean + b"..dot\r\n" + clean + b"bare\r\nlf\r\n" + clean + b"bare\r\ncr\r\n" + clean
        + b".\r\n"
    )
    assert encode([message]) == expected
    for size in (262_144, 65_536 + 1, len(clean) + 1, len(clean) + 3):
        chunks = [message[i : i + size] for i in range(0, len(message), size)]
        assert encode(chunks) == expected, size
