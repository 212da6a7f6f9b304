"""The configuration loader: defaults, path resolution, and an error naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from submitd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    Limits,
    ListenMode,
    default_config_path,
    format_duration,
    load_config,
    parse_duration,
)
from submitd.errors import ConfigError

ETC = Path(__file__).resolve().parents[2] / "etc"

LISTENER = """
[[listen]]
address = "127.0.0.1:2587"
mode = "starttls"
[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "submitd.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> object:
    return load_config(write(tmp_path, 'hostname = "mail.example.org"\n' + text))


def error_for(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def test_sample_config_in_etc_loads() -> None:
    config = load_config(ETC / "submitd.toml")
    assert [(lc.port, lc.mode) for lc in config.listeners] == [
        (587, ListenMode.STARTTLS),
        (465, ListenMode.IMPLICIT),
    ]
    assert config.tls is not None
    assert config.tls.cert == ETC / "tls" / "fullchain.pem"
    assert config.plugins.enable == ("passwdfile", "relay", "headers", "maildir")
    assert config.plugin_table("passwdfile")["path"] == "users"


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'hostname = "mail.example.org"\n'))
    assert config.listeners == ()
    assert config.tls is None
    assert config.limits == Limits()
    assert config.queue.dir == tmp_path / "spool"
    assert config.queue.retry == (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    assert config.queue.max_age == 5 * 86400
    assert config.queue.max_parallel == 16
    assert config.queue.delay_warning is None  # no delay warnings unless asked for
    assert config.plugins.enable == ()
    assert config.plugins.hook_timeout == 30.0


def test_hostname_defaults_to_the_system_fqdn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "host.example.net")
    assert load_config(write(tmp_path, "")).hostname == "host.example.net"


def test_unusable_system_hostname_asks_for_an_explicit_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "bad_name")
    with pytest.raises(ConfigError, match="set it") as info:
        load_config(write(tmp_path, ""))
    assert info.value.key == "hostname"


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    config = load(tmp_path, LISTENER + '[queue]\ndir = "/var/spool/submitd"\n')
    assert config.tls is not None
    assert config.tls.cert == tmp_path / "tls" / "cert.pem"
    assert config.tls.key == tmp_path / "tls" / "key.pem"
    assert config.queue.dir == Path("/var/spool/submitd")


def test_config_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, 'hostname = "mail.example.org"\n' + LISTENER)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("submitd.toml"))
    assert config.path == tmp_path / "submitd.toml"
    assert config.tls is not None and config.tls.cert.is_absolute()


def test_listeners_accept_ipv6_host_names_and_port_zero(tmp_path: Path) -> None:
    config = load(tmp_path, """
[[listen]]
address = "[::1]:587"
mode = "starttls"
proxy_trusted = ["10.0.0.0/8"]
[[listen]]
address = "localhost:0"
mode = "implicit"
[[listen]]
address = "localhost:0"
mode = "implicit"
[tls]
cert = "c"
key = "k"
""")
    first = config.listeners[0]
    assert (first.host, first.port, first.address) == ("::1", 587, "[::1]:587")
    assert first.proxy_trusted == ("10.0.0.0/8",)
    assert config.listeners[1].port == 0
    assert config.listeners[2].proxy_trusted == ("127.0.0.0/8", "::1/128")


def test_durations_and_limits_are_parsed(tmp_path: Path) -> None:
    config = load(tmp_path, """
[limits]
max_recipients = 5
command_timeout = "2m"
data_timeout = 90
shutdown_grace = "0s"
[queue]
retry = ["30s", "250ms"]
max_age = "2d"
max_parallel = 3
delay_warning = "4h"
delivery_timeout = "30m"
""")
    assert config.limits.max_recipients == 5
    assert config.limits.command_timeout == 120.0
    assert config.limits.data_timeout == 90.0
    assert config.limits.shutdown_grace == 0.0
    assert config.queue.retry == (30.0, 0.25)
    assert config.queue.max_age == 2 * 86400
    assert config.queue.max_parallel == 3
    assert config.queue.delay_warning == 4 * 3600.0
    assert config.queue.delivery_timeout == 30 * 60.0


def test_plugin_tables_stay_raw_and_hook_timeout_is_split_off(tmp_path: Path) -> None:
    config = load(tmp_path, """
[plugins]
enable = ["passwdfile", "smarthost"]
hook_timeout = "20s"
[plugins.passwdfile]
path = "users"
hook_timeout = "5s"
[plugins.smarthost]
host = "smtp.example.net"
ports = [587, 465]
auth = { user = "u" }
""")
    assert config.plugins.enable == ("passwdfile", "smarthost")
    assert dict(config.plugin_table("passwdfile")) == {"path": "users"}
    assert config.plugins.timeout_for("passwdfile") == 5.0
    assert config.plugins.timeout_for("smarthost") == 20.0
    smarthost = config.plugin_table("smarthost")
    assert smarthost["ports"] == (587, 465)
    assert smarthost["auth"]["user"] == "u"
    assert config.plugin_table("absent") == {}


def test_plugin_tables_cannot_be_modified(tmp_path: Path) -> None:
    config = load(tmp_path, '[plugins.x]\npath = "a"\nnested = { k = 1 }\n')
    table = config.plugin_table("x")
    with pytest.raises(TypeError):
        table["path"] = "b"  # type: ignore[index]
    with pytest.raises(TypeError):
        table["nested"]["k"] = 2


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("colour = 1", "colour", "unknown key"),
        ("[limits]\nmax_recipeints = 3", "limits.max_recipeints", "did you mean 'max_recipients'"),
        ('[[listen]]\naddress = "1.2.3.4:25"\nmode = "starttls"\nport = 1',
         "listen[0].port", "unknown key"),
        (LISTENER + '[[listen]]\naddress = "1.2.3.4:465"\nmode = "tls"', "listen[1].mode",
         "starttls or implicit"),
        ('[[listen]]\naddress = "1.2.3.4:70000"\nmode = "implicit"', "listen[0].address",
         "0 to 65535"),
        ('[[listen]]\naddress = "1.2.3.4"\nmode = "implicit"', "listen[0].address", "host:port"),
        ('[[listen]]\naddress = "::1:587"\nmode = "implicit"', "listen[0].address", "brackets"),
        ('[[listen]]\naddress = "[nope]:587"\nmode = "implicit"', "listen[0].address", "IPv6"),
        ('[[listen]]\naddress = "bad host:587"\nmode = "implicit"', "listen[0].address",
         "host name"),
        ('[[listen]]\nmode = "implicit"', "listen[0].address", "required"),
        ('[[listen]]\naddress = "1.2.3.4:587"', "listen[0].mode", "required"),
        ('[[listen]]\naddress = "1.2.3.4:587"\nmode = "starttls"', "tls", "required"),
        (LISTENER + '[[listen]]\naddress = "127.0.0.1:2587"\nmode = "implicit"',
         "listen[1].address", "same address as listen[0].address"),
        ('[[listen]]\naddress = "1.2.3.4:587"\nmode = "starttls"\nproxy_protocol = true',
         "listen[0].proxy_protocol", "not supported in this version"),
        ('[[listen]]\naddress = "1.2.3.4:587"\nmode = "starttls"\nproxy_protocol = "yes"',
         "listen[0].proxy_protocol", "true or false"),
        ('[[listen]]\naddress = "1.2.3.4:587"\nmode = "starttls"\nproxy_trusted = ["10.0.0.1/8"]',
         "listen[0].proxy_trusted[0]", "host bits"),
        ('[[listen]]\naddress = "1.2.3.4:587"\nmode = "starttls"\nproxy_trusted = ["lan"]',
         "listen[0].proxy_trusted[0]", "not a network"),
        ('listen = "0.0.0.0:587"', "listen", "must be an array"),
        ("[tls]\ncert = 'c'", "tls.key", "required"),
        ("[tls]\ncert = 'c'\nkey = 'k'\nhandshake_timeout = 'soon'", "tls.handshake_timeout",
         "not a duration"),
        ("[limits]\nmax_message_size = -1", "limits.max_message_size", "at least 1"),
        ("[limits]\nmax_recipients = 2.5", "limits.max_recipients", "must be an integer"),
        ("[limits]\nmax_recipients = true", "limits.max_recipients", "must be an integer"),
        ("[limits]\ncommand_timeout = '0s'", "limits.command_timeout", "longer than zero"),
        ("[limits]\ndata_timeout = -5", "limits.data_timeout", "not a duration"),
        ("[queue]\nretry = []", "queue.retry", "at least one"),
        ("[queue]\nretry = ['1m', 'often']", "queue.retry[1]", "not a duration"),
        ("[queue]\ndir = ''", "queue.dir", "non-empty"),
        ("[queue]\nmax_age = '5 days'", "queue.max_age", "not a duration"),
        ("[queue]\nmax_parallel = 0", "queue.max_parallel", "at least 1"),
        ("[queue]\nmax_parallel = '8'", "queue.max_parallel", "must be an integer"),
        ("[queue]\ndelay_warning = 'soon'", "queue.delay_warning", "not a duration"),
        ("[queue]\ndelay_warning = '0s'", "queue.delay_warning", "longer than zero"),
        ("[queue]\ndelivery_timeout = '0s'", "queue.delivery_timeout", "longer than zero"),
        ("[metrics]\naddress = '127.0.0.1:9587'", "metrics", "not supported in this version"),
        ("[plugins]\nenable = 'passwdfile'", "plugins.enable", "must be an array"),
        ("[plugins]\nenable = ['a', 'a']", "plugins.enable[1]", "listed twice"),
        ("[plugins]\nenable = ['../evil']", "plugins.enable[0]", "not a plugin name"),
        ("[plugins]\nenabled = ['a']", "plugins.enabled", "[plugins.NAME]"),
        ("[plugins.x]\nhook_timeout = 'never'", "plugins.x.hook_timeout", "not a duration"),
        ("hostname = 'a b'", "hostname", "fully qualified"),
        ("limits = 3", "limits", "must be a table"),
        ("[limits]\nstress_threshold = 101", "limits.stress_threshold",
         "must be a percentage from 1 to 100, got 101"),
        ("[limits]\nstress_threshold = 0", "limits.stress_threshold", "at least 1"),
    ],
)
def test_bad_configuration_names_the_dotted_key(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    if not text.startswith("hostname"):
        text = 'hostname = "m.example"\n' + text
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert info.value.path == path
    assert fragment in info.value.message
    assert str(info.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize("percent", [1, 100])
def test_stress_threshold_may_be_any_percentage(tmp_path: Path, percent: int) -> None:
    config = load(tmp_path, f"[limits]\nstress_threshold = {percent}\n")
    assert isinstance(config, Config) and config.limits.stress_threshold == percent


def test_toml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    err = error_for(tmp_path, "[limits]\nmax_recipients = \n")
    assert err.key == ""
    assert "line 3" in str(err)
    assert str(err).startswith(str(tmp_path / "submitd.toml"))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file") as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.path == tmp_path / "absent.toml"


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "submitd.toml"
    path.write_bytes(b'hostname = "\xff"\n')
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0), ("250ms", 0.25),
     ("1.5h", 5400.0), ("45", 45.0), (30, 30.0), (2.5, 2.5), (0, 0.0)],
)
def test_parse_duration_accepts_units_and_numbers(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5 m", "5min", "m", "-5s", -1, True, None, "1e3s", float("nan"), float("inf"),
             [1]]
)
def test_parse_duration_refuses_garbage(text: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(300.0, "5m"), (86400.0 * 5, "5d"), (90.0, "90s"), (0.25, "250ms"), (7200.0, "2h")],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_default_config_path_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBMITD_CONFIG", raising=False)
    assert default_config_path() == DEFAULT_CONFIG_PATH == Path("/etc/submitd/submitd.toml")
    monkeypatch.setenv("SUBMITD_CONFIG", "/srv/mail/submitd.toml")
    assert default_config_path() == Path("/srv/mail/submitd.toml")


def test_plugins_parse_durations_through_the_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'hostname = "mail.example.org"\n'))
    assert config.parse_duration("10s") == 10.0
    with pytest.raises(ValueError, match="not a duration"):
        config.parse_duration("soon")
