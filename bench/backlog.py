"""The queue-backlog workload: acceptance rate with a full spool against an empty one.

:func:`fill_spool` puts N deferred messages into a spool directory through the real spool
API (``Spool.open_incoming`` / ``write`` / ``finish`` / ``commit``, then ``Spool.save`` of
the record with the attempt recorded), so the files are exactly what a running server
writes: the message in ``msg/``, its sidecar in ``env/``. Each message looks like mail that
a smarthost kept refusing with a 4xx: received in the last three hours, one to six attempts
made (each in the recipient's history), the last reply ``451 4.4.1``, and the next attempt
2-3 hours ahead, far beyond the benchmark's few minutes, so the queue runner holds every one
of them for the whole run and delivers none.

To make 50,000 of them in a minute rather than an hour, ``os.fsync`` is a no-op while the
spool is filled, and one ``os.sync()`` flushes everything at the end: the bytes and file names
are the same, only the per-file durability (which a benchmark fixture does not need) is
skipped. The server then starts on that spool as after a restart.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import trio
from servers import RECIPIENT, SENDER, USER

from submitd import Envelope, MailParams, Recipient, Reply
from submitd.mailqueue import Attempt, Spool

FILL_WORKERS = 16  # messages being written at once (each step is a worker-thread trip)
DEFER_MIN_S = 2 * 3600.0  # the next attempt is at least this far ahead
RECEIVED_WITHIN_S = 3 * 3600.0  # messages were received up to this long ago
RELAY = "smtp.provider.example"
LAST_REPLY = Reply.make(451, "4.4.1", f"Connection timed out ({RELAY}:587)")


@contextlib.contextmanager
def _fsync_skipped() -> Iterator[None]:
    """``os.fsync`` does nothing inside the block; ``os.sync()`` once on the way out."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real
        os.sync()


async def _fill(directory: Path, count: int, body: bytes, now: float, seed: int) -> None:
    spool = Spool(directory)
    await spool.recover()  # creates tmp/ msg/ env/ corrupt/
    rng = random.Random(seed)
    indexes = iter(range(count))  # shared by the workers (one trio thread: no races)
    session_info = {
        "session_id": "backlog-fill", "peer": "127.0.0.1", "ehlo": "client.bench.example",
        "tls_version": "TLSv1.3", "tls_cipher": "TLS_AES_256_GCM_SHA384",
        "listener": "127.0.0.1:587", "mode": "starttls",
    }

    async def one(index: int) -> None:
        created = now - rng.uniform(0, RECEIVED_WITHIN_S)
        incoming = await spool.open_incoming()
        try:
            await incoming.write(body)
            handle = await incoming.finish(max_header_size=262_144)
            envelope = Envelope(
                sender=SENDER,
                recipients=(Recipient(address=f"user{index}@{RECIPIENT.partition('@')[2]}"),),
                params=MailParams(size=len(body)),
                username=USER,
                received_at=created,
            )
            queue_id = await incoming.commit(envelope, handle, session_info=session_info)
        finally:
            await incoming.abort()  # a no-op after the commit
        record = await spool.load_record(queue_id)
        due = now + DEFER_MIN_S + rng.uniform(0, 3600.0)
        attempts = rng.randint(1, 6)
        # The attempts were made between the message's arrival and now (what `queue show`
        # lists as the recipient's history).
        history = tuple(
            Attempt(at=t, reply=LAST_REPLY, remote=RELAY)
            for t in sorted(rng.uniform(created, now) for _ in range(attempts))
        )
        recipients = tuple(
            replace(r, attempts=attempts, last_reply=LAST_REPLY, next_attempt=due,
                    history=history)
            for r in record.recipients
        )
        await spool.save(replace(record, recipients=recipients, next_attempt=due))

    async def worker() -> None:
        for index in indexes:
            await one(index)

    async with trio.open_nursery() as nursery:
        for _ in range(FILL_WORKERS):
            nursery.start_soon(worker)


def fill_spool(directory: Path, *, count: int, body: bytes, seed: int = 5) -> dict[str, float]:
    """Write ``count`` deferred messages (``body`` each) into the spool at ``directory``."""
    started = time.perf_counter()
    with _fsync_skipped():
        trio.run(_fill, directory, count, body, time.time(), seed)
    elapsed = time.perf_counter() - started
    return {"fill_s": round(elapsed, 1), "fill_msgs_per_s": round(count / elapsed, 1)}


def count_queued(directory: Path) -> int:
    """How many committed messages (sidecars in ``env/``) the spool at ``directory`` holds."""
    try:
        return sum(1 for e in os.scandir(directory / "env") if e.name.endswith(".json"))
    except FileNotFoundError:
        return 0


def spool_bytes(directory: Path) -> int:
    """Bytes in the spool's message files and sidecars."""
    total = 0
    for sub in ("msg", "env"):
        with contextlib.suppress(FileNotFoundError), os.scandir(directory / sub) as it:
            total += sum(e.stat().st_size for e in it)
    return total

