"""``submitd user add|passwd|senders|del|list``: edit the users file (README, "Command line").

The users file is ``--file USERS``, else ``[plugins.passwdfile] path`` of the configuration
(``-c FILE``, ``$SUBMITD_CONFIG`` or ``/etc/submitd/submitd.toml``). Every edit locks the file
and replaces it atomically; a running server notices the change and re-reads it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._cli_common import config_from_args, help_handler
from .errors import ConfigError, UsageError
from .passwords import (
    DEFAULT_MIN_PASSWORD_LENGTH,
    UserEntry,
    UsersFile,
    check_password_length,
    min_password_length,
    validate_login,
    validate_sender,
)
from .secret import Secret

__all__ = ["add_user_commands"]

EXIT_OK = 0

SENDERS_HELP = """\
With no option, print the login's senders. --sender (repeatable) replaces the whole list;
--no-senders empties it (the login can authenticate but not send); --add-sender and
--remove-sender (repeatable) edit it, removals first. The password is left alone; a running
server applies the new list from the next login on, without a restart.
"""


def add_user_commands(commands: Any) -> None:
    """Add ``user`` and its actions to the ``submitd`` subparsers ``commands``."""
    user_parser: argparse.ArgumentParser = commands.add_parser(
        "user", help="manage the users file (logins, passwords, allowed senders)"
    )
    user_parser.set_defaults(handler=help_handler(user_parser))
    user = user_parser.add_subparsers(dest="user_command", metavar="ACTION")

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

    p = user.add_parser(
        "senders", help="show or change the addresses a login may send as",
        description=SENDERS_HELP,
    )
    _users_file_options(p)
    p.add_argument("login", metavar="USER")
    whole = p.add_mutually_exclusive_group()
    whole.add_argument("--sender", action="append", default=[], metavar="ADDR",
                       help="the new list: an address, @domain or <> (repeatable)")
    whole.add_argument("--no-senders", action="store_true",
                       help="remove every sender: the login may no longer send")
    p.add_argument("--add-sender", action="append", default=[], metavar="ADDR",
                   help="add an address, @domain or <> (repeatable)")
    p.add_argument("--remove-sender", action="append", default=[], metavar="ADDR",
                   help="remove a listed address, @domain or <> (repeatable)")
    p.set_defaults(handler=cmd_user_senders)

    p = user.add_parser("del", help="remove a login")
    _users_file_options(p)
    p.add_argument("login", metavar="USER")
    p.set_defaults(handler=cmd_user_del)

    p = user.add_parser("list", help="list logins and their senders")
    _users_file_options(p)
    p.set_defaults(handler=cmd_user_list)


def _users_file_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "-c", "--config", type=Path, metavar="FILE",
        help="use [plugins.passwdfile] of this config: path and min_password_length "
             "(default: $SUBMITD_CONFIG, else /etc/submitd/submitd.toml)",
    )
    group.add_argument(
        "--file", type=Path, metavar="USERSFILE",
        help=f"the users file itself (new passwords: at least {DEFAULT_MIN_PASSWORD_LENGTH} "
             "characters)",
    )


def _password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")


# --- where the users file is, and its password rule ------------------------------------------


def _target(args: argparse.Namespace) -> tuple[Path, int]:
    """The users file and the minimum password length: ``--file``, else the config's table."""
    if args.file is not None:
        path: Path = args.file
        return path, DEFAULT_MIN_PASSWORD_LENGTH
    config = config_from_args(args)
    table = config.plugin_table("passwdfile")
    raw = table.get("path")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(
            config.path, "plugins.passwdfile.path", "not set; name the users file with --file"
        )
    try:
        minimum = min_password_length(table)
    except ValueError as exc:
        raise ConfigError(config.path, "plugins.passwdfile.min_password_length", str(exc)) from None
    return config.resolve(raw), minimum


def _read_password(args: argparse.Namespace, minimum: int) -> Secret:
    if args.password_stdin:
        line = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
        if not line:
            raise UsageError("no password on stdin")
        return _long_enough(Secret(line), minimum)
    if not sys.stdin.isatty():
        raise UsageError("stdin is not a terminal; pipe the password in with --password-stdin")
    first = Secret(getpass.getpass("Password: "))
    if not first:
        raise UsageError("empty password")
    _long_enough(first, minimum)  # before asking again
    if Secret(getpass.getpass("Repeat password: ")) != first:
        raise UsageError("the passwords do not match")
    return first


def _long_enough(password: Secret, minimum: int) -> Secret:
    try:
        check_password_length(password, minimum)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return password


def _checked(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _describe(entry: UserEntry) -> str:
    return " ".join(entry.senders) if entry.senders else "(may not send)"


# --- the actions ------------------------------------------------------------------------------


def cmd_user_add(args: argparse.Namespace) -> int:
    """``submitd user add USER [--sender ADDR ...] [--password-stdin]``."""
    path, minimum = _target(args)
    login = _checked(validate_login, args.login)
    senders = [_checked(validate_sender, s) for s in args.sender]
    users = UsersFile.load(path, missing_ok=True)
    if login in users:  # say so before asking for a password (add re-checks under the lock)
        raise UsageError(f"user {login!r} already exists in {path}")
    users.add_user(login, _read_password(args, minimum), senders)
    note = "" if senders else " (no --sender: it can log in but not send)"
    print(f"added {login} to {path}{note}")
    return EXIT_OK


def cmd_user_passwd(args: argparse.Namespace) -> int:
    """``submitd user passwd USER [--password-stdin]``."""
    path, minimum = _target(args)
    users = UsersFile.load(path)
    if args.login not in users:
        raise UsageError(f"no user {args.login!r} in {path}")
    users.set_password(args.login, _read_password(args, minimum))
    print(f"changed the password of {args.login}")
    return EXIT_OK


def cmd_user_senders(args: argparse.Namespace) -> int:
    """``submitd user senders USER``: show, replace or edit the senders (see SENDERS_HELP)."""
    replace: list[str] = args.sender
    add: list[str] = args.add_sender
    remove: list[str] = args.remove_sender
    if (replace or args.no_senders) and (add or remove):
        raise UsageError(
            "--sender and --no-senders replace the whole list; "
            "use them without --add-sender/--remove-sender"
        )
    replace = [_checked(validate_sender, s) for s in replace]
    add = [_checked(validate_sender, s) for s in add]
    remove = [_checked(validate_sender, s) for s in remove]
    both = sorted(set(add) & set(remove))
    if both:
        raise UsageError(f"both added and removed: {' '.join(both)}")
    path, _minimum = _target(args)
    users = UsersFile.load(path)
    if args.login not in users:
        raise UsageError(f"no user {args.login!r} in {path}")
    if replace or args.no_senders:
        users = users.set_senders(args.login, replace)
    elif add or remove:
        users = users.change_senders(args.login, add=add, remove=remove)
    else:
        entry = users.lookup(args.login)
        assert entry is not None  # checked above
        print(_describe(entry))
        return EXIT_OK
    entry = users.lookup(args.login)
    assert entry is not None  # the edit raises NoSuchUserError otherwise
    print(f"senders of {args.login}: {_describe(entry)}")
    return EXIT_OK


def cmd_user_del(args: argparse.Namespace) -> int:
    """``submitd user del USER``."""
    path, _minimum = _target(args)
    UsersFile.load(path).delete_user(args.login)
    print(f"removed {args.login} from {path}")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    """``submitd user list``: each login and the senders it may use, never hashes."""
    users = UsersFile.load(_target(args)[0])
    entries = users.entries
    width = max((len(e.login) for e in entries), default=0)
    for e in entries:
        print(f"{e.login:<{width}}  {_describe(e)}")
    return EXIT_OK
