"""MAIL/RCPT syntax, address grammar, relay tricks, ESMTP parameters, and the shared grammar."""

from __future__ import annotations

import pytest

from submitd.protocol import (
    NEED_DATA,
    AddressError,
    BodyType,
    MailFrom,
    MailParams,
    RcptTo,
    Reply,
    ServerConnection,
    catalogue,
    decode_xtext,
    encode_xtext,
    format_path,
    parse_mailbox,
    parse_reply,
    render_mail_from,
    render_rcpt_to,
)
from submitd.protocol._grammar import has_control, is_hostname, replace_controls
from tests.unit.protocol_support import HOST, RCPT_OK, SENDER_OK, accept_event, ready

CONTROL = b"501 5.1.7 Control characters are not allowed in addresses\r\n"
UNKNOWN = b"555 5.5.4 Parameter not recognized or not implemented\r\n"
NEEDS_UTF8 = b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n"
BAD_LOCAL = b"501 5.1.7 Bad sender address syntax: bad local part\r\n"


def send(conn: ServerConnection, line: bytes) -> tuple[bytes, MailFrom | RcptTo | None]:
    """Send one command; accept the event it produces, if any."""
    conn.receive_data(line + b"\r\n")
    event = conn.next_event()
    if event is not NEED_DATA:
        assert isinstance(event, MailFrom | RcptTo)
        accept_event(conn, event)
        assert conn.next_event() is NEED_DATA
        return conn.data_to_send(), event
    return conn.data_to_send(), None


def syntax(detail: str) -> bytes:
    return b"501 5.5.4 Syntax error: " + detail.encode() + b"\r\n"


@pytest.mark.parametrize(
    ("line", "sender", "params"),
    [
        (b"MAIL FROM:<a@example.org>", "a@example.org", MailParams()),
        (b"mail from:<a@example.org>", "a@example.org", MailParams()),
        (b"MAIL FROM: <a@example.org>", "a@example.org", MailParams()),
        (b"MAIL FROM:<>", "", MailParams()),
        (b"MAIL FROM:<first.last+tag@sub.example.org>", "first.last+tag@sub.example.org",
         MailParams()),
        (b'MAIL FROM:<"john doe"@example.org>', '"john doe"@example.org', MailParams()),
        (b'MAIL FROM:<"a>b"@example.org>', '"a>b"@example.org', MailParams()),
        (b"MAIL FROM:<a@example.org> SIZE=1000", "a@example.org", MailParams(size=1000)),
        (b"MAIL FROM:<a@example.org> BODY=8BITMIME", "a@example.org",
         MailParams(body=BodyType.EIGHT_BIT_MIME)),
        (b"MAIL FROM:<a@example.org> body=7bit", "a@example.org", MailParams()),
        (b"MAIL FROM:<a@example.org> AUTH=<>", "a@example.org", MailParams(auth="<>")),
        (b"MAIL FROM:<a@example.org> AUTH=a+2Bb@example.org", "a@example.org",
         MailParams(auth="a+2Bb@example.org")),
        (b"MAIL FROM:<a@example.org>  SIZE=5   SMTPUTF8", "a@example.org",
         MailParams(size=5, smtputf8=True)),
        ("MAIL FROM:<jörg@exämple.org> SMTPUTF8".encode(), "jörg@exämple.org",
         MailParams(smtputf8=True)),
        (b"MAIL FROM:<a@example.org> SIZE=26214400", "a@example.org",
         MailParams(size=26_214_400)),
    ],
)
def test_mail_from_accepted(line: bytes, sender: str, params: MailParams) -> None:
    out, event = send(ready(), line)
    assert (out, event) == (SENDER_OK, MailFrom(sender=sender, params=params))


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL", syntax("expected MAIL FROM:<address>")),
        (b"MAIL TO:<a@example.org>", syntax("expected MAIL FROM:<address>")),
        (b"MAIL FROM <a@example.org>", syntax("expected MAIL FROM:<address>")),
        (b"MAIL FROM:a@example.org", syntax("address must be enclosed in <>")),
        (b"MAIL FROM:  <a@example.org>", syntax("address must be enclosed in <>")),
        (b"MAIL FROM:<a@example.org", syntax("address must be enclosed in <>")),
        (b"MAIL FROM:<a@example.org>SIZE=1",
         syntax("parameters must follow the address after a space")),
        (b"MAIL FROM:<a@example.org> SIZE=", syntax("bad parameter value")),
        (b"MAIL FROM:<a@example.org> SIZE=abc", syntax("SIZE needs a number")),
        (b"MAIL FROM:<a@example.org> SIZE", syntax("SIZE needs a number")),
        (b"MAIL FROM:<a@example.org> SIZE=1 SIZE=2", syntax("duplicate parameter")),
        (b"MAIL FROM:<a@example.org> size=1 SIZE=2", syntax("duplicate parameter")),
        (b"MAIL FROM:<a@example.org> SIZE=123456789012345678901", syntax("SIZE needs a number")),
        (b"MAIL FROM:<a@example.org> BODY=BINARYMIME", syntax("BODY must be 7BIT or 8BITMIME")),
        (b"MAIL FROM:<a@example.org> SMTPUTF8=yes", syntax("SMTPUTF8 takes no value")),
        (b"MAIL FROM:<a@example.org> AUTH=a+zz", syntax("AUTH needs xtext or <>")),
        (b"MAIL FROM:<a@example.org> AUTH", syntax("AUTH needs xtext or <>")),
        (b"MAIL FROM:<a@example.org> -X=1", syntax("bad parameter keyword")),
        (b"MAIL FROM:<a@example.org> X=a=b", syntax("bad parameter value")),
        (b"MAIL FROM:<a@example.org> MT-PRIORITY=3", UNKNOWN),
        (b"MAIL FROM:<a@example.org> REQUIRETLS", UNKNOWN),
        (b"MAIL FROM:<a@example.org> SIZE=26214401",
         b"552 5.3.4 Message size exceeds fixed limit\r\n"),
        ("MAIL FROM:<jörg@example.org>".encode(), NEEDS_UTF8),
        ("MAIL FROM:<a@exämple.org>".encode(), NEEDS_UTF8),
        (b"MAIL FROM:<a@example.org>\x00", CONTROL),
        (b"MAIL FROM:<a\x00b@example.org>", CONTROL),
        (b"MAIL FROM:<a\tb@example.org>", CONTROL),
        (b"MAIL FROM:<a\x7fb@example.org>", CONTROL),
        (b"MAIL FROM:<a\x1b[31m@example.org>", CONTROL),
        (b'MAIL FROM:<"a\x01"@example.org>', CONTROL),
        (b"MAIL FROM:<a\xff@example.org> SMTPUTF8",
         b"501 5.1.7 Bad sender address syntax: address is not valid UTF-8\r\n"),
        (b"MAIL FROM:<a>", b"501 5.1.7 Bad sender address syntax: missing @domain\r\n"),
        (b"MAIL FROM:<a b@example.org>", BAD_LOCAL),
        (b"MAIL FROM:<a..b@example.org>", BAD_LOCAL),
        (b"MAIL FROM:<.a@example.org>", BAD_LOCAL),
        (b"MAIL FROM:<a.@example.org>", BAD_LOCAL),
        (b'MAIL FROM:<"a"b@example.org>',
         b"501 5.1.7 Bad sender address syntax: missing @domain\r\n"),
        (b"MAIL FROM:<@example.org>", b"553 5.7.1 Sender address rejected: source routes are "
                                       b"not accepted\r\n"),
        (b"MAIL FROM:<a@-example.org>", b"501 5.1.7 Bad sender address syntax: bad domain\r\n"),
        (b"MAIL FROM:<a@example..org>", b"501 5.1.7 Bad sender address syntax: bad domain\r\n"),
        (b"MAIL FROM:<a@example.org.>", b"501 5.1.7 Bad sender address syntax: bad domain\r\n"),
        (b"MAIL FROM:<a@exa_mple.org>", b"501 5.1.7 Bad sender address syntax: bad domain\r\n"),
        (b'MAIL FROM:<"unterminated@example.org>',
         b"501 5.5.4 Syntax error: address must be enclosed in <>\r\n"),
        (b"MAIL FROM:<" + b"a" * 65 + b"@example.org>",
         b"501 5.1.7 Bad sender address syntax: local part too long\r\n"),
        (b"MAIL FROM:<a@" + b"b" * 64 + b".example.org>",
         b"501 5.1.7 Bad sender address syntax: bad domain\r\n"),
        (b"MAIL FROM:<" + b"a" * 60 + b"@" + b"b." * 100 + b"org>",
         b"501 5.1.7 Bad sender address syntax: address too long\r\n"),
    ],
)
def test_mail_from_refused(line: bytes, reply: bytes) -> None:
    assert send(ready(), line) == (reply, None)


def test_local_part_of_64_and_path_of_256_octets_are_accepted() -> None:
    domain = b".".join([b"d" * 61] * 3) + b".org"  # 189 octets
    line = b"MAIL FROM:<" + b"a" * 64 + b"@" + domain + b">"
    assert len(line) - len(b"MAIL FROM:") == 256
    assert send(ready(), line)[0] == SENDER_OK


RELAY_TRICKS = [
    (b"<a%b@example.org>", "% or ! in local part"),
    (b"<b!a@example.org>", "% or ! in local part"),
    (b'<"a%b"@example.org>', "% or ! in local part"),
    (b'<"a@b"@example.org>', "@ in quoted local part"),
    (b"<@relay.example:a@example.org>", "source routes are not accepted"),
    (b"<@a,@b:c@example.org>", "source routes are not accepted"),
    (b"<a@b@example.org>", "more than one @"),
    (b'<"a"@b@example.org>', "more than one @"),
    (b"<a@[192.0.2.1]>", "address literals are not accepted"),
    (b"<a@[IPv6:2001:db8::1]>", "address literals are not accepted"),
    (b"<a@localhost>", "unqualified domain"),
    (b"<a@example>", "unqualified domain"),
    (b"<a@192.0.2.1>", "numeric domain"),
]


@pytest.mark.parametrize(("path", "reason"), RELAY_TRICKS)
def test_relay_tricks_are_refused_as_recipient(path: bytes, reason: str) -> None:
    conn = ready()
    send(conn, b"MAIL FROM:<a@example.org>")
    assert send(conn, b"RCPT TO:" + path) == (
        b"554 5.7.1 Relay access denied: " + reason.encode() + b"\r\n", None
    )


@pytest.mark.parametrize(("path", "reason"), RELAY_TRICKS)
def test_relay_tricks_are_refused_as_sender(path: bytes, reason: str) -> None:
    assert send(ready(), b"MAIL FROM:" + path) == (
        b"553 5.7.1 Sender address rejected: " + reason.encode() + b"\r\n", None
    )


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<b@example.net>", RCPT_OK),
        (b"rcpt to: <b@example.net>", RCPT_OK),
        (b"RCPT TO:<>", b"501 5.1.3 Bad recipient address syntax: null recipient\r\n"),
        (b"RCPT TO:b@example.net", syntax("address must be enclosed in <>")),
        (b"RCPT FROM:<b@example.net>", syntax("expected RCPT TO:<address>")),
        (b"RCPT TO:<b>", b"501 5.1.3 Bad recipient address syntax: missing @domain\r\n"),
        (b"RCPT TO:<b@example.net> RRVS=2030-01-01T00:00:00Z", UNKNOWN),
        (b"RCPT TO:<b@example.net> X-FOO", UNKNOWN),
        (b"RCPT TO:<b@example.net> =x", syntax("bad parameter keyword")),
        (b"RCPT TO:<b\x00@example.net>", CONTROL),
        (b"RCPT TO:<b@example.net\x0b>", CONTROL),
        ("RCPT TO:<jörg@example.net>".encode(), NEEDS_UTF8),
    ],
)
def test_rcpt_to(line: bytes, reply: bytes) -> None:
    conn = ready()
    send(conn, b"MAIL FROM:<a@example.org>")
    assert send(conn, line)[0] == reply


def test_non_ascii_recipient_needs_smtputf8_on_mail() -> None:
    conn = ready()
    send(conn, b"MAIL FROM:<a@example.org> SMTPUTF8")
    out, event = send(conn, "RCPT TO:<jörg@exämple.net>".encode())
    assert (out, event) == (RCPT_OK, RcptTo(recipient="jörg@exämple.net"))
    send(conn, b"RSET")
    send(conn, b"MAIL FROM:<a@example.org>")
    assert send(conn, "RCPT TO:<jörg@example.net>".encode())[0] == NEEDS_UTF8


def test_mail_line_up_to_2048_octets_is_parsed() -> None:
    line = b"MAIL FROM:<a@example.org> AUTH=" + b"x" * 1500
    assert send(ready(), line)[0] == SENDER_OK


# -- the grammar the client role shares --------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "path"),
    [("", "<>"), ("a@example.org", "<a@example.org>"),
     ('"a b"@example.org', '<"a b"@example.org>'), ("jörg@exämple.org", "<jörg@exämple.org>"),
     ("a@localhost", "<a@localhost>")],
)
def test_format_path(address: str, path: str) -> None:
    assert format_path(address) == path


@pytest.mark.parametrize(
    "address",
    ["a@example.org\r\nRCPT TO:<x@y.z>", "a@example.org>", "a\n@example.org", "plain",
     "a@b@c.example", "<a@example.org>", "a@example.org\x00"],
)
def test_format_path_refuses_anything_that_could_break_a_command(address: str) -> None:
    with pytest.raises(AddressError):
        format_path(address)


def test_render_commands_for_the_client_role() -> None:
    params = MailParams(size=42, body=BodyType.EIGHT_BIT_MIME, smtputf8=True, auth="evil")
    assert render_mail_from("a@example.org", params) == (
        b"MAIL FROM:<a@example.org> SIZE=42 BODY=8BITMIME SMTPUTF8\r\n"
    )
    assert render_mail_from("", MailParams()) == b"MAIL FROM:<>\r\n"
    assert render_rcpt_to("b@example.net") == b"RCPT TO:<b@example.net>\r\n"
    with pytest.raises(AddressError):
        render_rcpt_to("")


@pytest.mark.parametrize("text", ["plain", "a+b=c", "jörg d", "\x01", ""])
def test_xtext_round_trip(text: str) -> None:
    encoded = encode_xtext(text)
    assert all(0x21 <= ord(c) <= 0x7E and c != "=" for c in encoded)
    assert decode_xtext(encoded) == text


def test_mailbox_parts() -> None:
    mailbox = parse_mailbox('"x y"@Example.ORG')
    assert (mailbox.local_part, mailbox.domain, mailbox.quoted) == ('"x y"', "Example.ORG", True)
    assert mailbox.address == '"x y"@Example.ORG'


def test_every_catalogue_reply_survives_the_wire_with_the_right_status() -> None:
    named = [v for v in vars(catalogue).values() if isinstance(v, Reply)]
    assert len(named) > 40
    for reply in named:  # RFC 2034: enhanced codes on everything but 3xx
        assert bool(reply.status) == (reply.code // 100 != 3), reply
    built = [catalogue.greeting(HOST), catalogue.ehlo(HOST, ["PIPELINING"]), catalogue.helo(HOST)]
    assert not any(reply.status for reply in built)  # greeting and hello carry none
    for reply in named + built + [catalogue.syntax_error("x"), catalogue.relay_denied("x")]:
        wire = reply.to_bytes()
        assert wire.count(b"\r\n") == len(reply.lines) and wire.endswith(b"\r\n")
        assert parse_reply(wire.split(b"\r\n")[:-1]) == reply


# -- the one host-name and control-character check everyone uses --------------------------


@pytest.mark.parametrize(
    ("name", "min_labels", "ok"),
    [
        ("mx.example.org", 1, True),
        ("localhost", 1, True),
        ("localhost", 2, False),
        ("3com.example", 2, True),
        ("a" * 63 + ".example", 1, True),
        ("a" * 64 + ".example", 1, False),
        (".".join(["a" * 63] * 4)[:253], 1, True),
        (".".join(["a" * 63] * 4)[:254], 1, False),
        ("-mx.example.org", 1, False),
        ("mx-.example.org", 1, False),
        ("mx.example.org.", 1, False),
        ("mx..example.org", 1, False),
        ("mx_1.example.org", 1, False),
        ("m\u00fcnchen.example", 1, False),
        ("mx.example.org\n", 1, False),
        ("", 1, False),
    ],
)
def test_is_hostname(name: str, min_labels: int, ok: bool) -> None:
    assert is_hostname(name, min_labels=min_labels) is ok


@pytest.mark.parametrize(
    ("text", "plain", "tab_ok"),
    [("abc", False, False), ("a\tb", True, False), ("a\x00", True, True), ("a\x7f", True, True),
     ("a\r\nb", True, True), ("\x1f", True, True), ("\x85\u2028", False, False)],
)
def test_has_control_and_replace_controls(text: str, plain: bool, tab_ok: bool) -> None:
    assert has_control(text) is plain
    assert has_control(text, tab_ok=True) is tab_ok
    assert not has_control(replace_controls(text, "?"))
    assert replace_controls("a\tb\x00", "?", tab_ok=True) == "a\tb?"
