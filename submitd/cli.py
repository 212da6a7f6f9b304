"""The ``submitd`` command (README, "Command line").

Exit codes: 0 success, 1 runtime failure (I/O errors), 2 usage or configuration error,
130 interrupted. A user's mistake prints ``submitd: <message>`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from ._cli_common import config_from_args, configured_plugins, help_handler
from ._cli_explain import add_explain_command
from ._cli_queue import add_queue_commands
from ._cli_smarthost import add_smarthost_commands
from ._cli_users import add_user_commands
from .certs import CertificateInfo, TLSFileError, inspect_certificate, write_selfsigned
from .config import Config, default_config_path, format_duration
from .errors import ConfigError, SubmitdError, UsageError
from .quickstart import quickstart, submitd_executable

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
    missing = _missing_config(args)
    if missing is not None:
        _error(missing)
        return EXIT_USAGE
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


def _warn(message: str) -> None:
    print(f"submitd: warning: {message}", file=sys.stderr)


def _describe_os_error(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{exc.filename}: {text}" if exc.filename else text


def _missing_config(args: argparse.Namespace) -> str | None:
    """Say how to give or make a configuration when the command needs one that is not there."""
    if "config" not in args or getattr(args, "file", None) is not None:
        return None  # the command reads no configuration, or `user ... --file` needs none
    given: Path | None = args.config
    path = given if given is not None else default_config_path()
    try:
        os.stat(path)
    except FileNotFoundError:
        pass
    except OSError:
        return None  # unreadable for another reason: the loader says which
    else:
        return None
    if given is not None:
        source = "given with -c"
    elif os.environ.get("SUBMITD_CONFIG"):
        source = "from $SUBMITD_CONFIG"
    else:
        source = "the default"
    make = f"{shlex.quote(submitd_executable())} quickstart DIR"
    return (f"no configuration file at {path} ({source}); give one with -c FILE or "
            f"$SUBMITD_CONFIG, or make a local test setup with `{make}`")


# --- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (each leaf parser sets ``handler``)."""
    parser = argparse.ArgumentParser(
        prog="submitd", description="An authenticated SMTP submission server (RFC 6409)."
    )
    parser.add_argument("--version", action="version", version=f"submitd {__version__}")
    parser.set_defaults(handler=help_handler(parser))  # `submitd` alone lists the commands
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("serve", help="run the server in the foreground")
    _config_option(p)
    # The choices are spelled out: importing them from submitd.server would load the server.
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   default="INFO", help="how much to log (default INFO; no level logs passwords)")
    p.set_defaults(handler=cmd_serve)

    p = commands.add_parser("check-config", help="validate and print the effective configuration")
    _config_option(p)
    p.set_defaults(handler=cmd_check_config)

    p = commands.add_parser("quickstart", help="write a complete local test setup into DIR")
    p.add_argument("dir", metavar="DIR", type=Path)
    p.set_defaults(handler=cmd_quickstart)

    add_user_commands(commands)
    add_queue_commands(commands, _config_option)
    add_explain_command(commands, _config_option)
    add_smarthost_commands(commands, _config_option)

    cert_parser = commands.add_parser("cert", help="certificate helpers")
    cert_parser.set_defaults(handler=help_handler(cert_parser))
    cert = cert_parser.add_subparsers(dest="cert_command", metavar="ACTION")
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


# --- serve, check-config, quickstart, cert --------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """``submitd serve``: run the server until it is stopped (see :func:`run_server`)."""
    config = config_from_args(args)
    from .server import run_server  # the server pulls in everything; only load it here

    return run_server(config, log_level=args.log_level)


def cmd_check_config(args: argparse.Namespace) -> int:
    """``submitd check-config``: the start-up validation, then the effective configuration.

    Setups that start but silently fail are reported on stderr as ``submitd: warning: ...``
    lines; they do not change the exit code.
    """
    config = config_from_args(args)
    cert = _check_certificate(config)
    with configured_plugins(config) as pm:
        print(render_config(config, cert), end="")
        delivers = [impl.plugin_name for impl in pm.hook.submitd_deliver.get_hookimpls()]
    for warning in config_warnings(config, cert, delivers):
        _warn(warning)
    return EXIT_OK


#: check-config warns about a certificate that ends within this period.
EXPIRY_WARNING = dt.timedelta(days=14)


def config_warnings(
    config: Config, cert: CertificateInfo, delivery_plugins: Sequence[str]
) -> list[str]:
    """What would let the server start but fail quietly: each a sentence for an operator."""
    warnings = []
    if not delivery_plugins:
        warnings.append(
            "no enabled plugin delivers mail (none implements submitd_deliver): every message "
            f"would wait in the queue for [queue] max_age ({format_duration(config.queue.max_age)})"
            " and then bounce; enable one in [plugins] enable, e.g. maildir or smarthost"
        )
    if "relay" not in config.plugins.enable:
        warnings.append(
            'no plugin checks senders ("relay" is not in [plugins] enable): a logged-in user '
            "may send as any address, in MAIL FROM and in From:; add \"relay\" to enable"
        )
    if not cert.covers(config.hostname):
        names = ", ".join(cert.names) or "none: it has no subjectAltName"
        warnings.append(
            f"hostname {config.hostname} is not among the certificate's names ({names}); "
            "clients that verify the certificate against it will refuse to connect "
            "(RFC 6125 §6.4)"
        )
    until = f"{cert.not_after:%Y-%m-%d %H:%M} UTC"
    if cert.expired:
        warnings.append(
            f"the certificate expired on {until}; clients that verify it refuse to connect"
        )
    elif cert.expires_within(EXPIRY_WARNING):
        left = cert.not_after - dt.datetime.now(dt.UTC)
        warnings.append(
            f"the certificate expires on {until} (in {_days(left)}); renew it and send "
            "SIGHUP to reload"
        )
    return warnings


def _days(left: dt.timedelta) -> str:
    if left.days < 1:
        return "less than a day"
    return f"{left.days} day" + ("s" if left.days != 1 else "")


def _check_certificate(config: Config) -> CertificateInfo:
    """Load the certificate and key as start-up does (``load_cert_chain``) and describe them."""
    if config.tls is None:  # the server refuses to start without one
        raise ConfigError(config.path, "tls", "a [tls] table is required to serve")
    try:
        return inspect_certificate(config.tls.cert, config.tls.key)
    except TLSFileError as exc:
        raise ConfigError(config.path, exc.setting, exc.message) from None


def cmd_quickstart(args: argparse.Namespace) -> int:
    """``submitd quickstart DIR``: every command it prints works when pasted as is."""
    result = quickstart(args.dir)
    exe = shlex.quote(submitd_executable())
    config = shlex.quote(str(result.config_path))
    print(f"Wrote a local submitd setup to {result.directory}")
    print(f"  configuration: {result.config_path}")
    print(f"  users file:    {result.users_path}")
    print(f"  certificate:   {result.cert_path} (self-signed for localhost, 127.0.0.1)")
    print()
    print(f"Login:    {result.login} (may send as {result.sender})")
    print(f"Password: {result.password.reveal()}")
    print("The password is shown only now; change it with:")
    print(f"  {exe} user passwd -c {config} {result.login}")
    print()
    print("Start the server:")
    print(f"  {exe} serve -c {config}")
    print("Send a test message (in another terminal, while the server runs):")
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


# --- the effective configuration, as TOML ---------------------------------------------------

_BARE_KEY = re.compile(r"\A[A-Za-z0-9_-]+\Z")
# Plugin settings that look like credentials are masked; *_file and *_path name files, and
# numbers are limits, not secrets.
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
    out += ["", "[server]"]
    if config.server.auto:
        out.append('# "auto": one worker per usable CPU')
    out.append(f"workers = {config.server.workers}")
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
    if isinstance(value, bool | int | float):  # a number is a setting (min_password_length)
        return value
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
