"""The server TLS context: TLS 1.2+, forward-secret AEAD suites only, no renegotiation."""

from __future__ import annotations

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
