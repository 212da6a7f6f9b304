"""The ``submitd`` command: exit codes, messages without tracebacks, and what each command does."""

from __future__ import annotations

import datetime as dt
import io
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import argon2
import pytest
from cryptography import x509

from submitd import cli
from submitd.certs import write_selfsigned
from submitd.config import Config, TLSConfig, load_config
from submitd.passwords import UsersFile
from submitd.secret import Secret
from submitd.server.tls import make_server_context

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
    assert config.plugins.enable == ("passwdfile", "relay", "headers", "maildir")
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
    seen: list[tuple[Path, str]] = []

    def run_server(config: Config, *, log_level: str = "INFO") -> int:
        seen.append((config.path, log_level))
        return 0

    fake = types.ModuleType("submitd.server")
    fake.run_server = run_server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "submitd.server", fake)
    assert cli.main(["serve", "-c", str(setup)]) == 0
    assert cli.main(["serve", "-c", str(setup), "--log-level", "debug"]) == 0
    assert seen == [(setup, "INFO"), (setup, "DEBUG")]
    assert cli.main(["serve", "-c", str(setup), "--log-level", "chatty"]) == 2


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


# --- commands that work as printed (issue 10, item 2) ----------------------------------------


def missing_config_line(path: Path, source: str) -> str:
    return (f"submitd: no configuration file at {path} ({source}); give one with -c FILE or "
            f"$SUBMITD_CONFIG, or make a local test setup with `{SUBMITD} quickstart DIR`\n")


@pytest.mark.parametrize(
    "argv", [["serve"], ["check-config"], ["user", "list"], ["user", "add", "bob"],
             ["queue", "list"]],
)
def test_a_missing_config_says_how_to_give_or_make_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    default = tmp_path / "etc" / "submitd.toml"
    monkeypatch.setattr("submitd.config.DEFAULT_CONFIG_PATH", default)
    monkeypatch.delenv("SUBMITD_CONFIG", raising=False)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == missing_config_line(default, "the default")

    from_env = tmp_path / "env.toml"
    monkeypatch.setenv("SUBMITD_CONFIG", str(from_env))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == missing_config_line(from_env, "from $SUBMITD_CONFIG")

    given = tmp_path / "given.toml"
    assert cli.main([*argv[:-1], argv[-1], "-c", str(given)]) == 2
    assert capsys.readouterr().err == missing_config_line(given, "given with -c")


def test_user_commands_with_file_need_no_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SUBMITD_CONFIG", str(tmp_path / "absent.toml"))
    assert cli.main(["user", "list", "--file", str(tmp_path / "users")]) == 2
    assert capsys.readouterr().err == f"submitd: {tmp_path / 'users'}: no such file\n"


@pytest.mark.parametrize(
    ("argv", "listed"),
    [([], ["serve", "check-config", "quickstart", "user", "queue", "cert"]),
     (["user"], ["add", "passwd", "senders", "del", "list"]),
     (["queue"], ["list", "show", "flush", "hold", "release", "delete"]),
     (["cert"], ["selfsigned"])],
)
def test_a_command_without_its_action_lists_the_actions_and_exits_2(
    argv: list[str], listed: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error:" not in captured.err
    for name in listed:
        assert any(f"\n    {name}{end}" in captured.err for end in " \n")


def test_console_script_without_arguments_prints_help(tmp_path: Path) -> None:
    result = run()
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: submitd")
    assert "check-config" in result.stderr and "quickstart" in result.stderr


def printed_command(out: str, after: str) -> list[str]:
    """The command line printed on the line after the one starting with ``after``."""
    lines = out.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(after))
    return shlex.split(lines[index + 1])


def test_quickstart_prints_commands_that_run_when_pasted(tmp_path: Path) -> None:
    target = tmp_path / "var"
    # As `make run` does: the script by a relative path, from the project directory.
    made = subprocess.run(
        ["./submitd", "quickstart", str(target)], cwd=SUBMITD.parent, capture_output=True,
        text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert made.returncode == 0, made.stderr
    config = str(target / "submitd.toml")
    # Pasted anywhere: another directory, no $SUBMITD_CONFIG, no venv on $PATH.
    env = {k: v for k, v in os.environ.items() if k not in ("SUBMITD_CONFIG", "PATH")}

    serve = printed_command(made.stdout, "Start the server:")
    assert serve == [str(SUBMITD), "serve", "-c", config]
    version = subprocess.run([serve[0], "--version"], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL, cwd="/", env=env)
    assert version.returncode == 0 and version.stdout.startswith("submitd ")

    passwd = printed_command(made.stdout, "The password is shown only now")
    assert passwd == [str(SUBMITD), "user", "passwd", "-c", config, "demo"]
    changed = subprocess.run([*passwd, "--password-stdin"], input="a new long password\n",
                             capture_output=True, text=True, timeout=60, cwd="/", env=env)
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout == "changed the password of demo\n"
    users = UsersFile.load(target / "users")
    assert users.verify("demo", Secret("a new long password")).ok


def test_quickstart_in_process_names_the_venv_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["quickstart", str(tmp_path)]) == 0  # sys.argv[0] is pytest here
    out = capsys.readouterr().out
    assert f"  {SUBMITD} serve -c {tmp_path / 'submitd.toml'}\n" in out
    assert f"  {SUBMITD} user passwd -c {tmp_path / 'submitd.toml'} demo\n" in out
    assert "submitd serve -c" not in out.replace(f"{SUBMITD} serve", "")
    text = (tmp_path / "submitd.toml").read_text()  # the config's comments say the same
    assert f"# Run it with: {SUBMITD} serve -c {tmp_path / 'submitd.toml'}\n" in text
    assert f"with: {SUBMITD} user add|passwd|senders|del|list -c {tmp_path / 'submitd.toml'}\n" \
        in text


# --- users: senders, password length, listing (item 3) -----------------------------------------


def senders_of(setup: Path, login: str = "alice") -> tuple[str, ...]:
    entry = UsersFile.load(setup.parent / "users").lookup(login)
    assert entry is not None
    return entry.senders


def test_user_senders_shows_replaces_and_edits_keeping_the_password(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = setup.parent / "users"
    old_hash = UsersFile.load(users).entries[0].hash
    c = ["-c", str(setup)]
    assert cli.main(["user", "senders", *c, "alice"]) == 0
    assert capsys.readouterr().out == "alice@example.com\n"

    assert cli.main(["user", "senders", *c, "alice", "--sender", "a@Example.ORG",
                     "--sender", "@lists.example.org"]) == 0
    assert capsys.readouterr().out == "senders of alice: a@example.org @lists.example.org\n"
    assert senders_of(setup) == ("a@example.org", "@lists.example.org")

    assert cli.main(["user", "senders", *c, "alice", "--add-sender", "<>",
                     "--remove-sender", "@lists.example.org", "--add-sender", "a@example.org"]) == 0
    assert capsys.readouterr().out == "senders of alice: a@example.org <>\n"

    assert cli.main(["user", "senders", *c, "alice", "--no-senders"]) == 0
    assert capsys.readouterr().out == "senders of alice: (may not send)\n"
    assert senders_of(setup) == ()
    assert UsersFile.load(users).entries[0].hash == old_hash


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["alice", "--remove-sender", "bob@example.com"],
         "user 'alice' has no sender 'bob@example.com' (senders: alice@example.com)"),
        (["alice", "--sender", "a@example.com", "--add-sender", "b@example.com"],
         "--sender and --no-senders replace the whole list; "
         "use them without --add-sender/--remove-sender"),
        (["alice", "--add-sender", "x@example.com", "--remove-sender", "x@example.com"],
         "both added and removed: x@example.com"),
        (["alice", "--add-sender", "x@localhost"], "invalid sender 'x@localhost'"),
        (["nobody", "--sender", "x@example.com"], "no user 'nobody'"),
    ],
)
def test_user_senders_mistakes_change_nothing(
    setup: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = (setup.parent / "users").read_bytes()
    assert cli.main(["user", "senders", "-c", str(setup), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("submitd: ") and message in err and err.count("\n") == 1
    assert (setup.parent / "users").read_bytes() == before


def test_user_list_shows_each_logins_senders(
    setup: Path, stdin: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin.write("a long enough password\n")
    stdin.seek(0)
    assert cli.main(["user", "add", "-c", str(setup), "robot", "--password-stdin"]) == 0
    capsys.readouterr()
    assert cli.main(["user", "list", "-c", str(setup)]) == 0
    assert capsys.readouterr().out == "alice  alice@example.com\nrobot  (may not send)\n"


TOO_SHORT = "submitd: the password is too short: at least 12 characters\n"


@pytest.mark.parametrize("action", [["add", "bob"], ["passwd", "alice"]])
def test_a_short_password_is_refused(
    setup: Path, stdin: io.StringIO, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    before = (setup.parent / "users").read_bytes()
    stdin.write("elevenchars\n")
    stdin.seek(0)
    assert cli.main(["user", action[0], "-c", str(setup), action[1], "--password-stdin"]) == 2
    assert capsys.readouterr().err == TOO_SHORT
    assert (setup.parent / "users").read_bytes() == before
    stdin.seek(0)
    stdin.truncate()
    stdin.write("twelve chars\n")
    stdin.seek(0)
    assert cli.main(["user", action[0], "-c", str(setup), action[1], "--password-stdin"]) == 0


def test_the_minimum_length_comes_from_the_passwdfile_table(
    setup: Path, stdin: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.write_text(setup.read_text() + "min_password_length = 20\n")
    stdin.write("nineteen characters\n")
    stdin.seek(0)
    assert cli.main(["user", "passwd", "-c", str(setup), "alice", "--password-stdin"]) == 2
    assert capsys.readouterr().err == (
        "submitd: the password is too short: at least 20 characters\n"
    )
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    assert "min_password_length = 20" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-1", '"12"', "true", "1.5"])
def test_a_bad_minimum_length_is_a_config_error(
    setup: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    setup.write_text(setup.read_text() + f"min_password_length = {value}\n")
    expected = f"submitd: {setup}: plugins.passwdfile.min_password_length: must be a positive"
    assert cli.main(["user", "list", "-c", str(setup)]) == 2
    assert capsys.readouterr().err.startswith(expected)
    assert cli.main(["check-config", "-c", str(setup)]) == 2
    assert capsys.readouterr().err.startswith(expected)


def test_a_short_password_at_the_prompt_is_refused_before_asking_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return "short"

    monkeypatch.setattr(sys, "stdin", FakeTTY())
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    assert cli.main(["user", "add", "--file", str(tmp_path / "users"), "bob"]) == 2
    assert capsys.readouterr().err == TOO_SHORT
    assert prompts == ["Password: "]


def test_console_script_refuses_a_short_password_from_stdin(tmp_path: Path) -> None:
    result = run("user", "add", "--file", str(tmp_path / "users"), "bob",
                 "--password-stdin", stdin="short\n")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", TOO_SHORT)
    assert not (tmp_path / "users").exists()


# --- check-config warnings (item 4) ------------------------------------------------------------


NO_DELIVERY = (
    "submitd: warning: no enabled plugin delivers mail (none implements submitd_deliver): "
    "every message would wait in the queue for [queue] max_age (5d) and then bounce; "
    "enable one in [plugins] enable, e.g. maildir or smarthost\n"
)
NO_SENDER_CHECK = (
    'submitd: warning: no plugin checks senders ("relay" is not in [plugins] enable): a '
    "logged-in user may send as any address, in MAIL FROM and in From:; add \"relay\" to "
    "enable\n"
)


def with_maildir(setup: Path) -> None:
    text = setup.read_text().replace('["passwdfile"]', '["passwdfile", "relay", "maildir"]')
    setup.write_text(text.replace('hostname = "mail.example.org"', 'hostname = "localhost"')
                     + '[plugins.maildir]\npath = "mail"\n')


def test_check_config_warns_about_setups_that_silently_fail(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# effective configuration")
    assert captured.err == NO_DELIVERY + NO_SENDER_CHECK + (
        "submitd: warning: hostname mail.example.org is not among the certificate's names "
        "(localhost); clients that verify the certificate against it will refuse to connect "
        "(RFC 6125 §6.4)\n"
    )


def test_check_config_is_quiet_about_a_sound_setup(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_maildir(setup)
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["quickstart", str(tmp_path / "qs")]) == 0
    capsys.readouterr()
    assert cli.main(["check-config", "-c", str(tmp_path / "qs" / "submitd.toml")]) == 0
    assert capsys.readouterr().err == ""


def test_check_config_accepts_a_wildcard_certificate_for_the_hostname(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_maildir(setup)
    setup.write_text(setup.read_text().replace('hostname = "localhost"',
                                               'hostname = "mail.example.org"'))
    write_selfsigned(setup.parent / "tls", ["*.example.org"], overwrite=True)
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    assert capsys.readouterr().err == ""
    write_selfsigned(setup.parent / "tls", ["*.mail.example.org", "example.org"], overwrite=True)
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    assert "hostname mail.example.org is not among the certificate's names " \
        "(*.mail.example.org, example.org)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("validity", "warning"),
    [
        (dt.timedelta(days=10, hours=1), " (in 10 days); renew it and send SIGHUP to reload\n"),
        (dt.timedelta(hours=2), " (in less than a day); renew it and send SIGHUP to reload\n"),
        (dt.timedelta(minutes=-30), "; clients that verify it refuse to connect\n"),
    ],
)
def test_check_config_warns_about_a_certificate_that_expires_soon(
    setup: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    validity: dt.timedelta, warning: str,
) -> None:
    with_maildir(setup)
    monkeypatch.setattr("submitd.certs.VALIDITY", validity)
    cert, key = write_selfsigned(setup.parent / "tls", ["localhost"], overwrite=True)
    assert cli.main(["check-config", "-c", str(setup)]) == 0
    err = capsys.readouterr().err
    ends = load_cert_end(cert)
    verb = "expired on" if validity < dt.timedelta(0) else "expires on"
    until = f"{ends:%Y-%m-%d %H:%M} UTC"
    assert err == f"submitd: warning: the certificate {verb} {until}{warning}"
    make_server_context(TLSConfig(cert=cert, key=key))  # start-up still accepts it


def load_cert_end(cert: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc


def test_check_config_explains_a_key_of_another_certificate(
    setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, other_key = write_selfsigned(tmp_path / "other", ["localhost"])
    setup.write_text(setup.read_text().replace("tls/key.pem", str(other_key)))
    assert cli.main(["check-config", "-c", str(setup)]) == 2
    assert capsys.readouterr().err == (
        f"submitd: {setup}: tls.key: the key does not belong to this certificate "
        f"(key {other_key}, certificate {setup.parent / 'tls' / 'cert.pem'})\n"
    )
