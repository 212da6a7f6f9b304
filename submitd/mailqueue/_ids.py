"""Queue IDs: 16 characters, unique, sortable by creation time, safe in file names.

An ID is the creation time in milliseconds (10 Crockford base32 digits, enough until the
year 37000) followed by 6 random digits (30 bits). Crockford's alphabet has no ``I L O U``
and sorts in ASCII order, so IDs sort by time. Within one process IDs are strictly
increasing: a second ID in the same millisecond takes the previous random part plus one
(the ULID "monotonic" rule), so two messages committed at once never collide.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

__all__ = ["QUEUE_ID_LENGTH", "is_queue_id", "new_queue_id"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_DIGITS = 10
_RANDOM_DIGITS = 6
_RANDOM_LIMIT = 32**_RANDOM_DIGITS
#: Every queue ID has exactly this many characters.
QUEUE_ID_LENGTH = _TIME_DIGITS + _RANDOM_DIGITS
_QUEUE_ID = re.compile(rf"\A[{_ALPHABET}]{{{QUEUE_ID_LENGTH}}}\Z")

_lock = threading.Lock()
_last: tuple[int, int] = (-1, 0)


def _encode(value: int, digits: int) -> str:
    out = []
    for _ in range(digits):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def new_queue_id(now: float | None = None) -> str:
    """Return a fresh queue ID for a message created at ``now`` (default: the wall clock)."""
    global _last
    ms = int((time.time() if now is None else now) * 1000)
    with _lock:
        last_ms, last_rand = _last
        if ms <= last_ms:
            # Same millisecond (or the clock stepped back): stay monotonic.
            ms, rand = last_ms, last_rand + 1
            if rand >= _RANDOM_LIMIT:
                ms, rand = ms + 1, secrets.randbelow(_RANDOM_LIMIT // 2)
        else:
            # Leave headroom so the monotonic increments cannot overflow in practice.
            rand = secrets.randbelow(_RANDOM_LIMIT // 2)
        _last = (ms, rand)
    return _encode(ms, _TIME_DIGITS) + _encode(rand, _RANDOM_DIGITS)


def is_queue_id(value: str) -> bool:
    """Tell whether ``value`` has the shape of a queue ID (so it is safe as a file name)."""
    return bool(_QUEUE_ID.match(value))
