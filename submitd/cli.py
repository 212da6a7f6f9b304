"""The ``submitd`` command (README, "Command line").

Exit codes: 0 success, 1 runtime failure (I/O errors), 2 usage or configuration error,
130 interrupted. A user's mistake prints ``submitd: <message>`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from ._cli_queue import add_queue_commands
from .certs import CertificateInfo, inspect_certificate, write_selfsigned
from .config import Config, default_config_path, format_duration, load_config
from .errors import ConfigError, SubmitdError, UsageError
from .passwords import UsersFile, validate_login, validate_sender
from .quickstart import quickstart
from .secret import Secret

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``submitd`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed help or the usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except SubmitdError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _error(_describe_os_error(exc))
        return EXIT_FAILURE


def _error(message: str) -> None:
    print(f"submitd: {message}", file=sys.stderr)


def _describe_os_error(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{exc.filename}: {text}" if exc.filename else text


# --- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (each leaf parser sets ``handler``)."""
    parser = argparse.ArgumentParser(
        prog="submitd", description="An authenticated SMTP submission server (RFC 6409)."
    )
    parser.add_argument("--version", action="version", version=f"submitd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("serve", help="run the server in the foreground")
    _config_option(p)
    p.set_defaults(handler=cmd_serve)

    p = commands.add_parser("check-config", help="validate and print the effective configuration")
    _config_option(p)
    p.set_defaults(handler=cmd_check_config)

    p = commands.add_parser("quickstart", help="write a complete local test setup into DIR")
    p.add_argument("dir", metavar="DIR", type=Path)
    p.set_defaults(handler=cmd_quickstart)

    user = commands.add_parser("user", help="manage the users file").add_subparsers(
        dest="user_command", metavar="ACTION", required=True
    )
    p = user.add_parser("add", help="add a login")
    _users_file_options(p)
    p.add_argument("login", metavar="USER")
    p.add_argument(
        "--sender", action="append", default=[], metavar="ADDR",
        help="an address or @domain the user may send as (repeatable); <> for bounces",
    )
    _password_option(p)
    p.set_defaults(handler=cmd_user_add)
    p = user.add_parser("passwd", help="set a login's password")
    _users_file_options(p)
    p.add_argument("login", metavar="USER")
    _password_option(p)
    p.set_defaults(handler=cmd_user_passwd)
    p = user.add_parser("del", help="remove a login")
    _users_file_options(p)
    p.add_argument("login", metavar="USER")
    p.set_defaults(handler=cmd_user_del)
    p = user.add_parser("list", help="list logins and their senders")
    _users_file_options(p)
    p.set_defaults(handler=cmd_user_list)

    add_queue_commands(commands, _config_option)

    cert = commands.add_parser("cert", help="certificate helpers").add_subparsers(
        dest="cert_command", metavar="ACTION", required=True
    )
    p = cert.add_parser("selfsigned", help="write a self-signed ECDSA P-256 certificate")
    p.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="a DNS name or IP address for the certificate (repeatable)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory for cert.pem and key.pem")
    p.set_defaults(handler=cmd_cert_selfsigned)
    return parser


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c", "--config", type=Path, metavar="FILE",
        help="configuration file (default: $SUBMITD_CONFIG, else /etc/submitd/submitd.toml)",
    )


def _users_file_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("-c", "--config", type=Path, metavar="FILE",
                       help="use the users file named in [plugins.passwdfile] of this config")
    group.add_argument("--file", type=Path, metavar="USERSFILE", help="the users file itself")


def _password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")


def _load(args: argparse.Namespace) -> Config:
    path: Path | None = args.config
    return load_config(path if path is not None else default_config_path())


# --- serve, check-config, quickstart, cert --------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """``submitd serve``: run the server until it is stopped (see :func:`run_server`)."""
    config = _load(args)
    from .server import run_server  # the server pulls in everything; only load it here

    return run_server(config)


def cmd_check_config(args: argparse.Namespace) -> int:
    """``submitd check-config``: the start-up validation, then the effective configuration."""
    config = _load(args)
    cert = _check_certificate(config)
    from .plugin_manager import configure_plugins, create_plugin_manager

    pm = create_plugin_manager(config)
    configure_plugins(pm, config)
    print(render_config(config, cert), end="")
    if cert.expired:
        _error(f"warning: the certificate {cert.subject} has expired")
    return EXIT_OK


def _check_certificate(config: Config) -> CertificateInfo:
    """Load the certificate and key as start-up does (``load_cert_chain``) and describe them."""
    if config.tls is None:  # the server refuses to start without one
        raise ConfigError(config.path, "tls", "a [tls] table is required to serve")
    try:
        return inspect_certificate(config.tls.cert, config.tls.key)
    except OSError as exc:
        key = "tls.key" if exc.filename and Path(exc.filename) == config.tls.key else "tls.cert"
        raise ConfigError(config.path, key, _describe_os_error(exc)) from None
    except ValueError as exc:
        raise ConfigError(config.path, "tls", str(exc)) from None


def cmd_quickstart(args: argparse.Namespace) -> int:
    """``submitd quickstart DIR``."""
    result = quickstart(args.dir)
    print(f"Wrote a local submitd setup to {result.directory}")
    print(f"  configuration: {result.config_path}")
    print(f"  users file:    {result.users_path}")
    print(f"  certificate:   {result.cert_path} (self-signed for localhost, 127.0.0.1)")
    print()
    print(f"Login:    {result.login} (may send as {result.sender})")
    print(f"Password: {result.password.reveal()}")
    print("The password is shown only now; change it with `submitd user passwd`.")
    print()
    print(f"Start the server:  submitd serve -c {result.config_path}")
    print("Send a test message:")
    print(f"  {result.swaks_command()}")
    return EXIT_OK


def cmd_cert_selfsigned(args: argparse.Namespace) -> int:
    """``submitd cert selfsigned --host NAME --out DIR``."""
    try:
        cert, key = write_selfsigned(args.out, args.host)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except FileExistsError as exc:
        raise UsageError(
            f"{exc.filename} already exists; remove it or choose another --out"
        ) from None
    print(f"certificate: {cert}")
    print(f"key:         {key}")
    return EXIT_OK


# --- user -----------------------------------------------------------------------------------


def _users_path(args: argparse.Namespace) -> Path:
    """The users file: ``--file``, else ``[plugins.passwdfile] path`` of the config."""
    if args.file is not None:
        path: Path = args.file
        return path
    config = _load(args)
    raw = config.plugin_table("passwdfile").get("path")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(
            config.path, "plugins.passwdfile.path", "not set; name the users file with --file"
        )
    return config.resolve(raw)


def _read_password(args: argparse.Namespace) -> Secret:
    if args.password_stdin:
        line = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
        if not line:
            raise UsageError("no password on stdin")
        return Secret(line)
    if not sys.stdin.isatty():
        raise UsageError("stdin is not a terminal; pipe the password in with --password-stdin")
    first = Secret(getpass.getpass("Password: "))
    if not first:
        raise UsageError("empty password")
    if Secret(getpass.getpass("Repeat password: ")) != first:
        raise UsageError("the passwords do not match")
    return first


def _checked(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_user_add(args: argparse.Namespace) -> int:
    """``submitd user add USER [--sender ADDR ...] [--password-stdin]``."""
    path = _users_path(args)
    login = _checked(validate_login, args.login)
    senders = [_checked(validate_sender, s) for s in args.sender]
    users = UsersFile.load(path, missing_ok=True)
    if login in users:  # say so before asking for a password (add re-checks under the lock)
        raise UsageError(f"user {login!r} already exists in {path}")
    users.add_user(login, _read_password(args), senders)
    note = "" if senders else " (no --sender: it can log in but not send)"
    print(f"added {login} to {path}{note}")
    return EXIT_OK


def cmd_user_passwd(args: argparse.Namespace) -> int:
    """``submitd user passwd USER [--password-stdin]``."""
    path = _users_path(args)
    users = UsersFile.load(path)
    if args.login not in users:
        raise UsageError(f"no user {args.login!r} in {path}")
    users.set_password(args.login, _read_password(args))
    print(f"changed the password of {args.login}")
    return EXIT_OK


def cmd_user_del(args: argparse.Namespace) -> int:
    """``submitd user del USER``."""
    path = _users_path(args)
    UsersFile.load(path).delete_user(args.login)
    print(f"removed {args.login} from {path}")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    """``submitd user list``: logins and their senders, never hashes."""
    users = UsersFile.load(_users_path(args))
    entries = users.entries
    width = max((len(e.login) for e in entries), default=0)
    for e in entries:
        senders = " ".join(e.senders) if e.senders else "(may not send)"
        print(f"{e.login:<{width}}  {senders}")
    return EXIT_OK


# --- the effective configuration, as TOML ---------------------------------------------------

_BARE_KEY = re.compile(r"\A[A-Za-z0-9_-]+\Z")
# Plugin settings that look like credentials are masked; *_file and *_path name files.
_SECRET_KEY = re.compile(r"password|secret|token|passphrase", re.IGNORECASE)


def render_config(config: Config, cert: CertificateInfo | None = None) -> str:
    """Render ``config`` as TOML: every default filled in, paths absolute, secrets masked.

    The output is itself a valid configuration file.
    """
    out = [f"# effective configuration of {config.path}"]
    if cert is not None:
        out.append(f"# certificate: {cert.subject}; names: {', '.join(cert.names) or 'none'};"
                   f" valid until {cert.not_after:%Y-%m-%d %H:%M} UTC")
    out.append(f"hostname = {_toml(config.hostname)}")
    for listener in config.listeners:
        out += ["", "[[listen]]", f"address = {_toml(listener.address)}",
                f"mode = {_toml(listener.mode.value)}",
                f"proxy_protocol = {_toml(listener.proxy_protocol)}",
                f"proxy_trusted = {_toml(listener.proxy_trusted)}"]
    if config.tls is not None:
        out += ["", "[tls]", f"cert = {_toml(str(config.tls.cert))}",
                f"key = {_toml(str(config.tls.key))}",
                f"handshake_timeout = {_toml(format_duration(config.tls.handshake_timeout))}"]
    out += ["", "[limits]"]
    for name in type(config.limits).__dataclass_fields__:
        value = getattr(config.limits, name)
        shown = format_duration(value) if isinstance(value, float) else value
        out.append(f"{name} = {_toml(shown)}")
    out += ["", "[queue]", f"dir = {_toml(str(config.queue.dir))}",
            f"retry = {_toml([format_duration(r) for r in config.queue.retry])}",
            f"max_age = {_toml(format_duration(config.queue.max_age))}",
            f"max_parallel = {config.queue.max_parallel}",
            f"delivery_timeout = {_toml(format_duration(config.queue.delivery_timeout))}"]
    if config.queue.delay_warning is not None:
        out.append(f"delay_warning = {_toml(format_duration(config.queue.delay_warning))}")
    plugins = config.plugins
    out += ["", "[plugins]", f"enable = {_toml(plugins.enable)}",
            f"hook_timeout = {_toml(format_duration(plugins.hook_timeout))}"]
    for name in sorted(set(plugins.tables) | set(plugins.hook_timeouts)):
        out += ["", f"[plugins.{_key(name)}]"]
        out += [f"{_key(k)} = {_toml(_masked(k, v))}" for k, v in config.plugin_table(name).items()]
        if name in plugins.hook_timeouts:
            out.append(f"hook_timeout = {_toml(format_duration(plugins.hook_timeouts[name]))}")
    return "\n".join(out) + "\n"


def _masked(key: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _masked(k, v) for k, v in value.items()}
    if _SECRET_KEY.search(key) and not key.endswith(("_file", "_path")):
        return "***"
    return value


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _toml(name)


def _escape(c: str) -> str:
    if c in ('"', "\\"):
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:  # TOML forbids raw control characters in strings
        return f"\\u{ord(c):04x}"
    return c


def _toml(value: Any) -> str:
    """Render one value as TOML (strings escaped per TOML 1.0 §String)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf and nan are spelled the same in TOML
    if isinstance(value, str):
        return '"' + "".join(_escape(c) for c in value) + '"'
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items())
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")  # pragma: no cover
