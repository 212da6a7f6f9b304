"""The smarthost plugin at run time: mark-down, the connection pool, and delivery outcomes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import trio

from submitd import (
    Config,
    DeliveryOutcome,
    Envelope,
    MailParams,
    MessageHandle,
    OutcomeKind,
    Recipient,
    Reply,
)
from submitd.client import ClientSettings, SMTPClientError, TransactionResult
from submitd_plugins import smarthost
from submitd_plugins._smarthost_config import HostAddress, Route
from submitd_plugins._smarthost_pool import ConnectionPool, Lease, MarkDown, MarkDownTable
from tests.unit.smarthost_support import configured, settings

# --- mark-down ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_host_is_skipped_for_host_down_time(tmp_path: Path) -> None:
    s = settings(tmp_path, '[plugins.smarthost]\nhosts = ["a.example", "b.example"]\n'
                 '[[plugins.smarthost.route]]\nname = "other"\nsenders = ["<>"]\n'
                 'hosts = ["a.example"]\n')
    route, (other,) = s.default, s.routes
    assert route is not None
    a, b = route.hosts
    clock = FakeClock()
    down = MarkDown(down_time=60.0, clock=clock)
    down.mark(route, a, "421 4.4.1 connection refused")
    assert down.is_down(route, a) and not down.is_down(route, b)
    assert not down.is_down(other, a), "marked per route"
    assert down.all_down(route) is None
    clock.now += 30
    down.mark(route, b, "454 4.7.5 certificate did not verify")
    assert down.all_down(route) == "454 4.7.5 certificate did not verify", "the latest error"
    clock.now += 30  # a's minute is over
    assert not down.is_down(route, a) and down.is_down(route, b)
    assert down.all_down(route) is None
    clock.now += 30
    assert not down.is_down(route, b)
    down.mark(route, a, "x")
    down.clear(route, a)
    assert not down.is_down(route, a)


def test_host_down_time_zero_turns_mark_down_off(tmp_path: Path) -> None:
    route = settings(tmp_path, '[plugins.smarthost]\nhost = "a.example"\n').default
    assert route is not None
    down = MarkDown(down_time=0.0, clock=FakeClock())
    down.mark(route, route.hosts[0], "refused")
    assert not down.is_down(route, route.hosts[0])


ONE_HOST = ('[plugins.smarthost]\nhost = "a.example"\ntls = "implicit"\n'
            'username = "relay"\npassword_env = "RELAY_PW"\n')


def test_marks_outlive_a_reload_unless_the_route_reaches_its_host_differently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_PW", "wrong")
    clock = FakeClock()
    table = MarkDownTable()  # what config.server_stash hands from one configuration to the next

    def markdown(text: str, down_time: float = 60.0) -> tuple[MarkDown, Route]:
        route = settings(tmp_path, text).default
        assert route is not None
        return MarkDown(down_time=down_time, clock=clock, table=table), route

    before, route = markdown(ONE_HOST)
    before.mark(route, route.hosts[0], "auth: 535 5.7.8 bad credentials")
    clock.now += 10
    after, same = markdown(ONE_HOST + 'connect_timeout = "20s"\n')
    assert after.is_down(same, same.hosts[0]), "the same route and host after a reload"
    shorter, same = markdown(ONE_HOST, down_time=5.0)
    assert not shorter.is_down(same, same.hosts[0]), "a shorter host_down_time applies at once"
    before.mark(route, route.hosts[0], "auth: 535 5.7.8 bad credentials")
    monkeypatch.setenv("RELAY_PW", "fixed")
    fixed, changed = markdown(ONE_HOST)
    assert not fixed.is_down(changed, changed.hosts[0]), "a new password is tried at once"
    assert not table.failures


# --- the connection pool --------------------------------------------------------------------


class FakeConnection:
    def __init__(self) -> None:
        self.usable = True
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        self.usable = False


HOST = HostAddress(host="a.example", port=587)


def lease(sent: int = 1) -> Lease[FakeConnection]:
    return Lease(route="default", host=HOST, client=FakeConnection(), sent=sent)


async def test_idle_connection_is_reused_within_reuse_time(autojump_clock: trio.abc.Clock
                                                           ) -> None:
    pool: ConnectionPool[FakeConnection] = ConnectionPool(reuse_time=10.0, max_messages=100)
    first = lease()
    await pool.give_back(first)
    assert pool.idle_count("default") == 1 and not first.client.closed
    await trio.sleep(9)
    again = await pool.take("default")
    assert again is first and again.reused
    assert await pool.take("default") is None
    assert await pool.take("other") is None


async def test_idle_connection_is_closed_after_reuse_time(autojump_clock: trio.abc.Clock) -> None:
    pool: ConnectionPool[FakeConnection] = ConnectionPool(reuse_time=10.0, max_messages=100)
    first, second = lease(), lease()
    await pool.give_back(first)
    await trio.sleep(5)
    await pool.give_back(second)
    await trio.sleep(5.5)
    assert first.client.closed and not second.client.closed, "QUIT after 10s idle"
    await trio.sleep(5)
    assert second.client.closed and pool.idle_count() == 0


async def test_unusable_or_worn_connections_are_not_kept(autojump_clock: trio.abc.Clock) -> None:
    pool: ConnectionPool[FakeConnection] = ConnectionPool(reuse_time=10.0, max_messages=3)
    broken = lease()
    broken.client.usable = False
    worn = lease(sent=3)
    await pool.give_back(broken)
    await pool.give_back(worn)
    assert worn.client.closed and pool.idle_count() == 0
    fresh = lease()
    await pool.give_back(fresh)
    fresh.client.usable = False  # the server closed it while idle
    assert await pool.take("default") is None
    assert fresh.client.closed
    no_reuse: ConnectionPool[FakeConnection] = ConnectionPool(reuse_time=0.0, max_messages=3)
    once = lease()
    await no_reuse.give_back(once)
    assert once.client.closed


async def test_close_from_unconfigure_closes_idle_and_returning_connections(
    autojump_clock: trio.abc.Clock,
) -> None:
    pool: ConnectionPool[FakeConnection] = ConnectionPool(reuse_time=60.0, max_messages=100)
    idle, busy = lease(), lease()
    await pool.give_back(idle)
    pool.close()  # synchronous, as submitd_unconfigure is
    await trio.sleep(0.1)
    assert idle.client.closed and pool.idle_count() == 0
    await pool.give_back(busy)  # a delivery that was in flight during the reload
    assert busy.client.closed
    assert await pool.take("default") is None


# --- the delivery hook, against a scripted client -------------------------------------------


class ScriptedClient:
    """Stands in for SMTPClient: ``plan`` maps a port to what connect/send do there."""

    plan: dict[int, object] = {}
    connects: list[int] = []
    closed: list[int] = []

    def __init__(self, port: int) -> None:
        self.port = port
        self.usable = True
        self.remote = "127.0.0.1"

    @classmethod
    async def connect(cls, settings: ClientSettings) -> ScriptedClient:
        cls.connects.append(settings.port)
        action = cls.plan[settings.port]
        if isinstance(action, SMTPClientError) and action.stage == "connect":
            raise action
        return cls(settings.port)

    async def send(self, *, sender: str, recipients: Sequence[Recipient], message: object,
                   params: MailParams) -> TransactionResult:
        action = self.plan[self.port]
        if action == "hang":
            await trio.sleep_forever()
        if isinstance(action, SMTPClientError):
            self.usable = False
            raise action
        assert isinstance(action, dict)
        return TransactionResult(replies=action)

    async def aclose(self) -> None:
        self.usable = False
        self.closed.append(self.port)


OK = Reply.make(250, "2.0.0", "Ok: queued")
RCPTS = (Recipient(address="a@example.net"), Recipient(address="b@example.net"))


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> type[ScriptedClient]:
    monkeypatch.setattr(ScriptedClient, "plan", {})
    monkeypatch.setattr(ScriptedClient, "connects", [])
    monkeypatch.setattr(ScriptedClient, "closed", [])
    monkeypatch.setattr(smarthost, "SMTPClient", ScriptedClient)
    return ScriptedClient


async def deliver(config: Config, sender: str = "me@example.org"
                  ) -> Mapping[str, DeliveryOutcome] | None:
    envelope = Envelope(sender=sender, recipients=RCPTS, params=MailParams(), username="me",
                        queue_id="Q1")
    handle = MessageHandle(path=Path("/nonexistent"), size=10, headers=[], body_offset=0)
    return await smarthost.submitd_deliver(config=config, envelope=envelope, message=handle,
                                           recipients=RCPTS)


TWO_HOSTS = '[plugins.smarthost]\nhosts = ["h1:1001", "h2:1002"]\ntls = "none"\n'


async def test_replies_become_outcomes_per_recipient(
    tmp_path: Path, scripted: type[ScriptedClient], autojump_clock: trio.abc.Clock
) -> None:
    config = configured(tmp_path, TWO_HOSTS)
    scripted.plan[1001] = {"a@example.net": Reply.make(550, "5.1.1", "No such user")}
    outcomes = await deliver(config)
    assert outcomes is not None
    a, b = outcomes["a@example.net"], outcomes["b@example.net"]
    assert a.kind is OutcomeKind.PERMANENT and a.reply.status == "5.1.1" and a.remote == "h1"
    assert b.kind is OutcomeKind.TEMPORARY and b.reply.status == "4.3.0", "no reply: retry"
    scripted.plan[1001] = {"a@example.net": OK, "b@example.net": Reply.make(452, "4.2.2", "Full")}
    outcomes = await deliver(config)
    assert outcomes is not None
    assert outcomes["a@example.net"].kind is OutcomeKind.DELIVERED
    assert outcomes["b@example.net"].kind is OutcomeKind.TEMPORARY
    assert scripted.connects == [1001], "the second message reused the connection"


async def test_failure_before_data_fails_over_to_the_next_host(
    tmp_path: Path, scripted: type[ScriptedClient], autojump_clock: trio.abc.Clock
) -> None:
    config = configured(tmp_path, TWO_HOSTS)
    scripted.plan[1001] = SMTPClientError("rcpt", Reply.make(451, "4.4.2", "connection lost"))
    scripted.plan[1002] = {"a@example.net": OK, "b@example.net": OK}
    outcomes = await deliver(config)
    assert outcomes is not None
    assert {o.kind for o in outcomes.values()} == {OutcomeKind.DELIVERED}
    assert {o.remote for o in outcomes.values()} == {"h2"}
    assert scripted.connects == [1001, 1002] and scripted.closed == [1001]
    state = config.stash[smarthost.STATE]
    route = state.settings.default
    assert route is not None and state.markdown.is_down(route, route.hosts[0])
    assert route.hosts[0] == HostAddress(host="h1", port=1001)
    assert config.server_stash[smarthost.MARKDOWN] is state.markdown.table, "kept for reloads"


async def test_failure_after_the_body_is_not_retried_elsewhere(
    tmp_path: Path, scripted: type[ScriptedClient], autojump_clock: trio.abc.Clock
) -> None:
    config = configured(tmp_path, TWO_HOSTS)
    lost = Reply.make(451, "4.4.2", "connection lost waiting for the reply to message")
    scripted.plan[1001] = SMTPClientError("data", lost)
    scripted.plan[1002] = {"a@example.net": OK, "b@example.net": OK}
    outcomes = await deliver(config)
    assert outcomes is not None
    assert {(o.kind, o.reply, o.remote) for o in outcomes.values()} == {
        (OutcomeKind.TEMPORARY, lost, "h1")}
    assert scripted.connects == [1001], "the first host may have taken it: no duplicate now"


async def test_every_host_down_defers_without_connecting(
    tmp_path: Path, scripted: type[ScriptedClient], autojump_clock: trio.abc.Clock
) -> None:
    config = configured(tmp_path, TWO_HOSTS)
    refused = Reply.make(421, "4.4.1", "connection refused")
    scripted.plan[1001] = SMTPClientError("connect", refused)
    scripted.plan[1002] = SMTPClientError("connect", refused)
    first = await deliver(config)
    assert first is not None and first["a@example.net"].reply == refused
    assert first["a@example.net"].remote == "h2", "the last host tried"
    second = await deliver(config)
    assert second is not None
    reply = second["a@example.net"].reply
    assert (reply.code, reply.status) == (451, "4.4.1")
    assert reply.text == ("all smarthosts of route default marked down: "
                          "connect: 421 4.4.1 connection refused")
    assert second["a@example.net"].remote is None
    assert scripted.connects == [1001, 1002]
    await trio.sleep(61)  # host_down_time is over: both are tried again
    await deliver(config)
    assert scripted.connects == [1001, 1002, 1001, 1002]


async def test_cancelled_delivery_closes_its_connection(
    tmp_path: Path, scripted: type[ScriptedClient], autojump_clock: trio.abc.Clock
) -> None:
    config = configured(tmp_path, TWO_HOSTS)
    scripted.plan[1001] = "hang"
    with trio.move_on_after(30):  # the hook deadline
        await deliver(config)
    assert scripted.closed == [1001]
    assert config.stash[smarthost.STATE].pool.idle_count() == 0


async def test_unmatched_sender_without_default_route_is_left_to_other_plugins(
    tmp_path: Path, scripted: type[ScriptedClient], autojump_clock: trio.abc.Clock
) -> None:
    config = configured(tmp_path, '[[plugins.smarthost.route]]\nsenders = ["<>"]\n'
                                  'hosts = ["h1:1001"]\ntls = "none"\n')
    assert await deliver(config) is None
    scripted.plan[1001] = {"a@example.net": OK, "b@example.net": OK}
    outcomes = await deliver(config, sender="")
    assert outcomes is not None and outcomes["b@example.net"].kind is OutcomeKind.DELIVERED
