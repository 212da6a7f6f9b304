"""DATA: one terminator, no smuggling, dot-unstuffing, chunking and content limits."""

from __future__ import annotations

import pytest

from submitd.protocol import (
    ConnectionClosed,
    DataChunk,
    DataComplete,
    Event,
    MailFrom,
    NeedsAnswer,
    ServerConnection,
)
from submitd.protocol._data import CHUNK_SIZE
from tests.unit.protocol_support import pump, ready

START = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
START_REPLIES = (
    b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
)
OK = b"250 2.0.0 Ok: queued as TEST\r\n"
BARE = b"550 5.5.2 Message contains bare CR or LF; lines must end with CRLF\r\n"
LONG_LINE = b"554 5.6.0 Message contains a line longer than 998 characters\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed limit\r\n"
HEADER_TOO_BIG = b"552 5.3.4 Message header too large\r\n"
NUL = b"554 5.6.0 Message contains NUL characters\r\n"
SMUGGLED = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nevil\r\n"


def in_data(**limits: int) -> ServerConnection:
    conn = ready(**limits)
    assert pump(conn, START)[0] == START_REPLIES
    return conn


def body(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataChunk))


def completions(events: list[Event]) -> list[DataComplete]:
    return [e for e in events if isinstance(e, DataComplete)]


def test_message_is_unstuffed_and_ends_at_crlf_dot_crlf() -> None:
    conn = in_data()
    out, events = pump(conn, b"Subject: hi\r\n\r\n..leading dot\r\n.\r\nNOOP\r\n")
    assert out == OK + b"250 2.0.0 OK\r\n"
    expected = b"Subject: hi\r\n\r\n.leading dot\r\n"
    assert body(events) == expected
    assert completions(events) == [DataComplete(size=len(expected), error=None)]


def test_dot_line_right_after_354_is_an_empty_message() -> None:
    conn = in_data()
    out, events = pump(conn, b".\r\n")
    assert out == OK
    assert completions(events) == [DataComplete(size=0, error=None)]


def test_lone_dot_line_with_stuffing_is_content() -> None:
    conn = in_data()
    out, events = pump(conn, b"..\r\n.\r\n")
    assert (out, body(events)) == (OK, b".\r\n")


# Each variant is followed by a smuggled transaction and then by the real terminator: the
# smuggled commands must be part of the refused body, never executed.
SMUGGLING_VARIANTS = [
    b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\r.\n", b"\n.\r", b"\r.\r\n",
    b"\r\n.\r\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\x00\r\n",
]


@pytest.mark.parametrize("variant", SMUGGLING_VARIANTS, ids=repr)
def test_fake_terminator_does_not_end_data_and_refuses_the_message(variant: bytes) -> None:
    conn = in_data()
    out, events = pump(conn, b"Subject: hi\r\n\r\nbody" + variant + SMUGGLED + b".\r\nNOOP\r\n")
    assert [type(e) for e in events if isinstance(e, NeedsAnswer)] == [DataComplete]
    assert not any(isinstance(e, MailFrom) for e in events)
    done = completions(events)
    assert len(done) == 1
    assert done[0].error is not None
    assert out in (BARE + b"250 2.0.0 OK\r\n", NUL + b"250 2.0.0 OK\r\n")


@pytest.mark.parametrize("variant", SMUGGLING_VARIANTS, ids=repr)
def test_smuggled_body_split_at_every_byte_is_still_refused(variant: bytes) -> None:
    stream = b"x" + variant + SMUGGLED + b".\r\nNOOP\r\n"
    for cut in range(1, len(stream)):
        conn = in_data()
        out1, ev1 = pump(conn, stream[:cut])
        out2, ev2 = pump(conn, stream[cut:])
        events = ev1 + ev2
        assert not any(isinstance(e, MailFrom) for e in events)
        assert len(completions(events)) == 1
        assert completions(events)[0].error is not None
        assert (out1 + out2).endswith(b"250 2.0.0 OK\r\n")


def test_terminator_split_at_every_boundary_is_found() -> None:
    stream = b"Subject: x\r\n\r\nline one\r\n..dot\r\n.\r\nNOOP\r\n"
    for cut in range(len(stream) + 1):
        for cut2 in range(cut, len(stream) + 1):
            conn = in_data()
            out = b""
            events: list[Event] = []
            for part in (stream[:cut], stream[cut:cut2], stream[cut2:]):
                o, e = pump(conn, part)
                out += o
                events += e
            assert out == OK + b"250 2.0.0 OK\r\n", (cut, cut2)
            assert body(events) == b"Subject: x\r\n\r\nline one\r\n.dot\r\n"


def test_message_fed_one_byte_at_a_time_keeps_state() -> None:
    conn = in_data()
    out = b""
    events: list[Event] = []
    for byte in b"a\r\n.b\r\n\r\n.\r\nNOOP\r\n":
        o, e = pump(conn, bytes([byte]))
        out += o
        events += e
    assert out == OK + b"250 2.0.0 OK\r\n"
    assert body(events) == b"a\r\nb\r\n\r\n"


def test_refused_message_stops_emitting_chunks_and_keeps_reading_to_real_end() -> None:
    conn = in_data()
    good = b"\r\n" + b"ok line\r\n" * (CHUNK_SIZE // 9 + 1)
    handed = body(pump(conn, good)[1])  # a full chunk is handed out at once
    assert len(handed) >= CHUNK_SIZE and good.startswith(handed)
    assert pump(conn, b"ok line\r\n") == (b"", [])  # held until a chunk is full or the end
    out, events = pump(conn, b"bad\nline\r\nmore\r\n")
    assert (out, events) == (b"", [])
    out, events = pump(conn, b"further\r\n.\r\n")
    assert body(events) == b""
    assert out == BARE


def test_bare_cr_in_body_is_refused() -> None:
    conn = in_data()
    assert pump(conn, b"a\rb\r\n.\r\n")[0] == BARE


def test_body_with_only_bare_lf_line_ends_is_refused_as_bare_lf() -> None:
    conn = in_data()
    out, _ = pump(conn, b"Subject: x\n\n" + b"unix line\n" * 200 + b".\n")
    assert out == b""  # still waiting for the real terminator
    assert pump(conn, b"\r\n.\r\n")[0] == BARE


def test_nul_in_body_is_refused() -> None:
    conn = in_data()
    assert pump(conn, b"a\x00b\r\n.\r\n")[0] == NUL


def test_chunks_are_about_chunk_size_of_whole_lines() -> None:
    conn = in_data()
    line = b"x" * 78 + b"\r\n"
    message = b"Subject: big\r\n\r\n" + line * 10000
    out, events = pump(conn, message + b".\r\n")
    chunks = [e.data for e in events if isinstance(e, DataChunk)]
    assert out == OK
    assert b"".join(chunks) == message
    assert len(chunks) == len(message) // CHUNK_SIZE + 1
    assert all(c.endswith(b"\r\n") for c in chunks)
    assert all(CHUNK_SIZE <= len(c) <= CHUNK_SIZE + 1000 for c in chunks[:-1])


def test_body_arriving_in_small_reads_is_handed_out_in_full_chunks() -> None:
    conn = in_data()
    line = b"y" * 58 + b"\r\n"
    message = b"\r\n" + line * 10000
    stream = message + b".\r\nNOOP\r\n"
    events: list[Event] = []
    out = b""
    for start in range(0, len(stream), 16384):  # one TLS record at a time
        o, e = pump(conn, stream[start : start + 16384])
        out, events = out + o, events + e
    chunks = [e.data for e in events if isinstance(e, DataChunk)]
    assert out == OK + b"250 2.0.0 OK\r\n"
    assert b"".join(chunks) == message
    assert all(len(c) >= CHUNK_SIZE for c in chunks[:-1])


def test_dots_are_unstuffed_in_large_bodies_too() -> None:
    conn = in_data()
    lines = b"".join(b"..%d\r\nplain %d\r\n" % (i, i) for i in range(4000))
    _, events = pump(conn, b"\r\n" + lines + b".\r\n")
    expected = b"\r\n" + b"".join(b".%d\r\nplain %d\r\n" % (i, i) for i in range(4000))
    assert body(events) == expected
    assert completions(events)[0].size == len(expected)


def test_line_of_998_octets_is_accepted_and_999_refused() -> None:
    conn = in_data()
    assert pump(conn, b"\r\n" + b"a" * 998 + b"\r\n.\r\n")[0] == OK
    pump(conn, START)
    assert pump(conn, b"\r\n" + b"a" * 999 + b"\r\n.\r\n")[0] == LONG_LINE


def test_transparency_dot_does_not_count_towards_line_length() -> None:
    conn = in_data()
    out, events = pump(conn, b"\r\n." + b"." * 998 + b"\r\n.\r\n")
    assert out == OK
    assert body(events) == b"\r\n" + b"." * 998 + b"\r\n"


def test_endless_line_is_drained_with_bounded_memory() -> None:
    conn = in_data()
    pump(conn, b"Subject: x\r\n\r\n")
    for _ in range(100):
        out, events = pump(conn, b"y" * 65536)
        assert events == [] and out == b""
        assert len(conn._buf) < 2000
    assert pump(conn, b"\r\n.\r\n")[0] == LONG_LINE


def test_message_over_size_is_refused_after_its_real_end() -> None:
    conn = in_data(max_message_size=100)
    out, events = pump(conn, b"\r\n" + b"a" * 60 + b"\r\n" + b"b" * 60 + b"\r\nmore\r\n")
    assert out == b""
    assert body(events) in (b"", b"\r\n" + b"a" * 60 + b"\r\n")
    out, events = pump(conn, b".\r\nNOOP\r\n")
    assert out == TOO_BIG + b"250 2.0.0 OK\r\n"
    assert body(events) == b""


def test_size_counts_unstuffed_octets_up_to_the_limit() -> None:
    conn = in_data(max_message_size=10)
    # ".3456\r\n" + ".\r\n" is exactly 10 octets once unstuffed (13 on the wire).
    assert pump(conn, b"..3456\r\n..\r\n.\r\n")[0] == OK
    pump(conn, START)
    assert pump(conn, b"123456789\r\n.\r\n")[0] == TOO_BIG


def test_header_larger_than_limit_is_refused() -> None:
    conn = in_data(max_header_size=100)
    header = b"X-Filler: " + b"h" * 60 + b"\r\n"
    assert pump(conn, header + header + b"\r\nbody\r\n.\r\n")[0] == HEADER_TOO_BIG


def test_body_is_not_counted_as_header() -> None:
    conn = in_data(max_header_size=100)
    out, _ = pump(conn, b"Subject: x\r\n\r\n" + (b"b" * 60 + b"\r\n") * 10 + b".\r\n")
    assert out == OK


def test_first_problem_found_is_the_one_reported() -> None:
    conn = in_data(max_message_size=50)
    assert pump(conn, b"a\nb\r\n" + b"c" * 100 + b"\r\n.\r\n")[0] == BARE


def test_data_after_terminator_is_parsed_as_commands() -> None:
    conn = in_data()
    out, events = pump(conn, b"body\r\n.\r\n" + START + b"second\r\n.\r\n")
    assert out == OK + START_REPLIES + OK
    assert len(completions(events)) == 2


def test_size_parameter_does_not_decide_where_data_ends() -> None:
    conn = ready()
    out, events = pump(
        conn,
        b"MAIL FROM:<a@example.org> SIZE=5\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        b"0123456789\r\nNOOP\r\n.\r\n",
    )
    assert out.endswith(OK)
    assert body(events) == b"0123456789\r\nNOOP\r\n"


def test_eof_during_data_closes_without_completing_the_message() -> None:
    conn = in_data()
    conn.receive_data(b"partial message\r\n")
    conn.receive_data(b"")
    out, events = pump(conn)
    assert out == b""
    assert completions(events) == []
    assert events[-1] == ConnectionClosed(
        reason="connection closed by client during DATA", client_done=True
    )


def test_refused_message_ends_the_transaction() -> None:
    conn = in_data()
    pump(conn, b"a\nb\r\n.\r\n")
    assert pump(conn, b"RCPT TO:<c@example.net>\r\n")[0] == (
        b"503 5.5.1 Bad sequence of commands: need MAIL command\r\n"
    )


def reference(stream: bytes) -> tuple[bytes | None, bytes]:
    """The specification, written the slow way: (unstuffed body or None if refused, rest)."""
    end = (b"\r\n" + stream).find(b"\r\n.\r\n")  # the 354 stands in for the first CRLF
    lines = stream[: end - 2].split(b"\r\n") if end > 0 else []
    rest = stream[end + 3 :]
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    if any(b"\r" in u or b"\n" in u or b"\0" in u or len(u) > 998 for u in unstuffed):
        return None, rest
    return b"".join(u + b"\r\n" for u in unstuffed), rest


@pytest.mark.parametrize("seed", range(40))
def test_random_bodies_and_splits_match_the_reference(seed: int) -> None:
    import random

    rng = random.Random(seed)
    pieces = [b"a", b"b", b".", b"..", b"\r\n", b"\r\n", b"\r\n.", b"\r", b"\n", b"x" * 150]
    if seed % 4:
        pieces = pieces[:6] + pieces[-1:]  # mostly clean messages
    stream = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 400)))
    while b"\r\n.\r\n" in stream:  # no early terminator: the test supplies the real one
        stream = stream.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    stream = b"z" + stream + b"z\r\n.\r\nNOOP\r\n"
    expected, rest = reference(stream)
    assert rest == b"NOOP\r\n"
    conn = in_data()
    out = b""
    events: list[Event] = []
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 2, 3, 7, 100, 5000])
        o, e = pump(conn, stream[pos : pos + step])
        out, events, pos = out + o, events + e, pos + step
    done = completions(events)
    assert len(done) == 1
    assert out.endswith(b"250 2.0.0 OK\r\n")
    if expected is None:
        assert done[0].error is not None
    else:
        assert done[0].error is None
        assert body(events) == expected


# Where a block of body lines is checked at once, every rule must still hold at any offset: a
# problem or a dot line placed just before, at or after a chunk boundary, and reads cut anywhere.
PLANTED = [
    b"..stuffed", b".", b"..", b"bare\rcr", b"bare\nlf", b"nul\x00", b"a" * 998, b"a" * 999,
    b"." + b"b" * 998, b"." + b"b" * 999, b"\r", b"\n", b"",
]


@pytest.mark.parametrize("planted", PLANTED, ids=repr)
@pytest.mark.parametrize("delta", [-80, -2, -1, 0, 1, 2, 79, 1000])
def test_lines_planted_at_a_chunk_boundary_match_the_reference(
    planted: bytes, delta: int
) -> None:
    line = b"z" * 77 + b"\r\n"
    before = line * ((CHUNK_SIZE + delta) // len(line))
    before += b"q" * ((CHUNK_SIZE + delta) % len(line)) + b"\r\n" if delta % 3 else b""
    stream = b"\r\n" + before + planted + b"\r\n" + line * 50 + b".\r\nNOOP\r\n"
    if b"\r\n.\r\n" in stream[: -len(b".\r\nNOOP\r\n")]:
        return  # the planted "." line is the real end: covered by the reference test above
    expected, rest = reference(stream)
    for step in (len(stream), 16384, 65536 + 7):
        conn = in_data()
        out = b""
        events: list[Event] = []
        for pos in range(0, len(stream), step):
            o, e = pump(conn, stream[pos : pos + step])
            out, events = out + o, events + e
        assert rest == b"NOOP\r\n"
        done = completions(events)
        assert len(done) == 1
        assert out.endswith(b"250 2.0.0 OK\r\n")
        if expected is None:
            assert done[0].error is not None
        else:
            assert done[0].error is None
            assert body(events) == expected
            assert done[0].size == len(expected)


def test_message_crossing_the_size_limit_inside_a_block_is_refused() -> None:
    line = b"z" * 78 + b"\r\n"
    limit = 3 * CHUNK_SIZE // 2
    for size in (limit - 80, limit, limit + 1, limit + 80):
        conn = in_data(max_message_size=limit)
        message = b"\r\n" + line * (size // len(line)) + b"x" * (size % len(line) - 2) + b"\r\n"
        assert len(message) == size + 2
        out, _ = pump(conn, message + b".\r\n")
        assert out == (OK if size + 2 <= limit else TOO_BIG), size


@pytest.mark.parametrize("seed", range(12))
def test_dot_heavy_bodies_across_chunks_match_the_reference(seed: int) -> None:
    import random

    rng = random.Random(seed)
    lines = [b"..", b"...", b".x", b"..x", b"plain", b"", b"y" * 997, b"." + b"z" * 998]
    if seed % 3 == 0:
        lines += [b"bad\rcr", b"nul\x00", b"." + b"w" * 999]  # a refused message
    header = b"".join(rng.choice([b"..H: 1", b"Subject: s", b".X: y"]) + b"\r\n" for _ in range(20))
    text = b"".join(rng.choice(lines) + b"\r\n" for _ in range(rng.randrange(1000, 9000)))
    stream = header + b"\r\n" + text + b".\r\nNOOP\r\n"
    expected, rest = reference(stream)
    assert rest == b"NOOP\r\n"
    conn = in_data()
    out = b""
    events: list[Event] = []
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 5, 999, 16384, 70000])
        o, e = pump(conn, stream[pos : pos + step])
        out, events, pos = out + o, events + e, pos + step
    (done,) = completions(events)
    assert out.endswith(b"250 2.0.0 OK\r\n")
    if expected is None:
        assert done.error is not None
    else:
        assert done.error is None
        assert body(events) == expected
        assert done.size == len(expected)


def test_a_body_of_dot_lines_is_handed_out_in_full_chunks() -> None:
    conn = in_data()
    message = b"..\r\n" * 200_000  # every line is stuffed
    out, events = pump(conn, b"\r\n" + message + b".\r\n")
    chunks = [e.data for e in events if isinstance(e, DataChunk)]
    assert out == OK
    assert b"".join(chunks) == b"\r\n" + b".\r\n" * 200_000
    assert len(chunks) <= len(message) // CHUNK_SIZE + 2


def test_stuffed_header_lines_are_unstuffed() -> None:
    conn = in_data()
    header = b"".join(b"..X-%d: v\r\n" % i for i in range(500))
    out, events = pump(conn, header + b"\r\nbody\r\n.\r\n")
    assert out == OK
    assert body(events) == header.replace(b"..", b".") + b"\r\nbody\r\n"


@pytest.mark.parametrize("where", [0, 1, 5000, CHUNK_SIZE // 80 - 1, CHUNK_SIZE // 80 + 1])
@pytest.mark.parametrize("bad", [b"bare lf\nhere\r\n", b"\nstarts with lf\r\n", b"lf\n\r\n"])
def test_a_bare_lf_among_many_good_body_lines_is_refused(where: int, bad: bytes) -> None:
    conn = in_data()
    line = b"z" * 78 + b"\r\n"
    lines = [line] * (CHUNK_SIZE // 80 * 2)
    lines.insert(where, bad)
    out, events = pump(conn, b"Subject: x\r\n\r\n" + b"".join(lines) + b".\r\n")
    assert out == BARE
    assert len(completions(events)) == 1
