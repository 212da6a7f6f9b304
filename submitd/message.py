"""The message handle that hooks receive: parsed headers, header edits, the stored bytes.

The body is never held in memory: the handle points at the spool file and reads the header
section only (bounded by ``Limits.max_header_size``). ``submitd_data_filter`` may add and remove
header fields; the spool applies the edits when it commits. Every edit is validated so that a
plugin cannot inject a line break into the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .stash import Stash

__all__ = ["HeaderEdits", "MessageHandle", "check_field", "parse_header_section"]

# RFC 5322 §3.6.8: field names are printable US-ASCII except ':'.
_FIELD_NAME = re.compile(rb"\A[\x21-\x39\x3b-\x7e]+\Z")
_FIELD_NAME_STR = re.compile(r"\A[\x21-\x39\x3b-\x7e]+\Z")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
# RFC 5322 §2.1.1: at most 998 characters per line, excluding CRLF.
_MAX_LINE = 998


def check_field(name: str, value: str | None = None) -> None:
    """Raise ValueError unless ``name: value`` is one safe header line (no CR, LF or NUL).

    Both the plugin-facing :meth:`MessageHandle.add_header` and the spool's commit use it,
    so a plugin cannot inject a line break whichever way it edits (docs/security.md §1).
    """
    if not _FIELD_NAME_STR.match(name):
        raise ValueError(f"invalid header field name {name!r}")
    if value is None:
        return
    if _BAD_VALUE.search(value):
        raise ValueError(f"invalid value for header {name!r}")
    if len(name) + 2 + len(value.encode("utf-8", "surrogateescape")) > _MAX_LINE:
        raise ValueError(f"header field {name!r} is too long")


def parse_header_section(data: bytes) -> tuple[list[tuple[str, str]], int]:
    """Split the header section at the start of ``data`` into ``(name, value)`` pairs.

    Returns the fields (values unfolded, decoded as UTF-8 with replacement) and the offset of
    the body (just after the empty line), or ``len(data)`` when there is no empty line. Lines
    that are not fields end the header section, as a lenient reader would treat them.

    Linear in the size of the section: the lines of a folded field are collected and joined
    once, so a header of many short continuation lines cannot stall the event loop.
    """
    fields: list[tuple[str, str]] = []
    name = ""
    parts: list[str] = []  # the value of the field being read, one entry per line

    def flush() -> None:
        if parts:
            fields.append((name, " ".join(parts)))
            parts.clear()

    pos = 0
    end = len(data)
    while pos < end:
        nl = data.find(b"\r\n", pos)
        if nl < 0:
            nl = end
        line = data[pos:nl]
        nxt = min(nl + 2, end)
        if line == b"":
            flush()
            return fields, nxt
        if line[:1] in (b" ", b"\t") and parts:
            parts.append(line.strip().decode("utf-8", "replace"))
        else:
            name_b, sep, value_b = line.partition(b":")
            if not sep or not _FIELD_NAME.match(name_b.rstrip()):
                flush()
                return fields, pos
            flush()
            name = name_b.rstrip().decode("ascii")
            parts.append(value_b.strip().decode("utf-8", "replace"))
        pos = nxt
    flush()
    return fields, end


@dataclass(slots=True)
class HeaderEdits:
    """Header changes requested by ``submitd_data_filter`` implementations, in order."""

    prepend: list[tuple[str, str]]
    remove: set[str]

    def __bool__(self) -> bool:
        return bool(self.prepend or self.remove)


class MessageHandle:
    """A stored message as plugins see it.

    ``headers`` lists the fields as received, in order (edits are not reflected there).
    ``add_header`` and ``remove_header`` are allowed only while the message is being filtered;
    in queue hooks the handle is read-only. ``open()`` returns the stored bytes: CRLF line
    endings, not dot-stuffed; call it from a worker thread for large messages.
    """

    def __init__(
        self,
        *,
        path: Path,
        size: int,
        headers: list[tuple[str, str]],
        body_offset: int,
        queue_id: str | None = None,
        editable: bool = False,
    ) -> None:
        self.path = path
        self.size = size
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)
        self.body_offset = body_offset
        self.queue_id = queue_id
        self.stash = Stash()
        self.edits = HeaderEdits(prepend=[], remove=set())
        self._editable = editable

    def get_all(self, name: str) -> list[str]:
        """Every value of the field ``name`` (case-insensitive), in order."""
        key = name.lower()
        return [v for n, v in self.headers if n.lower() == key]

    def get(self, name: str) -> str | None:
        """The first value of the field ``name``, or None."""
        values = self.get_all(name)
        return values[0] if values else None

    def add_header(self, name: str, value: str) -> None:
        """Prepend the field ``name: value``; raise ValueError on CR, LF or NUL (no injection)."""
        self._check_editable()
        check_field(name, value)
        self.edits.prepend.insert(0, (name, value))

    def remove_header(self, name: str) -> None:
        """Drop every received field ``name`` (case-insensitive) when the message is stored."""
        self._check_editable()
        check_field(name)
        self.edits.remove.add(name.lower())

    def freeze(self) -> None:
        """Make the handle read-only (the session calls this after the filters ran)."""
        self._editable = False

    def open(self) -> BinaryIO:
        """Open the stored message for reading (blocking I/O: use a worker thread)."""
        return self.path.open("rb")

    def iter_chunks(self, size: int = 65536) -> Iterator[bytes]:
        """Yield the stored message in chunks (blocking I/O: use a worker thread)."""
        with self.open() as f:
            while chunk := f.read(size):
                yield chunk

    def _check_editable(self) -> None:
        if not self._editable:
            raise RuntimeError("headers can only be changed in submitd_data_filter")

    def __repr__(self) -> str:
        return f"<MessageHandle {self.queue_id or 'uncommitted'} {self.size} bytes>"
