"""One-line ``key=value`` log formatting that never lets client input break a log line."""

from __future__ import annotations

import json
import re

__all__ = ["logfmt"]  # re-exported as submitd.logfmt for plugins

_MAX_VALUE = 256
_PLAIN = re.compile(r"\A[A-Za-z0-9@._+\-/:,<>\[\]]+\Z")


def logfmt(event: str, **fields: object) -> str:
    """Format ``event=EVENT key=value ...``; values with spaces, quotes or controls are quoted.

    Quoting uses JSON string syntax with ``ensure_ascii``: control characters and non-ASCII
    text from addresses or replies are escaped, so one event stays one line (docs/security.md §1).
    None values are left out.
    """
    parts = [f"event={event}"]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if len(text) > _MAX_VALUE:  # client-supplied values (user names) can be 12 KiB long
            text = text[:_MAX_VALUE] + "..."
        if not _PLAIN.match(text):
            text = json.dumps(text, ensure_ascii=True)
        parts.append(f"{key}={text}")
    return " ".join(parts)
