"""Start-up recovery of the spool and moving unreadable entries aside (blocking; run in a thread).

After a crash (``kill -9``, power loss) the spool may hold: files in ``tmp/`` from messages
that never got 250, a ``msg/ID`` whose sidecar was never renamed into ``env/`` (the commit
point was not reached), and complete messages. Complete messages resume; fragments go.
A sidecar that cannot be read is not deleted: it and its message move to ``corrupt/`` with
an error in the log, so an operator can look at them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Container
from pathlib import Path

from .. import durable as _durable
from .._logfmt import logfmt
from ._ids import is_queue_id
from ._layout import Layout

__all__ = ["move_aside", "recover_spool"]

log = logging.getLogger("submitd.queue")


def _free_name(directory: Path, name: str) -> Path:
    target = directory / name
    if not target.exists():
        return target
    return directory / f"{name}.{int(time.time() * 1000)}"


def move_aside(layout: Layout, queue_id: str, reason: str) -> bool:
    """Move ``queue_id``'s sidecar and message into ``corrupt/``; True if anything moved."""
    moved = False
    for source, name in (
        (layout.env_path(queue_id), f"{queue_id}.json"),
        (layout.msg_path(queue_id), queue_id),
    ):
        try:
            os.rename(source, _free_name(layout.corrupt, name))
        except FileNotFoundError:
            continue
        moved = True
    if moved:
        _durable.fsync_dir(layout.corrupt)
        _durable.fsync_dir(layout.env)
        _durable.fsync_dir(layout.msg)
        log.error(logfmt("quarantined", queue_id=queue_id, reason=reason, dir=layout.corrupt))
    return moved


def recover_spool(
    layout: Layout,
    *,
    active: Container[str],
    check: Callable[[str], float | None],
) -> dict[str, float]:
    """Create the layout, remove fragments, quarantine unreadable sidecars.

    ``active`` holds the queue IDs this process is receiving or committing right now: their
    files are left alone, so recovery is safe to run while the server accepts mail.
    ``check(queue_id)`` reads the sidecar once and returns when the message is due next
    (None if the sidecar vanished meanwhile); it raises :class:`ValueError` with the reason
    when the sidecar is unreadable. Returns the committed queue IDs, oldest first, with
    their due times.
    """
    layout.create()
    removed = 0
    for name in sorted(os.listdir(layout.tmp)):
        if name[:16] in active:
            continue
        path = layout.tmp / name
        if path.is_file() and _durable.unlink_quietly(path):
            removed += 1
            log.warning(logfmt("fragment_removed", file=f"tmp/{name}"))
    # List env/ before msg/: a commit renames msg first, so a sidecar seen here has its
    # message in the later listing (unless the runner removed both in between).
    sidecars = sorted(os.listdir(layout.env))
    messages = set(os.listdir(layout.msg))
    committed: dict[str, float] = {}
    for name in sidecars:
        queue_id = name.removesuffix(".json")
        if not name.endswith(".json") or not is_queue_id(queue_id):
            os.rename(layout.env / name, _free_name(layout.corrupt, name))
            log.error(logfmt("quarantined", file=f"env/{name}", reason="not a sidecar name"))
            continue
        try:
            due = check(queue_id)
        except ValueError as exc:
            move_aside(layout, queue_id, str(exc))
            continue
        if due is None:
            continue  # delivered and removed since the listing
        if queue_id not in messages:
            move_aside(layout, queue_id, "message file missing")
            continue
        committed[queue_id] = due
    known = set(committed)
    for name in sorted(messages - known):
        # A commit in progress is in ``active`` until its sidecar is in place: test ``active``
        # first, then the sidecar, so a commit finishing between the two is never mistaken
        # for a fragment.
        if name in active or layout.env_path(name).exists():
            continue
        if _durable.unlink_quietly(layout.msg / name):
            removed += 1
            log.warning(logfmt("fragment_removed", file=f"msg/{name}"))
    # No directory fsync for the removals: a fragment that comes back after a crash is
    # removed again by the next recovery.
    log.info(logfmt("spool_recovered", dir=layout.base, queued=len(committed), removed=removed))
    return committed
