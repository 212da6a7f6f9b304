"""Self-signed certificates that real TLS clients accept, and checking a cert/key pair."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from submitd.certs import CertificateInfo, TLSFileError, inspect_certificate, write_selfsigned
from submitd.config import TLSConfig
from submitd.errors import ConfigError
from submitd.server.tls import make_server_context


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


def encrypted_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ))
    return path


@pytest.mark.parametrize(
    ("cert_name", "key_name", "setting", "message"),
    [
        ("a/cert.pem", "b/key.pem", "tls.key", "the key does not belong to this certificate"),
        ("a/key.pem", "a/key.pem", "tls.cert", "the file holds no certificate"),
        ("garbage.txt", "a/key.pem", "tls.cert", "the file holds no certificate"),
        ("a/cert.pem", "a/cert.pem", "tls.key", "the file holds no private key"),
        ("a/cert.pem", "garbage.txt", "tls.key", "the file holds no private key"),
        ("a/cert.pem", "encrypted.pem", "tls.key",
         "the private key is encrypted with a passphrase, which submitd cannot ask for"),
        ("absent.pem", "a/key.pem", "tls.cert",
         "the certificate file cannot be read: No such file or directory"),
        ("a/cert.pem", "absent.pem", "tls.key",
         "the key file cannot be read: No such file or directory"),
        ("a", "a/key.pem", "tls.cert", "the certificate file cannot be read: Is a directory"),
    ],
)
def test_unusable_files_are_explained_in_plain_words_by_check_and_start_up(
    tmp_path: Path, cert_name: str, key_name: str, setting: str, message: str
) -> None:
    write_selfsigned(tmp_path / "a", ["localhost"])
    write_selfsigned(tmp_path / "b", ["localhost"])
    (tmp_path / "garbage.txt").write_text("not a PEM file\n")
    encrypted_key(tmp_path / "encrypted.pem")
    cert, key = tmp_path / cert_name, tmp_path / key_name
    named = key if setting == "tls.key" else cert

    with pytest.raises(TLSFileError) as info:
        inspect_certificate(cert, key)
    assert info.value.setting == setting
    assert str(info.value).startswith(message)
    assert str(named) in str(info.value)
    assert "PEM lib" not in str(info.value) and "_ssl.c" not in str(info.value)

    with pytest.raises(ConfigError) as started:  # what `submitd serve` reports
        make_server_context(TLSConfig(cert=cert, key=key))
    assert started.value.key == setting
    assert started.value.message == info.value.message


def test_a_file_holding_both_certificate_and_key_serves(tmp_path: Path) -> None:
    cert, key = write_selfsigned(tmp_path, ["localhost"])
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    assert inspect_certificate(both, both).names == ("localhost",)
    make_server_context(TLSConfig(cert=both, key=both))


@pytest.mark.parametrize(
    ("names", "hostname", "covered"),
    [
        (["mail.example.org"], "mail.example.org", True),
        (["mail.example.org"], "MAIL.Example.ORG", True),
        (["mail.example.org"], "smtp.example.org", False),
        (["*.example.org"], "mail.example.org", True),
        (["*.example.org"], "example.org", False),  # the wildcard stands for one label
        (["*.example.org"], "a.mail.example.org", False),  # ... exactly one
        (["localhost", "192.0.2.1"], "192.0.2.1", True),
        (["192.0.2.1"], "192.0.2.2", False),
        (["localhost"], "localhost", True),
    ],
)
def test_covers_follows_rfc_6125_name_matching(
    tmp_path: Path, names: list[str], hostname: str, covered: bool
) -> None:
    cert, key = write_selfsigned(tmp_path, names)
    assert inspect_certificate(cert, key).covers(hostname) is covered


def test_a_wildcard_directly_under_a_top_level_domain_covers_nothing() -> None:
    info = CertificateInfo(subject="CN=x", names=("*.org",), dns_names=("*.org",),
                           not_after=dt.datetime.now(dt.UTC))
    assert not info.covers("example.org")


def test_expiry_is_reported_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("submitd.certs.VALIDITY", dt.timedelta(days=10))
    info = inspect_certificate(*write_selfsigned(tmp_path, ["localhost"]))
    assert not info.expired
    assert info.expires_within(dt.timedelta(days=14))
    assert not info.expires_within(dt.timedelta(days=7))
