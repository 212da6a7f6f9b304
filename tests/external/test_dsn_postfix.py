"""Delivery status notifications end to end (RFC 3461): a client's DSN requests through
``submitd serve`` and a real Postfix smarthost.

The client (Python's smtplib) sends ``RET``/``ENVID`` on MAIL and ``NOTIFY``/``ORCPT`` on RCPT
over STARTTLS + AUTH. Postfix offers DSN by default: submitd passes the requests on and Postfix
reports success itself; with DSN turned off (``SinkOptions(offer_dsn=False)``) submitd reports
``relayed`` on its behalf. Every report travels back to the envelope sender through the same sink
(its catch-all Maildir takes the sender's domain too), so each test reads the reports exactly as
the sender would receive them. Each report is printed and kept under the test's ``tmp_path``.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from submitd.testing import TestCA
from tests.external.postfix_sink import (
    DEFERRED_LOCALPART,
    REFUSED_LOCALPART,
    PostfixSink,
    SinkMessage,
    SinkOptions,
    postfix_sink,
)
from tests.external.test_smarthost_postfix import (
    compose,
    delivery_status,
    explain,
    field,
    wait_for_empty_queue,
)
from tests.support import PASSWORD, SENDER, USER, ServerProcess

pytestmark = pytest.mark.external

QueueList = Callable[[Path], list[dict[str, Any]]]
QueueCommand = Callable[..., subprocess.CompletedProcess[str]]

SINK_HOST = "sink.test.example"  # Postfix's myhostname: its Reporting-MTA


def xtext(text: str) -> str:
    """RFC 3461 §4 xtext, as a client encodes ENVID and ORCPT values."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def submit_dsn(
    server: ServerProcess,
    ca: TestCA,
    message: bytes,
    recipients: Sequence[str],
    *,
    envid: str,
    notify: str,
    ret: str = "HDRS",
) -> None:
    """Submit with ``RET``/``ENVID`` and, for every recipient, ``NOTIFY`` and its ``ORCPT``."""
    with smtplib.SMTP("127.0.0.1", server.ports["starttls"], timeout=30) as smtp:
        smtp.starttls(context=ca.client_context())
        smtp.login(USER, PASSWORD)
        assert smtp.has_extn("dsn"), smtp.esmtp_features
        code, reply = smtp.mail(SENDER, [f"RET={ret}", f"ENVID={xtext(envid)}",
                                         "BODY=8BITMIME"])
        assert code == 250, reply
        for rcpt in recipients:
            code, reply = smtp.rcpt(rcpt, [f"NOTIFY={notify}", f"ORCPT=rfc822;{xtext(rcpt)}"])
            assert code == 250, reply
        code, reply = smtp.data(message)
        assert code == 250, reply


def reports(sink: PostfixSink, marker: str) -> list[SinkMessage]:
    """The reports in the sink about the message carrying ``marker`` (null sender)."""
    return [m for m in sink.messages() if m.sender == "" and marker.encode() in m.raw]


def wait_for_reports(
    sink: PostfixSink, server: ServerProcess, marker: str, count: int, timeout: float = 30
) -> list[SinkMessage]:
    """Wait until ``count`` reports carry ``marker``; return them."""
    deadline = time.monotonic() + timeout
    while len(found := reports(sink, marker)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(found)} of {count} report(s) with {marker!r}"
                        f"{explain(server, sink)}")
        time.sleep(0.1)
    return found


def keep(report: SinkMessage, tmp_path: Path, name: str) -> None:
    """Print the report as it arrived and keep a copy next to the test's files."""
    path = tmp_path / f"{name}.eml"
    path.write_bytes(report.raw)
    print(f"--- {name} report as received ({path}):\n{report.raw.decode(errors='replace')}")


def reported_by(report: SinkMessage) -> tuple[Message, list[Message]]:
    """The delivery-status groups of a stored report, after checking that it is one."""
    parsed = report.parsed
    assert parsed.get_content_type() == "multipart/report", report.crlf
    assert parsed.get_param("report-type") == "delivery-status"
    assert report.recipient == SENDER  # to the envelope sender, from the null sender
    return delivery_status(parsed)


def test_notify_success_through_a_dsn_smarthost_is_reported_by_postfix_not_submitd(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
    tmp_path: Path,
) -> None:
    config = relay_config(smarthost)
    server = serve(config)
    rcpt = "carol+dsn@example.net"
    envid = f"dsn success+{uuid.uuid4().hex}"
    message, message_id = compose("dsn success", [rcpt])
    submit_dsn(server, ca, message, [rcpt], envid=envid, notify="SUCCESS")
    (report,) = wait_for_reports(smarthost, server, message_id, 1)
    keep(report, tmp_path, "delivered-by-postfix")
    per_message, (status,) = reported_by(report)
    # Postfix's own report of the final delivery: the request reached it unchanged.
    assert field(per_message, "Reporting-MTA") == f"dns; {SINK_HOST}"
    assert field(per_message, "Original-Envelope-Id") == envid
    assert field(status, "Action") == "delivered"
    assert field(status, "Final-Recipient").lower() == f"rfc822; {rcpt}"
    assert field(status, "Original-Recipient").replace(" ", "") == f"rfc822;{rcpt}"
    assert "X-Submitd-Queue-ID" not in str(per_message)
    server.wait_for_log(rf"event=delivered .*rcpt={re.escape(rcpt)}")
    wait_for_empty_queue(queue_list, config, server)
    # submitd sent nothing of its own: the next hop took the request over.
    assert "event=report_queued" not in server.text()
    assert len(reports(smarthost, message_id)) == 1


def test_notify_never_to_a_refused_recipient_produces_no_bounce(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
) -> None:
    config = relay_config(smarthost)
    server = serve(config)
    refused, accepted = f"{REFUSED_LOCALPART}@example.net", "dave@example.net"
    envid = f"dsn-never-{uuid.uuid4().hex}"
    message, message_id = compose("dsn never", [refused, accepted])
    submit_dsn(server, ca, message, [refused, accepted], envid=envid, notify="NEVER")
    server.wait_for_log(rf"event=failed .*rcpt={re.escape(refused)} .*550 5\.1\.1")
    server.wait_for_log(rf"event=delivered .*rcpt={re.escape(accepted)}")
    wait_for_empty_queue(queue_list, config, server)
    smarthost.wait_for_messages(1, match=message_id)
    time.sleep(2)  # give a (wrong) report time to arrive before asserting there is none
    stored = [m for m in smarthost.messages() if message_id.encode() in m.raw]
    assert [(m.sender, m.recipient) for m in stored] == [(SENDER, accepted)], explain(
        server, smarthost
    )
    assert "event=report_queued" not in server.text()


def test_delayed_message_produces_exactly_one_delay_report(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
    queue_command: QueueCommand,
    tmp_path: Path,
) -> None:
    config = relay_config(smarthost, queue={"delay_warning": "2s"})
    server = serve(config)
    rcpt = f"{DEFERRED_LOCALPART}@example.net"
    envid = f"dsn-delay-{uuid.uuid4().hex}"
    message, message_id = compose("dsn delay", [rcpt])
    submit_dsn(server, ca, message, [rcpt], envid=envid, notify="DELAY,FAILURE")
    (report,) = wait_for_reports(smarthost, server, message_id, 1)
    seen = len(re.findall(rf"event=deferred .*rcpt={re.escape(rcpt)}", server.text()))
    # Three more attempts, each deferred again: still the one report.
    server.wait_for_log(rf"event=deferred .*rcpt={re.escape(rcpt)}", count=seen + 3)
    time.sleep(1)
    assert len(reports(smarthost, message_id)) == 1, explain(server, smarthost)
    keep(report, tmp_path, "delayed")
    per_message, (status,) = reported_by(report)
    assert field(per_message, "Original-Envelope-Id") == envid
    assert field(status, "Action") == "delayed"
    assert field(status, "Status") == "4.2.0"
    assert field(status, "Original-Recipient") == f"rfc822; {rcpt}"
    assert "450 4.2.0" in field(status, "Diagnostic-Code")
    assert report.parsed["Subject"] == "Delayed Mail (still being retried)"
    (entry,) = [m for m in queue_list(config) if m["sender"] == SENDER]
    deleted = queue_command(config, "delete", entry["id"])
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    wait_for_empty_queue(queue_list, config, server)
    assert len(reports(smarthost, message_id)) == 1


def test_smarthost_without_dsn_makes_submitd_report_relayed(
    sink_ca: TestCA,
    relay_config: Callable[..., Path],
    serve: Callable[[Path], ServerProcess],
    ca: TestCA,
    queue_list: QueueList,
    tmp_path: Path,
) -> None:
    options = SinkOptions(offer_dsn=False)
    with postfix_sink(ca=sink_ca, options=options, keep_log=tmp_path / "maillog") as plain:
        config = relay_config(plain)
        server = serve(config)
        rcpt = "erin+dsn@example.net"
        envid = f"dsn relayed {uuid.uuid4().hex}"  # a space: xtext-encoded as +20
        message, message_id = compose("dsn relayed", [rcpt])
        submit_dsn(server, ca, message, [rcpt], envid=envid, notify="SUCCESS,FAILURE")
        (report,) = wait_for_reports(plain, server, message_id, 1)
        wait_for_empty_queue(queue_list, config, server)
        time.sleep(1)
        assert len(reports(plain, message_id)) == 1, explain(server, plain)
    keep(report, tmp_path, "relayed-by-submitd")
    per_message, (status,) = reported_by(report)
    assert field(per_message, "X-Submitd-Queue-ID")  # submitd's own report
    assert field(per_message, "Original-Envelope-Id") == xtext(envid)
    assert field(status, "Action") == "relayed"
    assert field(status, "Status").startswith("2.")
    assert field(status, "Final-Recipient") == f"rfc822; {rcpt}"
    assert field(status, "Original-Recipient") == f"rfc822; {rcpt}"  # ORCPT, xtext-decoded
    assert "localhost" in field(status, "Remote-MTA")
    assert report.parsed["Subject"] == "Relayed Mail Report (no further notice will follow)"
    headers = [p for p in report.parsed.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert headers and message_id in str(headers[0].get_payload())
