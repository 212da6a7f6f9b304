"""Real clients — swaks, msmtp, curl, Python's smtplib — through both ports of a real
``submitd serve`` process, AUTH with the certificate verified; the message is read back from the
maildir."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest

from submitd.testing import TestCA
from tests.support import PASSWORD, RECIPIENT, SENDER, USER, ServerProcess, wait_for_mail_sync

pytestmark = pytest.mark.external

MODES = ["starttls", "implicit"]


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:  # .ci/run installs these; a missing one is a broken setup, not a skip
        pytest.fail(f"{program} is not installed (see .ci/run)")
    return path


def message_file(tmp_path: Path, subject: str) -> Path:
    path = tmp_path / f"{subject}.eml"
    path.write_bytes(
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n\r\n"
        f"body of {subject}\r\n.starts with a dot\r\n".encode()
    )
    return path


def delivered(maildir: Path, subject: str) -> bytes:
    (stored,) = wait_for_mail_sync(maildir)
    assert f"Subject: {subject}\r\n".encode() in stored
    assert f"Return-Path: <{SENDER}>".encode() in stored
    return stored


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False,
                            **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{args[0]} exited {result.returncode}:\n{result.stdout}\n" \
                                   f"{result.stderr}"
    return result


@pytest.mark.parametrize("mode", MODES)
def test_swaks(served: ServerProcess, ca: TestCA, maildir: Path, mode: str) -> None:
    subject = f"swaks-{mode}-{uuid.uuid4().hex[:8]}"
    run([need("swaks"), "--server", "127.0.0.1", "--port", str(served.ports[mode]),
         "--tls-on-connect" if mode == "implicit" else "--tls",
         "--tls-verify", "--tls-ca-path", str(ca.ca_path),
         "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
         "--from", SENDER, "--to", RECIPIENT, "--header", f"Subject: {subject}"])
    delivered(maildir, subject)


@pytest.mark.parametrize("mode", MODES)
def test_msmtp(served: ServerProcess, ca: TestCA, maildir: Path, tmp_path: Path,
               mode: str) -> None:
    subject = f"msmtp-{mode}"
    msg = message_file(tmp_path, subject)
    (tmp_path / "pw").write_text(PASSWORD)
    with msg.open("rb") as stdin:
        run([need("msmtp"), "-C", "/dev/null", "--host=localhost",
             f"--port={served.ports[mode]}", "--tls=on",
             f"--tls-starttls={'on' if mode == 'starttls' else 'off'}",
             f"--tls-trust-file={ca.ca_path}", "--auth=plain", f"--user={USER}",
             f"--passwordeval=cat {tmp_path / 'pw'}", f"--from={SENDER}", RECIPIENT],
            stdin=stdin)
    stored = delivered(maildir, subject)
    assert b"\r\n.starts with a dot\r\n" in stored


@pytest.mark.parametrize("mode", MODES)
def test_curl(served: ServerProcess, ca: TestCA, maildir: Path, tmp_path: Path,
              mode: str) -> None:
    subject = f"curl-{mode}"
    msg = message_file(tmp_path, subject)
    scheme = "smtps" if mode == "implicit" else "smtp"
    run([need("curl"), "-sS", "--ssl-reqd", "--cacert", str(ca.ca_path),
         "--url", f"{scheme}://localhost:{served.ports[mode]}",
         "--user", f"{USER}:{PASSWORD}", "--login-options", "AUTH=PLAIN",
         "--mail-from", SENDER, "--mail-rcpt", RECIPIENT, "--upload-file", str(msg)])
    stored = delivered(maildir, subject)
    assert b"\r\n.starts with a dot\r\n" in stored


@pytest.mark.parametrize("mode", MODES)
def test_python_smtplib(served: ServerProcess, ca: TestCA, maildir: Path, mode: str) -> None:
    subject = f"smtplib-{mode}"
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, RECIPIENT, subject
    msg.set_content("Sent by smtplib.\n")
    port = served.ports[mode]
    if mode == "implicit":
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as smtp:
            smtp.login(USER, PASSWORD)
            smtp.send_message(msg)
    else:
        with smtplib.SMTP("localhost", port, timeout=30) as smtp:
            smtp.starttls(context=context)
            smtp.login(USER, PASSWORD)
            smtp.send_message(msg)
    delivered(maildir, subject)


def test_smtplib_refuses_a_server_whose_certificate_it_cannot_verify(served: ServerProcess
                                                                     ) -> None:
    context = ssl.create_default_context()  # the system store does not know the test CA
    with smtplib.SMTP("localhost", served.ports["starttls"], timeout=30) as smtp, \
            pytest.raises(ssl.SSLCertVerificationError):
        smtp.starttls(context=context)


def test_swaks_without_auth_is_refused_530(served: ServerProcess, ca: TestCA) -> None:
    result = subprocess.run(
        [need("swaks"), "--server", "127.0.0.1", "--port", str(served.ports["implicit"]),
         "--tls-on-connect", "--tls-verify", "--tls-ca-path", str(ca.ca_path),
         "--from", SENDER, "--to", RECIPIENT], capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 23 or result.returncode == 28, result.stdout
    assert "530 5.7.0" in result.stdout
