"""Header section parsing: unfolding, where the body starts, and hostile folding."""

from __future__ import annotations

import pytest

from submitd.message import parse_header_section


@pytest.mark.parametrize(
    ("data", "fields", "body"),
    [
        (b"Subject: hi\r\n\r\nbody\r\n", [("Subject", "hi")], 15),
        (b"Subject: a\r\n b\r\n\tc\r\nTo: x\r\n\r\n", [("Subject", "a b c"), ("To", "x")], 29),
        (b"X:\r\n  folded  \r\n\r\n", [("X", " folded")], 18),
        (b"Subject : spaced\r\n\r\n", [("Subject", "spaced")], 20),
        (b"A: 1\r\nB: 2", [("A", "1"), ("B", "2")], 10),
        (b"A: 1\r\nnot a field\r\nB: 2\r\n\r\n", [("A", "1")], 6),
        (b" leading continuation\r\n\r\n", [], 0),
        (b"\r\nbody", [], 2),
        (b"A: caf\xc3\xa9 \xff\r\n\r\n", [("A", "caf\u00e9 \ufffd")], 14),
    ],
)
def test_header_section_is_split_and_unfolded(
    data: bytes, fields: list[tuple[str, str]], body: int
) -> None:
    assert parse_header_section(data) == (fields, body)


def test_a_240_kb_header_of_one_character_folds_is_unfolded_whole() -> None:
    # Each continuation line used to copy the whole value so far: quadratic in the size of
    # the header, about 0.3 s of a blocked event loop for this one (the fix is linear).
    folds = 240_000 // 4
    data = b"X-Long: a\r\n" + b" b\r\n" * folds + b"Subject: after\r\n\r\nbody\r\n"
    fields, body = parse_header_section(data)
    assert fields == [("X-Long", "a" + " b" * folds), ("Subject", "after")]
    assert data[body:] == b"body\r\n"
