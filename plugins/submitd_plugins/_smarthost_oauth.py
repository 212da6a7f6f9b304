"""OAuth2 access tokens for smarthost routes: AUTH XOAUTH2 to Microsoft 365 and Google Workspace.

``[plugins.smarthost.oauth]`` (the default route) or ``[plugins.smarthost.route.oauth]``::

    provider = "entra"             # entra | google-service-account | refresh-token
    tenant = "contoso.onmicrosoft.com"
    client_id = "0b7d..."
    client_secret_file = "entra.secret"     # or client_cert + client_key (certificate credential)
    mailbox = "sender"             # the envelope sender's mailbox, or one address (send-as)
    # scope, token_url, ca_file (the token endpoint's CA), timeout = "30s"

The grants are plain RFC 6749 POSTs: client credentials (§4.4) with a secret or an RFC 7523
§2.2 JWT client assertion, the RFC 7523 §2.1 JWT bearer grant (Google service accounts with
domain-wide delegation: ``sub`` is the mailbox) and the refresh-token grant (§6). They are
sent with httpx and the JWTs signed with PyJWT, both from the ``oauth`` extra and imported
only when a route uses OAuth.

Tokens are cached per (route, mailbox) in ``config.server_stash`` (see ``_smarthost_pool``)
and refreshed when less than 5 minutes (or a tenth of their lifetime, if shorter) remain;
one request serves every delivery waiting for the same token. No token, secret or
assertion is ever logged.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from submitd import Config, ConfigError, Secret

__all__ = [
    "OAuthSettings",
    "Provider",
    "Token",
    "TokenError",
    "build_assertion",
    "fetch_token",
    "parse_oauth",
    "read_secret_line",
]

log = logging.getLogger("submitd.plugins.smarthost")

#: A token is refreshed when less than this remains (or a tenth of its lifetime, if shorter).
REFRESH_MARGIN = 300.0
#: Lifetime of the JWTs we sign (RFC 7523 §3: short-lived; Google accepts at most an hour).
ASSERTION_LIFETIME = 600
#: Provider error text is cut to this length in replies and log lines.
ERROR_TEXT_LIMIT = 200
_MAX_RESPONSE = 64 * 1024

ENTRA_SCOPE = "https://outlook.office365.com/.default"
ENTRA_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
GOOGLE_SCOPE = "https://mail.google.com/"
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_CLIENT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Provider(enum.Enum):
    """Where tokens come from."""

    ENTRA = "entra"
    GOOGLE = "google-service-account"
    REFRESH_TOKEN = "refresh-token"


_KEYS: dict[Provider, tuple[str, ...]] = {
    Provider.ENTRA: ("tenant", "client_id", "client_secret_file", "client_cert", "client_key",
                     "scope", "token_url"),
    Provider.GOOGLE: ("key_file", "scope", "token_url"),
    Provider.REFRESH_TOKEN: ("client_id", "client_secret_file", "refresh_token_file",
                             "token_url", "scope"),
}
_COMMON = ("provider", "mailbox", "ca_file", "timeout")


@dataclass(frozen=True, kw_only=True)
class OAuthSettings:
    """A route's validated OAuth table.

    ``mailbox`` None means "the envelope sender". ``signing_key`` is a PEM private key for
    JWT assertions (Entra certificate credential, Google service account); ``key_id`` goes in
    the JWT header (``x5t#S256`` for Entra, ``kid`` for Google); ``issuer`` is the JWT ``iss``
    (the client id, or the service account's e-mail address).
    """

    provider: Provider
    token_url: str
    scope: str | None
    mailbox: str | None
    client_id: str | None = None
    issuer: str | None = None
    client_secret: Secret | None = field(default=None, repr=False)
    signing_key: Secret | None = field(default=None, repr=False)
    key_id: str | None = None
    refresh_token: Secret | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext = field(compare=False, repr=False,
                                        default_factory=ssl.create_default_context)
    timeout: float = 30.0
    fingerprint: str = field(default="", repr=False, compare=False)

    @property
    def endpoint_host(self) -> str:
        """The token endpoint's host, for log lines and the probe."""
        return urlsplit(self.token_url).hostname or self.token_url

    @property
    def per_mailbox(self) -> bool:
        """Whether tokens differ per mailbox (Google's ``sub``); an Entra app token does not."""
        return self.provider is Provider.GOOGLE

    def mailbox_for(self, sender: str) -> str | None:
        """The mailbox to authenticate as for ``sender`` ("" is ``<>``); None if there is none."""
        if self.mailbox is not None:
            return self.mailbox
        return sender or None


@dataclass(frozen=True, kw_only=True)
class Token:
    """An access token and when it expires (``trio.current_time()`` seconds)."""

    value: Secret = field(repr=False)
    expires_at: float
    lifetime: float
    host: str
    refresh_token: Secret | None = field(default=None, repr=False)  # a rotated one, if sent

    def due(self, now: float) -> bool:
        """True when it should be replaced before use."""
        margin = min(REFRESH_MARGIN, self.lifetime / 10)
        return now >= self.expires_at - margin


class TokenError(Exception):
    """No token: ``unreachable`` (down, slow, 5xx) or refused (an OAuth error response).

    ``str(exc)`` is one line with the provider's error text; never a secret.
    """

    def __init__(self, text: str, *, unreachable: bool) -> None:
        self.unreachable = unreachable
        super().__init__(text)


# --- configuration ---------------------------------------------------------------------------


class _Keys:
    def __init__(self, config: Config, prefix: str, data: Mapping[str, Any]) -> None:
        self.config, self.prefix, self.data = config, prefix, data

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.config.path, f"{self.prefix}.{name}", message)

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.error(name, "required")
            return None
        if not isinstance(value, str) or not value or any(ord(c) < 0x20 for c in value):
            raise self.error(name, "must be a non-empty string without control characters")
        return value

    def path(self, name: str, *, required: bool = False) -> Path | None:
        value = self.string(name, required=required)
        return None if value is None else self.config.resolve(value)

    def read(self, name: str) -> bytes:
        path = self.path(name, required=True)
        assert path is not None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self.error(name, f"cannot read {path}: {exc.strerror or exc}") from None

    def secret_line(self, name: str) -> Secret | None:
        """The first line of a secret file, read like ``password_file``."""
        if name not in self.data:
            return None
        path = self.path(name, required=True)
        assert path is not None
        return read_secret_line(path, lambda message: self.error(name, message))


def read_secret_line(path: Path, error: Callable[[str], ConfigError]) -> Secret:
    """The first line of the file at ``path``, trailing CR/LF stripped, as a :class:`Secret`.

    ``error(message)`` builds the :class:`ConfigError` (naming the key) raised for a file that
    cannot be read, or whose first line is not UTF-8, is empty or holds control characters.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    first = data.split(b"\n", 1)[0].rstrip(b"\r\n")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: the first line is not UTF-8") from None
    if not text:
        raise error(f"{path}: the first line is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise error(f"{path}: the first line holds control characters")
    return Secret(text)


def parse_oauth(config: Config, prefix: str, data: object) -> OAuthSettings:
    """Validate one OAuth table (``prefix`` is its dotted name); raise ``ConfigError``."""
    if not isinstance(data, Mapping):
        raise ConfigError(config.path, prefix, "must be a table")
    keys = _Keys(config, prefix, data)
    name = keys.string("provider", required=True)
    try:
        provider = Provider(name)
    except ValueError:
        raise keys.error("provider", 'must be "entra", "google-service-account" or '
                                     f'"refresh-token", not {name!r}') from None
    for key in data:
        if key not in _COMMON and key not in _KEYS[provider]:
            raise keys.error(key, f"unknown key for provider {provider.value!r}")
    try:
        import httpx  # noqa: F401
        import jwt  # noqa: F401
    except ImportError:
        raise ConfigError(config.path, prefix, "OAuth2 needs the oauth extra: "
                          "pip install 'submitd[oauth]'") from None
    try:
        timeout = config.parse_duration(data.get("timeout", "30s"))
    except ValueError as exc:
        raise keys.error("timeout", str(exc)) from None
    if timeout <= 0:
        raise keys.error("timeout", "must be longer than zero")
    common: dict[str, Any] = {"timeout": timeout, "ssl_context": _context(keys),
                              "mailbox": _mailbox(keys, provider)}
    if provider is Provider.ENTRA:
        settings = _entra(keys, common)
    elif provider is Provider.GOOGLE:
        settings = _google(keys, common)
    else:
        settings = _refresh(keys, common)
    _check_url(keys, settings.token_url)
    return settings


def _mailbox(keys: _Keys, provider: Provider) -> str | None:
    value = keys.data.get("mailbox")
    if value is None:
        if provider is Provider.GOOGLE:
            return None
        hint = ('"sender" or the address' if provider is Provider.ENTRA
                else "the address whose refresh token this is")
        raise keys.error("mailbox", f"required: {hint}")
    text = keys.string("mailbox")
    assert text is not None
    if text == "sender":
        if provider is Provider.REFRESH_TOKEN:
            raise keys.error("mailbox", "a refresh token is one mailbox's: give its address")
        return None
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or " " in text or "<" in text:
        raise keys.error("mailbox", f'must be "sender" or an address, not {text!r}')
    return text


def _context(keys: _Keys) -> ssl.SSLContext:
    ca_file = keys.path("ca_file")
    if ca_file is not None:
        keys.read("ca_file")
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except ssl.SSLError as exc:
        raise keys.error("ca_file", f"not a PEM CA certificate: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _check_url(keys: _Keys, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise keys.error("token_url", f"must be an https:// URL, not {url!r}")


def _fingerprint(*parts: str | Secret | None) -> str:
    digest = hashlib.sha256()
    for part in parts:
        text = part.reveal() if isinstance(part, Secret) else (part or "")
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _entra(keys: _Keys, common: dict[str, Any]) -> OAuthSettings:
    tenant = keys.string("tenant", required=True)
    client_id = keys.string("client_id", required=True)
    secret = keys.secret_line("client_secret_file")
    signing_key, key_id = None, None
    if "client_cert" in keys.data or "client_key" in keys.data:
        if secret is not None:
            raise keys.error("client_cert", "give client_secret_file or client_cert, not both")
        signing_key, key_id = _certificate(keys)
    elif secret is None:
        raise keys.error("client_secret_file", "required: client_secret_file, or client_cert "
                                               "and client_key (certificate credential)")
    url = keys.string("token_url") or ENTRA_TOKEN_URL.format(tenant=tenant)
    scope = keys.string("scope") or ENTRA_SCOPE
    return OAuthSettings(provider=Provider.ENTRA, token_url=url, scope=scope,
                         client_id=client_id, issuer=client_id, client_secret=secret,
                         signing_key=signing_key, key_id=key_id,
                         fingerprint=_fingerprint("entra", url, scope, client_id, secret,
                                                  signing_key, common["mailbox"]), **common)


def _certificate(keys: _Keys) -> tuple[Secret, str]:
    """The certificate credential: the private key (PEM) and the x5t#S256 thumbprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if "client_key" not in keys.data:
        raise keys.error("client_key", "required with client_cert")
    cert_pem = keys.read("client_cert")
    key_pem = keys.read("client_key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise keys.error("client_cert", f"not a PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise keys.error("client_key", f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise keys.error("client_key", "must be an RSA key (Entra signs assertions with RS256)")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise keys.error("client_key", "does not belong to client_cert")
    der = cert.public_bytes(serialization.Encoding.DER)
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    return Secret(key_pem.decode("ascii", "replace")), thumbprint


def _google(keys: _Keys, common: dict[str, Any]) -> OAuthSettings:
    raw = keys.read("key_file")
    try:
        info = json.loads(raw)
    except ValueError:
        raise keys.error("key_file", "not a JSON service account key") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise keys.error("key_file", 'not a service account key ("type": "service_account")')
    fields = {}
    for name in ("client_email", "private_key", "token_uri"):
        value = info.get(name)
        if not isinstance(value, str) or not value:
            if name == "token_uri" and "token_url" in keys.data:
                continue
            raise keys.error("key_file", f'the key has no "{name}"')
        fields[name] = value
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_pem_private_key(fields["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise keys.error("key_file", "the private_key is not a PEM private key") from None
    key_id = info.get("private_key_id")
    url = keys.string("token_url") or fields["token_uri"]
    scope = keys.string("scope") or GOOGLE_SCOPE
    signing_key = Secret(fields["private_key"])
    return OAuthSettings(provider=Provider.GOOGLE, token_url=url, scope=scope,
                         issuer=fields["client_email"], signing_key=signing_key,
                         key_id=key_id if isinstance(key_id, str) and key_id else None,
                         fingerprint=_fingerprint("google", url, scope, fields["client_email"],
                                                  signing_key, common["mailbox"]), **common)


def _refresh(keys: _Keys, common: dict[str, Any]) -> OAuthSettings:
    client_id = keys.string("client_id", required=True)
    url = keys.string("token_url", required=True)
    assert url is not None
    if "refresh_token_file" not in keys.data:
        raise keys.error("refresh_token_file", "required")
    refresh_token = keys.secret_line("refresh_token_file")
    secret = keys.secret_line("client_secret_file")
    scope = keys.string("scope")
    return OAuthSettings(provider=Provider.REFRESH_TOKEN, token_url=url, scope=scope,
                         client_id=client_id, client_secret=secret, refresh_token=refresh_token,
                         fingerprint=_fingerprint("refresh", url, scope, client_id, secret,
                                                  refresh_token, common["mailbox"]), **common)


# --- the grants ------------------------------------------------------------------------------


def build_assertion(settings: OAuthSettings, mailbox: str | None, *,
                    now: float | None = None) -> str:
    """The signed RFC 7523 JWT: a client assertion (Entra) or a bearer grant (Google)."""
    import jwt

    assert settings.signing_key is not None
    assert settings.issuer is not None
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": settings.issuer, "aud": settings.token_url,
                              "iat": issued, "exp": issued + ASSERTION_LIFETIME}
    headers: dict[str, Any] = {}
    if settings.provider is Provider.GOOGLE:
        claims["scope"] = settings.scope
        if mailbox is not None:
            claims["sub"] = mailbox  # domain-wide delegation: act as this user
        if settings.key_id:
            headers["kid"] = settings.key_id
    else:  # Entra certificate credential
        claims.update(sub=settings.issuer, jti=str(uuid.uuid4()), nbf=issued)
        headers["x5t#S256"] = settings.key_id
    return jwt.encode(claims, settings.signing_key.reveal(), algorithm="RS256",
                      headers=headers)


def _form(settings: OAuthSettings, mailbox: str | None,
          refresh_token: Secret | None) -> dict[str, str]:
    if settings.provider is Provider.GOOGLE:
        return {"grant_type": _JWT_BEARER, "assertion": build_assertion(settings, mailbox)}
    form: dict[str, str] = {}
    if settings.provider is Provider.ENTRA:
        form["grant_type"] = "client_credentials"
    else:
        refresh_token = refresh_token or settings.refresh_token
        assert refresh_token is not None
        form.update(grant_type="refresh_token", refresh_token=refresh_token.reveal())
    assert settings.client_id is not None
    form["client_id"] = settings.client_id
    if settings.scope:
        form["scope"] = settings.scope
    if settings.client_secret is not None:
        form["client_secret"] = settings.client_secret.reveal()
    elif settings.signing_key is not None:
        form.update(client_assertion_type=_CLIENT_ASSERTION,
                    client_assertion=build_assertion(settings, mailbox))
    return form


def _clean(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    clean = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return clean if len(clean) <= ERROR_TEXT_LIMIT else clean[: ERROR_TEXT_LIMIT - 3] + "..."


async def fetch_token(settings: OAuthSettings, mailbox: str | None, *,
                      refresh_token: Secret | None = None) -> Token:
    """POST the grant to the token endpoint under ``settings.timeout``; raise TokenError.

    ``refresh_token`` replaces the configured one (RFC 6749 §6: the provider may rotate it).
    """
    import httpx

    form = _form(settings, mailbox, refresh_token)
    secrets = [v for k, v in form.items() if k not in ("grant_type", "client_id", "scope",
                                                         "client_assertion_type")]
    host = settings.endpoint_host
    try:
        with trio.fail_after(settings.timeout):
            async with httpx.AsyncClient(verify=settings.ssl_context,
                                         timeout=settings.timeout,
                                         follow_redirects=False) as http:
                response = await http.post(settings.token_url, data=form,
                                           headers={"Accept": "application/json"})
    except trio.TooSlowError:
        raise TokenError(f"token endpoint unreachable: {host} did not answer within "
                         f"{settings.timeout:g}s", unreachable=True) from None
    except httpx.HTTPError as exc:
        reason = _clean(str(exc) or type(exc).__name__, secrets)
        raise TokenError(f"token endpoint unreachable: {host}: {reason}",
                         unreachable=True) from None
    body: Any = None
    if len(response.content) <= _MAX_RESPONSE:
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
    if response.status_code != 200 or not isinstance(body, dict):
        status = response.status_code
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            text = _clean(f"{body['error']}: {body.get('error_description') or ''}"
                          .rstrip(": "), secrets)
            if status >= 500:
                raise TokenError(f"token endpoint unreachable: {host} answered HTTP {status}: "
                                 f"{text}", unreachable=True)
            raise TokenError(f"token request refused by {host}: {text}", unreachable=False)
        raise TokenError(f"token endpoint unreachable: {host} answered HTTP {status}",
                         unreachable=True)
    token, expires_in = body.get("access_token"), body.get("expires_in", 3600)
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)  # some endpoints send it as a string
    if (not isinstance(token, str) or not token or not token.isprintable()
            or not isinstance(expires_in, int) or expires_in <= 0):
        raise TokenError(f"token request to {host}: no usable access_token/expires_in in the "
                         "answer", unreachable=False)
    rotated = body.get("refresh_token")
    return Token(value=Secret(token), expires_at=trio.current_time() + expires_in,
                 lifetime=float(expires_in), host=host,
                 refresh_token=Secret(rotated) if isinstance(rotated, str) and rotated
                 and rotated.isprintable() else None)
