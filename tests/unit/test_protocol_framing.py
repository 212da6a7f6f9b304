"""Command-line framing: CRLF only, bounded lines, cross-protocol requests, EOF, pipelining."""

from __future__ import annotations

import pytest

from submitd.protocol import NEED_DATA, ConnectionClosed, Event, Reply, ServerState
from tests.unit.protocol_support import connection, greeted, make, pump, ready

BARE_LF = (
    b"500 5.5.2 Line must end with CRLF (bare LF received; with openssl s_client use -crlf)\r\n"
)
BARE_CR = b"500 5.5.2 Line must end with CRLF (bare CR received)\r\n"
TOO_LONG = b"500 5.5.2 Line too long\r\n"


def test_greeting_names_the_host_without_enhanced_code() -> None:
    conn = connection(tls_active=False, tls_available=True)
    conn.greet()
    assert conn.data_to_send() == b"220 mx.example.org ESMTP submitd\r\n"
    assert conn.state is ServerState.COMMAND


@pytest.mark.parametrize(
    ("sent", "reply"),
    [
        (b"NOOP\n", BARE_LF),
        (b"NOOP\r\r\n", BARE_CR),
        (b"NO\rOP\r\n", BARE_CR),
        (b"\n", BARE_LF),
        (b"\r\n", b"500 5.5.2 Syntax error, empty command\r\n"),
        (b"NOOP\r\n", b"250 2.0.0 OK\r\n"),
        (b"noop\r\n", b"250 2.0.0 OK\r\n"),
        (b"FOO\r\n", b"500 5.5.1 Command unrecognized\r\n"),
        (b" NOOP\r\n", b"500 5.5.1 Command unrecognized\r\n"),
        (b"NOOP\x00\r\n", b"500 5.5.1 Command unrecognized\r\n"),
        (b"\xc5\xbftarttls\r\n", b"500 5.5.1 Command unrecognized\r\n"),
        (b"\xff\xfe\r\n", b"500 5.5.1 Command unrecognized\r\n"),
    ],
)
def test_command_line_framing(sent: bytes, reply: bytes) -> None:
    conn = make()
    assert pump(conn, sent) == (reply, [])
    assert not conn.closed


def test_bare_lf_does_not_end_a_line_and_the_session_goes_on_after_crlf() -> None:
    conn = make()
    assert pump(conn, b"EHLO client.example\nNOOP\r\n")[0] == BARE_LF
    assert pump(conn, b"NOOP\r\n")[0] == b"250 2.0.0 OK\r\n"
    assert not conn.closed


# Everything up to CRLF is one line: a stray CR or LF inside it gets one refusal, and the
# rest of the line is never run (SMTP smuggling, CVE-2023-51764 class; RFC 5321 §2.3.8).
@pytest.mark.parametrize(
    ("sent", "reply"),
    [
        (b"MAIL FROM:<a@example.org>\nRCPT TO:<c@example.org>\r\n", BARE_LF),
        (b"MAIL FROM:<a@example.org>\rRCPT TO:<c@example.org>\r\n", BARE_CR),
        (b"NOOP\nNOOP\nNOOP\r\n", BARE_LF),
        (b"NOOP\rNOOP\nNOOP\r\n", BARE_CR),
        (b"NOOP\nNOOP\rNOOP\r\n", BARE_LF),
        (b"\nQUIT\r\n", BARE_LF),
        (b"\rQUIT\r\n", BARE_CR),
        (b"NOOP\r\rQUIT\r\n", BARE_CR),
        (b"NOOP\n\r\n", BARE_LF),
        (b"NOOP\r\r\n", BARE_CR),
        (b"DATA\n.\nQUIT\r\n", BARE_LF),
        (b"RSET\n" + b"x" * 5000 + b"\nQUIT\r\n", BARE_LF),
    ],
)
def test_stray_cr_or_lf_refuses_the_whole_line_once(sent: bytes, reply: bytes) -> None:
    conn = ready()
    out, events = pump(conn, sent)
    assert (out, events) == (reply, [])
    assert not conn.closed
    assert pump(conn, b"NOOP\r\n")[0] == b"250 2.0.0 OK\r\n"


@pytest.mark.parametrize(
    "sent",
    [
        b"MAIL FROM:<a@example.org>\nRCPT TO:<c@example.org>\r\nNOOP\r\n",
        b"MAIL FROM:<a@example.org>\rRCPT TO:<c@example.org>\r\nNOOP\r\n",
        b"NOOP\r\rQUIT\r\r\nNOOP\r\n",
        b"NOOP\n\r\r\nNOOP\r\n",
    ],
)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
def test_stray_cr_or_lf_is_one_line_however_the_reads_fall(sent: bytes, size: int) -> None:
    conn = ready()
    out, events = b"", list[Event]()
    for i in range(0, len(sent), size):
        more, new = pump(conn, sent[i : i + size])
        out, events = out + more, events + new
    assert out.count(b"\r\n") == 2
    assert out.startswith(b"500 5.5.2 Line must end with CRLF (bare ")
    assert out.endswith(b"\r\n250 2.0.0 OK\r\n")
    assert events == []


def test_bare_lf_is_refused_at_once_without_waiting_for_the_crlf() -> None:
    # openssl s_client without -crlf sends LF only: the person typing must see the hint.
    conn = greeted()
    assert pump(conn, b"MAIL FROM:<a@example.org>\n") == (BARE_LF, [])
    assert pump(conn, b"RCPT TO:<c@example.org>\n") == (b"", [])
    assert pump(conn, b"RSET\r\nNOOP\r\n")[0] == b"250 2.0.0 OK\r\n"


def test_bare_cr_waits_for_the_next_byte_before_deciding() -> None:
    conn = make()
    assert pump(conn, b"NOOP\r") == (b"", [])
    assert pump(conn, b"X") == (BARE_CR, [])
    assert pump(conn, b"\r") == (b"", [])
    assert pump(conn, b"\nNOOP\r\n")[0] == b"250 2.0.0 OK\r\n"


def test_bare_lf_in_an_http_request_still_closes_silently() -> None:
    conn = make()
    out, events = pump(conn, b"GET / HTTP/1.0\n")
    assert (out, events) == (b"", [ConnectionClosed(reason="cross-protocol request")])


def test_bare_lf_in_a_sasl_response_cancels_and_drops_the_whole_line() -> None:
    conn = greeted()
    assert pump(conn, b"AUTH LOGIN\r\n")[0] == b"334 VXNlcm5hbWU6\r\n"
    out, events = pump(conn, b"dXNlcg==\nMAIL FROM:<a@example.org>\r\nNOOP\r\n")
    assert out == BARE_LF + b"250 2.0.0 OK\r\n"
    assert events == []
    assert not conn.authenticated


def test_too_long_line_runs_to_its_crlf_not_to_a_bare_lf() -> None:
    conn = ready()
    sent = b"NOOP " + b"x" * 600 + b"\nMAIL FROM:<a@example.org>\r\nNOOP\r\n"
    assert pump(conn, sent) == (TOO_LONG + b"250 2.0.0 OK\r\n", [])


def test_bare_cr_does_not_split_a_line_into_two_commands() -> None:
    conn = ready()
    out, events = pump(conn, b"NOOP\rMAIL FROM:<a@example.org>\r\n")
    assert (out, events) == (BARE_CR, [])


def test_bare_lf_inside_mail_command_never_produces_an_event() -> None:
    conn = ready()
    out, events = pump(conn, b"MAIL FROM:<a@example.org>\n")
    assert (out, events) == (BARE_LF, [])


@pytest.mark.parametrize(
    ("prefix", "limit"),
    [(b"NOOP ", 512), (b"EHLO ", 512), (b"MAIL FROM:<a@example.org> X", 2048),
     (b"RCPT TO:<a@example.org> X", 2048), (b"AUTH PLAIN ", 12288)],
)
def test_line_limits_include_the_crlf(prefix: bytes, limit: int) -> None:
    conn = make(tls_active=False)
    fits = prefix + b"A" * (limit - len(prefix) - 2) + b"\r\n"
    assert len(fits) == limit
    assert pump(conn, fits)[0] != TOO_LONG
    conn = make(tls_active=False)
    assert pump(conn, prefix + b"A" * (limit - len(prefix) - 1) + b"\r\n")[0] == TOO_LONG


def test_long_line_is_drained_without_buffering_and_then_refused() -> None:
    conn = make()
    conn.receive_data(b"NOOP " + b"x" * 100_000)
    assert conn.next_event() is NEED_DATA
    for _ in range(50):
        conn.receive_data(b"y" * 100_000)
        assert conn.next_event() is NEED_DATA
        assert len(conn._buf) < 600  # the drained line is not kept
    assert conn.data_to_send() == b""
    assert pump(conn, b"zz\r\nNOOP\r\n")[0] == TOO_LONG + b"250 2.0.0 OK\r\n"


def test_command_split_over_many_reads_is_reassembled() -> None:
    conn = make()
    out = b""
    for byte in b"NOOP\r\nRSET\r\n":
        out += pump(conn, bytes([byte]))[0]
    assert out == b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n"


def test_cr_and_lf_of_one_crlf_may_arrive_in_different_reads() -> None:
    conn = make()
    assert pump(conn, b"NOOP\r") == (b"", [])
    assert pump(conn, b"\n")[0] == b"250 2.0.0 OK\r\n"


@pytest.mark.parametrize(
    "line",
    [b"GET / HTTP/1.1", b"POST /x HTTP/1.1", b"HEAD / HTTP/1.0", b"PUT /x HTTP/1.1",
     b"CONNECT mx.example.org:25 HTTP/1.1", b"OPTIONS * HTTP/1.1", b"DELETE /x HTTP/1.1",
     b"Host: mx.example.org", b"User-Agent: Mozilla/5.0", b"user-agent:curl", b"get /"],
)
def test_http_request_closes_without_any_reply(line: bytes) -> None:
    conn = make()
    out, events = pump(conn, line + b"\r\n")
    assert out == b""
    assert events == [ConnectionClosed(reason="cross-protocol request")]
    assert conn.closed


def test_http_request_after_smtp_commands_closes_silently() -> None:
    conn = make()
    out, events = pump(conn, b"NOOP\r\nGET / HTTP/1.1\r\nNOOP\r\n")
    assert out == b"250 2.0.0 OK\r\n"
    assert isinstance(events[-1], ConnectionClosed)


def test_overlong_http_request_line_still_closes_silently() -> None:
    conn = make()
    out, events = pump(conn, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n")
    assert out == b""
    assert isinstance(events[-1], ConnectionClosed)


def test_header_lookalike_that_is_not_http_is_just_unrecognized() -> None:
    conn = make()
    assert pump(conn, b"Subject: hello\r\n")[0] == b"500 5.5.1 Command unrecognized\r\n"


def test_eof_closes_after_buffered_commands_are_answered() -> None:
    conn = make()
    conn.receive_data(b"NOOP\r\nNOOP")
    conn.receive_data(b"")
    out, events = pump(conn)
    assert out == b"250 2.0.0 OK\r\n"
    assert events == [ConnectionClosed(reason="connection closed by client", client_done=True)]
    assert conn.next_event() == events[0]  # closed stays closed


def test_quit_says_bye_and_ignores_what_follows() -> None:
    conn = make()
    out, events = pump(conn, b"QUIT\r\nNOOP\r\n")
    assert out == b"221 2.0.0 Bye\r\n"
    assert events == [ConnectionClosed(reason="quit", client_done=True)]
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() == ConnectionClosed(reason="quit", client_done=True)
    assert conn.data_to_send() == b""


def test_pipelined_transaction_replies_come_in_command_order() -> None:
    conn = ready()
    out, events = pump(
        conn,
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nNOOP\r\n"
        b"RCPT TO:<bad>\r\nRCPT TO:<c@example.net>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
    )
    assert out == (
        b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n250 2.0.0 OK\r\n"
        b"501 5.1.3 Bad recipient address syntax: missing @domain\r\n"
        b"250 2.1.5 Recipient OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as TEST\r\n221 2.0.0 Bye\r\n"
    )
    assert [type(e).__name__ for e in events] == [
        "MailFrom", "RcptTo", "RcptTo", "DataStart", "DataChunk", "DataComplete",
        "ConnectionClosed",
    ]


def test_core_stops_at_each_event_that_needs_an_answer() -> None:
    conn = ready()
    conn.receive_data(b"MAIL FROM:<a@example.org>\r\nNOOP\r\n")
    event = conn.next_event()
    assert type(event).__name__ == "MailFrom"
    assert conn.data_to_send() == b""  # NOOP is not answered before MAIL
    conn.reject(Reply.make(550, "5.7.1", "Not your address"))
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"550 5.7.1 Not your address\r\n250 2.0.0 OK\r\n"
