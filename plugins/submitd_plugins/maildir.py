"""Local delivery into one Maildir: every queued message lands in ``[plugins.maildir] path``.

The embedded default of ``submitd quickstart``. Configuration::

    [plugins.maildir]
    path = "mail"        # required; relative to the config file; tmp/ new/ cur/ are created

Each message becomes one file (whatever its recipients) named
``SECONDS.M<micro>P<pid>Q<queue id>R<random>.<host>``: written to ``tmp/`` in a worker
thread, starting with ``Return-Path: <sender>`` and followed by the stored message (CRLF line
endings, as stored), fsynced, renamed into ``new/`` and ``new/`` fsynced. A failure leaves no
file in ``new/`` and answers ``451 4.3.0`` for every recipient, so the queue retries.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import trio

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
)
from submitd.durable import fsync_dir, write_all

__all__ = ["MAILDIR_PATH", "submitd_configure", "submitd_deliver"]

#: Where ``submitd_configure`` stores the resolved Maildir path on ``config.stash``.
MAILDIR_PATH = StashKey[Path]()

_KNOWN_KEYS = frozenset({"path"})
_SUBDIRS = ("tmp", "new", "cur")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.maildir]`` and create the Maildir's ``tmp/ new/ cur/``."""
    table = config.plugin_table("maildir")
    for key in table:
        if key not in _KNOWN_KEYS:
            raise ConfigError(config.path, f"plugins.maildir.{key}", "unknown key")
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
    config.stash[MAILDIR_PATH] = path


def _host_part() -> str:
    # Maildir names may not contain "/" or ":" (the info separator); escape them as the
    # Maildir convention does, in octal.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


def _unique_name(queue_id: str) -> str:
    now = time.time()
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    tag = secrets.token_hex(3)
    return f"{seconds}.M{micro}P{os.getpid()}Q{queue_id}R{tag}.{_host_part()}"


def _deliver_file(maildir: Path, envelope: Envelope, message: MessageHandle) -> Path:
    """Write one message into ``maildir`` (blocking); on failure nothing is left in new/."""
    name = _unique_name(envelope.queue_id or "none")
    tmp = maildir / "tmp" / name
    final = maildir / "new" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
    renamed = False
    try:
        try:
            write_all(fd, f"Return-Path: <{envelope.sender}>\r\n".encode())
            for chunk in message.iter_chunks():
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        renamed = True
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            (final if renamed else tmp).unlink()
        raise
    return final


@hookimpl
async def submitd_deliver(
    config: Config,
    envelope: Envelope,
    message: MessageHandle,
    recipients: tuple[Recipient, ...],
) -> Mapping[str, DeliveryOutcome] | None:
    """Store the message once in the Maildir and report every recipient delivered."""
    maildir = config.stash.get(MAILDIR_PATH, None)
    if maildir is None:
        failure = DeliveryOutcome.temporary(Reply.make(451, "4.3.0", "Maildir not configured"))
        return {r.address: failure for r in recipients}
    if _CONTROL.search(envelope.sender):
        # The core refuses such senders (SECURITY.md §1); never write one into a header.
        failure = DeliveryOutcome.permanent(Reply.make(554, "5.6.0", "Invalid sender address"))
        return {r.address: failure for r in recipients}
    try:
        await trio.to_thread.run_sync(_deliver_file, maildir, envelope, message)
    except OSError:
        failure = DeliveryOutcome.temporary(Reply.make(451, "4.3.0", "Maildir write failed"))
        return {r.address: failure for r in recipients}
    done = DeliveryOutcome.delivered(Reply.make(250, "2.0.0", "Delivered to Maildir"))
    return {r.address: done for r in recipients}
