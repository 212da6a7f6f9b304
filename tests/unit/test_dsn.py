"""Delivery status notifications: RFC 3464 reports that mail programs and Python can read."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message

import pytest

from submitd import Recipient
from submitd.mailqueue.dsn import (
    Action,
    Notify,
    RecipientStatus,
    Report,
    build_report,
    notify_conditions,
    report_envelope,
    returnable,
)
from submitd.protocol._events import BodyType
from submitd.protocol._replies import Reply

T0 = 1_700_000_000.0
HEADERS = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: lunch\r\n\r\n"
REFUSED = Reply.make(550, "5.1.1", "No such user here")


@dataclass
class ParsedReport:
    """A report as Python's email package reads it."""

    message: EmailMessage
    text: str
    per_message: Message
    recipients: list[Message]
    headers: str  # the text/rfc822-headers part ("" when the whole message is returned)
    returned: EmailMessage | None = None  # the message/rfc822 (or message/global) part


def parse_report(data: bytes) -> ParsedReport:
    """Parse ``data`` as an RFC 3464 report and check its structure on the way."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, status, original = message.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list) and len(payload) >= 2
    blocks = [b for b in payload if isinstance(b, Message)]
    assert len(blocks) == len(payload)
    headers, returned = "", None
    if original.get_content_type() == "text/rfc822-headers":
        headers = original.get_content()
    else:
        assert original.get_content_type() in ("message/rfc822", "message/global")
        content = original.get_content()
        if isinstance(content, bytes):  # message/global: the email package hands out bytes
            content = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(content, EmailMessage)
        returned = content
    return ParsedReport(
        message=message,
        text=human.get_content(),
        per_message=blocks[0],
        recipients=blocks[1:],
        headers=headers,
        returned=returned,
    )


def report(*recipients: RecipientStatus, **overrides: object) -> Report:
    fields: dict[str, object] = {
        "hostname": "mx.example.org",
        "sender": "alice@example.org",
        "arrival": T0,
        "date": T0 + 600,
        "recipients": recipients,
        "headers": HEADERS,
        "queue_id": "0123456789ABCDEF",
    }
    fields.update(overrides)
    return Report(**fields)  # type: ignore[arg-type]


def failed(address: str = "bob@example.net", reply: Reply = REFUSED,
           remote: str | None = "smtp.example.net") -> RecipientStatus:
    return RecipientStatus(address=address, action=Action.FAILED, reply=reply, remote=remote,
                           last_attempt=T0 + 600)


def assert_wire_safe(data: bytes) -> None:
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_bounce_is_a_multipart_report_listing_every_failed_recipient() -> None:
    data = build_report(report(
        failed(),
        failed("carol@example.com", Reply.make(552, "5.2.2", "Mailbox full"), remote=None),
    ))
    assert_wire_safe(data)
    parsed = parse_report(data)
    msg = parsed.message
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] == "Tue, 14 Nov 2023 22:23:20 +0000"
    assert re.fullmatch(r"<0123456789ABCDEF\.[0-9a-f]{16}@mx\.example\.org>", msg["Message-ID"])
    assert parsed.per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert parsed.per_message["X-Submitd-Queue-ID"] == "0123456789ABCDEF"
    assert parsed.per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert parsed.per_message["Original-Envelope-Id"] is None
    bob, carol = parsed.recipients
    assert dict(bob.items()) == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; smtp.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 No such user here",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:23:20 +0000",
    }
    assert carol["Status"] == "5.2.2" and carol["Remote-MTA"] is None
    text = " ".join(parsed.text.split())
    assert "<bob@example.net>: 550 5.1.1 No such user here" in text
    assert "could not be delivered" in text
    assert parsed.headers.replace("\r\n", "\n") == HEADERS.decode().replace("\r\n", "\n")[:-1]


def test_delay_warning_says_delayed_with_a_4xx_status_and_the_retry_limit() -> None:
    delayed = RecipientStatus(
        address="bob@example.net", action=Action.DELAYED,
        reply=Reply.make(451, "4.4.1", "Connection timed out"), remote="smtp.example.net",
        last_attempt=T0 + 3600, will_retry_until=T0 + 5 * 86400,
    )
    parsed = parse_report(build_report(report(delayed, envelope_id="ENV-1")))
    assert parsed.message["Subject"] == "Delayed Mail (still being retried)"
    (rcpt,) = parsed.recipients
    assert (rcpt["Action"], rcpt["Status"]) == ("delayed", "4.4.1")
    assert rcpt["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert parsed.per_message["Original-Envelope-Id"] == "ENV-1"
    assert "do not need to send it again" in " ".join(parsed.text.split())


def test_no_value_can_inject_a_header_field_or_a_part() -> None:
    hostile = "x\r\nBcc: victim@example.net\r\n\r\n--boundary"
    data = build_report(report(
        failed(address="bob@example.net\r\nX-Evil: 1", remote="relay\r\nX-Evil: 2"),
        hostname="mx.example.org\r\nX-Evil: 3",
        sender="alice@example.org\r\nX-Evil: 4",
        queue_id=hostile, envelope_id=hostile,
    ))
    assert_wire_safe(data)
    parsed = parse_report(data)
    assert parsed.message["Bcc"] is None and parsed.message["X-Evil"] is None
    assert all(block["X-Evil"] is None and block["Bcc"] is None
               for block in [parsed.per_message, *parsed.recipients])
    assert len(list(parsed.message.iter_parts())) == 3


def test_long_replies_are_folded_and_hostile_original_headers_are_encoded() -> None:
    long_reply = Reply(code=550, status="5.7.1", lines=tuple(f"line {i} " + "x" * 400
                                                             for i in range(20)))
    headers = (b"Subject: caf\xc3\xa9\r\nX-Long: " + b"y" * 3000 + b"\r\nX-Bare: a\nb\r\n\r\n")
    data = build_report(report(failed(reply=long_reply), headers=headers))
    assert_wire_safe(data)
    parsed = parse_report(data)
    diagnostic = parsed.recipients[0]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 line 0")
    assert len(diagnostic) <= 2100  # bounded, not the whole 8 KiB reply
    assert "Subject: café" in parsed.headers
    assert "y" * 3000 in parsed.headers.replace("\n", "")


def test_internationalised_addresses_use_utf8_address_type() -> None:
    data = build_report(report(failed(address="jörg@bücher.example"), sender="zoë@example.org"))
    parsed = parse_report(data)
    assert parsed.recipients[0]["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert "To: <zoë@example.org>\r\n".encode() in data  # RFC 6532: UTF-8 in the header
    envelope = report_envelope(report(failed(), sender="zoë@example.org"), received_at=T0)
    assert envelope.params.smtputf8 and envelope.params.body is BodyType.EIGHT_BIT_MIME


def test_report_goes_from_the_null_sender_to_the_original_sender_only() -> None:
    envelope = report_envelope(report(failed()), received_at=T0)
    assert envelope.sender == ""
    assert [r.address for r in envelope.recipients] == ["alice@example.org"]
    assert not envelope.params.smtputf8
    with pytest.raises(ValueError, match="null sender"):
        report_envelope(report(failed(), sender=""), received_at=T0)


# --- DSN requests (RFC 3461): NOTIFY, RET, ENVID, ORCPT ----------------------------------------


@pytest.mark.parametrize(
    ("notify", "conditions"),
    [
        (None, {Notify.FAILURE, Notify.DELAY}),  # absent: submitd's choice (RFC 3461 §4.1)
        ("NEVER", set()),
        ("SUCCESS", {Notify.SUCCESS}),
        ("SUCCESS,FAILURE", {Notify.SUCCESS, Notify.FAILURE}),
        ("failure,delay", {Notify.FAILURE, Notify.DELAY}),
    ],
)
def test_notify_parameter_decides_which_reports_a_recipient_gets(
    notify: str | None, conditions: set[Notify]
) -> None:
    params = () if notify is None else (("NOTIFY", notify),)
    assert notify_conditions(Recipient(address="b@example.net", params=params)) == conditions


def test_success_report_says_delivered_or_relayed_with_a_2xx_status() -> None:
    delivered = RecipientStatus(address="bob@example.net", action=Action.DELIVERED,
                                reply=Reply.make(250, "2.0.0", "Delivered"), last_attempt=T0)
    relayed = RecipientStatus(address="carol@example.com", action=Action.RELAYED,
                              reply=Reply.make(250, "", "Ok queued"), remote="smtp.example.net",
                              last_attempt=T0)
    data = build_report(report(delivered, relayed))
    assert_wire_safe(data)
    parsed = parse_report(data)
    assert parsed.message["Subject"] == "Relayed Mail Report (no further notice will follow)"
    assert [(r["Action"], r["Status"], r["Remote-MTA"]) for r in parsed.recipients] == [
        ("delivered", "2.0.0", None),
        ("relayed", "2.0.0", "dns; smtp.example.net"),  # no enhanced code: 2.0.0
    ]
    text = " ".join(parsed.text.split())
    assert "does not send delivery status notifications" in text
    assert "<carol@example.com>: 250 Ok queued (relayed to smtp.example.net)" in text
    assert "Subject: lunch" in parsed.headers  # success reports return the header section
    only_delivered = parse_report(build_report(report(delivered)))
    assert only_delivered.message["Subject"] == "Successful Mail Delivery Report"
    assert "was delivered" in " ".join(only_delivered.text.split())


def test_envid_is_xtext_encoded_and_orcpt_decoded_into_original_recipient() -> None:
    def with_orcpt(orcpt: str) -> RecipientStatus:
        return RecipientStatus(address="bob@example.net", action=Action.FAILED, reply=REFUSED,
                               original_recipient=orcpt)

    parsed = parse_report(build_report(report(
        with_orcpt("rfc822;a+2Bb@example.org"),
        with_orcpt("RFC822;j+C3+B6rg@example.org"),  # UTF-8 in xtext
        with_orcpt("no type here"),                 # not addr-type;xtext: left out
        failed(),                                   # no ORCPT: no Original-Recipient
        envelope_id="order 42+x=y",
    )))
    # RFC 3464 §2.2.1 with the xtext of RFC 3461 §4: what the client sent as ENVID.
    assert parsed.per_message["Original-Envelope-Id"] == "order+2042+2Bx+3Dy"
    assert [r["Original-Recipient"] for r in parsed.recipients] == [
        "rfc822; a+b@example.org",
        "utf-8; j\\x{F6}rg@example.org",
        None,
        None,
    ]
    assert all(r["Final-Recipient"] == "rfc822; bob@example.net" for r in parsed.recipients)


def original_message(body: bytes = b"The body of the message.\r\n") -> bytes:
    return HEADERS + body


def test_ret_full_returns_the_whole_message_as_message_rfc822() -> None:
    data = build_report(report(failed(), original=original_message()))
    assert_wire_safe(data)
    parsed = parse_report(data)
    assert parsed.returned is not None
    assert parsed.returned["Subject"] == "lunch"
    assert parsed.returned.get_content().splitlines() == ["The body of the message."]
    assert "It is attached below." in " ".join(parsed.text.split())
    assert report_envelope(report(failed(), original=original_message()),
                           received_at=T0).params.body is BodyType.SEVEN_BIT


def test_ret_full_with_8bit_content_is_sent_as_8bitmime() -> None:
    eight_bit = (b"Subject: hi\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Grüße\r\n".encode())
    parsed = parse_report(build_report(report(failed(), original=eight_bit)))
    assert parsed.returned is not None
    assert parsed.returned.get_content().splitlines() == ["Grüße"]
    (_, _, part) = parsed.message.iter_parts()
    assert part["Content-Transfer-Encoding"] == "8bit"
    envelope = report_envelope(report(failed(), original=eight_bit), received_at=T0)
    assert envelope.params.body is BodyType.EIGHT_BIT_MIME and not envelope.params.smtputf8
    # UTF-8 in the returned header section: message/global (RFC 6532 §3.7).
    utf8_headers = b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n"
    data = build_report(report(failed(), original=utf8_headers))
    assert b"Content-Type: message/global\r\n" in data
    returned = parse_report(data).returned
    assert returned is not None and returned["Subject"] == "café"


def test_headers_only_report_explains_why_when_full_return_was_refused() -> None:
    note = "The message is larger than 10 MiB (20971520 bytes), so only its header section..."
    parsed = parse_report(build_report(report(failed(), return_note=note)))
    assert parsed.returned is None and "Subject: lunch" in parsed.headers
    assert "larger than 10 MiB" in " ".join(parsed.text.split())


def test_only_messages_a_message_rfc822_part_can_carry_are_returned_whole() -> None:
    assert returnable(original_message())
    assert not returnable(HEADERS + b"x" * 999 + b"\r\n")  # RFC 5322 §2.1.1
    assert not returnable(HEADERS + b"bare\nLF\r\n")
    assert not returnable(HEADERS + b"NUL\0\r\n")
