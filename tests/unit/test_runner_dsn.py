"""The queue runner's reports honour the client's DSN requests (RFC 3461 §4, §6).

``NOTIFY`` per recipient decides which reports list it; ``RET`` whether a failure returns
the whole message; ``ENVID`` and ``ORCPT`` come back in the report's fields.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from submitd import DeliveryOutcome, DsnReturn, Envelope, MailParams, Recipient
from submitd.mailqueue import QueueRunner, Spool
from submitd.mailqueue import dsn as dsn_module
from submitd.protocol._replies import Reply
from tests.unit.test_dsn import ParsedReport, parse_report
from tests.unit.test_runner import (
    DEFERRED,
    MESSAGE,
    REFUSED,
    SENDER,
    FakeHooks,
    clock,
    queue_config,
    running,
)

RELAYED = Reply.make(250, "2.0.0", "Ok: queued as 4Xyz")

Rcpt = tuple[str, str | None]  # address, NOTIFY value (None: no NOTIFY)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", clock=clock)


async def commit(
    spool: Spool, *recipients: Rcpt, params: MailParams | None = None,
    orcpt: bool = False, message: bytes = MESSAGE,
) -> str:
    """Commit ``message`` from SENDER to ``recipients`` (with ORCPT=rfc822;ADDRESS if asked)."""
    incoming = await spool.open_incoming()
    await incoming.write(message)
    handle = await incoming.finish(max_header_size=65536)
    rcpts = []
    for address, notify in recipients:
        rparams: list[tuple[str, str]] = [] if notify is None else [("NOTIFY", notify)]
        if orcpt:
            rparams.append(("ORCPT", "rfc822;" + address.replace("+", "+2B")))
        rcpts.append(Recipient(address=address, params=tuple(rparams)))
    envelope = Envelope(sender=SENDER, recipients=tuple(rcpts), params=params or MailParams(),
                        username="a")
    return await incoming.commit(envelope, handle, session_info={"session_id": "S1"})


def answer_by_local_part(recipient: Recipient) -> DeliveryOutcome:
    """refused@ 550, later@ 451, maildir@ final delivery, passed@ relayed with DSN passed on,
    anything else relayed to a host without DSN. The sender (reports) gets a final delivery."""
    local = recipient.address.split("@")[0]
    if recipient.address == SENDER or local.startswith("maildir"):
        return DeliveryOutcome.delivered()
    if local.startswith("refused"):
        return DeliveryOutcome.permanent(REFUSED, remote="smtp.example.net")
    if local.startswith("later"):
        return DeliveryOutcome.temporary(DEFERRED, remote="smtp.example.net")
    if local.startswith("passed"):
        return DeliveryOutcome.delivered(RELAYED, remote="smtp.example.net", dsn_passed_on=True)
    return DeliveryOutcome.delivered(RELAYED, remote="smtp.example.net")


def reports(hooks: FakeHooks) -> list[ParsedReport]:
    """Every report the runner sent to the sender, in order."""
    return [parse_report(body) for (_, rcpts, _), body in zip(hooks.attempts, hooks.bodies,
                                                              strict=True)
            if rcpts == (SENDER,)]


def by_kind(found: list[ParsedReport]) -> tuple[ParsedReport, ParsedReport]:
    """The failure report and the other one, of two."""
    failure = [r for r in found if r.recipients[0]["Action"] == "failed"]
    other = [r for r in found if r.recipients[0]["Action"] != "failed"]
    assert len(failure) == len(other) == 1, [listed(r) for r in found]
    return failure[0], other[0]


def listed(report: ParsedReport) -> list[tuple[str, str]]:
    return [(r["Final-Recipient"].removeprefix("rfc822; "), r["Action"])
            for r in report.recipients]


async def run_until_idle(spool: Spool, hooks: FakeHooks, tmp_path: Path, results: int,
                         **config: object) -> None:
    runner = QueueRunner(spool, hooks, queue_config(tmp_path, **config), hostname="mx.test",
                         clock=clock)
    async with running(runner):
        await hooks.wait_results(results)
        await trio.sleep(600)  # nothing more is sent after that


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        (None, [[("refused@example.net", "failed")]]),
        ("FAILURE", [[("refused@example.net", "failed")]]),
        ("SUCCESS,FAILURE", [[("refused@example.net", "failed")]]),
        ("SUCCESS", []),
        ("DELAY", []),
        ("NEVER", []),
    ],
)
async def test_failure_is_reported_only_when_notify_allows_it(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock,
    notify: str | None, expected: list[list[tuple[str, str]]],
) -> None:
    await spool.recover()
    await commit(spool, ("refused@example.net", notify))
    hooks = FakeHooks(answer_by_local_part)
    await run_until_idle(spool, hooks, tmp_path, results=1 + len(expected))
    assert [listed(r) for r in reports(hooks)] == expected
    assert await spool.queued_ids() == []


async def test_one_failure_report_lists_only_the_recipients_that_asked(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    await commit(spool, ("refused1@example.net", "NEVER"), ("refused2@example.net", None),
                 ("refused3@example.net", "FAILURE,DELAY"), ("refused4@example.net", "SUCCESS"))
    hooks = FakeHooks(answer_by_local_part)
    await run_until_idle(spool, hooks, tmp_path, results=5)
    (bounce,) = reports(hooks)
    assert listed(bounce) == [("refused2@example.net", "failed"),
                              ("refused3@example.net", "failed")]


async def test_success_is_reported_as_delivered_or_relayed_unless_the_next_hop_reports(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    await commit(
        spool,
        ("maildir@example.org", "SUCCESS"),          # final delivery: delivered
        ("relay@example.net", "SUCCESS,FAILURE"),    # next hop without DSN: relayed
        ("passed@example.net", "SUCCESS"),           # next hop took NOTIFY over: its report
        ("quiet@example.net", None),                 # no SUCCESS asked: nothing
        ("refused@example.net", "SUCCESS,FAILURE"),  # failed in the same attempt: a bounce
        orcpt=True,
    )
    hooks = FakeHooks(answer_by_local_part)
    await run_until_idle(spool, hooks, tmp_path, results=7)
    bounce, success = by_kind(reports(hooks))
    assert listed(bounce) == [("refused@example.net", "failed")]
    assert listed(success) == [("maildir@example.org", "delivered"),
                               ("relay@example.net", "relayed")]
    delivered, relayed = success.recipients
    assert (delivered["Status"], delivered["Remote-MTA"]) == ("2.0.0", None)
    assert (relayed["Status"], relayed["Remote-MTA"]) == ("2.0.0", "dns; smtp.example.net")
    assert relayed["Original-Recipient"] == "rfc822; relay@example.net"
    assert success.message["Subject"] == "Relayed Mail Report (no further notice will follow)"
    assert "Subject: hi" in success.headers and success.returned is None


async def test_nothing_is_reported_when_the_next_hop_took_the_dsn_request_over(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    await commit(spool, ("passed@example.net", "SUCCESS,FAILURE,DELAY"))
    hooks = FakeHooks(answer_by_local_part)
    await run_until_idle(spool, hooks, tmp_path, results=1)
    assert reports(hooks) == [] and len(hooks.attempts) == 1


@pytest.mark.parametrize(
    ("notify", "warned"),
    [(None, True), ("DELAY", True), ("FAILURE,DELAY", True), ("FAILURE", False),
     ("SUCCESS", False), ("NEVER", False)],
)
async def test_delay_warning_once_only_for_recipients_that_asked_for_delays(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock,
    notify: str | None, warned: bool,
) -> None:
    await spool.recover()
    queue_id = await commit(spool, ("later@example.net", notify), ("later2@example.net", "NEVER"))
    hooks = FakeHooks(answer_by_local_part)
    runner = QueueRunner(spool, hooks, queue_config(tmp_path, retry=(60.0,), delay_warning=100.0),
                         clock=clock)
    async with running(runner):
        await hooks.wait_attempts(8)
    delays = reports(hooks)
    assert [listed(r) for r in delays] == ([[("later@example.net", "delayed")]] if warned else [])
    # The decision is made once per message, whether or not anyone was told.
    assert (await spool.load_record(queue_id)).delay_warned


async def test_ret_full_returns_the_whole_message_in_a_failure_report(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    await commit(spool, ("refused@example.net", None), ("relay@example.net", "SUCCESS"),
                 params=MailParams(ret=DsnReturn.FULL, envid="batch+7 a"))
    hooks = FakeHooks(answer_by_local_part)
    await run_until_idle(spool, hooks, tmp_path, results=4)
    bounce, success = by_kind(reports(hooks))
    assert bounce.returned is not None and bounce.headers == ""
    assert bounce.returned["Subject"] == "hi"
    assert bounce.returned.get_content().splitlines() == ["hello"]
    # A success report returns the header section whatever RET says (RFC 3461 §4.3).
    assert success.returned is None and "Subject: hi" in success.headers
    for report in (bounce, success):
        assert report.per_message["Original-Envelope-Id"] == "batch+2B7+20a"


@pytest.mark.parametrize("ret", [DsnReturn.HDRS, None])
async def test_ret_hdrs_or_no_ret_returns_the_header_section_only(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, ret: DsnReturn | None
) -> None:
    await spool.recover()
    await commit(spool, ("refused@example.net", None), params=MailParams(ret=ret))
    hooks = FakeHooks(answer_by_local_part)
    await run_until_idle(spool, hooks, tmp_path, results=2)
    (bounce,) = reports(hooks)
    assert bounce.returned is None and "Subject: hi" in bounce.headers
    assert "hello" not in bounce.message.as_string()
    assert bounce.per_message["Original-Envelope-Id"] is None


async def test_ret_full_for_a_message_over_the_limit_returns_headers_and_says_why(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dsn_module, "MAX_RETURNED_SIZE", 1024 * 1024)
    await spool.recover()
    big = MESSAGE + b"x" * 900 + b"\r\n"
    big += b"".join([b"y" * 900 + b"\r\n"] * 1200)
    await commit(spool, ("refused@example.net", None), params=MailParams(ret=DsnReturn.FULL),
                 message=big)
    hooks = FakeHooks(answer_by_local_part)
    await run_until_idle(spool, hooks, tmp_path, results=2)
    (bounce,) = reports(hooks)
    assert bounce.returned is None and "Subject: hi" in bounce.headers
    assert f"larger than 1 MiB ({len(big)} bytes)" in " ".join(bounce.text.split())


async def test_delete_with_bounce_honours_notify_never(
    spool: Spool, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    await spool.recover()
    never = await commit(spool, ("later@example.net", "NEVER"))
    told = await commit(spool, ("later@example.net", None))
    hooks = FakeHooks(answer_by_local_part)
    runner = QueueRunner(spool, hooks, queue_config(tmp_path, retry=(3600.0,)), clock=clock)
    async with running(runner):
        await hooks.wait_results(2)
        assert await runner.delete(never, bounce=True) is None
        assert await runner.delete(told, bounce=True) is not None
        while not [r for _, r, _ in hooks.results if r.address == SENDER]:
            await hooks.wait_results(len(hooks.results) + 1)
    (bounce,) = reports(hooks)
    assert listed(bounce) == [("later@example.net", "failed")]
