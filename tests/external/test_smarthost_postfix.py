"""``submitd serve`` forwards through a real Postfix smarthost that requires STARTTLS and AUTH.

The smarthost (``tests/external/postfix_sink.py``) verifies nothing about submitd except its
password, but it is the strictest common relay: TLS is mandatory before AUTH and MAIL, a refused
recipient gets the reply a production Postfix gives, and what it accepts is stored by its
``virtual`` agent, so the tests read back exactly what a provider would have received. Each test
runs its own ``submitd serve`` (own spool) against the module's one Postfix and picks its own
messages out of the shared Maildir by Message-ID.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable, Sequence
from email.message import Message
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import pytest

from submitd.testing import TestCA
from tests.external.postfix_sink import (
    REALM,
    REFUSED_LOCALPART,
    PostfixSink,
    SinkMessage,
    SinkOptions,
    free_port,
    postfix_sink,
)
from tests.support import PASSWORD, SENDER, USER, ServerProcess

pytestmark = pytest.mark.external

QueueList = Callable[[Path], list[dict[str, Any]]]

# What submitd says when the smarthost does not listen: "421 4.4.1 cannot connect to HOST:PORT:
# <reason>", or "451 4.4.1 all smarthosts of route R marked down: <that reply>".
OUTAGE = r"4\.4\.1 (cannot connect|connection refused|all smarthosts .* marked down)"

# Lines a relay must carry through untouched: dot-stuffing both ways, whitespace, 8-bit text.
BODY = (
    b"Hello through the smarthost.\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"   leading and trailing spaces   \r\n"
    b"\ttab\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln (8-bit UTF-8)\r\n"
    b"\r\n"
    b"From the last paragraph\r\n"
)


def compose(subject: str, recipients: Sequence[str], body: bytes = BODY) -> tuple[bytes, str]:
    """A message (CRLF) from SENDER to ``recipients`` with a fresh Message-ID; returns both."""
    message_id = make_msgid(domain="test.example")
    head = (
        f"From: Demo <{SENDER}>\r\n"
        f"To: {', '.join(f'<{r}>' for r in recipients)}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate()}\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    )
    return head.encode() + body, message_id


def submit(server: ServerProcess, ca: TestCA, message: bytes, recipients: Sequence[str]) -> None:
    """Submit ``message`` through submitd's STARTTLS port (certificate verified, AUTH PLAIN)."""
    with smtplib.SMTP("127.0.0.1", server.ports["starttls"], timeout=30) as smtp:
        smtp.starttls(context=ca.client_context())
        smtp.login(USER, PASSWORD)
        refused = smtp.sendmail(SENDER, list(recipients), message, mail_options=["BODY=8BITMIME"])
    assert refused == {}, refused


def explain(server: ServerProcess, sink: PostfixSink) -> str:
    """Both logs, for an assertion message."""
    return f"\n--- submitd:\n{server.text()}\n--- postfix:\n{sink.log()}"


def arrived(
    sink: PostfixSink, server: ServerProcess, count: int, message_id: str, timeout: float = 30
) -> list[SinkMessage]:
    """The ``count`` stored messages that carry ``message_id`` (bounces quote it too)."""
    try:
        return sink.wait_for_messages(count, match=message_id, timeout=timeout)
    except TimeoutError as exc:
        pytest.fail(f"{exc}{explain(server, sink)}")


def wait_for_empty_queue(
    queue_list: QueueList, config: Path, server: ServerProcess, timeout: float = 30
) -> None:
    """Wait until ``submitd queue list`` shows nothing: every recipient reached a final state."""
    deadline = time.monotonic() + timeout
    while (listing := queue_list(config)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listing == [], f"still queued: {listing}\n{server.text()}"


def retried(
    queue_list: QueueList, config: Path, server: ServerProcess, count: int, attempts: int
) -> list[dict[str, Any]]:
    """Wait until ``queue list`` shows ``count`` messages from SENDER whose every recipient is
    pending after at least ``attempts`` attempts, and return them.

    The runner logs an outcome just before it writes the record, so the listing may lag the
    log by a moment.
    """
    deadline = time.monotonic() + 15
    while True:
        listing = [m for m in queue_list(config) if m["sender"] == SENDER]
        states = [r for m in listing for r in m["recipients"]]
        if len(listing) == count and all(
            r["state"] == "pending" and r["attempts"] >= attempts for r in states
        ):
            return listing
        assert time.monotonic() < deadline, f"queue list: {listing}\n{server.text()}"
        time.sleep(0.1)


def last_reply(recipient: dict[str, Any]) -> str:
    """A recipient's last reply in ``queue list --json``, as one line: "451 4.4.1 text"."""
    reply = recipient["last_reply"]
    assert reply is not None, recipient
    return f"{reply['code']} {reply['status'] or ''} {reply['text']}"


def test_message_arrives_at_postfix_byte_for_byte_over_verified_tls_and_auth(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
) -> None:
    config = relay_config(smarthost)
    server = serve(config)
    rcpt = "alice@example.net"
    message, message_id = compose("byte for byte", [rcpt])
    submit(server, ca, message, [rcpt])
    (stored,) = arrived(smarthost, server, 1, message_id)
    # What Postfix stored ends with the submitted message, header section and body, every byte
    # (dots unstuffed, 8-bit text intact); in front only trace fields.
    assert stored.crlf.endswith(message), stored.crlf
    assert stored.body == BODY
    added = stored.crlf[: -len(message)].decode()
    names = [line.split(":", 1)[0] for line in added.splitlines() if line[:1] not in (" ", "\t")]
    assert names[:3] == ["Return-Path", "X-Original-To", "Delivered-To"], added
    assert set(names[3:]) <= {"Received"}, added
    # Postfix's own trace field: the submission came over TLS with AUTH ("ESMTPSA").
    assert re.search(r"by sink\.test\.example \(Postfix\) with ESMTPSA", added), added
    assert re.search(r"using TLSv1\.[23]", added), added
    assert stored.sender == SENDER and stored.recipient == rcpt
    # Cyrus qualifies the plain login with the sink's realm (smtpd_sasl_local_domain).
    assert f"sasl_method=PLAIN, sasl_username={smarthost.user}@{REALM}" in smarthost.log()
    server.wait_for_log(rf"event=delivered .*rcpt={re.escape(rcpt)}")
    assert smarthost.password not in server.text()
    wait_for_empty_queue(queue_list, config, server)


def test_postfix_outage_keeps_mail_queued_and_each_message_arrives_once_after(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
) -> None:
    config = relay_config(smarthost)
    server = serve(config)
    smarthost.stop()
    try:
        sent: dict[str, str] = {}
        for n in range(3):
            rcpt = f"outage{n}@example.net"
            message, message_id = compose(f"outage {n}", [rcpt])
            submit(server, ca, message, [rcpt])
            sent[message_id] = rcpt
        for rcpt in sent.values():
            # The log says why: no connection (or the host is marked down for that).
            line = server.wait_for_log(rf"event=deferred .*rcpt={re.escape(rcpt)} .*")
            assert re.search(OUTAGE, line), line
        listing = retried(queue_list, config, server, count=len(sent), attempts=1)
        assert sorted(r["address"] for m in listing for r in m["recipients"]) == sorted(
            sent.values()
        ), listing
        for entry in listing:
            (rcpt_state,) = entry["recipients"]
            assert re.search(OUTAGE, last_reply(rcpt_state)), entry
    finally:
        smarthost.start()
    started = time.monotonic()
    for message_id in sent:
        arrived(smarthost, server, 1, message_id)
    wait_for_empty_queue(queue_list, config, server)
    drained = time.monotonic() - started
    print(f"outage: {len(sent)} messages drained {drained:.1f} s after Postfix came back")
    # Nothing is left to send, so nothing more can arrive: each is there exactly once.
    for message_id, rcpt in sent.items():
        copies = [m for m in smarthost.messages() if m.message_id == message_id]
        assert [m.recipient for m in copies] == [rcpt], explain(server, smarthost)


def delivery_status(report: Message) -> tuple[Message, list[Message]]:
    """The per-message and per-recipient field groups of a multipart/report (RFC 3464)."""
    (part,) = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    payload = part.get_payload()
    assert isinstance(payload, list), payload
    groups = [g for g in payload if isinstance(g, Message)]
    assert len(groups) == len(payload) >= 2, payload
    return groups[0], groups[1:]


def field(group: Message, name: str) -> str:
    """One field of a delivery-status group, whitespace collapsed."""
    value = group[name]
    assert value is not None, f"no {name} in {group}"
    return " ".join(str(value).split())


def test_refused_recipient_bounces_to_the_sender_and_the_others_are_delivered(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
) -> None:
    config = relay_config(smarthost)
    server = serve(config)
    refused = f"{REFUSED_LOCALPART}@example.net"
    recipients = ["carol@example.net", refused, "dave@example.net"]
    message, message_id = compose("one refused", recipients)
    submit(server, ca, message, recipients)
    # Two deliveries and one bounce (the bounce quotes the original header section).
    stored = arrived(smarthost, server, 3, message_id)
    bounces = [m for m in stored if m.sender == ""]
    delivered = [m for m in stored if m.sender == SENDER]
    assert sorted(m.recipient for m in delivered) == ["carol@example.net", "dave@example.net"]
    assert all(m.body == BODY for m in delivered)
    (bounce,) = bounces
    assert bounce.recipient == SENDER  # to the envelope sender, with a null sender of its own
    report = bounce.parsed
    assert report.get_content_type() == "multipart/report", bounce.crlf.decode(errors="replace")
    assert report.get_param("report-type") == "delivery-status"
    assert SENDER in str(report["To"])
    per_message, per_recipient = delivery_status(report)
    assert field(per_message, "Reporting-MTA").lower().startswith("dns;")
    (failed,) = per_recipient  # only the refused recipient is reported
    assert field(failed, "Final-Recipient").lower() == f"rfc822; {refused}"
    assert field(failed, "Action").lower() == "failed"
    assert field(failed, "Status") == "5.1.1"
    assert "localhost" in field(failed, "Remote-MTA")
    diagnostic = field(failed, "Diagnostic-Code")
    assert diagnostic.lower().startswith("smtp;") and "550 5.1.1" in diagnostic, diagnostic
    headers = [p for p in report.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert headers and message_id in str(headers[0].get_payload()), bounce.crlf
    server.wait_for_log(rf"event=failed .*rcpt={re.escape(refused)} .*550 5\.1\.1")
    wait_for_empty_queue(queue_list, config, server)
    print("bounce as it arrived:\n" + bounce.raw.decode(errors="replace"))


def assert_stays_queued(
    server: ServerProcess,
    sink: PostfixSink,
    config: Path,
    queue_list: QueueList,
    ca: TestCA,
    reason: str,
) -> None:
    """Submit one message; it is deferred twice for ``reason`` (a regex) and never arrives."""
    rcpt = "erin@example.net"
    message, message_id = compose("stays queued", [rcpt])
    submit(server, ca, message, [rcpt])
    line = server.wait_for_log(rf"event=deferred .*rcpt={re.escape(rcpt)} .*", count=2)
    assert re.search(reason, line), line + explain(server, sink)
    (entry,) = retried(queue_list, config, server, count=1, attempts=2)
    (state,) = entry["recipients"]
    assert re.search(reason, last_reply(state)), entry
    assert not [m for m in sink.messages() if message_id.encode() in m.raw]


def test_wrong_smarthost_password_keeps_mail_queued(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
) -> None:
    wrong = "not the " + smarthost.password
    config = relay_config(smarthost, password=wrong)
    server = serve(config)
    reason = r"535 5\.7\.8 .*authentication failed"  # Postfix's reply, passed on
    assert_stays_queued(server, smarthost, config, queue_list, ca, reason)
    assert "authentication failed" in smarthost.log()
    assert wrong not in server.text()  # never a password in the log


def test_untrusted_smarthost_certificate_keeps_mail_queued(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
) -> None:
    # submitd's own listener CA is a valid CA, but not the one that issued Postfix's certificate.
    config = relay_config(smarthost, ca_file=str(ca.ca_path))
    server = serve(config)
    reason = r"454 4\.7\.5 certificate did not verify"
    assert_stays_queued(server, smarthost, config, queue_list, ca, reason)


def test_smarthost_without_starttls_keeps_mail_queued_and_sees_no_login(
    sink_ca: TestCA,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
    tmp_path: Path,
) -> None:
    options = SinkOptions(offer_starttls=False)
    with postfix_sink(ca=sink_ca, options=options, keep_log=tmp_path / "maillog") as plain:
        config = relay_config(plain)
        server = serve(config)
        reason = r"454 4\.7\.0 STARTTLS not offered"
        assert_stays_queued(server, plain, config, queue_list, ca, reason)
        sessions = re.findall(r"disconnect from .*", plain.log())
    # Never a silent downgrade: no AUTH and no MAIL went over the plain-text connection.
    assert sessions, plain.log()
    assert not [s for s in sessions if "auth=" in s or "mail=" in s], sessions


def test_first_host_down_mail_goes_through_the_second_and_the_first_is_marked_down(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
) -> None:
    closed = free_port()  # nothing listens there: connection refused
    config = relay_config(
        smarthost,
        host=None,
        port=None,
        hosts=[f"localhost:{closed}", f"localhost:{smarthost.port}"],
        host_down_time="10m",
        max_messages_per_connection=1,  # a new connection for each message
    )
    server = serve(config)
    first_rcpt, second_rcpt = "frank@example.net", "grace@example.net"
    message, message_id = compose("first host down", [first_rcpt])
    submit(server, ca, message, [first_rcpt])
    (stored,) = arrived(smarthost, server, 1, message_id)
    assert stored.recipient == first_rcpt and stored.body == BODY
    server.wait_for_log(rf"event=delivered .*rcpt={re.escape(first_rcpt)} .*")
    down = server.wait_for_log(rf"event=smarthost_host_down .*host=localhost:{closed} .*")
    assert "cannot connect" in down, down
    # While it is marked down the first host is skipped: the next message connects straight to
    # the second one.
    message, message_id = compose("first host still down", [second_rcpt])
    submit(server, ca, message, [second_rcpt])
    arrived(smarthost, server, 1, message_id)
    server.wait_for_log(rf"event=delivered .*rcpt={re.escape(second_rcpt)} .*")
    connects = re.findall(r"event=smarthost_connect .*host=(localhost:\d+)", server.text())
    assert connects == [f"localhost:{closed}", *[f"localhost:{smarthost.port}"] * 2], connects
    wait_for_empty_queue(queue_list, config, server)
