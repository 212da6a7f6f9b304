"""Self-signed certificates that real TLS clients accept, and checking a cert/key pair."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from submitd.certs import inspect_certificate, write_selfsigned


def handshake(cert: Path, key: Path, server_hostname: str) -> str:
    """Run a TLS handshake in memory (no sockets); return the negotiated version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))  # the cert is its own anchor
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return str(client.version())
    raise AssertionError("handshake did not finish")


def test_certificate_names_every_host_and_uses_ecdsa_p256(tmp_path: Path) -> None:
    cert_path, key_path = write_selfsigned(tmp_path / "tls", ["localhost", "127.0.0.1", "::1"])
    assert (cert_path.name, key_path.name) == ("cert.pem", "key.pem")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    ]
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=360) < lifetime <= dt.timedelta(days=366)
    assert cert.issuer == cert.subject


def test_key_is_private_and_certificate_readable(tmp_path: Path) -> None:
    cert_path, key_path = write_selfsigned(tmp_path, ["localhost"])
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
def test_a_client_trusting_the_certificate_verifies_the_host(tmp_path: Path, name: str) -> None:
    cert, key = write_selfsigned(tmp_path, ["localhost", "127.0.0.1"])
    assert handshake(cert, key, name) in ("TLSv1.2", "TLSv1.3")


def test_a_client_refuses_a_host_not_named(tmp_path: Path) -> None:
    cert, key = write_selfsigned(tmp_path, ["localhost"])
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(cert, key, "mail.example.org")


def test_existing_files_are_not_overwritten_unless_asked(tmp_path: Path) -> None:
    cert, key = write_selfsigned(tmp_path, ["localhost"])
    before = key.read_bytes()
    with pytest.raises(FileExistsError):
        write_selfsigned(tmp_path, ["localhost"])
    assert key.read_bytes() == before
    write_selfsigned(tmp_path, ["example.org"], overwrite=True)
    assert key.read_bytes() != before
    assert inspect_certificate(cert, key).names == ("example.org",)


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["-leading.example"], ["a" * 64 + ".com"]])
def test_bad_host_names_are_refused(tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(ValueError, match="host"):
        write_selfsigned(tmp_path, hosts)
    assert list(tmp_path.iterdir()) == []


def test_inspect_describes_a_matching_pair(tmp_path: Path) -> None:
    cert, key = write_selfsigned(tmp_path, ["mail.example.org", "192.0.2.1"])
    info = inspect_certificate(cert, key)
    assert info.subject == "CN=mail.example.org"
    assert info.names == ("mail.example.org", "192.0.2.1")
    assert not info.expired


def test_inspect_refuses_a_key_from_another_certificate(tmp_path: Path) -> None:
    cert, _ = write_selfsigned(tmp_path / "a", ["localhost"])
    _, other_key = write_selfsigned(tmp_path / "b", ["localhost"])
    with pytest.raises(ValueError, match="cannot load"):
        inspect_certificate(cert, other_key)


def test_inspect_names_a_missing_file(tmp_path: Path) -> None:
    cert, _ = write_selfsigned(tmp_path, ["localhost"])
    with pytest.raises(FileNotFoundError) as info:
        inspect_certificate(cert, tmp_path / "absent.pem")
    assert info.value.filename == str(tmp_path / "absent.pem")
