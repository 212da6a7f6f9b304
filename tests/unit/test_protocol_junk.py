"""Abuse limits of the core: commands that send no mail (junk), parameters after HELO."""

from __future__ import annotations

import pytest

from submitd.protocol import ConnectionClosed, MailFrom, RcptTo, ServerConnection
from tests.unit.protocol_support import EHLO, PLAIN, SENDER_OK, greeted, make, pump, ready

OK = b"250 2.0.0 OK\r\n"
JUNK_421 = b"421 4.7.0 Too many commands that send no mail\r\n"
CLOSED = ConnectionClosed(reason="Too many commands that send no mail")
MAIL = b"MAIL FROM:<a@example.org>\r\n"
RCPT = b"RCPT TO:<b@example.net>\r\n"
MESSAGE = MAIL + RCPT + b"DATA\r\nSubject: hi\r\n\r\nhi\r\n.\r\n"
HELO_ONLY_PARAMS = b"555 5.5.4 Parameters are not allowed after HELO; use EHLO\r\n"


def test_a_hundred_noops_are_answered_and_the_next_one_closes() -> None:
    conn = ready()
    out, events = pump(conn, b"NOOP\r\n" * 100)
    assert out == OK * 100 and events == []
    out, events = pump(conn, b"NOOP\r\nNOOP\r\n")
    assert out == JUNK_421
    assert events == [CLOSED]
    assert conn.closed


def test_rset_noop_vrfy_cycles_count_together() -> None:
    conn = ready()
    out, events = pump(conn, b"RSET\r\nNOOP\r\nVRFY postmaster\r\n" * 33 + b"HELP\r\n")
    assert out.count(b"\r\n") == 100 and events == []
    out, events = pump(conn, b"RSET\r\n")
    assert (out, events) == (JUNK_421, [CLOSED])


@pytest.mark.parametrize(
    "junk", [b"NOOP", b"RSET", b"VRFY x", b"HELP", b"EXPN x", b"ETRN x", b"TURN", b"BDAT 1",
             b"EHLO client.example", b"HELO client.example"],
)
def test_each_junk_command_counts(junk: bytes) -> None:
    conn = ready(max_junk_commands=3)
    pump(conn, (junk + b"\r\n") * 3)
    assert not conn.closed
    assert pump(conn, junk + b"\r\n") == (JUNK_421, [CLOSED])


def test_first_hello_and_the_hello_after_tls_are_not_junk() -> None:
    conn = make(tls_active=False, tls_available=True, max_junk_commands=1)
    pump(conn, EHLO + b"STARTTLS\r\n")
    conn.tls_started()
    out, _ = pump(conn, EHLO + b"AUTH PLAIN " + PLAIN + b"\r\nNOOP\r\n")
    assert out.endswith(b"235 2.7.0 Authentication successful\r\n" + OK)
    assert pump(conn, b"NOOP\r\n") == (JUNK_421, [CLOSED])


def test_mail_and_rset_cycles_are_cut_off() -> None:
    conn = ready(max_junk_commands=5)
    out, events = pump(conn, (MAIL + b"RSET\r\n") * 6)
    assert out == (SENDER_OK + OK) * 5 + SENDER_OK + JUNK_421
    assert events[-1] == CLOSED


def test_an_accepted_message_forgives_the_junk_so_far() -> None:
    conn = ready(max_junk_commands=3)
    for _ in range(5):
        out, _ = pump(conn, b"NOOP\r\n" * 3 + MESSAGE)
        assert out.startswith(OK * 3) and out.endswith(b"250 2.0.0 Ok: queued as TEST\r\n")
    assert pump(conn, b"NOOP\r\n" * 3)[0] == OK * 3
    assert pump(conn, b"NOOP\r\n")[0] == JUNK_421


def test_a_refused_message_does_not_forgive_the_junk() -> None:
    conn = ready(max_junk_commands=3)
    pump(conn, b"NOOP\r\n" * 3 + MAIL + RCPT + b"DATA\r\n")
    conn.receive_data(b"bare\nlf\r\n.\r\n")
    events = pump(conn)[1]
    assert events and not conn.closed
    assert pump(conn, b"NOOP\r\n")[0] == JUNK_421


def test_junk_before_login_counts_too() -> None:
    conn = greeted(max_junk_commands=2)
    assert pump(conn, b"NOOP\r\nHELP\r\n")[0].count(b"\r\n") == 2
    assert pump(conn, b"VRFY x\r\n") == (JUNK_421, [CLOSED])


# -- ESMTP parameters belong to EHLO sessions (RFC 5321 §4.1.1.11, §3.3) ------------------


def _helo_session() -> ServerConnection:
    """Logged in after EHLO (AUTH needs it, RFC 4954 §4), then HELO: no ESMTP any more."""
    conn = ready()
    assert pump(conn, b"HELO client.example\r\n")[0] == b"250 mx.example.org\r\n"
    assert conn.authenticated
    return conn


def test_after_helo_mail_with_a_parameter_gets_555() -> None:
    conn = _helo_session()
    for params in (b" SIZE=10", b" BODY=8BITMIME", b" SMTPUTF8", b" RET=HDRS", b" X=Y"):
        out, events = pump(conn, b"MAIL FROM:<a@example.org>" + params + b"\r\n")
        assert (out, events) == (HELO_ONLY_PARAMS, [])


def test_after_helo_rcpt_with_a_parameter_gets_555() -> None:
    conn = _helo_session()
    assert pump(conn, MAIL)[0] == SENDER_OK
    out, events = pump(conn, b"RCPT TO:<b@example.net> NOTIFY=NEVER\r\n")
    assert (out, events) == (HELO_ONLY_PARAMS, [])
    out, events = pump(conn, RCPT)
    assert events == [RcptTo(recipient="b@example.net")]


def test_after_helo_plain_mail_and_rcpt_still_work() -> None:
    conn = _helo_session()
    out, events = pump(conn, MESSAGE)
    assert out.endswith(b"250 2.0.0 Ok: queued as TEST\r\n")
    assert isinstance(events[0], MailFrom)


def test_after_ehlo_again_parameters_are_fine() -> None:
    conn = _helo_session()
    out, events = pump(conn, EHLO + b"MAIL FROM:<a@example.org> SIZE=10\r\n")
    assert out.endswith(SENDER_OK)
    assert isinstance(events[-1], MailFrom) and events[-1].params.size == 10
