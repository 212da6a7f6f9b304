"""The server TLS context: TLS 1.2+, forward-secret AEAD suites only, no renegotiation."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest

from submitd.config import TLSConfig
from submitd.errors import ConfigError
from submitd.server.tls import make_server_context
from submitd.testing import TestCA


def test_context_offers_only_modern_forward_secret_aead(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    ctx = make_server_context(TLSConfig(cert=ca.cert_path, key=ca.key_path))
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    for option in (ssl.OP_NO_RENEGOTIATION, ssl.OP_NO_COMPRESSION, ssl.OP_NO_TICKET):
        assert ctx.options & option
    for cipher in ctx.get_ciphers():
        assert cipher["aead"], cipher["name"]
        if cipher["protocol"] == "TLSv1.2":
            assert cipher["kea"] == "kx-ecdhe", cipher["name"]


def test_missing_certificate_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the certificate file cannot be read"):
        make_server_context(TLSConfig(cert=tmp_path / "no.pem", key=tmp_path / "no.key"))


def test_tls13_handshakes_leave_no_cached_session_and_send_no_ticket(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server_context = make_server_context(TLSConfig(cert=ca.cert_path, key=ca.key_path))
    client_context = ca.client_context()
    for _ in range(3):
        server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
        server = server_context.wrap_bio(server_in, server_out, server_side=True)
        client = client_context.wrap_bio(client_in, client_out, server_hostname="localhost")
        for side, outbox, peer_inbox in ((client, client_out, server_in),
                                         (server, server_out, client_in)) * 3:
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            peer_inbox.write(outbox.read())
        server.write(b"220 ready\r\n")
        client_in.write(server_out.read())
        assert client.read(100) == b"220 ready\r\n"  # tickets would have come before this
        assert client.version() == "TLSv1.3"
        assert client.session is not None and not client.session.has_ticket
    assert server_context.session_stats()["number"] == 0
