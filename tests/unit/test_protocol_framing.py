"""Command-line framing: CRLF only, bounded lines, cross-protocol requests, EOF, pipelining."""

from __future__ import annotations

import pytest

from submitd.protocol import NEED_DATA, ConnectionClosed, Reply, ServerState
from tests.unit.protocol_support import connection, make, pump, ready

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


def test_bare_lf_ends_a_refused_command_and_the_session_goes_on() -> None:
    conn = make()
    assert pump(conn, b"EHLO client.example\nNOOP\r\n")[0] == BARE_LF + b"250 2.0.0 OK\r\n"


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
