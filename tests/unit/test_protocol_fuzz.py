"""Property tests: whatever bytes arrive, in whatever pieces, the core stays well-behaved.

A hostile or broken client must never crash the server, never get a malformed reply, and never
smuggle a second message. ``make fuzz`` runs the same properties with many more examples
(``SUBMITD_HYPOTHESIS_PROFILE=fuzz``).
"""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from submitd.protocol import (
    NEED_DATA,
    AuthRequest,
    ConnectionClosed,
    DataChunk,
    DataComplete,
    DataStart,
    NeedsAnswer,
    Reply,
    StartTLS,
)
from tests.unit.protocol_support import PLAIN, QUEUED, accept_event, make

settings.register_profile("default", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SUBMITD_HYPOTHESIS_PROFILE", "default"))

REFUSE = Reply.make(550, "5.7.1", "Refused by policy")
REPLY_LINE = re.compile(rb"\A[2-5]\d\d([ -].*)?\Z", re.DOTALL)

# Pieces a session is made of, plus the byte tricks of SMTP smuggling and framing attacks.
TOKENS = st.sampled_from([
    b"EHLO client.example\r\n", b"HELO client.example\r\n", b"STARTTLS\r\n",
    b"AUTH PLAIN " + PLAIN + b"\r\n", b"AUTH PLAIN\r\n", PLAIN + b"\r\n", b"AUTH LOGIN\r\n",
    b"dXNlcg==\r\n", b"*\r\n", b"=\r\n", b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME\r\n", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<b@example.net>\r\n", b"RCPT TO:<b%c@example.net>\r\n", b"DATA\r\n",
    b"Subject: x\r\n", b"\r\n", b".\r\n", b"\r\n.\r\n", b"..x\r\n", b"\n.\n", b"\r.\r",
    b"\n", b"\r", b"\x00", b".", b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"HELP\r\n",
    b"QUIT\r\n", b"GET / HTTP/1.1\r\n", b"x" * 1100 + b"\r\n", b"A" * 600,
    "MAIL FROM:<ü@example.org> SMTPUTF8\r\n".encode(),
])
STREAMS = st.lists(TOKENS | st.binary(max_size=40), max_size=30).map(b"".join)
CUTS = st.lists(st.integers(min_value=1, max_value=200), max_size=30)


def feed(data: bytes, cuts: list[int], *, accept: bool, tls: bool) -> tuple[bytes, int, int]:
    """Drive one connection; return the output, messages accepted, DataStarts accepted."""
    conn = make(tls_active=tls, tls_available=not tls, max_message_size=2000,
                max_header_size=500)
    out = bytearray()
    accepted = data_starts = 0
    pieces, pos = [], 0
    for cut in cuts:
        pieces.append(data[pos : pos + cut])
        pos += cut
    pieces.append(data[pos:])
    pieces.append(b"")  # EOF
    in_data = False
    for piece in pieces:
        if conn.closed:
            break
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, StartTLS):
                conn.tls_started()
            elif isinstance(event, ConnectionClosed):
                break
            elif isinstance(event, DataChunk):
                assert in_data, "body bytes only inside an accepted DATA"
            elif isinstance(event, DataComplete):
                assert in_data
                in_data = False
                if event.error is not None:
                    conn.reject(event.error)
                else:
                    conn.accept_message(event, QUEUED)
                    accepted += 1
            elif isinstance(event, NeedsAnswer):
                if accept or isinstance(event, AuthRequest | DataStart):
                    accept_event(conn, event)
                    if isinstance(event, DataStart):
                        in_data, data_starts = True, data_starts + 1
                else:
                    conn.reject(REFUSE)
        out += conn.data_to_send()
        if conn.closed:
            break
    return bytes(out), accepted, data_starts


@given(data=STREAMS, cuts=CUTS, accept=st.booleans(), tls=st.booleans())
def test_any_input_in_any_pieces_gets_well_formed_replies(
    data: bytes, cuts: list[int], accept: bool, tls: bool
) -> None:
    out, accepted, data_starts = feed(data, cuts, accept=accept, tls=tls)
    assert out == b"" or out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert b"\r" not in line and b"\n" not in line
        assert len(line) <= 510
        assert REPLY_LINE.match(line), line
    assert accepted <= data_starts, "one completion per accepted DATA, never a smuggled extra"


@given(data=STREAMS, cuts=CUTS)
def test_how_input_is_split_never_changes_the_replies(data: bytes, cuts: list[int]) -> None:
    whole = feed(data, [], accept=True, tls=True)
    pieces = feed(data, cuts, accept=True, tls=True)
    assert pieces == whole
