"""The ``submitd`` command: exit codes, messages without tracebacks, and what each command does."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types
from pathlib import Path

import argon2
import pytest

from submitd import cli
from submitd.certs import write_selfsigned
from submitd.config import Config, load_config
from submitd.passwords import UsersFile
from submitd.secret import Secret

SUBMITD = Path(sys.executable).with_name("submitd")
CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as a user would."""
    return subprocess.run(
        [str(SUBMITD), *argv], input=stdin, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL if stdin is None else None,
        env={k: v for k, v in os.environ.items() if k != "SUBMITD_CONFIG"},
    )


@pytest.fixture
def stdin(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    fake = io.StringIO()
    monkeypatch.setattr(sys, "stdin", fake)
    return fake


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    """A config with one listener, a real self-signed certificate and a users file."""
    write_selfsigned(tmp_path / "tls", ["localhost"])
    (tmp_path / "users").write_text(f"alice {CHEAP.hash('pw')} alice@example.com\n")
    config = tmp_path / "submitd.toml"
    config.write_text(
        'hostname = "mail.example.org"\n'
        '[[listen]]\naddress = "127.0.0.1:2587"\nmode = "starttls"\n'
        '[tls]\ncert = "tls/cert.pem"\nkey = "tls/key.pem"\n'
        '[limits]\ncommand_timeout = "2m"\n'
        '[plugins]\nenable = ["passwdfile"]\n'
        '[plugins.passwdfile]\npath = "users"\nhook_timeout = "5s"\n'
    )
    return config


# --- quickstart -----------------------------------------------------------------------------


def test_quickstart_writes_a_working_setup_and_prints_the_password_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "var"
    assert cli.main(["quickstart", str(target)]) == 0
    out = capsys.readouterr().out
    password = next(
        line.split()[1] for line in out.splitlines() if line.startswith("Password:")
    )
    assert out.count(password) == 2  # the password line and the swaks command
    cert = target / "tls" / "cert.pem"
    assert (
        "swaks --server 127.0.0.1 --port 2587 --tls --tls-verify "
        f"--tls-ca-path {cert} --auth PLAIN --auth-user demo --auth-password {password} "
        "--from demo@example.com --to someone@example.com"
    ) in out

    config = load_config(target / "submitd.toml")
    assert config.hostname == "localhost"
    assert [(lc.address, lc.mode.value) for lc in config.listeners] == [
        ("127.0.0.1:2587", "starttls"), ("127.0.0.1:2465", "implicit")
    ]
    assert config.tls is not None and config.tls.cert == cert
    assert config.queue.dir == target / "spool"
    assert config.plugins.enable == ("passwdfile", "maildir")
    assert config.plugin_table("maildir")["path"] == "mail"
    users = UsersFile.load(target / "users")
    assert users.verify("demo", Secret(password)).ok
    assert users.sender_allowed("demo", "demo@example.com")
    assert password not in (target / "users").read_text()
    assert oct((target / "users").stat().st_mode & 0o777) == "0o600"


def test_quickstart_config_passes_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["quickstart", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["check-config", "-c", str(tmp_path / "submitd.toml")]) == 0
    out = capsys.readouterr().out
    assert "names: localhost, 127.0.0.1" in out
    assert '[plugins.maildir]\npath = "mail"' in out


def test_quickstart_refuses_an_existing_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "submitd.toml").write_text("# mine\n")
    assert cli.main(["quickstart", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    existing = tmp_path / "submitd.toml"
    assert err == f"submitd: {existing} already exists; choose an empty directory\n"
    assert (tmp_path / "submitd.toml").read_text() == "# mine\n"
    assert not (tmp_path / "users").exists()


# --- check-config and serve -----------------------------------------------------------------


def test_check_config_prints_the_effective_configuration(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    out = capsys.readouterr().out
    assert f"# effective configuration of {setup}" in out
    assert 'command_timeout = "2m"' in out
    assert "max_recipients = 100" in out  # defaults are shown too
    assert f'cert = "{setup.parent / "tls" / "cert.pem"}"' in out
    assert '[plugins.passwdfile]\npath = "users"\nhook_timeout = "5s"' in out


def test_check_config_output_is_itself_a_valid_configuration(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    again = tmp_path / "elsewhere" / "effective.toml"
    again.parent.mkdir()
    again.write_text(capsys.readouterr().out)
    original, reloaded = load_config(setup), load_config(again)
    for part in ("hostname", "listeners", "tls", "limits", "queue", "plugins"):
        assert getattr(reloaded, part) == getattr(original, part)


def test_check_config_masks_credentials_in_plugin_tables(tmp_path: Path) -> None:
    path = tmp_path / "submitd.toml"
    path.write_text(
        'hostname = "m.example.org"\n[plugins.smarthost]\npassword = "hunter2"\n'
        'password_file = "smarthost.secret"\nauth = { token = "t0k3n", user = "u" }\n'
    )
    text = cli.render_config(load_config(path))
    assert "hunter2" not in text and "t0k3n" not in text
    assert 'password = "***"' in text
    assert 'password_file = "smarthost.secret"' in text
    assert 'auth = { token = "***", user = "u" }' in text


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("[limits]", "[limits]\nmax_recipeints = 5"),
         "limits.max_recipeints: unknown key (did you mean 'max_recipients'?)"),
        (('path = "users"', 'path = "nobody"'), "plugins.passwdfile.path: "),
        (('enable = ["passwdfile"]', 'enable = ["passwdfile", "nosuch"]'),
         "plugins.enable[1]: no plugin named 'nosuch'"),
        (('key = "tls/key.pem"', 'key = "tls/missing.pem"'), "tls.key: "),
        (('cert = "tls/cert.pem"', 'cert = "users"'), "tls.cert: the file holds no certificate"),
    ],
)
def test_check_config_reports_the_file_and_key_without_a_traceback(
    setup: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], expected: str
) -> None:
    setup.write_text(setup.read_text().replace(*edit))
    assert cli.main(["check-config", "-c", str(setup)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"submitd: {setup}: {expected}")
    assert "Traceback" not in captured.err


def test_check_config_uses_submitd_config_from_the_environment(
    setup: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SUBMITD_CONFIG", str(setup))
    assert cli.main(["check-config"]) == 0
    assert str(setup) in capsys.readouterr().out


def test_serve_loads_the_config_and_returns_the_server_exit_code(
    setup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Config] = []

    def run_server(config: Config) -> int:
        seen.append(config)
        return 0

    fake = types.ModuleType("submitd.server")
    fake.run_server = run_server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "submitd.server", fake)
    assert cli.main(["serve", "-c", str(setup)]) == 0
    assert [c.path for c in seen] == [setup]


def test_serve_with_a_bad_config_never_starts_the_server(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.write_text("hostname = \n")
    assert cli.main(["serve", "-c", str(setup)]) == 2
    assert "TOML syntax error" in capsys.readouterr().err


# --- user -----------------------------------------------------------------------------------


def test_user_add_list_passwd_del_round_trip(
    tmp_path: Path, stdin: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users"
    stdin.write("first password\n")
    stdin.seek(0)
    assert cli.main(["user", "add", "--file", str(users), "bob", "--sender", "bob@Example.com",
                     "--sender", "@lists.example.com", "--password-stdin"]) == 0
    assert UsersFile.load(users).verify("bob", Secret("first password")).ok

    assert cli.main(["user", "list", "--file", str(users)]) == 0
    listing = capsys.readouterr().out
    assert "bob  bob@example.com @lists.example.com\n" in listing
    assert "argon2" not in listing

    stdin.seek(0)
    stdin.truncate()
    stdin.write("second password\r\n")
    stdin.seek(0)
    assert cli.main(["user", "passwd", "--file", str(users), "bob", "--password-stdin"]) == 0
    assert UsersFile.load(users).verify("bob", Secret("second password")).ok

    assert cli.main(["user", "del", "--file", str(users), "bob"]) == 0
    assert "bob" not in UsersFile.load(users)


def test_user_commands_find_the_users_file_through_the_config(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["user", "list", "-c", str(setup)]) == 0
    assert capsys.readouterr().out == "alice  alice@example.com\n"
    assert cli.main(["user", "del", "-c", str(setup), "alice"]) == 0
    assert len(UsersFile.load(setup.parent / "users")) == 0


def test_user_command_without_a_passwdfile_table_says_to_use_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "submitd.toml"
    config.write_text('hostname = "m.example.org"\n')
    assert cli.main(["user", "list", "-c", str(config)]) == 2
    assert "plugins.passwdfile.path: not set; name the users file with --file" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "alice", "--password-stdin"], "user 'alice' already exists"),
        (["passwd", "nobody", "--password-stdin"], "no user 'nobody'"),
        (["del", "nobody"], "no user 'nobody'"),
        (["add", "new user", "--password-stdin"], "invalid login"),
        (["add", "carol", "--sender", "carol@localhost", "--password-stdin"], "invalid sender"),
        (["add", "carol", "--password-stdin"], "no password on stdin"),
    ],
)
def test_user_mistakes_exit_2_with_a_message(
    setup: Path, stdin: io.StringIO, capsys: pytest.CaptureFixture[str], argv: list[str],
    message: str,
) -> None:
    before = (setup.parent / "users").read_bytes()
    assert cli.main(["user", argv[0], "-c", str(setup), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("submitd: ")
    assert message in err
    assert (setup.parent / "users").read_bytes() == before


def test_password_prompt_needs_a_terminal(
    tmp_path: Path, stdin: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["user", "add", "--file", str(tmp_path / "users"), "bob"]) == 2
    assert capsys.readouterr().err == (
        "submitd: stdin is not a terminal; pipe the password in with --password-stdin\n"
    )
    assert not (tmp_path / "users").exists()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("answers", "code", "message"),
    [
        (["typed on a tty", "typed on a tty"], 0, ""),
        (["typed on a tty", "typo on a tty"], 2, "the passwords do not match"),
        (["", ""], 2, "empty password"),
    ],
)
def test_password_prompt_asks_twice_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    answers: list[str], code: int, message: str,
) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return answers[len(prompts) - 1]

    monkeypatch.setattr(sys, "stdin", FakeTTY())
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    users = tmp_path / "users"
    assert cli.main(["user", "add", "--file", str(users), "bob"]) == code
    assert message in capsys.readouterr().err
    if code == 0:
        assert prompts == ["Password: ", "Repeat password: "]
        assert UsersFile.load(users).verify("bob", Secret("typed on a tty")).ok


def test_interrupt_at_the_prompt_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", FakeTTY())
    monkeypatch.setattr("getpass.getpass", interrupted)
    assert cli.main(["user", "add", "--file", str(tmp_path / "users"), "bob"]) == 130


def test_io_failure_exits_1_naming_the_path(
    tmp_path: Path, stdin: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin.write("long enough password\n")
    stdin.seek(0)
    missing_dir = tmp_path / "no" / "such"
    assert cli.main(["user", "add", "--file", str(missing_dir / "users"), "bob",
                     "--password-stdin"]) == 1
    err = capsys.readouterr().err
    assert err == f"submitd: {missing_dir}: No such file or directory\n"


# --- cert and argument errors ---------------------------------------------------------------


def test_cert_selfsigned_writes_the_pair_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["cert", "selfsigned", "--host", "mail.example.org", "--host", "192.0.2.1",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert f"certificate: {tmp_path / 'cert.pem'}" in capsys.readouterr().out
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    bad = ["cert", "selfsigned", "--host", "not a name", "--out", str(tmp_path / "x")]
    assert cli.main(bad) == 2
    assert "not a host name" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["user"], ["user", "add"], ["cert", "selfsigned", "--out", "x"],
     ["user", "list", "-c", "a.toml", "--file", "users"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage: submitd" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "check-config" in capsys.readouterr().out


# --- the installed console script -----------------------------------------------------------


def test_console_script_reports_a_bad_config_with_exit_2_and_no_traceback(
    tmp_path: Path,
) -> None:
    config = tmp_path / "submitd.toml"
    config.write_text('hostname = "m.example.org"\n[limits]\nmax_recipients = -3\n')
    result = run("check-config", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr == (
        f"submitd: {config}: limits.max_recipients: must be at least 1, got -3\n"
    )
    assert result.stdout == ""


def test_console_script_quickstart_then_refuses_to_overwrite(tmp_path: Path) -> None:
    first = run("quickstart", str(tmp_path / "var"))
    assert first.returncode == 0, first.stderr
    assert "Password: " in first.stdout
    second = run("quickstart", str(tmp_path / "var"))
    assert second.returncode == 2
    assert "already exists" in second.stderr
    assert "Traceback" not in second.stderr


def test_console_script_manages_users_from_stdin(tmp_path: Path) -> None:
    users = str(tmp_path / "users")
    added = run("user", "add", "--file", users, "bob", "--sender", "bob@example.com",
                "--password-stdin", stdin="pw from a pipe\n")
    assert added.returncode == 0, added.stderr
    listed = run("user", "list", "--file", users)
    assert listed.stdout == "bob  bob@example.com\n"
    no_tty = run("user", "passwd", "--file", users, "bob")
    assert no_tty.returncode == 2
    assert "--password-stdin" in no_tty.stderr
    assert "Traceback" not in no_tty.stderr


def test_check_config_shows_and_round_trips_the_queue_settings(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.write_text(setup.read_text() + '\n[queue]\nmax_parallel = 3\ndelay_warning = "4h"\n'
                     'delivery_timeout = "20m"\n')
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    out = capsys.readouterr().out
    assert 'max_parallel = 3\ndelivery_timeout = "20m"\ndelay_warning = "4h"' in out
    again = tmp_path / "effective.toml"
    again.write_text(out)
    assert load_config(again).queue.delay_warning == 4 * 3600
    assert load_config(again).queue == load_config(setup).queue
