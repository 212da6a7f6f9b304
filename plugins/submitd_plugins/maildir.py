r"""Local delivery into one Maildir: every queued message lands in ``[plugins.maildir] path``.

The embedded default of ``submitd quickstart``. Configuration::

    [plugins.maildir]
    path = "mail"        # required; relative to the config file; tmp/ new/ cur/ are created

Each message becomes one file (whatever its recipients): written to ``tmp/`` in a worker
thread, starting with ``Return-Path: <sender>`` and followed by the stored message (CRLF line
endings, as stored), fsynced, renamed into ``new/`` and ``new/`` fsynced. The fsync of ``new/``
is shared by the deliveries running at the same time (:class:`submitd.durable.DirectorySync`):
each returns only after an fsync of ``new/`` that started after its own rename succeeded. A
failure leaves no file in ``new/``, is logged with the operating system's error, and answers
``451 4.3.0`` for every recipient, so the queue retries.

File names are ``SECONDS.Q<queue id>.<host>``: ``SECONDS`` is when the message was received
(stored with it), the queue ID makes the name unique, and ``<host>`` is this machine's name
with ``/`` and ``:`` written ``\057`` and ``\072``, as the Maildir convention asks. The name
is the same for every attempt at one message, which makes delivery idempotent: when the runner
repeats an attempt whose outcome it could not record (a crash after the rename), the message is
found in ``new/``, or in ``cur/`` under that name plus the ``:2,FLAGS`` a mail reader adds, and
reported delivered without a second copy. A partial file of a crashed attempt at the same
message is removed from ``tmp/`` before the next one; at start (and reload) every file left in
``tmp/`` for more than 36 hours is removed, the Maildir convention for abandoned deliveries.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from submitd import (
    Config,
    ConfigError,
    DeliveryOutcome,
    Envelope,
    MessageHandle,
    Recipient,
    Reply,
    StashKey,
    hookimpl,
    logfmt,
)
from submitd.durable import DirectorySync, copy_to_end, run_blocking, write_all

from ._login_groups import reject_unknown_keys

__all__ = [
    "MAILDIR_PATH",
    "NEW_DIR_SYNC",
    "STALE_TMP_AGE",
    "submitd_configure",
    "submitd_deliver",
]

#: Where ``submitd_configure`` stores the resolved Maildir path on ``config.stash``.
MAILDIR_PATH = StashKey[Path]()

#: Where the group commit of ``new/`` fsyncs lives, in ``config.server_stash``: concurrent
#: deliveries share one fsync of ``new/`` per batch, across reloads too.
NEW_DIR_SYNC = StashKey[DirectorySync]()

#: Files older than this (seconds) in ``tmp/`` are abandoned deliveries (the Maildir rule).
STALE_TMP_AGE = 36 * 3600.0

log = logging.getLogger("submitd.plugins.maildir")

_KNOWN_KEYS = ("path",)
_SUBDIRS = ("tmp", "new", "cur")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Queue IDs are short and alphanumeric; anything else never becomes part of a file name.
_DELIVERED = DeliveryOutcome.delivered(Reply.make(250, "2.0.0", "Delivered to Maildir"))
_SAFE_QUEUE_ID = re.compile(r"\A[0-9A-Za-z]{1,64}\Z")
# The unique part of an earlier release's name: M<micro>P<pid>Q<queue id>R<hex>.
_OLD_STYLE = re.compile(r"M\d+P\d+Q([0-9A-Za-z]{1,64})R[0-9a-f]+")


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.maildir]``, create ``tmp/ new/ cur/`` and clear stale ``tmp/`` files."""
    table = config.plugin_table("maildir")
    reject_unknown_keys(config, "plugins.maildir", table, _KNOWN_KEYS)
    raw = table.get("path")
    if raw is None:
        raise ConfigError(config.path, "plugins.maildir.path", "required (the Maildir to fill)")
    if not isinstance(raw, str) or not raw:
        raise ConfigError(config.path, "plugins.maildir.path", "must be a non-empty string")
    path = config.resolve(raw)
    try:
        for sub in _SUBDIRS:
            (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            config.path, "plugins.maildir.path", f"cannot create the Maildir {path}: {exc}"
        ) from exc
    _remove_stale_tmp(path / "tmp", time.time() - STALE_TMP_AGE)
    config.server_stash.setdefault(NEW_DIR_SYNC, DirectorySync())
    config.stash[MAILDIR_PATH] = path


def _remove_stale_tmp(tmp: Path, cutoff: float) -> None:
    """Remove files in ``tmp`` neither read nor written since ``cutoff`` (crashed deliveries)."""
    try:
        entries = list(os.scandir(tmp))
    except OSError as exc:
        log.warning(logfmt("maildir_tmp_unreadable", path=tmp, error=exc.strerror or exc))
        return
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            if max(st.st_mtime, st.st_atime) >= cutoff:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning(logfmt("maildir_tmp_cleanup_failed", file=entry.name,
                               error=exc.strerror or exc))
            continue
        log.info(logfmt("maildir_tmp_removed", file=entry.name, reason="stale"))


def _host_part() -> str:
    # Maildir names may not contain "/" or ":" (the info separator); escape them as the
    # Maildir convention does, in octal.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


def _file_name(envelope: Envelope) -> tuple[str, str | None]:
    """The Maildir name for ``envelope``, and the queue ID when the name is stable."""
    queue_id = envelope.queue_id
    if queue_id is not None and _SAFE_QUEUE_ID.match(queue_id):
        received = envelope.received_at
        seconds = int(received) if math.isfinite(received) and received > 0 else 0
        return f"{seconds}.Q{queue_id}.{_host_part()}", queue_id
    # No usable queue ID (never from the queue runner): a unique one-off name.
    now = time.time()
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micro}P{os.getpid()}R{secrets.token_hex(3)}.{_host_part()}", None


def _carries_queue_id(name: str, queue_id: str) -> bool:
    """Whether ``name`` is one of ours for ``queue_id``.

    Its unique part is ``Q<id>``, or ``M<micro>P<pid>Q<id>R<hex>`` as in earlier releases.
    """
    if queue_id not in name:  # nearly every name in tmp/: no split, no pattern
        return False
    parts = name.split(".", 2)
    if len(parts) != 3:
        return False
    unique = parts[1]
    if unique == f"Q{queue_id}":
        return True
    match = _OLD_STYLE.fullmatch(unique)
    return match is not None and match.group(1) == queue_id


def _already_delivered(root: str, name: str) -> bool:
    """Whether ``name`` is in ``new/``, or in ``cur/`` with the info a mail reader adds."""
    if os.path.exists(f"{root}/new/{name}"):
        return True
    # A reader moves a seen message to cur/ as NAME:2,FLAGS (some add ",S=size" first).
    with os.scandir(f"{root}/cur") as entries:
        return any(
            e.name == name or (e.name.startswith(name) and e.name[len(name)] in ":,")
            for e in entries
        )


def _remove_leftovers(root: str, queue_id: str) -> None:
    """Remove the partial files of crashed earlier attempts at ``queue_id`` from ``tmp/``."""
    tmp = f"{root}/tmp"
    with os.scandir(tmp) as entries:
        leftovers = [e.name for e in entries if _carries_queue_id(e.name, queue_id)]
    for name in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{tmp}/{name}")
        log.info(logfmt("maildir_tmp_removed", file=name, queue_id=queue_id,
                        reason="earlier_attempt"))


def _deliver_file(
    maildir: Path, envelope: Envelope, message: MessageHandle, new_sync: DirectorySync
) -> bool:
    """Write one message into ``maildir`` (blocking); on failure nothing is left in new/.

    Returns False when an earlier attempt had already delivered it (nothing written).
    """
    # Plain strings: the paths are built and used once per delivery (no pathlib parsing).
    root = os.fspath(maildir)
    name, queue_id = _file_name(envelope)
    if queue_id is not None:
        if _already_delivered(root, name):
            return False
        _remove_leftovers(root, queue_id)
    new_dir = f"{root}/new"
    tmp = f"{root}/tmp/{name}"
    final = f"{new_dir}/{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
    renamed = False
    try:
        try:
            write_all(fd, f"Return-Path: <{envelope.sender}>\r\n".encode())
            source = os.open(message.path, os.O_RDONLY | _O_CLOEXEC)
            try:
                copy_to_end(source, 0, fd)  # inside the kernel where it can
            finally:
                os.close(source)
            os.fsync(fd)
        finally:
            os.close(fd)
        mark = new_sync.mark(new_dir)
        os.rename(tmp, final)
        renamed = True
        new_sync.sync(new_dir, since=mark)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(final if renamed else tmp)
        raise
    return True


@hookimpl
async def submitd_deliver(
    config: Config,
    envelope: Envelope,
    message: MessageHandle,
    recipients: tuple[Recipient, ...],
) -> Mapping[str, DeliveryOutcome] | None:
    """Store the message once in the Maildir and report every recipient delivered."""
    maildir = config.stash.get(MAILDIR_PATH, None)
    new_sync = config.server_stash.get(NEW_DIR_SYNC, None)
    if maildir is None or new_sync is None:
        failure = DeliveryOutcome.temporary(Reply.make(451, "4.3.0", "Maildir not configured"))
        return {r.address: failure for r in recipients}
    if _CONTROL.search(envelope.sender):
        # The core refuses such senders (RFC 5321 §4.1.2 has no controls in addresses);
        # never write one into a header.
        failure = DeliveryOutcome.permanent(Reply.make(554, "5.6.0", "Invalid sender address"))
        return {r.address: failure for r in recipients}
    try:
        written = await run_blocking(_deliver_file, maildir, envelope, message, new_sync)
    except OSError as exc:
        log.error(logfmt("maildir_write_failed", queue_id=envelope.queue_id,
                         error=exc.strerror or exc))
        failure = DeliveryOutcome.temporary(Reply.make(451, "4.3.0", "Maildir write failed"))
        return {r.address: failure for r in recipients}
    if not written:
        log.info(logfmt("maildir_already_delivered", queue_id=envelope.queue_id))
    return {r.address: _DELIVERED for r in recipients}
