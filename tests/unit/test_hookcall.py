"""The async hook caller: pluggy's order, stop rules, deadlines, failures become PluginError."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pluggy
import pytest
import trio

from submitd import (
    DeliveryOutcome,
    Envelope,
    MailParams,
    Recipient,
    Reject,
    Reply,
    hookimpl,
    hookspec,
)
from submitd._hookcall import HookCaller, PluginDelivery
from submitd.config import Config, Limits, PluginsConfig, QueueConfig
from submitd.errors import PluginError
from submitd.message import MessageHandle


def make_config(**plugin_opts: object) -> Config:
    return Config(
        path=Path("/nonexistent/submitd.toml"),
        hostname="mx.test",
        listeners=(),
        tls=None,
        limits=Limits(),
        queue=QueueConfig(dir=Path("/nonexistent/spool")),
        plugins=PluginsConfig(**plugin_opts),  # type: ignore[arg-type]
    )


def make_caller(*plugins: tuple[str, object], **opts: object) -> HookCaller:
    pm = pluggy.PluginManager("submitd")
    pm.add_hookspecs(hookspec)
    for name, plugin in plugins:
        pm.register(plugin, name=name)
    return HookCaller(pm, make_config(**opts).plugins)


def refusal(value: object) -> Reply:
    if not isinstance(value, Reply):
        raise TypeError("not a Reply")
    return value


REFUSE = Reply.make(550, "5.7.1", "no")


class Accepting:
    @hookimpl
    def submitd_mail_from(self, session, sender, params):
        return None


class Refusing:
    @hookimpl
    async def submitd_mail_from(self, session, sender, params):
        await trio.sleep(0)
        return REFUSE


class Raising:
    @hookimpl
    async def submitd_mail_from(self, session, sender, params):
        raise RuntimeError("boom")


class Slow:
    @hookimpl
    async def submitd_mail_from(self, session, sender, params):
        await trio.sleep(3600)


class Rejecting:
    @hookimpl
    def submitd_mail_from(self, sender):
        raise Reject(Reply.make(553, "5.7.1", f"not {sender}"))


async def test_first_answer_stops_the_walk_in_pluggy_order() -> None:
    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str, answer: Reply | None) -> None:
            self.name, self.answer = name, answer

        @hookimpl
        def submitd_mail_from(self, sender):
            calls.append(self.name)
            return self.answer

    # pluggy calls the last registered plugin first.
    caller = make_caller(("a", Recorder("a", REFUSE)), ("b", Recorder("b", None)),
                         ("c", Recorder("c", None)))
    result = await caller.first("submitd_mail_from", refusal, session=None, sender="x@y.z",
                                params=MailParams())
    assert result == ("a", REFUSE)
    assert calls == ["c", "b", "a"]


async def test_plain_def_and_async_def_implementations_both_work() -> None:
    caller = make_caller(("sync", Accepting()), ("async", Refusing()))
    result = await caller.first("submitd_mail_from", refusal, session=None, sender="",
                                params=MailParams())
    assert result == ("async", REFUSE)


async def test_no_answer_means_none() -> None:
    caller = make_caller(("sync", Accepting()))
    assert await caller.first("submitd_mail_from", refusal, session=None, sender="",
                              params=MailParams()) is None


async def test_reject_exception_is_an_answer_and_args_are_passed_by_name() -> None:
    caller = make_caller(("rej", Rejecting()))
    result = await caller.first("submitd_mail_from", refusal, session=None, sender="a@b.c",
                                params=MailParams())
    assert result is not None
    assert result[1].code == 553 and "a@b.c" in result[1].text


async def test_exception_becomes_plugin_error_naming_the_plugin(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caller = make_caller(("exploder", Raising()))
    with caplog.at_level(logging.ERROR), pytest.raises(PluginError) as info:
        await caller.first("submitd_mail_from", refusal, session=None, sender="",
                           params=MailParams())
    assert info.value.plugin == "exploder"
    assert "plugin=exploder" in caplog.text and "hook=submitd_mail_from" in caplog.text


async def test_timeout_becomes_plugin_error(autojump_clock: trio.abc.Clock) -> None:
    caller = make_caller(("slow", Slow()), hook_timeout=2.0)
    start = trio.current_time()
    with pytest.raises(PluginError, match="timed out"):
        await caller.first("submitd_mail_from", refusal, session=None, sender="",
                           params=MailParams())
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_per_plugin_timeout_overrides_the_default(autojump_clock: trio.abc.Clock) -> None:
    caller = make_caller(("slow", Slow()), hook_timeout=100.0,
                         hook_timeouts=MappingProxyType({"slow": 0.5}))
    start = trio.current_time()
    with pytest.raises(PluginError):
        await caller.first("submitd_mail_from", refusal, session=None, sender="",
                           params=MailParams())
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_invalid_answer_is_a_plugin_error() -> None:
    class Wrong:
        @hookimpl
        def submitd_mail_from(self):
            return "550 no"

    caller = make_caller(("wrong", Wrong()))
    with pytest.raises(PluginError, match="invalid answer"):
        await caller.first("submitd_mail_from", refusal, session=None, sender="",
                           params=MailParams())


async def test_collect_skips_failing_plugins_and_keeps_the_rest() -> None:
    class Keywords:
        @hookimpl
        def submitd_ehlo_keywords(self):
            return ["DSN"]

    class Broken:
        @hookimpl
        def submitd_ehlo_keywords(self):
            raise ValueError("bad")

    caller = make_caller(("kw", Keywords()), ("broken", Broken()))
    assert await caller.collect("submitd_ehlo_keywords", session=None) == [("kw", ["DSN"])]


async def test_hook_wrappers_are_refused_at_start() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def submitd_mail_from(self):
            return (yield)

    with pytest.raises(ValueError, match="wrappers"):
        make_caller(("w", Wrapper()))


def _envelope() -> Envelope:
    recipients = (Recipient(address="x@one.example"), Recipient(address="y@two.example"))
    return Envelope(sender="a@b.example", recipients=recipients, params=MailParams(),
                    username="a", queue_id="Q1")


def _message(tmp_path: Path) -> MessageHandle:
    path = tmp_path / "m"
    path.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    return MessageHandle(path=path, size=19, headers=[("Subject", "x")], body_offset=13)


async def test_deliver_hands_each_recipient_to_the_first_plugin_that_takes_it(
    tmp_path: Path,
) -> None:
    seen: dict[str, list[str]] = {}

    class Local:
        @hookimpl
        def submitd_deliver(self, recipients):
            seen["local"] = [r.address for r in recipients]
            return {r.address: DeliveryOutcome.delivered() for r in recipients
                    if r.address.endswith("@one.example")}

    class Remote:
        @hookimpl
        async def submitd_deliver(self, recipients):
            seen["remote"] = [r.address for r in recipients]
            return {r.address: DeliveryOutcome.permanent(Reply.make(550, "5.1.1", "unknown"))
                    for r in recipients}

    # Local registered last, so it is asked first.
    caller = make_caller(("remote", Remote()), ("local", Local()))
    delivery = PluginDelivery(caller, make_config)
    recipients = (Recipient(address="x@one.example"), Recipient(address="y@two.example"))
    outcomes = await delivery.deliver(_envelope(), _message(tmp_path), recipients)
    assert seen == {"local": ["x@one.example", "y@two.example"], "remote": ["y@two.example"]}
    assert outcomes["x@one.example"].kind.value == "delivered"
    assert outcomes["y@two.example"].reply.code == 550


async def test_deliver_with_no_taker_is_temporary(tmp_path: Path) -> None:
    delivery = PluginDelivery(make_caller(), make_config)
    outcomes = await delivery.deliver(_envelope(), _message(tmp_path),
                                      (Recipient(address="x@one.example"),))
    assert outcomes["x@one.example"].kind.value == "temporary"
    assert outcomes["x@one.example"].reply.code == 451


async def test_deliver_plugin_crash_is_temporary_not_lost(tmp_path: Path) -> None:
    class Crash:
        @hookimpl
        def submitd_deliver(self):
            raise OSError("disk on fire")

    delivery = PluginDelivery(make_caller(("crash", Crash())), make_config)
    outcomes = await delivery.deliver(_envelope(), _message(tmp_path),
                                      (Recipient(address="x@one.example"),))
    assert outcomes["x@one.example"].kind.value == "temporary"


async def test_deliver_answer_that_is_not_an_outcome_is_an_error_naming_the_plugin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asked: list[str] = []

    class Sloppy:
        @hookimpl
        def submitd_deliver(self, recipients):
            return {"x@one.example": "delivered", "y@two.example": DeliveryOutcome.delivered()}

    class Next:
        @hookimpl
        def submitd_deliver(self, recipients):
            asked.extend(r.address for r in recipients)
            return {r.address: DeliveryOutcome.delivered() for r in recipients}

    delivery = PluginDelivery(make_caller(("next", Next()), ("sloppy", Sloppy())), make_config)
    with caplog.at_level(logging.ERROR, logger="submitd.plugins"):
        outcomes = await delivery.deliver(_envelope(), _message(tmp_path), _envelope().recipients)
    # The plugin took x (it may have delivered it): retried later, never handed on.
    assert (outcomes["x@one.example"].kind.value, outcomes["x@one.example"].reply.code) == (
        "temporary", 451
    )
    assert outcomes["y@two.example"].kind.value == "delivered"
    assert asked == []
    errors = [r.getMessage() for r in caplog.records]
    assert any("event=plugin_bad_answer" in e and "plugin=sloppy" in e for e in errors)


async def test_deliver_answer_for_a_recipient_not_offered_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Confused:
        @hookimpl
        def submitd_deliver(self, recipients):
            return {"someone@else.example": DeliveryOutcome.delivered(),
                    "x@one.example": DeliveryOutcome.delivered()}

    delivery = PluginDelivery(make_caller(("confused", Confused())), make_config)
    with caplog.at_level(logging.ERROR, logger="submitd.plugins"):
        outcomes = await delivery.deliver(_envelope(), _message(tmp_path), _envelope().recipients)
    assert set(outcomes) == {"x@one.example", "y@two.example"}
    assert outcomes["x@one.example"].kind.value == "delivered"
    assert outcomes["y@two.example"].kind.value == "temporary"  # nobody took it
    (error,) = [r.getMessage() for r in caplog.records if "plugin_bad_answer" in r.getMessage()]
    assert "plugin=confused" in error and "someone@else.example" in error


async def test_deliver_answer_that_is_not_a_mapping_fails_every_recipient_temporarily(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Listy:
        @hookimpl
        async def submitd_deliver(self, recipients):
            return [DeliveryOutcome.delivered() for _ in recipients]

    delivery = PluginDelivery(make_caller(("listy", Listy())), make_config)
    with caplog.at_level(logging.ERROR, logger="submitd.plugins"):
        outcomes = await delivery.deliver(_envelope(), _message(tmp_path), _envelope().recipients)
    assert {o.kind.value for o in outcomes.values()} == {"temporary"}
    assert any("plugin=listy" in r.getMessage() and "plugin_bad_answer" in r.getMessage()
               for r in caplog.records)



class SlowDelivery:
    @hookimpl
    async def submitd_deliver(self, recipients):
        await trio.sleep(10)
        return {r.address: DeliveryOutcome.delivered() for r in recipients}


@pytest.mark.parametrize(("delivery_timeout", "kind", "elapsed"),
                         [(60.0, "delivered", 10.0), (4.0, "temporary", 4.0)])
async def test_delivery_runs_under_the_queue_deadline_not_the_session_hook_deadline(
    tmp_path: Path, autojump_clock: trio.abc.Clock, delivery_timeout: float, kind: str,
    elapsed: float,
) -> None:
    # A session hook must answer within seconds; a smarthost may take minutes for a big message.
    caller = make_caller(("slow", SlowDelivery()), hook_timeout=2.0)
    config = replace(make_config(hook_timeout=2.0),
                     queue=QueueConfig(dir=tmp_path, delivery_timeout=delivery_timeout))
    delivery = PluginDelivery(caller, lambda: config)
    start = trio.current_time()
    outcomes = await delivery.deliver(_envelope(), _message(tmp_path),
                                      (Recipient(address="x@one.example"),))
    assert outcomes["x@one.example"].kind.value == kind
    assert trio.current_time() - start == pytest.approx(elapsed)


async def test_a_plugins_own_hook_timeout_also_bounds_its_deliveries(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    caller = make_caller(("slow", SlowDelivery()), hook_timeout=2.0,
                         hook_timeouts=MappingProxyType({"slow": 3.0}))
    delivery = PluginDelivery(caller, make_config)
    start = trio.current_time()
    outcomes = await delivery.deliver(_envelope(), _message(tmp_path),
                                      (Recipient(address="x@one.example"),))
    assert outcomes["x@one.example"].kind.value == "temporary"
    assert trio.current_time() - start == pytest.approx(3.0)


# --- the blocking rule ------------------------------------------------------------------------


class FakeSession:
    session_id = "S1"


async def test_a_plain_def_that_blocks_is_logged_with_plugin_hook_and_milliseconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import time

    class Sleepy:
        @hookimpl
        def submitd_mail_from(self, sender):
            time.sleep(0.08)  # a database call without a timeout, say

    caller = make_caller(("sleepy", Sleepy()))
    with caplog.at_level(logging.WARNING, logger="submitd.plugins"):
        await caller.first("submitd_mail_from", refusal, session=FakeSession(), sender="",
                           params=MailParams())
    (line,) = [r.getMessage() for r in caplog.records if "plugin_blocked" in r.getMessage()]
    assert line.startswith("event=plugin_blocked plugin=sleepy hook=submitd_mail_from ms=")
    assert int(line.split("ms=")[1].split()[0]) >= 80
    assert "session=S1" in line


async def test_a_quick_plain_def_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caller = make_caller(("quick", Accepting()))
    with caplog.at_level(logging.WARNING, logger="submitd.plugins"):
        await caller.first("submitd_mail_from", refusal, session=None, sender="",
                           params=MailParams())
    assert "plugin_blocked" not in caplog.text


async def test_a_hook_marked_blocking_runs_in_a_thread_while_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import threading

    import submitd

    go = threading.Event()

    class Waiting:
        @hookimpl
        @submitd.blocking
        def submitd_mail_from(self, sender):
            # Only another task on the event loop can set this: on the loop it would deadlock.
            assert go.wait(10)
            return Reply.make(550, "5.7.1", f"{sender} refused after a lookup")

    async def release() -> None:
        await trio.sleep(0)
        go.set()

    caller = make_caller(("lookup", Waiting()))
    with caplog.at_level(logging.WARNING, logger="submitd.plugins"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release)
            result = await caller.first("submitd_mail_from", refusal, session=None,
                                        sender="a@b.example", params=MailParams())
    assert result is not None and result[0] == "lookup"
    assert result[1].text == "a@b.example refused after a lookup"
    assert "plugin_blocked" not in caplog.text


async def test_a_blocking_hook_still_has_its_deadline() -> None:
    import threading

    import submitd

    stuck = threading.Event()

    class Stuck:
        @hookimpl
        @submitd.blocking
        def submitd_mail_from(self):
            stuck.wait(10)

    caller = make_caller(("stuck", Stuck()), hook_timeout=0.2)
    try:
        with trio.fail_after(5), pytest.raises(PluginError, match=r"timed out after 0\.2s"):
            await caller.first("submitd_mail_from", refusal, session=None, sender="",
                               params=MailParams())
    finally:
        stuck.set()  # the abandoned thread ends here


def test_blocking_refuses_an_async_hook() -> None:
    import submitd

    async def submitd_mail_from() -> None:
        pass

    with pytest.raises(TypeError, match="async"):
        submitd.blocking(submitd_mail_from)


async def test_a_plugin_error_is_logged_with_its_message_on_one_line_and_the_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        @hookimpl
        def submitd_mail_from(self):
            raise RuntimeError("lookup failed:\r\nserver db.internal refused\x00")

    caller = make_caller(("broken", Broken()))
    with caplog.at_level(logging.ERROR), pytest.raises(PluginError) as info:
        await caller.first("submitd_mail_from", refusal, session=FakeSession(), sender="",
                           params=MailParams())
    (line,) = [r.getMessage() for r in caplog.records if "plugin_error" in r.getMessage()]
    assert "session=S1" in line and "plugin=broken" in line and "error=RuntimeError" in line
    assert 'message="lookup failed: server db.internal refused"' in line
    assert "server db.internal refused" in str(info.value)
