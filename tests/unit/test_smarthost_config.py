"""The smarthost plugin's configuration contract: keys, hosts, credentials, TLS files, routes."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
import trustme

from submitd import Secret
from submitd.client import ClientTLSMode
from submitd.testing import TestCA
from submitd_plugins import smarthost
from submitd_plugins._smarthost_config import HostAddress
from tests.unit.smarthost_support import error, load, settings


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
