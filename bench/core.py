"""The sans-I/O protocol core alone: how fast ``ServerConnection`` turns DATA bytes into chunks.

A ``ServerConnection`` is brought to the DATA phase (EHLO inside TLS, AUTH PLAIN, MAIL, RCPT,
DATA, each accepted with its ``accept_...`` method), then the dot-stuffed message is fed in
64 KiB segments, as the connection driver receives them, and every ``DataChunk`` is collected
until ``DataComplete``, which is accepted with the queue reply. Only that DATA phase is timed.

The peer is the least work that gives the same result from the same bytes: split the buffer on
CRLF, stop at the "." line, drop the transparency dot, join. It checks nothing (bare CR/LF,
NUL, line length, header size, size limit) and sees the whole buffer at once, so the ratio
says what the core's checks and streaming cost over plain byte shuffling.
"""

from __future__ import annotations

import base64
import statistics
import time
from typing import Any

from client import stuff

from submitd.protocol import (
    NEED_DATA,
    AuthRequest,
    DataChunk,
    DataComplete,
    DataStart,
    Hello,
    MailFrom,
    ProtocolLimits,
    RcptTo,
    Reply,
    ServerConnection,
)

SEGMENT = 64 * 1024
QUEUED = Reply.make(250, "2.0.0", "Ok: queued as BENCH")


def make_body(size: int) -> bytes:
    """An unstuffed message of about ``size`` bytes; some lines start with a dot or are "."."""
    header = b"From: <bench@example.com>\r\nTo: <someone@example.net>\r\nSubject: core\r\n\r\n"
    lines = []
    for n in range(64):
        width = 20 + (n * 37) % 57  # 20..76 octets: realistic, not one fixed width
        text = (f"{n:02d} " + "abcdefghijklmnopqrstuvwxyz0123456789" * 3)[:width]
        if n % 16 == 5:
            text = "." + text  # needs stuffing
        if n == 40:
            text = "."  # a line holding only a dot: content, stuffed to ".."
        lines.append(text.encode() + b"\r\n")
    block = b"".join(lines)
    return header + block * max(1, (size - len(header)) // len(block))


def _answer(conn: ServerConnection, line: bytes) -> None:
    conn.receive_data(line)
    event = conn.next_event()
    if isinstance(event, Hello):
        conn.accept_hello(event)
    elif isinstance(event, AuthRequest):
        conn.accept_auth(event)
    elif isinstance(event, MailFrom):
        conn.accept_mail(event)
    elif isinstance(event, RcptTo):
        conn.accept_rcpt(event)
    elif isinstance(event, DataStart):
        conn.accept_data(event)
    else:
        raise RuntimeError(f"unexpected event after {line!r}: {event!r}")


def _connection_in_data(max_size: int) -> ServerConnection:
    conn = ServerConnection(
        hostname="core.bench.example",
        limits=ProtocolLimits(max_message_size=max_size),
        tls_active=True,
        tls_available=False,
    )
    conn.greet()
    credentials = base64.b64encode(b"\0bench\0secret").decode()
    _answer(conn, b"EHLO client.bench.example\r\n")
    _answer(conn, f"AUTH PLAIN {credentials}\r\n".encode())
    _answer(conn, b"MAIL FROM:<bench@example.com>\r\n")
    _answer(conn, b"RCPT TO:<someone@example.net>\r\n")
    _answer(conn, b"DATA\r\n")
    conn.data_to_send()
    return conn


def core_once(segments: list[bytes], max_size: int) -> tuple[float, list[bytes]]:
    """Feed the segments to a fresh connection in DATA; return (seconds, chunks)."""
    conn = _connection_in_data(max_size)
    chunks: list[bytes] = []
    done = False
    start = time.perf_counter()
    for segment in segments:
        conn.receive_data(segment)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, DataChunk):
                chunks.append(event.data)
            elif isinstance(event, DataComplete):
                if event.error is not None:
                    raise RuntimeError(f"the core refused the message: {event.error}")
                conn.accept_message(event, QUEUED)
                done = True
                break
            else:
                raise RuntimeError(f"unexpected event in DATA: {event!r}")
    elapsed = time.perf_counter() - start
    if not done or not conn.data_to_send().endswith(QUEUED.to_bytes()):
        raise RuntimeError("the core did not complete the message")
    return elapsed, chunks


def reference(wire: bytes) -> bytes:
    """The peer: split on CRLF, stop at ".", unstuff, join."""
    lines = wire.split(b"\r\n")
    end = lines.index(b".")
    return b"\r\n".join([ln[1:] if ln[:1] == b"." else ln for ln in lines[:end]]) + b"\r\n"


def reference_once(wire: bytes) -> tuple[float, bytes]:
    """Time :func:`reference` once."""
    start = time.perf_counter()
    out = reference(wire)
    return time.perf_counter() - start, out


def _rates(wire: bytes, core_times: list[float], ref_times: list[float]) -> dict[str, Any]:
    mib = len(wire) / (1024 * 1024)
    core_rate = mib / statistics.median(core_times)
    ref_rate = mib / statistics.median(ref_times)
    return {
        "submitd": {
            "mib_per_s": round(core_rate, 1),
            "best_mib_per_s": round(mib / min(core_times), 1),
        },
        "peer": {
            "name": "bytes.split(CRLF) + unstuff + join over the whole buffer",
            "mib_per_s": round(ref_rate, 1),
            "best_mib_per_s": round(mib / min(ref_times), 1),
        },
        "ratio_submitd_over_peer": round(core_rate / ref_rate, 3),
    }


def run_core(*, size: int, repeats: int, small_size: int, small_count: int) -> dict[str, Any]:
    """Interleave runs of the core and of the reference; report median rates.

    First one ``size`` message in 64 KiB segments (``repeats`` times); then ``small_count``
    messages of ``small_size`` bytes, each arriving whole with its terminator in one segment,
    as a 10 KiB message usually does from a real client (one TLS read).
    """
    body = make_body(size)
    wire = stuff(body)
    segments = [wire[i : i + SEGMENT] for i in range(0, len(wire), SEGMENT)]
    max_size = 2 * len(body)
    core_times: list[float] = []
    ref_times: list[float] = []
    chunk_count = 0
    for _ in range(repeats):
        seconds, chunks = core_once(segments, max_size)
        core_times.append(seconds)
        if b"".join(chunks) != body:
            raise RuntimeError("the core's chunks differ from the message")
        chunk_count = len(chunks)
        seconds, out = reference_once(wire)
        ref_times.append(seconds)
        if out != body:
            raise RuntimeError("the reference's output differs from the message")

    small_body = make_body(small_size)
    small_wire = stuff(small_body)
    small_core: list[float] = []
    small_ref: list[float] = []
    for _ in range(small_count):
        seconds, chunks = core_once([small_wire], max_size)
        small_core.append(seconds)
        if b"".join(chunks) != small_body:
            raise RuntimeError("the core's chunks differ from the small message")
        small_ref.append(reference_once(small_wire)[0])
    return {
        "wire_bytes": len(wire),
        "segment_bytes": SEGMENT,
        "repeats": repeats,
        "data_chunks": chunk_count,
        **_rates(wire, core_times, ref_times),
        "small_messages": {
            "wire_bytes": len(small_wire),
            "count": small_count,
            "segments_per_message": 1,
            **_rates(small_wire, small_core, small_ref),
        },
    }
