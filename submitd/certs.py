"""Certificate helpers: a self-signed server certificate, and checking a cert/key pair.

Blocking (key generation, file I/O): the CLI calls these directly; the server would use a
worker thread.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .durable import write_all

__all__ = [
    "CERT_FILENAME",
    "KEY_FILENAME",
    "CertificateInfo",
    "inspect_certificate",
    "write_selfsigned",
]

CERT_FILENAME = "cert.pem"
KEY_FILENAME = "key.pem"
VALIDITY = dt.timedelta(days=365)

# A DNS name, optionally a leftmost wildcard label (RFC 6125 §6.4.3).
_DNS_NAME = re.compile(
    r"\A(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS_NAME.match(host) or len(host) > 253:
                raise ValueError(f"not a host name or IP address: {host!r}") from None
            names.append(x509.DNSName(host.lower()))
    return names


def write_selfsigned(
    out_dir: Path, hosts: list[str], *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write a self-signed certificate and its key into ``out_dir``; return their paths.

    The key is ECDSA P-256 (``key.pem``, mode 0600, PKCS#8); the certificate (``cert.pem``) is
    valid for a year, names every host as a subjectAltName (DNS names and IP addresses, the
    only names TLS clients check, RFC 6125 §6.4.4) and is its own trust anchor: give it to a
    client as the CA file. Raise ValueError for a bad host name and FileExistsError when a
    file exists and ``overwrite`` is false.
    """
    if not hosts:
        raise ValueError("at least one host name or IP address is needed")
    sans = _subject_alt_names(hosts)
    cert_path, key_path = out_dir / CERT_FILENAME, out_dir / KEY_FILENAME
    if not overwrite:
        for p in (cert_path, key_path):
            if p.exists():
                raise FileExistsError(17, "refusing to overwrite", str(p))

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate small clock skew
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_file(key_path, key_pem, 0o600, overwrite=overwrite)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write_file(cert_path, cert_pem, 0o644, overwrite=overwrite)
    return cert_path, key_path


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Create ``path`` with ``mode`` from the start (a key is never readable by others)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; an old file keeps its own
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateInfo:
    """What ``submitd check-config`` reports about the server certificate."""

    subject: str
    names: tuple[str, ...]
    not_after: dt.datetime

    @property
    def expired(self) -> bool:
        """True once the certificate's validity has ended."""
        return self.not_after <= dt.datetime.now(dt.UTC)


def inspect_certificate(cert_path: Path, key_path: Path) -> CertificateInfo:
    """Load the chain and key as the server does and describe the leaf certificate.

    Raise OSError when a file cannot be read and ValueError when the files are not PEM, the
    key does not match the certificate, or the key is encrypted.
    """
    cert_pem = cert_path.read_bytes()  # read first: ssl's own OSError does not name the file
    with key_path.open("rb"):
        pass
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key would prompt on the terminal; refuse it instead.
        ctx.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ValueError(f"cannot load the certificate and key: {exc.reason or exc}") from None
    leaf = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(n.value) for n in san)
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        subject=leaf.subject.rfc4514_string(), names=names, not_after=leaf.not_valid_after_utc
    )
