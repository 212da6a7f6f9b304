"""Header edits from ``submitd_data_filter``, applied to the stored header section on commit.

Pure functions on bytes: the spool reads the (bounded) header section, calls
:func:`edited_header_section`, writes the result and then copies the body unchanged.
"""

from __future__ import annotations

from ..message import HeaderEdits, check_field, parse_header_section

__all__ = ["bounded_header_section", "edited_header_section"]


def bounded_header_section(
    head: bytes, *, complete: bool
) -> tuple[list[tuple[str, str]], int, bytes]:
    """Parse the header section from ``head``, the first bytes of a message.

    ``complete`` says whether ``head`` is the whole message. When it is not, a line cut by
    the bound is left out, so a truncated line is never taken for a field. Returns the
    fields, the body offset and the part of ``head`` that was parsed.
    """
    if not complete:
        cut = head.rfind(b"\r\n")
        head = head[: cut + 2] if cut >= 0 else b""
    fields, body_offset = parse_header_section(head)
    return fields, body_offset, head


def _ends_with_empty_line(head: bytes, body_offset: int) -> bool:
    if body_offset < 2 or head[body_offset - 2 : body_offset] != b"\r\n":
        return False
    return body_offset == 2 or head[body_offset - 4 : body_offset - 2] == b"\r\n"


def _check_prepend(edits: HeaderEdits) -> bytes:
    # MessageHandle.add_header validates, but ``edits.prepend`` is a plain list a plugin
    # could append to: check again right before the bytes hit the disk (docs/security.md §1).
    for name, value in edits.prepend:
        check_field(name, value)
    return b"".join(
        f"{name}: {value}\r\n".encode("utf-8", "surrogateescape") for name, value in edits.prepend
    )


def edited_header_section(head: bytes, body_offset: int, edits: HeaderEdits) -> bytes:
    """Return the header section ``head[:body_offset]`` with ``edits`` applied.

    Prepended fields come first, in ``edits.prepend`` order. Received fields named in
    ``edits.remove`` are dropped together with their continuation lines (RFC 5322 §2.2.3).
    When the message had no empty line after its fields but text follows, an empty line is
    inserted after the fields so that text stays body rather than becoming a header.
    Raises ValueError if a prepended field could break the framing.
    """
    out = [_check_prepend(edits)]
    keep = True
    pos = 0
    while pos < body_offset:
        nl = head.find(b"\r\n", pos, body_offset)
        end = body_offset if nl < 0 else nl + 2
        line = head[pos:end]
        if line[:1] not in (b" ", b"\t"):
            name = line.partition(b":")[0].rstrip().decode("ascii", "replace").lower()
            keep = line == b"\r\n" or name not in edits.remove
        if keep:
            out.append(line)
        pos = end
    has_text_after = body_offset < len(head)
    if edits.prepend and has_text_after and not _ends_with_empty_line(head, body_offset):
        out.append(b"\r\n")
    return b"".join(out)
