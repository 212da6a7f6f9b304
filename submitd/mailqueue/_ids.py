"""Queue IDs: 16 characters, unique, sortable by creation time, safe in file names.

An ID is the creation time in milliseconds (10 Crockford base32 digits, enough until the
year 37000) followed by 6 random digits (30 bits). Crockford's alphabet has no ``I L O U``
and sorts in ASCII order, so IDs sort by time. Within one process IDs are strictly
increasing: a second ID in the same millisecond takes the previous random part plus one
(the ULID "monotonic" rule), so two messages committed at once never collide.

Several processes on one spool (``[server] workers``) each call :func:`set_process_tag`
with their worker number: the top 8 bits of the random part are then that number, so IDs
made in the same millisecond by two processes differ there and can never collide (the rest,
22 bits, follows the same monotonic rule).
"""

from __future__ import annotations

import os
import re
import threading
import time

__all__ = ["MAX_PROCESS_TAG", "QUEUE_ID_LENGTH", "is_queue_id", "new_queue_id",
           "set_process_tag"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_DIGITS = 10
_RANDOM_DIGITS = 6
_RANDOM_LIMIT = 32**_RANDOM_DIGITS
#: Every queue ID has exactly this many characters.
QUEUE_ID_LENGTH = _TIME_DIGITS + _RANDOM_DIGITS
_QUEUE_ID = re.compile(rf"\A[{_ALPHABET}]{{{QUEUE_ID_LENGTH}}}\Z")

_TAG_BITS = 8
_LOW_LIMIT = _RANDOM_LIMIT >> _TAG_BITS
#: The largest process tag (one per worker process).
MAX_PROCESS_TAG = (1 << _TAG_BITS) - 1

_lock = threading.Lock()
_last: tuple[int, int] = (-1, 0)
_tag: int | None = None


def set_process_tag(tag: int | None) -> None:
    """Reserve the IDs whose random part starts with ``tag`` for this process (None: no tag).

    Every process on one spool needs its own tag (0 to :data:`MAX_PROCESS_TAG`).
    """
    global _tag, _last
    if tag is not None and not 0 <= tag <= MAX_PROCESS_TAG:
        raise ValueError(f"a process tag is 0 to {MAX_PROCESS_TAG}, not {tag}")
    with _lock:
        _tag = tag
        _last = (-1, 0)


def _encode(value: int, digits: int) -> str:
    out = []
    for _ in range(digits):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


# Random bytes from the kernel, taken 4 at a time: one getrandom call per 1024 IDs. Each call
# on the event loop releases the GIL, and a worker thread holding it then delays the loop.
_POOL_SIZE = 4096
_pool = b""
_pool_pos = 0


def _drop_pool() -> None:
    """Forget the random bytes (a forked child must not reuse its parent's)."""
    global _pool, _pool_pos
    _pool, _pool_pos = b"", 0


os.register_at_fork(after_in_child=_drop_pool)


def _random_below(limit: int) -> int:
    """A uniform random number below ``limit`` (a power of two up to 2**32); hold ``_lock``."""
    global _pool, _pool_pos
    if _pool_pos + 4 > len(_pool):
        _pool, _pool_pos = os.urandom(_POOL_SIZE), 0
    value = int.from_bytes(_pool[_pool_pos:_pool_pos + 4], "big")
    _pool_pos += 4
    return value & (limit - 1)


def new_queue_id(now: float | None = None) -> str:
    """Return a fresh queue ID for a message created at ``now`` (default: the wall clock)."""
    global _last
    ms = int((time.time() if now is None else now) * 1000)
    with _lock:
        limit = _RANDOM_LIMIT if _tag is None else _LOW_LIMIT
        last_ms, last_rand = _last
        if ms <= last_ms:
            # Same millisecond (or the clock stepped back): stay monotonic.
            ms, rand = last_ms, last_rand + 1
            if rand >= limit:
                ms, rand = ms + 1, _random_below(limit // 2)
        else:
            # Leave headroom so the monotonic increments cannot overflow in practice.
            rand = _random_below(limit // 2)
        _last = (ms, rand)
        if _tag is not None:
            rand |= _tag << (_RANDOM_DIGITS * 5 - _TAG_BITS)
    return _encode(ms, _TIME_DIGITS) + _encode(rand, _RANDOM_DIGITS)


def is_queue_id(value: str) -> bool:
    """Tell whether ``value`` has the shape of a queue ID (so it is safe as a file name)."""
    return bool(_QUEUE_ID.match(value))
