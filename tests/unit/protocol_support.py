"""Sessions and canned bytes shared by the protocol unit tests (``test_protocol_*.py``).

Every helper drives a sans-I/O :class:`ServerConnection` in memory; nothing here opens a
socket. Defaults describe implicit TLS on port 465 (TLS already up, no STARTTLS on offer), the
state most tests want; pass ``tls_active``/``tls_available`` for the plaintext cases.
"""

from __future__ import annotations

import base64

from submitd.protocol import (
    NEED_DATA,
    AuthRequest,
    ConnectionClosed,
    DataComplete,
    DataStart,
    Event,
    Hello,
    MailFrom,
    NeedData,
    NeedsAnswer,
    ProtocolLimits,
    RcptTo,
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


def accept_event(conn: ServerConnection, event: Event | NeedData) -> None:
    """Accept ``event`` with its default answer (:data:`QUEUED` for a complete message)."""
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
    elif isinstance(event, DataComplete):
        conn.accept_message(event, QUEUED)
    else:
        raise AssertionError(f"{event!r} takes no answer")


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
        if isinstance(event, DataComplete) and event.error:
            conn.reject(event.error)
        elif isinstance(event, NeedsAnswer):
            accept_event(conn, event)
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
