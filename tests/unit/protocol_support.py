"""Sessions and canned bytes shared by the protocol unit tests (``test_protocol_*.py``).

Every helper drives a sans-I/O :class:`ServerConnection` in memory; nothing here opens a
socket. Defaults describe implicit TLS on port 465 (TLS already up, no STARTTLS on offer), the
state most tests want; pass ``tls_active``/``tls_available`` for the plaintext cases.
"""

from __future__ import annotations

import base64

from submitd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    DataComplete,
    Event,
    NeedsAnswer,
    ProtocolLimits,
    Reply,
    ServerConnection,
    StartTLS,
)

HOST = "mx.example.org"
QUEUED = Reply.make(250, "2.0.0", "Ok: queued as TEST")
PLAIN = base64.b64encode(b"\0user\0secret")
EHLO = b"EHLO client.example\r\n"
SENDER_OK = b"250 2.1.0 Sender OK\r\n"
RCPT_OK = b"250 2.1.5 Recipient OK\r\n"


def connection(
    *, tls_active: bool = True, tls_available: bool = False, **limits: int
) -> ServerConnection:
    """A connection that has not greeted yet; ``limits`` are :class:`ProtocolLimits` fields."""
    return ServerConnection(
        hostname=HOST, limits=ProtocolLimits(**limits), tls_active=tls_active,
        tls_available=tls_available,
    )


def make(
    *, tls_active: bool = True, tls_available: bool = False, **limits: int
) -> ServerConnection:
    """A connection that has sent its 220 greeting (already drained) and waits for commands."""
    conn = connection(tls_active=tls_active, tls_available=tls_available, **limits)
    conn.greet()
    conn.data_to_send()
    return conn


def pump(conn: ServerConnection, data: bytes = b"") -> tuple[bytes, list[Event]]:
    """Feed ``data``, accept every event with its default answer; return replies and events."""
    if data:
        conn.receive_data(data)
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            break
        events.append(event)
        if isinstance(event, StartTLS | ConnectionClosed):
            break
        if isinstance(event, DataComplete):
            conn.reject(event.error) if event.error else conn.accept(QUEUED)
        elif isinstance(event, NeedsAnswer):
            conn.accept()
    return conn.data_to_send(), events


def greeted(**limits: int) -> ServerConnection:
    """An implicit-TLS connection after an accepted EHLO, replies drained, not authenticated."""
    conn = make(tls_active=True, tls_available=False, **limits)
    pump(conn, EHLO)
    return conn


def ready(**limits: int) -> ServerConnection:
    """An implicit-TLS connection after EHLO and a successful AUTH PLAIN, replies drained."""
    conn = make(tls_active=True, tls_available=False, **limits)
    pump(conn, EHLO + b"AUTH PLAIN " + PLAIN + b"\r\n")
    assert conn.authenticated
    return conn
