"""Certificate helpers: a self-signed server certificate, and checking a cert/key pair.

Blocking (key generation, file I/O): the CLI calls these directly; the server would use a
worker thread.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .durable import write_all
from .protocol._grammar import MAX_HOSTNAME, is_hostname

__all__ = [
    "CERT_FILENAME",
    "KEY_FILENAME",
    "CertificateInfo",
    "TLSFileError",
    "inspect_certificate",
    "load_server_files",
    "write_selfsigned",
]

CERT_FILENAME = "cert.pem"
KEY_FILENAME = "key.pem"
VALIDITY = dt.timedelta(days=365)


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            # A DNS name, optionally with a leftmost wildcard label (RFC 6125 §6.4.3).
            name = host.removeprefix("*.")
            if not is_hostname(name) or len(host) > MAX_HOSTNAME:
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


class TLSFileError(Exception):
    """The certificate or key cannot be used, said in plain words.

    ``setting`` names the configuration key at fault (``tls.cert`` or ``tls.key``); ``str()``
    is the explanation, ending with the file concerned.
    """

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        self.message = message
        super().__init__(message)


def load_server_files(ctx: ssl.SSLContext, cert_path: Path, key_path: Path) -> bytes:
    """Load the certificate chain and key into ``ctx``; return the certificate file's bytes.

    Raise :class:`TLSFileError` for a file that cannot be read, holds no certificate or no
    private key, holds an encrypted key (it would prompt for a passphrase on the terminal),
    or a key that does not belong to the certificate, instead of OpenSSL's error codes.
    """
    cert_pem = _read(cert_path, "tls.cert", "certificate")
    key_pem = _read(key_path, "tls.key", "key")
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise _explain(exc, cert_path, cert_pem, key_path, key_pem) from None
    except OSError as exc:  # the file changed between the two reads
        raise TLSFileError("tls.cert", f"cannot load the certificate and key: {exc}") from None
    return cert_pem


def _no_passphrase() -> bytes:
    return b""  # an encrypted key fails to load (explained by _explain) instead of prompting


def _read(path: Path, setting: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFileError(
            setting, f"the {what} file cannot be read: {exc.strerror or exc} ({path})"
        ) from None


def _explain(
    exc: ssl.SSLError, cert_path: Path, cert_pem: bytes, key_path: Path, key_pem: bytes
) -> TLSFileError:
    """Say which file is wrong; OpenSSL's reason ("PEM lib") does not tell them apart."""
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        return TLSFileError("tls.cert", f"the file holds no certificate ({cert_path})")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        return TLSFileError(
            "tls.key",
            "the private key is encrypted with a passphrase, which submitd cannot ask for; "
            f"decrypt it with `openssl pkey -in KEY -out NEWKEY` ({key_path})",
        )
    except (ValueError, UnsupportedAlgorithm):
        return TLSFileError("tls.key", f"the file holds no private key ({key_path})")
    if exc.reason == "KEY_VALUES_MISMATCH" or not _same_key(leaf, key):
        return TLSFileError(
            "tls.key",
            f"the key does not belong to this certificate (key {key_path}, "
            f"certificate {cert_path})",
        )
    return TLSFileError(
        "tls.cert", f"OpenSSL cannot load the certificate and key: {exc.reason or exc} "
        f"({cert_path}, {key_path})"
    )


def _same_key(leaf: x509.Certificate, key: PrivateKeyTypes) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        return bool(
            leaf.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
        )
    except (ValueError, UnsupportedAlgorithm):  # pragma: no cover - exotic key types
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateInfo:
    """What ``submitd check-config`` reports about the server certificate.

    ``names`` are the subjectAltName entries in certificate order; ``dns_names`` and
    ``ip_addresses`` the same split by kind (the only names TLS clients check, RFC 6125 §6.4.4).
    """

    subject: str
    names: tuple[str, ...]
    not_after: dt.datetime
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()

    @property
    def expired(self) -> bool:
        """True once the certificate's validity has ended."""
        return self.not_after <= dt.datetime.now(dt.UTC)

    def expires_within(self, period: dt.timedelta) -> bool:
        """True if the validity ends within ``period`` from now (or has ended)."""
        return self.not_after <= dt.datetime.now(dt.UTC) + period

    def covers(self, hostname: str) -> bool:
        """Tell whether a client checking ``hostname`` accepts this certificate.

        An IP address must be listed as an IP address; a DNS name matches a DNS name
        case-insensitively, or a wildcard that is the whole leftmost label and stands for
        exactly one label (``*.example.com`` covers ``mail.example.com``, not
        ``example.com`` nor ``a.b.example.com``; RFC 6125 §6.4.3).
        """
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            pass
        else:
            return any(ipaddress.ip_address(ip) == address for ip in self.ip_addresses)
        wanted = hostname.rstrip(".").lower().split(".")
        return any(_dns_match(name, wanted) for name in self.dns_names)


def _dns_match(name: str, wanted: list[str]) -> bool:
    labels = name.rstrip(".").lower().split(".")
    if len(labels) != len(wanted):
        return False
    if labels[0] == "*":
        # RFC 6125 §6.4.3 (and RFC 9525 §6.3): only a complete leftmost label, and never
        # directly under a top-level domain.
        return len(labels) > 2 and labels[1:] == wanted[1:] and wanted[0] != ""
    return labels == wanted


def inspect_certificate(cert_path: Path, key_path: Path) -> CertificateInfo:
    """Load the chain and key as the server does and describe the leaf certificate.

    Raise :class:`TLSFileError` when a file cannot be read or used (see
    :func:`load_server_files`).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert_pem = load_server_files(ctx, cert_path, key_path)
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names: tuple[str, ...] = ()
        dns: tuple[str, ...] = ()
        ips: tuple[str, ...] = ()
    else:
        names = tuple(str(n.value) for n in san)
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return CertificateInfo(
        subject=leaf.subject.rfc4514_string(), names=names, not_after=leaf.not_valid_after_utc,
        dns_names=dns, ip_addresses=ips,
    )
