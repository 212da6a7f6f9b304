"""The DSN extension on the server side (RFC 3461): EHLO, MAIL's RET/ENVID, RCPT's NOTIFY/ORCPT."""

from __future__ import annotations

import pytest

from submitd.protocol import (
    NEED_DATA,
    BodyType,
    DsnReturn,
    MailFrom,
    MailParams,
    RcptTo,
    ServerConnection,
    render_mail_from,
)
from tests.unit.protocol_support import EHLO, RCPT_OK, SENDER_OK, accept_event, make, pump, ready

MAIL = b"MAIL FROM:<a@example.org>"
RCPT = b"RCPT TO:<b@example.net>"
UNKNOWN = b"555 5.5.4 Parameter not recognized or not implemented\r\n"
NOTIFY_LIST = b"NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"


def syntax(detail: bytes) -> bytes:
    return b"501 5.5.4 Syntax error: " + detail + b"\r\n"


def send(conn: ServerConnection, line: bytes) -> tuple[bytes, MailFrom | RcptTo | None]:
    """Send one command; accept the event it produces, if any."""
    conn.receive_data(line + b"\r\n")
    event = conn.next_event()
    if event is NEED_DATA:
        return conn.data_to_send(), None
    assert isinstance(event, MailFrom | RcptTo)
    accept_event(conn, event)
    return conn.data_to_send(), event


def test_ehlo_announces_dsn_before_and_after_tls() -> None:
    for tls_active, tls_available in ((False, True), (True, False), (False, False)):
        conn = make(tls_active=tls_active, tls_available=tls_available)
        lines = pump(conn, EHLO)[0].split(b"\r\n")
        assert [line[4:] for line in lines].count(b"DSN") == 1


def test_helo_answer_lists_no_extension() -> None:
    assert pump(make(), b"HELO client.example\r\n")[0] == b"250 mx.example.org\r\n"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b" RET=FULL", MailParams(ret=DsnReturn.FULL)),
        (b" RET=HDRS", MailParams(ret=DsnReturn.HDRS)),
        (b" ret=hdrs", MailParams(ret=DsnReturn.HDRS)),
        (b" RET=Full", MailParams(ret=DsnReturn.FULL)),
        (b" ENVID=QQ-1234", MailParams(envid="QQ-1234")),
        # xtext is decoded: "+2B" is "+", "+20" a space, "+3D" an "=".
        (b" ENVID=a+2Bb+20c+3Dd", MailParams(envid="a+b c=d")),
        (b" ENVID=" + b"x" * 100, MailParams(envid="x" * 100)),
        (b" ENVID=" + b"+41" * 100, MailParams(envid="A" * 100)),
        (b" RET=HDRS ENVID=id1 SIZE=10 BODY=8BITMIME",
         MailParams(ret=DsnReturn.HDRS, envid="id1", size=10, body=BodyType.EIGHT_BIT_MIME)),
    ],
)
def test_mail_accepts_ret_and_envid(params: bytes, expected: MailParams) -> None:
    out, event = send(ready(), MAIL + params)
    assert out == SENDER_OK
    assert event == MailFrom(sender="a@example.org", params=expected)


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (b" RET=NONE", syntax(b"RET must be FULL or HDRS")),
        (b" RET", syntax(b"RET must be FULL or HDRS")),
        (b" RET=FULL RET=HDRS", syntax(b"duplicate parameter")),
        (b" RET=FULL ret=FULL", syntax(b"duplicate parameter")),
        (b" ENVID", syntax(b"ENVID must be xtext")),
        (b" ENVID=", syntax(b"bad parameter value")),
        (b" ENVID=a+zz", syntax(b"ENVID must be xtext")),
        (b" ENVID=a+2b", syntax(b"ENVID must be xtext")),  # hex digits are upper-case
        (b" ENVID=a+", syntax(b"ENVID must be xtext")),
        (b" ENVID=" + b"x" * 101, syntax(b"ENVID is longer than 100 characters")),
        (b" ENVID=a+0Ab", syntax(b"ENVID must be printable US-ASCII")),
        (b" ENVID=a+00", syntax(b"ENVID must be printable US-ASCII")),
        (b" ENVID=+C3+A9", syntax(b"ENVID must be printable US-ASCII")),
        (b" ENVID=a ENVID=b", syntax(b"duplicate parameter")),
        (b" NOTIFY=NEVER", UNKNOWN),  # a RCPT parameter, not a MAIL one
    ],
)
def test_mail_refuses_bad_ret_and_envid(params: bytes, reply: bytes) -> None:
    conn = ready()
    assert send(conn, MAIL + params) == (reply, None)
    # The refused MAIL left no transaction behind: a plain one works.
    assert send(conn, MAIL)[0] == SENDER_OK


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (b"", ()),
        (b" NOTIFY=NEVER", (("NOTIFY", "NEVER"),)),
        (b" notify=never", (("NOTIFY", "NEVER"),)),
        (b" NOTIFY=SUCCESS", (("NOTIFY", "SUCCESS"),)),
        (b" NOTIFY=FAILURE", (("NOTIFY", "FAILURE"),)),
        (b" NOTIFY=DELAY", (("NOTIFY", "DELAY"),)),
        (b" NOTIFY=delay,Success", (("NOTIFY", "SUCCESS,DELAY"),)),
        (b" NOTIFY=DELAY,FAILURE,SUCCESS", (("NOTIFY", "SUCCESS,FAILURE,DELAY"),)),
        (b" ORCPT=rfc822;b@example.net", (("ORCPT", "rfc822;b@example.net"),)),
        # ORCPT is kept exactly as given, still xtext.
        (b" ORCPT=RFC822;b+2Bx@example.net", (("ORCPT", "RFC822;b+2Bx@example.net"),)),
        (b" ORCPT=utf-8;j\\x{F6}rg@example.net", (("ORCPT", "utf-8;j\\x{F6}rg@example.net"),)),
        (b" ORCPT=rfc822;" + b"x" * 493, (("ORCPT", "rfc822;" + "x" * 493),)),
        # Stored NOTIFY first, whatever order the client used.
        (b" ORCPT=rfc822;b@example.net NOTIFY=SUCCESS,FAILURE",
         (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;b@example.net"))),
    ],
)
def test_rcpt_accepts_notify_and_orcpt(params: bytes, expected: tuple[object, ...]) -> None:
    conn = ready()
    send(conn, MAIL)
    out, event = send(conn, RCPT + params)
    assert out == RCPT_OK
    assert event == RcptTo(recipient="b@example.net", params=expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        (b" NOTIFY", syntax(NOTIFY_LIST)),
        (b" NOTIFY=ALWAYS", syntax(NOTIFY_LIST)),
        (b" NOTIFY=SUCCESS,", syntax(NOTIFY_LIST)),
        (b" NOTIFY=,FAILURE", syntax(NOTIFY_LIST)),
        (b" NOTIFY=SUCCESS;FAILURE", syntax(NOTIFY_LIST)),
        (b" NOTIFY=NEVER,SUCCESS", syntax(b"NOTIFY=NEVER cannot be combined with other values")),
        (b" NOTIFY=FAILURE,never", syntax(b"NOTIFY=NEVER cannot be combined with other values")),
        (b" NOTIFY=NEVER,NEVER", syntax(b"NOTIFY=NEVER cannot be combined with other values")),
        (b" NOTIFY=FAILURE,failure", syntax(b"NOTIFY lists a value twice")),
        (b" NOTIFY=NEVER NOTIFY=NEVER", syntax(b"duplicate parameter")),
        (b" ORCPT=rfc822;a@b ORCPT=rfc822;a@b", syntax(b"duplicate parameter")),
        (b" ORCPT", syntax(b"ORCPT must be addr-type;xtext")),
        (b" ORCPT=b@example.net", syntax(b"ORCPT must be addr-type;xtext")),
        (b" ORCPT=rfc822;", syntax(b"ORCPT must be addr-type;xtext")),
        (b" ORCPT=;b@example.net", syntax(b"ORCPT must be addr-type;xtext")),
        (b" ORCPT=rfc(822);b@example.net", syntax(b"ORCPT must be addr-type;xtext")),
        (b" ORCPT=rfc822;b+zz@example.net", syntax(b"ORCPT must be addr-type;xtext")),
        (b" ORCPT=rfc822;" + b"x" * 494, syntax(b"ORCPT is longer than 500 characters")),
        (b" ORCPT=rfc822;a=b", syntax(b"bad parameter value")),
        (b" RET=FULL", UNKNOWN),  # a MAIL parameter, not a RCPT one
        (b" NOTIFY=NEVER X-FOO=1", UNKNOWN),
    ],
)
def test_rcpt_refuses_bad_notify_and_orcpt(params: bytes, reply: bytes) -> None:
    conn = ready()
    send(conn, MAIL)
    assert send(conn, RCPT + params) == (reply, None)
    assert send(conn, RCPT)[0] == RCPT_OK


def test_pipelined_transaction_with_dsn_parameters() -> None:
    conn = ready()
    out, events = pump(
        conn,
        MAIL + b" RET=HDRS ENVID=env+2B1\r\n"
        + RCPT + b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.net\r\n"
        + b"RCPT TO:<c@example.net> NOTIFY=NEVER\r\n"
        + b"RCPT TO:<d@example.net> NOTIFY=NEVER,DELAY\r\n"
        + b"RCPT TO:<e@example.net>\r\n",
    )
    assert out == (
        SENDER_OK + RCPT_OK + RCPT_OK
        + syntax(b"NOTIFY=NEVER cannot be combined with other values") + RCPT_OK
    )
    assert events == [
        MailFrom(sender="a@example.org",
                 params=MailParams(ret=DsnReturn.HDRS, envid="env+1")),
        RcptTo(recipient="b@example.net",
               params=(("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;b@example.net"))),
        RcptTo(recipient="c@example.net", params=(("NOTIFY", "NEVER"),)),
        RcptTo(recipient="e@example.net", params=()),
    ]


@pytest.mark.parametrize(
    ("params", "line"),
    [
        (MailParams(ret=DsnReturn.FULL), b"MAIL FROM:<a@example.org> RET=FULL\r\n"),
        (MailParams(ret=DsnReturn.HDRS, envid="a+b c=d"),
         b"MAIL FROM:<a@example.org> RET=HDRS ENVID=a+2Bb+20c+3Dd\r\n"),
    ],
)
def test_client_renders_ret_and_envid_in_xtext(params: MailParams, line: bytes) -> None:
    assert render_mail_from("a@example.org", params) == line
    # What the client renders, the server parses back to the same values.
    out, event = send(ready(), line.rstrip(b"\r\n"))
    assert out == SENDER_OK and isinstance(event, MailFrom) and event.params == params


@pytest.mark.parametrize("envid", ["x" * 101, "line\r\nDATA", "caf\u00e9"])
def test_client_refuses_an_envid_it_could_not_send(envid: str) -> None:
    with pytest.raises(ValueError, match="ENVID"):
        render_mail_from("a@example.org", MailParams(envid=envid))
