"""``submitd queue``: inspect and steer the mail queue, safe while the server runs.

Reading (``list``, ``show``) goes straight to the spool: a sidecar is replaced atomically, so
each one read is a consistent snapshot, and a message delivered meanwhile is just not shown.

Changing (``flush``, ``hold``, ``release``, ``delete``) never races the queue runner. When no
server holds the spool lock, the command takes the lock and changes the spool itself; when a
server holds it, the command asks that server over its control socket and the server's
runner does the work between delivery attempts.

Exit codes: 0 done, 1 runtime failure (no such message, the server does not answer, disk
errors), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from ._cli_common import config_from_args, help_handler
from ._queue_display import as_json, details, format_sender, printable, summary, totals
from .config import Config
from .errors import SpoolError
from .mailqueue import (
    QueueEntryMissing,
    QueueRecord,
    RecipientState,
    Spool,
    SpoolLocked,
)
from .mailqueue import is_queue_id as _is_queue_id
from .views import DeliveryOutcome

__all__ = ["JSON_FORMAT_VERSION", "add_queue_commands"]

#: ``queue list --json`` writes ``{"version": JSON_FORMAT_VERSION, ...}``; fields are only
#: ever added within one version.
JSON_FORMAT_VERSION = 1

EXIT_OK = 0
EXIT_FAILURE = 1

_T = TypeVar("_T")
Handler = Callable[[argparse.Namespace], int]


class QueueCommandError(Exception):
    """A queue command failed at run time (exit code 1); the message says why."""


# --- the parser -----------------------------------------------------------------------------


def add_queue_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    config_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``submitd queue ACTION`` under ``commands``; ``config_option`` adds ``-c``."""
    queue_parser = commands.add_parser(
        "queue", help="inspect and steer the mail queue (safe while the server runs)"
    )
    queue_parser.set_defaults(handler=help_handler(queue_parser))  # alone: list the actions
    queue = queue_parser.add_subparsers(dest="queue_command", metavar="ACTION")

    def action(name: str, text: str, handler: Handler, *, takes_id: bool = True,
               optional_id: bool = False) -> argparse.ArgumentParser:
        p = queue.add_parser(name, help=text)
        config_option(p)
        if takes_id:
            p.add_argument(
                "queue_id", metavar="ID", nargs="?" if optional_id else None,
                help="a queue ID as `submitd queue list` shows it"
                + (" (default: every message)" if optional_id else ""),
            )
        p.set_defaults(handler=handler)
        return p

    action("list", "list queued messages and their recipients", cmd_queue_list,
           takes_id=False).add_argument(
        "--json", action="store_true", help="print one JSON document instead"
    )
    action("show", "envelope, header section and delivery history", cmd_queue_show)
    action("flush", "attempt one message, or every message, now", cmd_queue_flush,
           optional_id=True)
    action("hold", "keep a message from being attempted until released", cmd_queue_hold)
    action("release", "let a held message be attempted again", cmd_queue_release)
    action("delete", "remove a message from the queue", cmd_queue_delete).add_argument(
        "--bounce", action="store_true",
        help="tell the sender: its pending recipients fail and a bounce is queued",
    )


def _spool(config: Config) -> Spool:
    return Spool(config.queue.dir, max_header_size=config.limits.max_header_size)


def _queue_id(raw: str) -> str:
    """The queue ID the operator meant (IDs are upper case; typing them in lower is fine)."""
    queue_id = raw.strip().upper()
    if not _is_queue_id(queue_id):
        raise QueueCommandError(f"no queued message {printable(raw)}")
    return queue_id


def _run(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``main`` under trio; spool and control failures become :class:`QueueCommandError`."""
    try:
        return trio.run(main)
    except SpoolError as exc:  # QueueEntryMissing says "no queued message ID" itself
        raise QueueCommandError(str(exc)) from None


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except QueueCommandError as exc:
            print(f"submitd: {exc}", file=sys.stderr)
            return EXIT_FAILURE

    return run


# --- reading the spool ----------------------------------------------------------------------


async def _records(spool: Spool) -> list[QueueRecord]:
    """Every queued message's record, oldest first, each sidecar read once in one thread trip.

    Messages delivered or deleted meanwhile are left out; unreadable ones are named on stderr
    (the server moves them to ``corrupt/``).
    """

    def warn(queue_id: str, reason: str) -> None:
        print(f"submitd: skipping {queue_id}: {reason}", file=sys.stderr)

    return [record for _, record in await spool.list_records(on_unreadable=warn)]


# --- queue list -----------------------------------------------------------------------------


@_guarded
def cmd_queue_list(args: argparse.Namespace) -> int:
    """``submitd queue list [--json]``: every queued message, oldest first."""
    spool = _spool(config_from_args(args))

    async def main() -> list[QueueRecord]:
        return await _records(spool)

    records = _run(main)
    now = time.time()
    if args.json:
        doc = {"version": JSON_FORMAT_VERSION, "messages": [as_json(r, now) for r in records]}
        print(json.dumps(doc, ensure_ascii=True, allow_nan=False, indent=2))
        return EXIT_OK
    for record in records:
        print("\n".join(summary(record, now)))
        print()
    print(totals(records))
    return EXIT_OK


# --- queue show -----------------------------------------------------------------------------


@_guarded
def cmd_queue_show(args: argparse.Namespace) -> int:
    """``submitd queue show ID``: the envelope, the header section and each recipient's history."""
    config = config_from_args(args)
    spool = _spool(config)
    queue_id = _queue_id(args.queue_id)
    queued = _run(partial(spool.load, queue_id))  # reads at most [limits] max_header_size
    print("\n".join(details(queued.record, time.time())))
    print()
    print("Header section:")
    head = queued.header_section
    # RFC 5322 §2.1: the header section ends at the first empty line (kept in ``head``).
    ended = head.endswith(b"\r\n\r\n") or head == b"\r\n"
    for line in head.split(b"\r\n")[: -2 if ended else -1]:
        print(f"  {printable(line.decode('utf-8', 'replace'))}")
    if not ended and len(head) < queued.message.size:
        print(f"  [... no end of the header section within {spool.max_header_size} bytes]")
    return EXIT_OK


# --- changing the queue ---------------------------------------------------------------------
#
# One rule: the CLI and the queue runner never both act on one message. A free spool lock
# means no server runs: the command takes the lock and changes the spool itself. A held lock
# means a server runs: the command asks it over the control socket, and its runner acts.


@_guarded
def cmd_queue_flush(args: argparse.Namespace) -> int:
    """``submitd queue flush [ID]``: attempt one message, or every message, now."""
    config = config_from_args(args)
    queue_id = None if args.queue_id is None else _queue_id(args.queue_id)

    async def offline(spool: Spool) -> str:
        ids = [queue_id] if queue_id is not None else await spool.queued_ids()
        if not ids:
            return "the queue is empty"
        due, held = await _make_due(spool, ids, single=queue_id is not None)
        text = f"{due} message{'' if due == 1 else 's'} due now"
        if held:
            text += f" ({', '.join(held)} held: release {'it' if len(held) == 1 else 'them'}"
            text += " first)"
        return text + "; no server is running: they are attempted when it starts"

    remote = f"the server is attempting {queue_id or 'every queued message'} now"
    print(_steer(config, "flush", queue_id, offline, remote))
    return EXIT_OK


async def _make_due(spool: Spool, ids: list[str], *, single: bool) -> tuple[int, list[str]]:
    now = time.time()
    due, held = 0, []
    records = [await spool.load_record(ids[0])] if single else await _records(spool)
    for record in records:
        if record.held and single:
            raise QueueCommandError(f"{record.queue_id} is held: release it first")
        if record.held:
            held.append(record.queue_id)
            continue
        recipients = tuple(
            replace(r, next_attempt=now) if r.state is RecipientState.PENDING else r
            for r in record.recipients
        )
        try:
            await spool.save(replace(record, recipients=recipients, next_attempt=now))
        except QueueEntryMissing:
            if single:
                raise
            continue
        due += 1
    return due, held


@_guarded
def cmd_queue_hold(args: argparse.Namespace) -> int:
    """``submitd queue hold ID``: never attempt the message until it is released."""
    return _set_held(args, held=True)


@_guarded
def cmd_queue_release(args: argparse.Namespace) -> int:
    """``submitd queue release ID``: attempt a held message again on its schedule."""
    return _set_held(args, held=False)


def _set_held(args: argparse.Namespace, *, held: bool) -> int:
    config = config_from_args(args)
    queue_id = _queue_id(args.queue_id)
    verb = "held" if held else "released"

    async def offline(spool: Spool) -> str:
        record = await spool.load_record(queue_id)
        if record.held == held:
            return f"{queue_id} is already {'held' if held else 'not held'}"
        await spool.save(replace(record, held=held))
        return f"{verb} {queue_id}"

    print(_steer(config, "hold" if held else "release", queue_id, offline, f"{verb} {queue_id}"))
    return EXIT_OK


@_guarded
def cmd_queue_delete(args: argparse.Namespace) -> int:
    """``submitd queue delete ID [--bounce]``: remove a message, silently or with a bounce."""
    config = config_from_args(args)
    queue_id = _queue_id(args.queue_id)
    bounce: bool = args.bounce

    async def offline(spool: Spool) -> str:
        record = await spool.load_record(queue_id)
        if bounce:
            return await _delete_with_bounce(spool, record, config)
        await spool.remove(queue_id)
        return f"deleted {queue_id} (the sender was not told)"

    told = "; a bounce to the sender is queued" if bounce else " (the sender was not told)"
    print(_steer(config, "delete", queue_id, offline, f"deleted {queue_id}{told}", bounce=bounce))
    return EXIT_OK


def _steer(
    config: Config,
    op: str,
    queue_id: str | None,
    offline: Callable[[Spool], Awaitable[str]],
    remote: str,
    *,
    bounce: bool = False,
) -> str:
    """Do ``op`` through the running server, or with ``offline`` when none runs.

    Returns what to tell the operator. Only the spool's owner changes the spool directly:
    files another user (root, say) wrote there would be unreadable to the server.
    """
    from .server.control import (
        ControlError,
        ControlRefused,
        ControlRequest,
        send_request,
        socket_path,
    )

    directory = config.queue.dir
    request = ControlRequest(op=op, queue_id=queue_id, bounce=bounce)
    owner = _owner(directory)
    if owner is None:  # never started: nothing is queued
        if queue_id is not None:
            raise QueueCommandError(f"no queued message {queue_id}")
        return "the queue is empty"

    async def ask_server(hint: str) -> str:
        try:
            await send_request(socket_path(directory), request)
        except ControlRefused as exc:
            raise QueueCommandError(str(exc)) from None
        except ControlError as exc:
            raise QueueCommandError(f"{exc} ({hint})") from None
        return remote

    async def main() -> str:
        if owner != os.geteuid():
            return await ask_server(
                f"with no server running, run this as the owner of {directory}, uid {owner}"
            )
        spool = _spool(config)
        try:
            await spool.lock()
        except SpoolLocked as locked:
            holder = f"process {locked.holder}" if locked.holder else "another process"
            return await ask_server(
                f"the spool is locked by {holder}; a server that is still starting answers"
                " once it has read the queue"
            )
        try:
            return await offline(spool)
        finally:
            spool.unlock()

    return _run(main)


def _owner(directory: Path) -> int | None:
    try:
        return directory.stat().st_uid
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise QueueCommandError(f"{directory}: {exc.strerror or exc}") from None


async def _delete_with_bounce(spool: Spool, record: QueueRecord, config: Config) -> str:
    """Fail every pending recipient as the runner does, queue one bounce, then remove."""
    from .mailqueue._reports import Reporter
    from .mailqueue.runner import DELETED_REPLY

    report_id = None
    if record.pending:
        queued = await spool.load(record.queue_id)
        failed = [(r, DeliveryOutcome.permanent(DELETED_REPLY)) for r in record.pending]
        reporter = Reporter(spool, config.queue, config.hostname, time.time)
        report_id = await reporter.bounce(
            record, queued.header_section, failed, time.time(), message=queued.message
        )
    await spool.remove(record.queue_id)
    if report_id is None:
        return f"deleted {record.queue_id} (nothing pending, or the sender is <>: no bounce)"
    return f"deleted {record.queue_id}; the bounce to {format_sender(record.sender)} is {report_id}"
