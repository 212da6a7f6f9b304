"""A burst of submissions while ``submitd serve`` is killed with SIGKILL and the smarthost is down.

Twenty clients (threads with smtplib: STARTTLS with the certificate verified, AUTH PLAIN) submit
200 messages with unique Message-IDs. ``submitd serve`` is killed with ``kill -9`` twice at random
moments (seeded: the seed is printed, ``SUBMITD_BURST_SEED`` repeats a run) and restarted on the
same config and spool; the Postfix smarthost is stopped for part of the time, so one kill hits a
queue full of deferred mail. When the queue has drained:

- every message that got ``250`` to its DATA arrived at Postfix (counted by Message-ID);
- no message that got a ``4xx``/``5xx`` to its DATA arrived;
- a message whose client got no reply (the kill cut the session after the data was sent) may or
  may not have arrived: the server may have committed it;
- duplicates come only from delivery attempts in flight at a kill, so there are at most
  ``kills * max_parallel`` of them.

A client retries a message only when it failed before the data went out (connect, TLS, AUTH,
MAIL, RCPT), which can never duplicate it. The figures are printed and written as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import smtplib
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import pytest

from submitd.testing import TestCA
from tests.external.postfix_sink import PostfixSink
from tests.support import PASSWORD, SENDER, USER, ServerProcess

pytestmark = pytest.mark.external

CLIENTS = 20
MESSAGES = 200
KILLS = 2
MAX_PARALLEL = 8
RESTART_WAIT = 60.0  # how long a client waits for the server to come back
NO_REPLY = "no reply"


@dataclass
class Live:
    """Where the current server listens; clients wait on ``cond`` for a restart."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    port: int = 0
    generation: int = 0
    up: bool = False
    outcomes: dict[str, str] = field(default_factory=dict)  # Message-ID -> "250" / "451" / ...
    errors: list[str] = field(default_factory=list)
    reconnects: int = 0  # sessions cut before the data went out (the message was tried again)

    def current(self) -> tuple[int, int]:
        """Wait until a server is up; return its port and generation."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.up, timeout=RESTART_WAIT):
                raise TimeoutError("the server did not come back")
            return self.port, self.generation

    def after(self, generation: int) -> None:
        """Wait until a server newer than ``generation`` is up (the old one was killed)."""
        with self.cond:
            self.reconnects += 1
            if not self.cond.wait_for(
                lambda: self.up and self.generation != generation, timeout=RESTART_WAIT
            ):
                raise TimeoutError(f"a session failed but the server was not restarted:\n{self}")

    def record(self, message_id: str, outcome: str) -> None:
        """Note the final outcome of one message and wake the controller."""
        with self.cond:
            self.outcomes[message_id] = outcome
            self.cond.notify_all()

    def set_server(self, port: int | None) -> None:
        """A new server is up on ``port``, or (None) the current one is about to be killed."""
        with self.cond:
            if port is None:
                self.up = False
            else:
                self.port, self.up = port, True
                self.generation += 1
            self.cond.notify_all()

    def fail(self, error: str) -> None:
        """A client gave up: note why and wake the controller."""
        with self.cond:
            self.errors.append(error)
            self.cond.notify_all()

    def wait_done(self, count: int, timeout: float) -> None:
        """Wait until ``count`` messages have an outcome (or a client gave up)."""
        with self.cond:
            if not self.cond.wait_for(
                lambda: len(self.outcomes) >= count or self.errors, timeout=timeout
            ):
                raise TimeoutError(f"only {len(self.outcomes)} of {count} submissions finished")


def message(n: int) -> tuple[str, str, bytes]:
    """Message ``n``: its Message-ID, recipient and bytes."""
    message_id = make_msgid(idstring=f"burst{n}", domain="test.example")
    rcpt = f"burst{n}@example.net"
    data = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: burst {n}\r\nDate: {formatdate()}\r\n"
        f"Message-ID: {message_id}\r\n\r\nmessage {n} of the burst\r\n"
    ).encode()
    return message_id, rcpt, data


def session(port: int, context: ssl.SSLContext) -> smtplib.SMTP:
    """A submission session: STARTTLS (verified) and AUTH PLAIN."""
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        smtp.starttls(context=context)
        smtp.login(USER, PASSWORD)
    except BaseException:
        smtp.close()
        raise
    return smtp


def client(live: Live, context: ssl.SSLContext, batch: list[tuple[str, str, bytes]]) -> None:
    """Submit ``batch`` over one session, reconnecting after the server was killed."""
    smtp: smtplib.SMTP | None = None
    generation = 0
    try:
        for message_id, rcpt, data in batch:
            refusals = 0
            while True:
                try:
                    if smtp is None:
                        port, generation = live.current()
                        smtp = session(port, context)
                    code, _ = smtp.mail(SENDER)
                    if code == 250:
                        code, _ = smtp.rcpt(rcpt)
                    if code not in (250, 251):
                        refusals += 1
                        if code >= 500 or refusals > 20:  # never sent: it must never arrive
                            smtp.rset()
                            live.record(message_id, str(code))
                            break
                        smtp.rset()  # nothing was sent: try the same message again
                        continue
                except (OSError, smtplib.SMTPException):
                    # Before DATA: nothing can have been committed; retry on the next server.
                    if smtp is not None:
                        smtp.close()
                    smtp = None
                    live.after(generation)
                    continue
                try:
                    code, _ = smtp.data(data)
                except smtplib.SMTPDataError as exc:  # DATA itself refused: nothing sent
                    live.record(message_id, str(exc.smtp_code))
                except (OSError, smtplib.SMTPException):
                    # The data may have been committed before the kill cut the reply.
                    live.record(message_id, NO_REPLY)
                    smtp.close()
                    smtp = None
                    live.after(generation)
                else:
                    live.record(message_id, str(code))
                break
        if smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()  # killed after our last message: nothing left to say
    except Exception as exc:  # surfaced by the test
        live.fail(f"{type(exc).__name__}: {exc}")
    finally:
        if smtp is not None:
            smtp.close()


def last_states(log: str) -> dict[str, str]:
    """Queue ID -> how the last delivery attempt in ``log`` ended: "delivered", "deferred", ...,
    or "open" when the log ends before its outcome (the server was killed)."""
    states: dict[str, str] = {}
    outcome = re.compile(
        r"submitd\.queue event=(delivered|deferred|failed|expired) queue_id=(\S+)"
    )
    for line in log.splitlines():
        if match := re.search(r"submitd\.plugins\.smarthost event=\S+ queue_id=(\S+)", line):
            states[match.group(1)] = "open"
        elif match := outcome.search(line):
            states[match.group(2)] = match.group(1)
    return states


def delivered_twice(log: str) -> list[tuple[str, str]]:
    """(queue ID, recipient) pairs one server life delivered more than once."""
    pairs = Counter(re.findall(r"event=delivered queue_id=(\S+) rcpt=(\S+)", log))
    return [pair for pair, count in pairs.items() if count > 1]


def queue_ids(logs: list[str]) -> dict[str, set[str]]:
    """Recipient address -> the queue IDs the runner logged an outcome for."""
    found: dict[str, set[str]] = {}
    for log in logs:
        for qid, rcpt in re.findall(r"event=\w+ queue_id=(\S+) rcpt=(\S+)", log):
            found.setdefault(rcpt, set()).add(qid)
    return found


def test_burst_with_two_sigkills_and_a_smarthost_outage_loses_nothing(
    smarthost: PostfixSink,
    relay_config: Callable[..., Path],
    ca: TestCA,
    queue_list: Callable[[Path], list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("SUBMITD_BURST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nburst seed {seed} (SUBMITD_BURST_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    # Kill 1 with the smarthost up (deliveries in flight), kill 2 while it is down.
    kill_at = sorted([rng.randint(25, 70), rng.randint(110, 150)])
    outage = (rng.randint(80, 100), rng.randint(160, 185))
    config = relay_config(smarthost, queue={"max_parallel": MAX_PARALLEL})
    messages = [message(n) for n in range(MESSAGES)]
    live = Live()
    servers = [ServerProcess(config)]
    live.set_server(servers[-1].ports["starttls"])
    context = ca.client_context()
    threads = [
        threading.Thread(target=client, args=(live, context, messages[i::CLIENTS]), daemon=True)
        for i in range(CLIENTS)
    ]
    began = time.monotonic()
    outage_began = outage_ended = 0.0
    try:
        for thread in threads:
            thread.start()
        events = sorted(
            [(k, "kill") for k in kill_at] + [(outage[0], "stop"), (outage[1], "start")]
        )
        for done, action in events:
            live.wait_done(done, timeout=60)
            assert not live.errors, live.errors
            if action == "stop":
                smarthost.stop()
                outage_began = time.monotonic()
            elif action == "start":
                smarthost.start()
                outage_ended = time.monotonic()
            else:
                time.sleep(rng.uniform(0, 0.2))  # a random moment, not a quiet one
                live.set_server(None)
                assert servers[-1].stop(signal.SIGKILL) == -signal.SIGKILL
                servers.append(ServerProcess(config))  # same config, same spool
                live.set_server(servers[-1].ports["starttls"])
        for thread in threads:
            thread.join(timeout=RESTART_WAIT)
        assert not live.errors, live.errors
        assert not any(t.is_alive() for t in threads)
        submitted = time.monotonic()
        outcomes = dict(live.outcomes)
        assert len(outcomes) == MESSAGES
        accepted = {mid for mid, result in outcomes.items() if result == "250"}
        refused = {mid for mid, result in outcomes.items() if result not in ("250", NO_REPLY)}
        # Drained: every accepted message arrived and the queue is empty.
        ours = {mid for mid, _, _ in messages}
        deadline = time.monotonic() + 60
        while True:
            arrived = Counter(m.message_id for m in smarthost.messages())
            if accepted <= set(arrived) and not queue_list(config):
                break
            assert time.monotonic() < deadline, (
                f"not drained: {len(accepted - set(arrived))} accepted messages missing, "
                f"{len(queue_list(config))} queued\n{servers[-1].text()}"
            )
            time.sleep(0.2)
        drained = time.monotonic()
        arrived = Counter(m.message_id for m in smarthost.messages() if m.message_id in ours)
    finally:
        if not smarthost.running:
            smarthost.start()
        final = servers[-1].stop(signal.SIGTERM)
    assert final == 0, servers[-1].text()
    duplicates = sum(count - 1 for count in arrived.values())
    logs = [server.text() for server in servers]
    # What the killed servers were doing: an attempt whose outcome was not logged, or one that
    # was logged as delivered but maybe not yet written to the spool, may be repeated after the
    # restart. Those are the only duplicates allowed.
    killed = [last_states(log) for log in logs[:-1]]
    unfinished = sum(list(states.values()).count("open") for states in killed)
    maybe_repeated = {qid for states in killed for qid, st in states.items() if st != "deferred"}
    rcpt_of = {mid: rcpt for mid, rcpt, _ in messages}
    ids_of = queue_ids(logs)
    queued_twice = {rcpt: ids for rcpt, ids in ids_of.items() if len(ids) > 1}
    unexplained = [
        mid
        for mid, count in arrived.items()
        if count > 1 and not ids_of.get(rcpt_of[mid], set()) & maybe_repeated
    ]
    no_reply = {mid for mid, result in outcomes.items() if result == NO_REPLY}
    figures = {
        "seed": seed,
        "clients": CLIENTS,
        "sent": MESSAGES,
        "accepted_250": len(accepted),
        "refused_4xx_5xx": len(refused),
        "no_reply": len(no_reply),
        "no_reply_delivered": len(no_reply & set(arrived)),
        "sessions_cut": live.reconnects,
        "kills": len(kill_at),
        "max_parallel": MAX_PARALLEL,
        "delivered_distinct": len(arrived),
        "delivered_total": sum(arrived.values()),
        "duplicates": duplicates,
        "attempts_without_outcome_at_kills": unfinished,
        "outage_seconds": round(outage_ended - outage_began, 2),
        "submission_seconds": round(submitted - began, 2),
        "drain_seconds_after_outage": round(drained - outage_ended, 2),
    }
    print("burst figures: " + json.dumps(figures, indent=2))
    (tmp_path / "burst-figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    for log in logs:
        assert "Traceback" not in log, log
    assert not accepted - set(arrived), f"lost: {sorted(accepted - set(arrived))}"
    assert not refused & set(arrived), f"refused but delivered: {sorted(refused & set(arrived))}"
    # A duplicate is a delivery attempt that reached Postfix but whose outcome the kill kept
    # from being recorded: never within one server life, at most max_parallel per kill.
    assert not queued_twice, f"one submission, several queue entries: {queued_twice}"
    assert not [pair for log in logs for pair in delivered_twice(log)]
    assert not unexplained, f"duplicates no killed server was delivering: {unexplained}"
    assert duplicates <= KILLS * MAX_PARALLEL, figures
