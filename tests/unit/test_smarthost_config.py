"""The smarthost plugin's configuration contract, route choice, mark-down and connection pool."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import trio
import trustme

from submitd import (
    Config,
    ConfigError,
    DeliveryOutcome,
    Envelope,
    MailParams,
    MessageHandle,
    OutcomeKind,
    Recipient,
    Reply,
    Secret,
)
from submitd.client import ClientSettings, ClientTLSMode, SMTPClientError, TransactionResult
from submitd.config import load_config
from submitd.testing import TestCA
from submitd_plugins import smarthost
from submitd_plugins._smarthost_config import HostAddress, SmarthostSettings, parse_settings
from submitd_plugins._smarthost_pool import ConnectionPool, Lease, MarkDown

HEAD = 'hostname = "mx.example.org"\n[plugins]\nenable = ["smarthost"]\n'


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "submitd.toml"
    path.write_text(HEAD + text)
    return load_config(path)


def settings(tmp_path: Path, text: str) -> SmarthostSettings:
    return parse_settings(load(tmp_path, text))


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, text)
    assert str(tmp_path / "submitd.toml") in str(info.value)
    return info.value


def test_one_host_gets_the_default_port_of_its_tls_mode(tmp_path: Path) -> None:
    for tls, port in (("starttls", 587), ("implicit", 465), ("none", 25)):
        s = settings(tmp_path, f'[plugins.smarthost]\nhost = "smtp.example.net"\ntls = "{tls}"\n')
        assert s.default is not None and s.default.name == "default"
        assert s.default.hosts == (HostAddress(host="smtp.example.net", port=port),)
        assert s.default.tls is ClientTLSMode(tls)
    s = settings(tmp_path, '[plugins.smarthost]\nhost = "smtp.example.net"\n')
    assert s.default is not None and s.default.tls is ClientTLSMode.STARTTLS
    assert s.default.hosts[0].port == 587


def test_hosts_list_with_ports_and_bracketed_ipv6(tmp_path: Path) -> None:
    s = settings(tmp_path, '[plugins.smarthost]\nport = 2525\n'
                 'hosts = ["a.example.net:587", "[2001:db8::1]:465", "b.example.net", "[::1]", '
                 '"192.0.2.7:25"]\n')
    assert s.default is not None
    assert [str(h) for h in s.default.hosts] == [
        "a.example.net:587", "[2001:db8::1]:465", "b.example.net:2525", "[::1]:2525",
        "192.0.2.7:25",
    ]
    assert s.default.hosts[1].host == "2001:db8::1"


@pytest.mark.parametrize(("hosts", "key", "words"), [
    ('["2001:db8::1:25"]', "hosts[0]", "brackets"),
    ('["[2001:db8::1"]', "hosts[0]", "[::1]:25"),
    ('["[not-v6]:25"]', "hosts[0]", "IPv6"),
    ('["a.example:0"]', "hosts[0]", "1 to 65535"),
    ('["a.example:70000"]', "hosts[0]", "1 to 65535"),
    ('["a.example:smtp"]', "hosts[0]", "1 to 65535"),
    ('["a.example:"]', "hosts[0]", "port is missing"),
    ('["ok.example:25", "bad_host!:25"]', "hosts[1]", "host name"),
    ('["a.example:25", "a.example:25"]', "hosts[1]", "twice"),
    ("[]", "hosts", "non-empty"),
    ('"a.example:25"', "hosts", "array"),
])
def test_bad_host_lists_name_the_entry(tmp_path: Path, hosts: str, key: str, words: str) -> None:
    exc = error(tmp_path, f"[plugins.smarthost]\nhosts = {hosts}\n")
    assert exc.key == f"plugins.smarthost.{key}"
    assert words in exc.message


@pytest.mark.parametrize(("table", "key", "words"), [
    ('host = "a.example"\nhosts = ["b.example"]', "hosts", "not both"),
    ('host = "a.example:587"', "host", "port"),
    ('host = "a.example"\nport = 0', "port", "1 to 65535"),
    ('host = "a.example"\nport = "587"', "port", "integer"),
    ('host = "a.example"\ntls = "ssl"', "tls", '"starttls", "implicit" or "none"'),
    ('host = "a.example"\ntls = "NONE"', "tls", "none"),
    ('host = "a.example"\npasword_file = "x"', "pasword_file", "unknown key"),
    ('host = "a.example"\ntls_server_name = "bad name"', "tls_server_name", "spaces"),
    ('host = "a.example"\ntls_server_name = "-x-"', "tls_server_name", "host name"),
    ('host = "a.example"\nconnect_timeout = "soon"', "connect_timeout", "not a duration"),
    ('host = "a.example"\ncommand_timeout = "0s"', "command_timeout", "longer than zero"),
    ('host = "a.example"\nmax_messages_per_connection = 0', "max_messages_per_connection",
     "from 1"),
    ('username = "u"\npassword_env = "P"', "username", "needs host or hosts"),
])
def test_bad_default_route_keys_are_named(tmp_path: Path, table: str, key: str, words: str
                                          ) -> None:
    exc = error(tmp_path, f"[plugins.smarthost]\n{table}\n")
    assert exc.key == f"plugins.smarthost.{key}"
    assert words in exc.message


def test_no_host_and_no_route_is_an_error(tmp_path: Path) -> None:
    exc = error(tmp_path, "[plugins.smarthost]\n")
    assert exc.key == "plugins.smarthost.host" and "route" in exc.message
    exc = error(tmp_path, "")  # enabled without a table at all
    assert exc.key == "plugins.smarthost.host"


def test_timeouts_follow_the_table_with_rfc_5321_caps(tmp_path: Path) -> None:
    s = settings(tmp_path, '[plugins.smarthost]\nhost = "a.example"\n')
    t = s.timeouts
    assert (t.connect, t.greeting, t.mail, t.rcpt) == (30.0, 300.0, 300.0, 300.0)
    assert (t.data_init, t.data_block, t.data_end) == (120.0, 180.0, 600.0)
    assert (s.host_down_time, s.reuse_time, s.max_messages_per_connection) == (60.0, 10.0, 100)
    assert s.helo_name == "mx.example.org"
    s = settings(tmp_path, '[plugins.smarthost]\nhost = "a.example"\nconnect_timeout = "2s"\n'
                 'command_timeout = "7s"\ndata_timeout = "1m"\nhost_down_time = "0s"\n'
                 'reuse_time = "0s"\nmax_messages_per_connection = 3\n')
    t = s.timeouts
    assert (t.connect, t.greeting, t.rcpt, t.data_init, t.data_block, t.data_end) == (
        2.0, 7.0, 7.0, 7.0, 7.0, 60.0)
    assert (s.host_down_time, s.reuse_time, s.max_messages_per_connection) == (0.0, 0.0, 3)


# --- credentials ----------------------------------------------------------------------------


def test_password_file_first_line_becomes_a_secret(tmp_path: Path) -> None:
    (tmp_path / "smarthost.secret").write_bytes(b"pa ss\xc3\xa9word\r\nsecond line\n")
    s = settings(tmp_path, '[plugins.smarthost]\nhost = "a.example"\nusername = "relay-user"\n'
                 'password_file = "smarthost.secret"\n')
    assert s.default is not None
    assert s.default.username == "relay-user"
    assert s.default.password == Secret("pa sséword")
    assert "pa ss" not in repr(s) and "pa ss" not in repr(s.default)


@pytest.mark.parametrize(("content", "words"), [
    (b"", "empty"), (b"\n", "empty"), (b"\r\nsecret\n", "empty"), (b"\xff\xfe\n", "UTF-8"),
    (b"pass\x00word\n", "control"),
])
def test_unusable_password_file_is_an_error(tmp_path: Path, content: bytes, words: str) -> None:
    (tmp_path / "pw").write_bytes(content)
    exc = error(tmp_path, '[plugins.smarthost]\nhost = "a.example"\nusername = "u"\n'
                          'password_file = "pw"\n')
    assert exc.key == "plugins.smarthost.password_file" and words in exc.message


def test_missing_or_unreadable_password_file_names_the_key_and_path(tmp_path: Path) -> None:
    table = '[plugins.smarthost]\nhost = "a.example"\nusername = "u"\npassword_file = "pw"\n'
    exc = error(tmp_path, table)
    assert exc.key == "plugins.smarthost.password_file"
    assert str(tmp_path / "pw") in exc.message and "No such file" in exc.message
    (tmp_path / "pw").mkdir()  # unreadable as a file, whoever runs the test
    exc = error(tmp_path, table)
    assert exc.key == "plugins.smarthost.password_file" and "cannot read" in exc.message


def test_password_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = ('[plugins.smarthost]\nhost = "a.example"\nusername = "u"\n'
             'password_env = "SUBMITD_TEST_SMARTHOST_PW"\n')
    monkeypatch.delenv("SUBMITD_TEST_SMARTHOST_PW", raising=False)
    exc = error(tmp_path, table)
    assert exc.key == "plugins.smarthost.password_env" and "not set" in exc.message
    monkeypatch.setenv("SUBMITD_TEST_SMARTHOST_PW", "")
    assert "empty" in error(tmp_path, table).message
    monkeypatch.setenv("SUBMITD_TEST_SMARTHOST_PW", "from-env")
    s = settings(tmp_path, table)
    assert s.default is not None and s.default.password == Secret("from-env")
    exc = error(tmp_path, table.replace("SUBMITD_TEST_SMARTHOST_PW", "1BAD-NAME"))
    assert exc.key == "plugins.smarthost.password_env"


@pytest.mark.parametrize(("table", "key", "words"), [
    ('username = "u"', "username", "needs a password"),
    ('password_env = "X"', "password_env", "needs a username"),
    ('username = "u"\npassword_env = "X"\npassword_file = "pw"', "password_env", "not both"),
    ('username = ""\npassword_env = "X"', "username", "non-empty"),
    ('tls = "none"\nusername = "u"\npassword_env = "X"', "username", "never sent"),
    ('tls = "none"\npassword_file = "pw"', "password_file", "never sent"),
    ('tls = "none"\nca_file = "ca.pem"', "ca_file", 'tls = "none"'),
    ('tls = "none"\nclient_cert = "c.pem"', "client_cert", 'tls = "none"'),
])
def test_credential_rules(tmp_path: Path, table: str, key: str, words: str) -> None:
    exc = error(tmp_path, f'[plugins.smarthost]\nhost = "a.example"\n{table}\n')
    assert exc.key == f"plugins.smarthost.{key}" and words in exc.message


def test_tls_none_is_warned_once_at_configure(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                              ) -> None:
    config = load(tmp_path, '[plugins.smarthost]\nhost = "relay.lan"\ntls = "none"\n')
    with caplog.at_level(logging.INFO, logger="submitd.plugins.smarthost"):
        smarthost.submitd_configure(config)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "event=smarthost_tls_none route=default hosts=relay.lan:25" in warnings[0].message
    route = config.stash[smarthost.STATE].settings.default
    assert route is not None and route.ssl_context is None and route.username is None


# --- TLS ------------------------------------------------------------------------------------


def test_tls_context_verifies_against_ca_file_with_tls12_minimum(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "tls")
    s = settings(tmp_path, '[plugins.smarthost]\nhost = "a.example"\ntls = "implicit"\n'
                 f'ca_file = "{ca.ca_path}"\ntls_server_name = "relay.example"\n')
    route = s.default
    assert route is not None and route.ssl_context is not None
    ctx = route.ssl_context
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert len(ctx.get_ca_certs()) == 1, "only the configured CA, not the system store"
    assert route.server_name == "relay.example"
    default = settings(tmp_path, '[plugins.smarthost]\nhost = "a.example"\n').default
    assert default is not None and default.ssl_context is not None
    assert default.ssl_context.verify_mode is ssl.CERT_REQUIRED


def test_bad_tls_files_name_their_key(tmp_path: Path) -> None:
    base = '[plugins.smarthost]\nhost = "a.example"\n'
    exc = error(tmp_path, base + 'ca_file = "nowhere.pem"\n')
    assert exc.key == "plugins.smarthost.ca_file" and "nowhere.pem" in exc.message
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    exc = error(tmp_path, base + 'ca_file = "junk.pem"\n')
    assert exc.key == "plugins.smarthost.ca_file"
    exc = error(tmp_path, base + 'client_cert = "junk.pem"\n')
    assert exc.key == "plugins.smarthost.client_cert"
    exc = error(tmp_path, base + 'client_key = "junk.pem"\n')
    assert exc.key == "plugins.smarthost.client_key" and "client_cert" in exc.message
    exc = error(tmp_path, base + 'client_cert = "junk.pem"\nclient_key = "missing.pem"\n')
    assert exc.key == "plugins.smarthost.client_key" and "missing.pem" in exc.message


def test_client_certificate_is_loaded_into_the_context(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.example.org")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "client-key.pem"))
    s = settings(tmp_path, '[plugins.smarthost]\nhost = "a.example"\n'
                 'client_cert = "client.pem"\nclient_key = "client-key.pem"\n')
    assert s.default is not None and s.default.ssl_context is not None
    other = trustme.CA()
    other.private_key_pem.write_to_path(str(tmp_path / "wrong-key.pem"))
    exc = error(tmp_path, '[plugins.smarthost]\nhost = "a.example"\n'
                          'client_cert = "client.pem"\nclient_key = "wrong-key.pem"\n')
    assert exc.key in ("plugins.smarthost.client_key", "plugins.smarthost.client_cert")
    assert "client certificate" in exc.message


# --- routes ---------------------------------------------------------------------------------

ROUTES = """\
[plugins.smarthost]
host = "default.example"
username = "top"
password_env = "SUBMITD_TEST_TOP_PW"
[[plugins.smarthost.route]]
name = "partner"
senders = ["@Sales.Example.org", "CEO@example.org"]
hosts = ["relay.partner.example:465"]
tls = "implicit"
[[plugins.smarthost.route]]
senders = ["<>", "ceo@example.org"]
host = "bounces.example"
tls = "none"
"""


def test_routes_match_by_sender_first_match_wins(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBMITD_TEST_TOP_PW", "x")
    s = settings(tmp_path, ROUTES)
    partner, second = s.routes
    assert (partner.name, second.name) == ("partner", "route-2")

    def chosen(sender: str) -> str | None:
        route = s.route_for(sender)
        return route.name if route else None

    assert chosen("anyone@sales.example.org") == "partner"
    assert chosen("Anyone@SALES.EXAMPLE.ORG") == "partner"
    assert chosen("ceo@Example.Org") == "partner", "first match wins"
    assert chosen("") == "route-2", "<> matches bounces"
    assert chosen("x@sub.sales.example.org") == "default", "a domain entry is that domain only"
    assert chosen("sales.example.org@other.example") == "default"
    assert chosen("other@example.org") == "default"
    assert partner.hosts == (HostAddress(host="relay.partner.example", port=465),)
    assert partner.username is None and partner.password is None, "credentials not inherited"
    assert second.hosts[0].port == 25


def test_without_a_default_route_unmatched_senders_get_none(tmp_path: Path) -> None:
    s = settings(tmp_path, '[[plugins.smarthost.route]]\nsenders = ["@a.example"]\n'
                 'host = "relay.example"\n')
    assert s.default is None
    assert s.route_for("x@a.example") is s.routes[0]
    assert s.route_for("x@b.example") is None and s.route_for("") is None


@pytest.mark.parametrize(("route", "key", "words"), [
    ('host = "r.example"', "route[0].senders", "required"),
    ('senders = []\nhost = "r.example"', "route[0].senders", "non-empty"),
    ('senders = "@a.example"\nhost = "r.example"', "route[0].senders", "array"),
    ('senders = ["a.example"]\nhost = "r.example"', "route[0].senders[0]", "@domain"),
    ('senders = ["@"]\nhost = "r.example"', "route[0].senders[0]", "@domain"),
    ('senders = ["a@b@c"]\nhost = "r.example"', "route[0].senders[0]", "@domain"),
    ('senders = ["<a@b>"]\nhost = "r.example"', "route[0].senders[0]", "@domain"),
    ('senders = ["a b@c"]\nhost = "r.example"', "route[0].senders[0]", "spaces"),
    ('senders = ["@a.example"]', "route[0].hosts", "required"),
    ('senders = ["@a.example"]\nhost = "r.example"\nname = "default"', "route[0].name",
     "already used"),
    ('senders = ["@a.example"]\nhost = "r.example"\nname = "a b"', "route[0].name", "letters"),
    ('senders = ["@a.example"]\nhost = "r.example"\nreuse_time = "1s"', "route[0].reuse_time",
     "inherits"),
    ('senders = ["@a.example"]\nhost = "r.example"\nhost_down_time = "1s"',
     "route[0].host_down_time", "inherits"),
    ('senders = ["@a.example"]\nhost = "r.example"\nsender = "x"', "route[0].sender",
     "unknown key"),
    ('senders = ["@a.example"]\nhosts = ["r.example:99999"]', "route[0].hosts[0]", "65535"),
    ('senders = ["@a.example"]\nhost = "r.example"\nusername = "u"', "route[0].username",
     "needs a password"),
])
def test_bad_routes_name_the_dotted_key(tmp_path: Path, route: str, key: str, words: str
                                        ) -> None:
    exc = error(tmp_path, f"[[plugins.smarthost.route]]\n{route}\n")
    assert exc.key == f"plugins.smarthost.{key}"
    assert words in exc.message


def test_route_names_must_be_unique(tmp_path: Path) -> None:
    route = '[[plugins.smarthost.route]]\nname = "p"\nsenders = ["@a.example"]\nhost = "r.ex"\n'
    exc = error(tmp_path, route + route)
    assert exc.key == "plugins.smarthost.route[1].name"


# --- mark-down ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_host_is_skipped_for_host_down_time(tmp_path: Path) -> None:
    route = settings(tmp_path, '[plugins.smarthost]\nhosts = ["a.example", "b.example"]\n'
                     ).default
    assert route is not None
    a, b = route.hosts
    clock = FakeClock()
    down = MarkDown(down_time=60.0, clock=clock)
    down.mark("default", a, "421 4.4.1 connection refused")
    assert down.is_down("default", a) and not down.is_down("default", b)
    assert not down.is_down("other-route", a), "marked per route"
    assert down.all_down(route) is None
    clock.now += 30
    down.mark("default", b, "454 4.7.5 certificate did not verify")
    assert down.all_down(route) == "454 4.7.5 certificate did not verify", "the latest error"
    clock.now += 30  # a's minute is over
    assert not down.is_down("default", a) and down.is_down("default", b)
    assert down.all_down(route) is None
    clock.now += 30
    assert not down.is_down("default", b)
    down.mark("default", a, "x")
    down.clear("default", a)
    assert not down.is_down("default", a)


def test_host_down_time_zero_turns_mark_down_off() -> None:
    down = MarkDown(down_time=0.0, clock=FakeClock())
    host = HostAddress(host="a.example", port=25)
    down.mark("default", host, "refused")
    assert not down.is_down("default", host)


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


def configured(tmp_path: Path, text: str) -> Config:
    config = load(tmp_path, text)
    smarthost.submitd_configure(config)
    return config


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
    assert state.markdown.is_down("default", HostAddress(host="h1", port=1001))


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
