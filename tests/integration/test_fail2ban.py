"""The shipped fail2ban filter, run by fail2ban itself over what a real server logged.

A real ``submitd serve`` logs to a file exactly as an operator sees it on stderr (the format of
``setup_logging``); two logins fail and one succeeds. ``fail2ban-regex`` must count exactly the
two failures, for 127.0.0.1, and nothing else: not the good login, not the other events, and
not an address a client hid in its login name. The same lines are then matched in the shape
fail2ban's journal backend (``backend = systemd``) gives them to the filter.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from submitd.testing import TestCA
from tests.support import PASSWORD, USER, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "deploy" / "fail2ban" / "filter.d" / "submitd.conf"
JAIL = ROOT / "deploy" / "fail2ban" / "jail.d" / "submitd.local"
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter Debian's fail2ban package runs on

# A login name that tries to plant another address where a filter might look for one.
SNEAKY = 'x" peer=10.9.9.9 mechanism=PLAIN reply=535'

# fail2ban's journal backend hands the filter "HOST IDENT[PID]: MESSAGE" with the entry's time
# kept apart (FilterSystemd.formatJournalEntry); fail2ban-regex does the same for
# `systemd-journal`. This feeds such entries through fail2ban's own matching code.
JOURNAL_RUNNER = """
import sys, time
from fail2ban.client.fail2banregex import Fail2banRegex, get_opt_parser
opts, _ = get_opt_parser().parse_args(["-o", "ip"])
regex = Fail2banRegex(opts)
assert regex.readRegex(sys.argv[1], "fail")
regex.setDatePattern(None)  # as for systemd-journal: the journal supplies the time
now = time.time()
entries = [(("", time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(now)),
             "mail submitd[4711]: " + line), now) for line in sys.stdin.read().splitlines()]
regex.process(entries)
"""


def fail2ban_regex() -> str:
    path = shutil.which("fail2ban-regex")
    if path is None:
        pytest.fail("fail2ban-regex is missing: apt-get install fail2ban")
    return path


def failed_login(port: int, context: ssl.SSLContext, user: str, password: str,
                 mechanism: str) -> int:
    with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30) as client:
        client.ehlo("client.test")
        client.user, client.password = user, password
        auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.auth(mechanism, auth)
        return info.value.smtp_code


def test_filter_matches_exactly_the_failed_logins_with_the_client_address(
    make_config: Callable[..., Path], ca: TestCA, tmp_path: Path,
) -> None:
    program = fail2ban_regex()
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    server = ServerProcess(make_config())
    try:
        port = server.ports["implicit"]
        assert failed_login(port, context, USER, "not the password", "PLAIN") == 535
        assert failed_login(port, context, SNEAKY, "guess", "LOGIN") == 535
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30) as client:
            client.login(USER, PASSWORD)
        server.wait_for_log("event=auth_ok")
        server.wait_for_log("event=auth_failed", count=2)
    finally:
        assert server.stop() == 0

    log = tmp_path / "submitd.log"
    shutil.copyfile(server.log_path, log)
    lines = log.read_text().splitlines()
    failed = [line for line in lines if " event=auth_failed " in line]
    assert len(failed) == 2
    # The line as an operator reads it (and as the filter's comment documents it).
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d WARNING submitd\.session event=auth_failed"
        r" session=\S+ peer=127\.0\.0\.1 user=\S.* mechanism=(PLAIN|LOGIN) reply=535",
        failed[0],
    ), failed[0]
    assert any("event=auth_ok" in line for line in lines)
    others = len(lines) - len(failed)
    assert others > 5  # listening, ready, connections, auth_ok, shutdown, ...

    report = subprocess.run(
        [program, "--print-all-matched", "--print-no-missed", str(log), str(FILTER)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    counts = re.search(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed", report)
    assert counts is not None, report
    assert tuple(map(int, counts.groups())) == (len(lines), 0, 2, others), report
    matched = re.search(r"\|- Matched line\(s\):\n((?:\|  .*\n)+)", report)
    assert matched is not None, report
    assert [m[3:] for m in matched.group(1).splitlines()] == failed

    hosts = subprocess.run(
        [program, "-o", "ip", str(log), str(FILTER)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    assert hosts == ["127.0.0.1", "127.0.0.1"]

    journal = subprocess.run(
        [SYSTEM_PYTHON, "-c", JOURNAL_RUNNER, str(FILTER)], input="\n".join(lines),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    assert journal == ["127.0.0.1", "127.0.0.1"]


def test_jail_loads_in_fail2ban_once_enabled(tmp_path: Path) -> None:
    fail2ban_regex()  # the same package
    client = shutil.which("fail2ban-client")
    assert client is not None
    assert "\nenabled = false\n" in JAIL.read_text()  # off until the operator turns it on
    # fail2ban's own configuration check over a copy of the system's configuration with the
    # jail turned on (and Debian's sshd jail off: this machine may have no sshd log).
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    shutil.copy(FILTER, conf / "filter.d" / "submitd.conf")
    (conf / "jail.d" / "submitd.local").write_text(
        JAIL.read_text().replace("\nenabled = false\n", "\nenabled = true\n"))
    (conf / "jail.d" / "zz-test.local").write_text("[sshd]\nenabled = false\n")
    check = subprocess.run([client, "-c", str(conf), "-t"], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    dump = subprocess.run([client, "-c", str(conf), "-d"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert "['add', 'submitd', 'systemd']" in dump
    assert "['set', 'submitd', 'addjournalmatch', '_SYSTEMD_UNIT=submitd.service']" in dump
    assert "['set', 'submitd', 'maxretry', 5]" in dump
    assert "['port', 'submission,submissions']" in dump
    assert "'nftables-multiport'" in dump
