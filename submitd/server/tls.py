"""Server TLS: a hardened ``ssl.SSLContext``, reloadable on SIGHUP (docs/security.md §2)."""

from __future__ import annotations

import ssl

import trio

from ..certs import TLSFileError, load_server_files
from ..config import TLSConfig
from ..errors import ConfigError

__all__ = [
    "CIPHERS_TLS12",
    "FirstBytes",
    "TLSContextHolder",
    "explain_tls_failure",
    "make_server_context",
    "receive_buffered",
    "tls_error",
]

#: TLS 1.2 suites: forward secret (ECDHE) and AEAD only; TLS 1.3 suites are all AEAD.
#: No DHE: without loaded DH parameters it never negotiates, and ECDHE covers every client.
CIPHERS_TLS12 = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def make_server_context(tls: TLSConfig) -> ssl.SSLContext:
    """Build the server context: TLS 1.2+, ECDHE + AEAD, no renegotiation, tickets, compression.

    No session tickets in TLS 1.3 either, and so no sessions cached per handshake.

    A certificate or key that cannot be used raises ConfigError naming ``tls.cert`` or
    ``tls.key`` with the reason in plain words (see :func:`submitd.certs.load_server_files`).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
        # TLS 1.2 tickets are sealed with one key for the life of the process: whoever
        # obtains it can read past sessions. Submission clients gain little from resuming.
        | ssl.OP_NO_TICKET
    )
    # TLS 1.3 sends session tickets whatever OP_NO_TICKET says (with it, stateful ones: every
    # handshake would leave a session in OpenSSL's server cache, about 1 KiB each, up to
    # 20,480 of them). No tickets: nothing is cached and none are sent.
    ctx.num_tickets = 0
    try:
        load_server_files(ctx, tls.cert, tls.key)  # errors in plain words, not OpenSSL codes
    except TLSFileError as exc:
        raise ConfigError(None, exc.setting, exc.message) from None
    return ctx


class TLSContextHolder:
    """The current server context; the server swaps it on reload without touching open sessions."""

    def __init__(self, tls: TLSConfig) -> None:
        self.context = make_server_context(tls)


_HEAD = 16  # bytes of a failed handshake kept to tell what the client spoke
_USE_TLS_RIGHT = "use STARTTLS on the submission port, or TLS from the first byte here"

_TLS_ERRORS = {
    "NO_SHARED_CIPHER": "the client offers no cipher this server accepts",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions older than 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the client offers only TLS versions older than 1.2",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust the server's certificate (its CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client does not accept the server's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client does not accept the server's certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says the server's certificate has expired",
    "BrokenResourceError": "the client closed the connection during the TLS handshake",
    "ClosedResourceError": "the client closed the connection during the TLS handshake",
}


def explain_tls_failure(
    head: bytes, error: str | None, *, implicit: bool, timeout: float
) -> str:
    """Why a TLS handshake failed, in plain words.

    ``head`` is what the client sent first, ``error`` OpenSSL's code (None: the handshake
    timed out). A TLS client starts with a handshake record (byte 0x16); anything else tells
    what the client spoke instead.
    """
    if error is None:
        if not head and implicit:
            return (f"the client sent nothing for {timeout:g}s (tls.handshake_timeout): a plain "
                    f"SMTP or STARTTLS client waits for a greeting on the implicit-TLS port "
                    f"({_USE_TLS_RIGHT})")
        return f"the TLS handshake did not finish within {timeout:g}s (tls.handshake_timeout)"
    if head and head[0] != 0x16:
        if error == "HTTP_REQUEST" or head.startswith((b"GET ", b"POST ", b"HEAD ", b"PUT ")):
            return "the client spoke HTTP, not SMTP over TLS"
        if head[:4].isalpha() and implicit:
            return f"the client spoke plain SMTP on the implicit-TLS port ({_USE_TLS_RIGHT})"
        if head[:4].isalpha():
            return "the client went on in plain text after STARTTLS instead of starting TLS"
        return "the client sent something other than a TLS handshake"
    return _TLS_ERRORS.get(error, f"the TLS handshake failed ({error})")


def tls_error(exc: BaseException) -> str:
    """OpenSSL's code for a failed handshake (``WRONG_VERSION_NUMBER``), for the log."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or type(cause).__name__
    return type(exc).__name__


def receive_buffered(stream: trio.abc.Stream, data: bytes, limit: int) -> bytes:
    """``data`` just received from ``stream``, plus what TLS can decrypt without waiting.

    ``SSLStream.receive_some`` returns one TLS record (at most 16 KiB) per call, however much
    ciphertext its last read from the socket brought; every further call is a pass through
    the scheduler. Reading the records already received straight from its ``SSLObject``
    gives up to ``limit`` octets at once. It relies on the ``SSLStream``'s private
    ``_ssl_object``, ``_incoming`` and ``_outgoing``; without them (another trio) it returns
    ``data`` as it is. It stops, leaving the rest to the next ``receive_some``, at an
    incomplete record, at anything that is not application data (an alert, a close_notify,
    a bad record: the next read meets it again) and when TLS has something to send (a
    post-handshake message's answer, which trio sends with its next read or write).
    """
    ssl_object = getattr(stream, "_ssl_object", None)
    incoming = getattr(stream, "_incoming", None)
    outgoing = getattr(stream, "_outgoing", None)
    if (
        not isinstance(ssl_object, ssl.SSLObject)
        or not isinstance(incoming, ssl.MemoryBIO)
        or not isinstance(outgoing, ssl.MemoryBIO)
        or not (incoming.pending or ssl_object.pending())
    ):
        return data
    pieces = [data]
    total = len(data)
    while total < limit and (incoming.pending or ssl_object.pending()) and not outgoing.pending:
        try:
            more = ssl_object.read(limit - total)
        except ssl.SSLError:  # SSLWantReadError (a partial record) included
            break
        if not more:
            break
        pieces.append(more)
        total += len(more)
    return data if len(pieces) == 1 else b"".join(pieces)


class FirstBytes(trio.abc.Stream):
    """A transport that remembers the first bytes the client sent during a TLS handshake.

    They tell a failed handshake's cause: plain SMTP on the implicit-TLS port, HTTP, ...
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.head = b""
        self._recording = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send on the wrapped stream."""
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait on the wrapped stream."""
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive from the wrapped stream, recording the first bytes."""
        data = await self.stream.receive_some(max_bytes)
        if self._recording:
            self.head = (self.head + data)[:_HEAD]
            self._recording = len(self.head) < _HEAD
        return data

    async def aclose(self) -> None:
        """Close the wrapped stream."""
        await self.stream.aclose()

    def stop(self) -> None:
        """The handshake is done: stop recording."""
        self._recording = False
        self.head = b""
