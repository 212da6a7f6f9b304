"""Server TLS: a hardened ``ssl.SSLContext``, reloadable on SIGHUP (docs/security.md §2)."""

from __future__ import annotations

import ssl

from ..certs import TLSFileError, load_server_files
from ..config import TLSConfig
from ..errors import ConfigError

__all__ = ["CIPHERS_TLS12", "TLSContextHolder", "make_server_context"]

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
    try:
        load_server_files(ctx, tls.cert, tls.key)  # errors in plain words, not OpenSSL codes
    except TLSFileError as exc:
        raise ConfigError(None, exc.setting, exc.message) from None
    return ctx


class TLSContextHolder:
    """The current server context; the server swaps it on reload without touching open sessions."""

    def __init__(self, tls: TLSConfig) -> None:
        self.context = make_server_context(tls)

