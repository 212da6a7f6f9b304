"""The state table, simple commands, per-session limits and the answer API contract."""

from __future__ import annotations

import pytest

from submitd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    DataChunk,
    DataComplete,
    DataStart,
    Hello,
    LocalProtocolError,
    MailFrom,
    NeedsAnswer,
    ProtocolLimits,
    RcptTo,
    Reply,
    ServerConnection,
    ServerState,
    Verb,
)
from submitd.protocol._state import Facts, Greeting, Transaction, check_sequence
from tests.unit.protocol_support import (
    PLAIN,
    QUEUED,
    RCPT_OK,
    SENDER_OK,
    accept_event,
    connection,
    make,
    pump,
    ready,
)

OK = b"250 2.0.0 OK\r\n"
MAIL = b"MAIL FROM:<a@example.org>\r\n"
RCPT = b"RCPT TO:<b@example.net>\r\n"


def seq(text: str) -> bytes:
    return b"503 5.5.1 Bad sequence of commands: " + text.encode() + b"\r\n"


@pytest.mark.parametrize(
    ("setup", "command", "reply"),
    [
        (b"", MAIL, seq("send HELO/EHLO first")),
        (b"", RCPT, seq("send HELO/EHLO first")),
        (b"", b"DATA\r\n", seq("send HELO/EHLO first")),
        (b"", b"AUTH PLAIN\r\n", seq("send EHLO first")),
        (b"EHLO c.example\r\n", MAIL, b"530 5.7.0 Authentication required\r\n"),
        (b"EHLO c.example\r\n", RCPT, b"530 5.7.0 Authentication required\r\n"),
        (b"HELO c.example\r\n", b"DATA\r\n", b"530 5.7.0 Authentication required\r\n"),
        (b"EHLO c.example\r\nAUTH PLAIN " + PLAIN + b"\r\n", RCPT, seq("need MAIL command")),
        (b"EHLO c.example\r\nAUTH PLAIN " + PLAIN + b"\r\n", b"DATA\r\n", seq("need MAIL command")),
        (b"EHLO c.example\r\nAUTH PLAIN " + PLAIN + b"\r\n" + MAIL, MAIL,
         seq("nested MAIL command")),
        (b"EHLO c.example\r\nAUTH PLAIN " + PLAIN + b"\r\n" + MAIL, b"DATA\r\n",
         b"554 5.5.1 No valid recipients\r\n"),
        (b"EHLO c.example\r\nAUTH PLAIN " + PLAIN + b"\r\n" + MAIL, b"AUTH PLAIN\r\n",
         seq("already authenticated")),
        (b"EHLO c.example\r\nAUTH PLAIN " + PLAIN + b"\r\nRSET\r\n", b"AUTH LOGIN\r\n",
         seq("already authenticated")),
    ],
)
def test_state_table_refusals(setup: bytes, command: bytes, reply: bytes) -> None:
    conn = make()
    pump(conn, setup)
    out, events = pump(conn, command)
    assert (out, events) == (reply, [])


def test_state_is_checked_before_syntax() -> None:
    conn = make()
    pump(conn, b"EHLO c.example\r\n")
    assert pump(conn, b"MAIL FROM:garbage\r\n")[0] == b"530 5.7.0 Authentication required\r\n"


@pytest.mark.parametrize(
    ("verb", "facts_change", "reply_code"),
    [(Verb.STARTTLS, {"transaction": Transaction.SENDER}, 503),
     (Verb.AUTH, {"transaction": Transaction.SENDER, "authenticated": False}, 503),
     (Verb.MAIL, {"transactions_left": False}, 421)],
)
def test_state_table_rules_that_sessions_rarely_reach(
    verb: Verb, facts_change: dict[str, object], reply_code: int
) -> None:
    base = {
        "tls_active": verb is not Verb.STARTTLS, "tls_available": True,
        "greeting": Greeting.EHLO, "authenticated": True, "transaction": Transaction.NONE,
        "transactions_left": True,
    }
    rule = check_sequence(verb, Facts(**{**base, **facts_change}))  # type: ignore[arg-type]
    assert rule is not None and rule.reply.code == reply_code


def test_full_transaction_then_a_second_one() -> None:
    conn = ready()
    out, events = pump(conn, MAIL + RCPT + b"DATA\r\nhi\r\n.\r\n" + MAIL)
    assert out.endswith(b"250 2.0.0 Ok: queued as TEST\r\n" + SENDER_OK)
    assert [type(e) for e in events if isinstance(e, NeedsAnswer)] == [
        MailFrom, RcptTo, DataStart, DataComplete, MailFrom,
    ]


def test_rset_ends_the_transaction_but_keeps_authentication() -> None:
    conn = ready()
    assert pump(conn, MAIL + b"RSET\r\n" + RCPT)[0] == SENDER_OK + OK + seq("need MAIL command")
    assert conn.authenticated
    assert pump(conn, MAIL)[0] == SENDER_OK


def test_ehlo_resets_the_transaction() -> None:
    conn = ready()
    pump(conn, MAIL + RCPT)
    assert pump(conn, b"EHLO c.example\r\nDATA\r\n")[0].endswith(seq("need MAIL command"))
    assert conn.authenticated


def test_rejected_recipients_do_not_count_for_data() -> None:
    conn = ready()
    conn.receive_data(MAIL + RCPT + b"DATA\r\n")
    mail = conn.next_event()
    assert isinstance(mail, MailFrom)
    conn.accept_mail(mail)
    assert isinstance(conn.next_event(), RcptTo)
    conn.reject(Reply.make(550, "5.1.1", "No such user"))
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == (
        SENDER_OK + b"550 5.1.1 No such user\r\n554 5.5.1 No valid recipients\r\n"
    )


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"NOOP anything at all\r\n", OK),
        (b"RSET\r\n", OK),
        (b"RSET x\r\n", b"501 5.5.4 Syntax error: RSET takes no arguments\r\n"),
        (b"QUIT x\r\n", b"501 5.5.4 Syntax error: QUIT takes no arguments\r\n"),
        (b"VRFY postmaster\r\n",
         b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
        (b"VRFY\r\n", b"501 5.5.4 Syntax error: VRFY needs an argument\r\n"),
        (b"HELP\r\n", b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP "
                      b"VRFY HELP QUIT\r\n"),
        (b"HELP MAIL\r\n", b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET "
                           b"NOOP VRFY HELP QUIT\r\n"),
        (b"EXPN staff\r\n", b"502 5.5.1 Command not implemented\r\n"),
        (b"TURN\r\n", b"502 5.5.1 Command not implemented\r\n"),
        (b"ETRN example.org\r\n", b"502 5.5.1 Command not implemented\r\n"),
        (b"BDAT 10 LAST\r\n", b"502 5.5.1 Command not implemented\r\n"),
        (b"XCLIENT ADDR=1.2.3.4\r\n", b"500 5.5.1 Command unrecognized\r\n"),
    ],
)
def test_commands_the_core_answers_itself(line: bytes, reply: bytes) -> None:
    conn = make()
    assert pump(conn, line) == (reply, [])


def test_data_with_an_argument_is_a_syntax_error() -> None:
    conn = ready()
    pump(conn, MAIL + RCPT)
    assert pump(conn, b"DATA now\r\n") == (
        b"501 5.5.4 Syntax error: DATA takes no arguments\r\n", []
    )


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"EHLO client.example.org\r\n", Hello(domain="client.example.org", extended=True)),
        (b"ehlo localhost\r\n", Hello(domain="localhost", extended=True)),
        (b"EHLO DESKTOP_1\r\n", Hello(domain="DESKTOP_1", extended=True)),
        (b"EHLO [192.0.2.1]\r\n", Hello(domain="[192.0.2.1]", extended=True)),
        (b"EHLO [IPv6:2001:db8::1]\r\n", Hello(domain="[IPv6:2001:db8::1]", extended=True)),
        (b"HELO client.example\r\n", Hello(domain="client.example", extended=False)),
    ],
)
def test_hello_arguments_that_are_accepted(line: bytes, event: Hello) -> None:
    conn = make()
    assert pump(conn, line)[1] == [event]


@pytest.mark.parametrize(
    "line",
    [b"EHLO\r\n", b"EHLO \r\n", b"HELO\r\n", b"EHLO a b\r\n", b"EHLO -bad.example\r\n",
     b"EHLO bad..example\r\n", b"EHLO [300.1.1.1]\r\n", b"EHLO [IPv6:zz]\r\n", b"EHLO a\x01b\r\n",
     b"EHLO caf\xc3\xa9.example\r\n", b"EHLO " + b"a" * 64 + b".example\r\n"],
)
def test_hello_without_a_valid_domain_is_a_syntax_error(line: bytes) -> None:
    conn = make()
    assert pump(conn, line) == (
        b"501 5.5.4 Syntax error: EHLO/HELO needs a domain or address literal\r\n", []
    )


def test_helo_gets_a_one_line_answer() -> None:
    conn = make()
    assert pump(conn, b"HELO c.example\r\n")[0] == b"250 mx.example.org\r\n"


def test_session_keywords_are_appended_to_the_ehlo_answer() -> None:
    conn = make()
    conn.receive_data(b"EHLO c.example\r\n")
    hello = conn.next_event()
    assert isinstance(hello, Hello)
    conn.accept_hello(hello, ["X-ONE", "X-EXAMPLE a=b"])
    out = conn.data_to_send()
    assert out.endswith(b"250-AUTH PLAIN LOGIN\r\n250-X-ONE\r\n250 X-EXAMPLE a=b\r\n")


def test_a_session_keyword_the_core_already_offers_is_listed_once() -> None:
    conn = make()
    conn.receive_data(b"EHLO c.example\r\n")
    hello = conn.next_event()
    assert isinstance(hello, Hello)
    conn.accept_hello(hello, ["dsn", "X-EXAMPLE"])
    out = conn.data_to_send()
    assert out.upper().count(b"DSN") == 1
    assert out.endswith(b"250-DSN\r\n250-AUTH PLAIN LOGIN\r\n250 X-EXAMPLE\r\n")


def test_recipient_limit_gives_452_and_keeps_the_accepted_ones() -> None:
    conn = ready(max_recipients=2)
    out, _ = pump(conn, MAIL + RCPT + RCPT + RCPT + b"DATA\r\n.\r\n")
    assert out == (
        SENDER_OK + RCPT_OK + RCPT_OK + b"452 4.5.3 Too many recipients\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as TEST\r\n"
    )


def test_too_many_errors_closes_with_421() -> None:
    conn = make(max_errors=3)
    out, events = pump(conn, b"FOO\r\nNOOP\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    unknown = b"500 5.5.1 Command unrecognized\r\n"
    assert out == unknown + OK + unknown + unknown + b"421 4.7.0 Too many errors\r\n"
    assert events == [ConnectionClosed(reason="too many errors")]


def test_session_refusals_count_as_errors() -> None:
    conn = ready(max_errors=2)
    conn.receive_data(MAIL)
    conn.next_event()
    conn.reject(Reply.make(550, "5.7.1", "Not your address"))
    assert pump(conn, b"FOO\r\n")[1] == [ConnectionClosed(reason="too many errors")]


def test_temporary_refusals_do_not_count_as_errors() -> None:
    conn = ready(max_errors=1, max_recipients=1)
    out, _ = pump(conn, MAIL + RCPT + RCPT + RCPT)
    assert out.count(b"452 4.5.3") == 2
    assert not conn.closed


def test_transaction_limit_closes_on_the_next_mail() -> None:
    conn = ready(max_transactions=2)
    message = MAIL + RCPT + b"DATA\r\nhi\r\n.\r\n"
    pump(conn, message + message)
    out, events = pump(conn, b"NOOP\r\n" + MAIL)
    assert out == OK + b"421 4.7.0 Too many messages in one session\r\n"
    assert isinstance(events[-1], ConnectionClosed)


def test_reject_with_421_closes_the_connection() -> None:
    conn = ready()
    conn.receive_data(MAIL + b"NOOP\r\n")
    conn.next_event()
    conn.reject(Reply.make(421, "4.3.0", "Temporary local problem, closing connection"))
    assert conn.next_event() == ConnectionClosed(reason="closed after a 421 reply")
    assert conn.data_to_send() == b"421 4.3.0 Temporary local problem, closing connection\r\n"


def test_greeting_refusal_ends_the_session() -> None:
    conn = connection(tls_active=False, tls_available=True)
    conn.greet(Reply.make(554, "5.7.1", "Go away"))
    conn.receive_data(b"EHLO c.example\r\n")
    assert conn.next_event() == ConnectionClosed(reason="refused at greeting")
    assert conn.data_to_send() == b"554 5.7.1 Go away\r\n"


def test_driver_close_queues_its_reply_once() -> None:
    conn = ready()
    conn.receive_data(MAIL)
    conn.next_event()  # pending MailFrom: a timeout may still end the session
    timeout = Reply.make(421, "4.4.2", "Timeout, closing connection")
    conn.close(timeout)
    conn.close(timeout)
    assert conn.data_to_send() == b"421 4.4.2 Timeout, closing connection\r\n"
    assert conn.next_event() == ConnectionClosed(reason="closed by server")
    assert conn.state is ServerState.CLOSED


# -- the caller's contract ---------------------------------------------------------------------


def test_next_event_before_answering_is_a_caller_error() -> None:
    conn = ready()
    conn.receive_data(MAIL)
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="MailFrom"):
        conn.next_event()


def test_answer_without_a_pending_event_is_a_caller_error() -> None:
    conn = make()
    with pytest.raises(LocalProtocolError, match="no event"):
        conn.accept_hello(Hello(domain="c.example", extended=True))
    with pytest.raises(LocalProtocolError, match="no event"):
        conn.reject(Reply.make(550, "5.0.0", "No"))


def test_an_answer_must_be_for_the_pending_event() -> None:
    conn = ready()
    conn.receive_data(MAIL + RCPT)
    mail = conn.next_event()
    assert isinstance(mail, MailFrom)
    # A type error for a checked caller; refused at run time for anyone else.
    with pytest.raises(LocalProtocolError, match="MailFrom"):
        conn.accept_rcpt(mail)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="MailFrom"):
        conn.accept_mail(MailFrom(sender=mail.sender, params=mail.params))  # an equal copy
    conn.accept_mail(mail)
    rcpt = conn.next_event()
    assert isinstance(rcpt, RcptTo)
    with pytest.raises(LocalProtocolError, match="RcptTo"):
        conn.accept_mail(mail)  # already answered
    conn.accept_rcpt(rcpt)
    assert conn.data_to_send() == SENDER_OK + RCPT_OK


@pytest.mark.parametrize(
    "reply",
    [Reply.make(250, "2.0.0", "Fine"), Reply(code=550, lines=("no status",)),
     Reply.make(521, "5.3.2", "Not here")],
)
def test_reject_needs_a_proper_refusal(reply: Reply) -> None:
    conn = ready()
    conn.receive_data(MAIL)
    mail = conn.next_event()
    assert isinstance(mail, MailFrom)
    with pytest.raises(LocalProtocolError):
        conn.reject(reply)
    conn.accept_mail(mail)  # the event is still pending after the misuse
    assert conn.data_to_send() == SENDER_OK


def test_data_complete_needs_a_queue_reply_and_cannot_accept_a_refused_message() -> None:
    conn = ready()
    conn.receive_data(MAIL + RCPT + b"DATA\r\nbad\nline\r\n.\r\n")
    for _ in range(3):  # MailFrom, RcptTo, DataStart
        accept_event(conn, conn.next_event())
    done = conn.next_event()
    assert isinstance(done, DataComplete) and done.error is not None
    with pytest.raises(LocalProtocolError, match="reject"):
        conn.accept_message(done, QUEUED)
    conn.reject(done.error)


@pytest.mark.parametrize(
    "reply",
    [Reply.make(550, "5.0.0", "Not a success"), Reply(code=250, lines=("no status",))],
)
def test_success_replies_from_the_session_are_checked(reply: Reply) -> None:
    conn = ready()
    conn.receive_data(MAIL + RCPT + b"DATA\r\nhi\r\n.\r\n")
    accept_event(conn, conn.next_event())
    rcpt = conn.next_event()
    assert isinstance(rcpt, RcptTo)
    with pytest.raises(LocalProtocolError):
        conn.accept_rcpt(rcpt, reply)
    conn.accept_rcpt(rcpt, Reply.make(251, "2.1.5", "Will forward"))
    accept_event(conn, conn.next_event())
    assert conn.next_event() == DataChunk(data=b"hi\r\n")
    done = conn.next_event()
    assert isinstance(done, DataComplete)
    with pytest.raises(LocalProtocolError):
        conn.accept_message(done, reply)
    conn.accept_message(done, QUEUED)
    assert conn.data_to_send().endswith(
        b"251 2.1.5 Will forward\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        + QUEUED.to_bytes()
    )


@pytest.mark.parametrize("keywords", [["bad keyword!\x01"], "DSN", ["X-A\r\n250 X-B"]])
def test_ehlo_answer_is_built_by_the_core(keywords: list[str]) -> None:
    conn = make()
    conn.receive_data(b"EHLO c.example\r\n")
    hello = conn.next_event()
    assert isinstance(hello, Hello)
    with pytest.raises(LocalProtocolError):
        conn.accept_hello(hello, keywords)
    conn.accept_hello(hello)  # the event is still pending after the misuse
    assert conn.data_to_send().endswith(b"250 AUTH PLAIN LOGIN\r\n")


def test_api_order_is_enforced() -> None:
    conn = connection()
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    conn.greet()
    with pytest.raises(LocalProtocolError):
        conn.greet()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"NOOP\r\n")


@pytest.mark.parametrize("bad", [{"max_recipients": 0}, {"max_message_size": -1}])
def test_limits_must_be_positive(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        ProtocolLimits(**bad)


@pytest.mark.parametrize("hostname", ["", "mx example", "mx\r\n250 evil"])
def test_hostname_cannot_break_the_greeting(hostname: str) -> None:
    with pytest.raises(ValueError, match="hostname"):
        ServerConnection(hostname=hostname, limits=ProtocolLimits(), tls_active=True,
                         tls_available=False)
