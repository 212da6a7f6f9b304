"""STARTTLS: injection-proof switch, state reset, and the 530s before TLS on port 587."""

from __future__ import annotations

from functools import partial

import pytest

from submitd.protocol import (
    AuthRequest,
    Hello,
    LocalProtocolError,
    MailFrom,
    ServerState,
    StartTLS,
    Verb,
)
from submitd.protocol._state import BEFORE_TLS, SEQUENCE_RULES
from tests.unit import protocol_support
from tests.unit.protocol_support import PLAIN, pump

# The state STARTTLS is about: plaintext on port 587 with TLS on offer (RFC 3207).
make = partial(protocol_support.make, tls_active=False, tls_available=True)

READY = b"220 2.0.0 Ready to start TLS\r\n"
MUST_STARTTLS = b"530 5.7.0 Must issue a STARTTLS command first\r\n"

EHLO_PLAIN = (
    b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n250 STARTTLS\r\n"
)
EHLO_TLS = (
    b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n250 AUTH PLAIN LOGIN\r\n"
)


def test_plaintext_ehlo_offers_starttls_and_no_auth() -> None:
    conn = make()
    out, events = pump(conn, b"EHLO client.example\r\n")
    assert out == EHLO_PLAIN
    assert events == [Hello(domain="client.example", extended=True)]


def test_implicit_tls_ehlo_offers_auth_at_once_and_no_starttls() -> None:
    conn = make(tls_active=True, tls_available=False)
    assert pump(conn, b"EHLO client.example\r\n")[0] == EHLO_TLS


def test_plaintext_without_tls_offers_neither() -> None:
    conn = make(tls_available=False)
    out = pump(conn, b"EHLO client.example\r\n")[0]
    assert b"STARTTLS" not in out and b"AUTH" not in out


def test_starttls_switch_resets_everything_and_ehlo_is_required_again() -> None:
    conn = make()
    pump(conn, b"EHLO client.example\r\n")
    out, events = pump(conn, b"STARTTLS\r\n")
    assert (out, events) == (READY, [StartTLS(discarded=0)])
    assert conn.state is ServerState.TLS_HANDSHAKE
    conn.tls_started()
    assert conn.tls_active and not conn.authenticated
    assert pump(conn, b"AUTH PLAIN " + PLAIN + b"\r\n")[0] == (
        b"503 5.5.1 Bad sequence of commands: send EHLO first\r\n"
    )
    assert pump(conn, b"MAIL FROM:<a@example.org>\r\n")[0] == (
        b"503 5.5.1 Bad sequence of commands: send HELO/EHLO first\r\n"
    )
    assert pump(conn, b"EHLO client.example\r\n")[0] == EHLO_TLS
    assert pump(conn, b"STARTTLS\r\n")[0] == (
        b"503 5.5.1 Bad sequence of commands: TLS already active\r\n"
    )


@pytest.mark.parametrize(
    "injected",
    [b"MAIL FROM:<x@y.z>\r\n", b"EHLO evil\r\nAUTH PLAIN " + PLAIN + b"\r\n", b"NOOP\r\n", b"\r"],
)
def test_commands_pipelined_after_starttls_are_discarded(injected: bytes) -> None:
    conn = make()
    pump(conn, b"EHLO client.example\r\n")
    out, events = pump(conn, b"STARTTLS\r\n" + injected)
    assert (out, events) == (READY, [StartTLS(discarded=len(injected))])
    conn.receive_data(b"MAIL FROM:<late@y.z>\r\n")  # before the handshake finished: dropped
    conn.tls_started()
    out, events = pump(conn)
    assert (out, events) == (b"", [])
    out, events = pump(conn, b"NOOP\r\n")
    assert (out, events) == (b"250 2.0.0 OK\r\n", [])


def test_starttls_without_ehlo_is_allowed() -> None:
    conn = make()
    assert pump(conn, b"STARTTLS\r\n")[0] == READY


@pytest.mark.parametrize(
    ("kwargs", "sent", "reply"),
    [
        ({"tls_available": False}, b"STARTTLS\r\n", b"502 5.5.1 STARTTLS not available\r\n"),
        ({"tls_active": True, "tls_available": False}, b"STARTTLS\r\n",
         b"503 5.5.1 Bad sequence of commands: TLS already active\r\n"),
        ({}, b"STARTTLS now\r\n", b"501 5.5.4 Syntax error: STARTTLS takes no arguments\r\n"),
    ],
)
def test_starttls_refusals(kwargs: dict[str, bool], sent: bytes, reply: bytes) -> None:
    conn = make(**kwargs)
    assert pump(conn, b"EHLO client.example\r\n" + sent)[0].endswith(reply)
    assert conn.state is ServerState.COMMAND


@pytest.mark.parametrize(
    "command",
    [b"AUTH PLAIN " + PLAIN, b"AUTH LOGIN", b"AUTH BOGUS", b"AUTH", b"MAIL FROM:<a@example.org>",
     b"MAIL FROM:<bad", b"RCPT TO:<b@example.net>", b"DATA", b"DATA now"],
)
@pytest.mark.parametrize("ehlo", [b"", b"EHLO client.example\r\n", b"HELO client.example\r\n"])
def test_before_tls_credentials_and_mail_get_530_first(command: bytes, ehlo: bytes) -> None:
    conn = make()
    out, events = pump(conn, ehlo + command + b"\r\n")
    assert out.endswith(MUST_STARTTLS)
    assert not any(isinstance(e, AuthRequest | MailFrom) for e in events)


@pytest.mark.parametrize(
    "command",
    [b"VRFY postmaster", b"VRFY", b"HELP", b"HELP MAIL", b"EXPN staff", b"ETRN example.org",
     b"TURN", b"BDAT 10 LAST", b"vrfy postmaster", b"help"],
)
@pytest.mark.parametrize("ehlo", [b"", b"EHLO client.example\r\n", b"HELO client.example\r\n"])
def test_before_tls_every_other_known_command_gets_530(command: bytes, ehlo: bytes) -> None:
    # RFC 3207 §4: only EHLO, HELO, STARTTLS, NOOP, RSET and QUIT before TLS.
    conn = make()
    out, events = pump(conn, ehlo + command + b"\r\n")
    assert out.endswith(MUST_STARTTLS)
    hello = Hello(domain="client.example", extended=ehlo.startswith(b"EHLO"))
    assert events == ([hello] if ehlo else [])
    assert not conn.closed


def test_before_tls_the_six_allowed_commands_are_answered() -> None:
    conn = make()
    out, _ = pump(conn, b"NOOP\r\nRSET\r\nHELO client.example\r\nEHLO client.example\r\n")
    assert out == b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n250 mx.example.org\r\n" + EHLO_PLAIN
    assert pump(conn, b"STARTTLS\r\n")[0] == READY
    conn = make()
    assert pump(conn, b"QUIT\r\n")[0] == b"221 2.0.0 Bye\r\n"


def test_before_tls_every_verb_but_the_six_is_refused_by_the_state_table() -> None:
    for verb in Verb:
        rules = SEQUENCE_RULES.get(verb, ())
        if verb in BEFORE_TLS:
            assert all(rule.name != "tls" for rule in rules), verb
        else:
            assert rules and rules[0].name == "tls", verb


def test_before_tls_an_unknown_verb_keeps_500() -> None:
    # Nothing to refuse: RFC 5321 §4.2.4 answers an unknown command 500 in every state.
    conn = make()
    assert pump(conn, b"XYZZY\r\n")[0] == b"500 5.5.1 Command unrecognized\r\n"


@pytest.mark.parametrize(
    ("command", "reply"),
    [(b"VRFY postmaster", b"252 2.5.0 "), (b"HELP", b"214 2.0.0 "),
     (b"EXPN staff", b"502 5.5.1 "), (b"ETRN example.org", b"502 5.5.1 ")],
)
def test_after_tls_those_commands_get_their_normal_answers(command: bytes, reply: bytes) -> None:
    conn = make()
    pump(conn, b"STARTTLS\r\n")
    conn.tls_started()
    assert pump(conn, command + b"\r\n")[0].startswith(reply)


def test_plain_listener_without_tls_never_accepts_auth_or_mail() -> None:
    conn = make(tls_available=False)
    auth = b"AUTH PLAIN " + PLAIN + b"\r\n"
    out, _ = pump(conn, b"EHLO c.example\r\n" + auth + b"MAIL FROM:<a@b.example>\r\n")
    assert out.endswith(MUST_STARTTLS + MUST_STARTTLS)


def test_next_event_during_handshake_is_a_caller_error() -> None:
    conn = make()
    pump(conn, b"STARTTLS\r\n")
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_full_submission_works_after_the_switch() -> None:
    conn = make()
    pump(conn, b"EHLO client.example\r\nSTARTTLS\r\n")
    conn.tls_started()
    pump(conn, b"EHLO client.example\r\nAUTH PLAIN " + PLAIN + b"\r\n")
    assert conn.authenticated
    out, _ = pump(conn, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n.\r\n")
    assert out.endswith(b"250 2.0.0 Ok: queued as TEST\r\n")


def test_tls_started_without_starttls_is_a_caller_error() -> None:
    conn = make()
    with pytest.raises(LocalProtocolError):
        conn.tls_started()
