"""A real Postfix acting as a null client relays its mail through ``submitd serve``.

Postfix's smtp client is the strictest common relay client: it verifies the certificate for the
name ``localhost`` against the test CA (``smtp_tls_security_level = secure``), authenticates with
AUTH PLAIN from its password map, and treats a refusal the way a production MTA does. Both listener
kinds are driven: STARTTLS (port-587 style) and implicit TLS (``smtp_tls_wrappermode``, port-465
style). The message is submitted with Postfix's own ``sendmail`` and read back from the maildir.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from submitd.testing import TestCA
from tests.external.postfix_support import PostfixClient, null_client
from tests.support import PASSWORD, RECIPIENT, SENDER, USER, ServerProcess, wait_for_mail_sync

pytestmark = pytest.mark.external

MODES = ["starttls", "implicit"]


def message(subject: str) -> bytes:
    # Local submission format: LF line ends; -i keeps the lone-dot-looking line as text.
    return (
        f"From: <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: {subject}\n\n"
        f"relayed by postfix\n.starts with a dot\n"
    ).encode()


def delivered(maildir: Path, postfix: PostfixClient, server: ServerProcess) -> bytes:
    try:
        (stored,) = wait_for_mail_sync(maildir, timeout=30)
    except TimeoutError:
        pytest.fail(
            f"nothing delivered\n--- postfix:\n{postfix.log()}\n{postfix.queue()}\n"
            f"--- submitd:\n{server.text()}"
        )
    return stored


@pytest.mark.parametrize("mode", MODES)
def test_postfix_null_client_relays_with_verified_tls_and_auth_plain(
    served: ServerProcess, ca: TestCA, maildir: Path, tmp_path: Path, mode: str
) -> None:
    subject = f"postfix-{mode}-{uuid.uuid4().hex[:8]}"
    port = served.ports[mode]
    with null_client(
        relay_port=port,
        ca_file=ca.ca_path,
        user=USER,
        password=PASSWORD,
        wrappermode=mode == "implicit",
        keep_log=tmp_path / "postfix.log",
    ) as pf:
        pf.sendmail(message(subject), sender=SENDER, recipient=RECIPIENT)
        stored = delivered(maildir, pf, served)
        sent = pf.wait_for_log(r"status=sent")
        queue_id = sent.split("]: ", 1)[1].split(":", 1)[0]
        pf.wait_for_log(rf"{queue_id}: removed")  # nothing left for Postfix to retry
        postfix_log = pf.log()
        assert "Mail queue is empty" in pf.queue()
    assert f"Subject: {subject}\r\n".encode() in stored
    assert f"Return-Path: <{SENDER}>".encode() in stored
    assert b"\r\n.starts with a dot\r\n" in stored  # Postfix dot-stuffed it, submitd undid it
    # Postfix's own verdict: the chain and the name "localhost" checked against the test CA.
    assert re.search(
        rf"Verified TLS connection established to localhost\[127\.0\.0\.1\]:{port}: "
        r"TLSv1\.[23]",
        postfix_log,
    ), postfix_log
    assert f"relay=localhost[127.0.0.1]:{port}" in sent and "dsn=2.0.0" in sent, sent
    served.wait_for_log(r"event=tls .*version=TLSv1\.[23]")
    served.wait_for_log(rf"event=auth_ok .*user={USER}")


@pytest.mark.parametrize("mode", MODES)
def test_postfix_keeps_mail_deferred_when_submitd_refuses_its_password_with_535(
    served: ServerProcess, ca: TestCA, maildir: Path, tmp_path: Path, mode: str
) -> None:
    with null_client(
        relay_port=served.ports[mode],
        ca_file=ca.ca_path,
        user=USER,
        password="wrong " + PASSWORD,
        wrappermode=mode == "implicit",
        keep_log=tmp_path / "postfix.log",
    ) as pf:
        pf.sendmail(message("refused"), sender=SENDER, recipient=RECIPIENT)
        deferred = pf.wait_for_log(r"status=deferred")
        queue_id = deferred.split("]: ", 1)[1].split(":", 1)[0]
        # No "*" (active) or "!" (held) after the id: it sits in the deferred queue.
        queue = pf.wait_for_queue(rf"(?m)^{queue_id}\s[^\n]*\n\s*\(SASL[^)]*535 5\.7\.8")
        postfix_log = pf.log()
    # smtp_sasl_auth_soft_bounce (on by default): Postfix turns our 535 5.7.8 into a 4.7.8
    # deferral and keeps the message for a later retry; it neither bounces nor drops it.
    assert "dsn=4.7.8" in deferred and "SASL authentication failed" in deferred, deferred
    assert "said: 535 5.7.8" in deferred, deferred
    assert RECIPIENT in queue and "Mail queue is empty" not in queue, queue
    assert "status=bounced" not in postfix_log and f"{queue_id}: removed" not in postfix_log
    served.wait_for_log(rf"event=auth_failed .*user={USER}")
    assert not (maildir / "new").exists() or not any((maildir / "new").iterdir())
