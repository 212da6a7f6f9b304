"""OAuth2 routes of the smarthost plugin: the oauth tables, the JWT assertions, the token cache."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import jwt
import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from submitd import Envelope, MailParams, MessageHandle, OutcomeKind, Recipient, Secret
from submitd_plugins import smarthost
from submitd_plugins._smarthost_oauth import Provider, Token, build_assertion
from submitd_plugins._smarthost_pool import TokenCache
from tests.unit.smarthost_support import configured, error, settings

ROUTE = '[plugins.smarthost]\nhost = "smtp.office365.com"\n'


def entra(tmp_path: Path, extra: str = "", *, mailbox: str | None = '"sender"') -> str:
    (tmp_path / "entra.secret").write_text("s3cret-value\r\nignored second line\n")
    return (ROUTE + "[plugins.smarthost.oauth]\nprovider = \"entra\"\n"
            'tenant = "contoso.onmicrosoft.com"\nclient_id = "app-1"\n'
            'client_secret_file = "entra.secret"\n'
            + (f"mailbox = {mailbox}\n" if mailbox else "") + extra)


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def google_key(tmp_path: Path, key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "client_email": "relay@proj.iam.gserviceaccount.com",
        "private_key_id": "kid-42", "private_key": pem(key).decode(),
        "token_uri": "https://oauth2.googleapis.com/token"}))
    return path


def test_entra_with_a_secret_file_and_the_defaults(tmp_path: Path) -> None:
    route = settings(tmp_path, entra(tmp_path)).default
    assert route is not None and route.oauth is not None
    oauth = route.oauth
    assert oauth.provider is Provider.ENTRA
    assert oauth.token_url == ("https://login.microsoftonline.com/contoso.onmicrosoft.com"
                               "/oauth2/v2.0/token")
    assert oauth.scope == "https://outlook.office365.com/.default"
    assert oauth.client_secret == Secret("s3cret-value"), "the first line, CR/LF stripped"
    assert oauth.mailbox is None and oauth.mailbox_for("a@b.example") == "a@b.example"
    assert oauth.timeout == 30.0
    assert "s3cret" not in repr(route) and "s3cret" not in repr(oauth)


def test_fixed_mailbox_is_used_for_every_sender_and_for_bounces(tmp_path: Path) -> None:
    route = settings(tmp_path, entra(tmp_path, mailbox='"relay@contoso.example"')).default
    assert route is not None and route.oauth is not None
    assert route.oauth.mailbox_for("x@y.example") == "relay@contoso.example"
    assert route.oauth.mailbox_for("") == "relay@contoso.example"


@pytest.mark.parametrize(("text", "key", "words"), [
    ("", "oauth.mailbox", "required"),
    ('mailbox = "not an address"\n', "oauth.mailbox", '"sender" or an address'),
    ('mailbox = "sender"\ncolour = "blue"\n', "oauth.colour", "unknown key"),
    ('mailbox = "sender"\ntimeout = "0s"\n', "oauth.timeout", "longer than zero"),
    ('mailbox = "sender"\ntoken_url = "http://login.example/token"\n', "oauth.token_url",
     "https://"),
    ('mailbox = "sender"\nclient_cert = "c.pem"\n', "oauth.client_cert", "not both"),
])
def test_bad_entra_tables_name_the_dotted_key(tmp_path: Path, text: str, key: str,
                                              words: str) -> None:
    exc = error(tmp_path, entra(tmp_path, text, mailbox=None))
    assert exc.key == f"plugins.smarthost.{key}"
    assert words in exc.message


def test_missing_secret_file_names_the_key_and_never_the_secret(tmp_path: Path) -> None:
    text = entra(tmp_path).replace('"entra.secret"', '"missing.secret"')
    exc = error(tmp_path, text)
    assert exc.key == "plugins.smarthost.oauth.client_secret_file"
    assert "cannot read" in exc.message


def test_oauth_excludes_a_password_and_tls_none(tmp_path: Path) -> None:
    text = entra(tmp_path).replace(ROUTE, ROUTE + 'username = "x"\npassword_env = "P"\n')
    assert error(tmp_path, text).key == "plugins.smarthost.username"
    text = entra(tmp_path).replace(ROUTE, ROUTE + 'tls = "none"\n')
    assert error(tmp_path, text).key == "plugins.smarthost.oauth"


def test_a_route_has_its_own_oauth_table(tmp_path: Path) -> None:
    (tmp_path / "rt").write_text("refresh-token-value\n")
    s = settings(tmp_path, ROUTE + '[[plugins.smarthost.route]]\nname = "gmail"\n'
                 'senders = ["@gmail-user.example"]\nhost = "smtp.gmail.com"\n'
                 '[plugins.smarthost.route.oauth]\nprovider = "refresh-token"\n'
                 'client_id = "cid"\nrefresh_token_file = "rt"\n'
                 'token_url = "https://oauth2.googleapis.com/token"\n'
                 'mailbox = "me@gmail-user.example"\n')
    (route,) = s.routes
    assert route.oauth is not None and route.oauth.refresh_token == Secret("refresh-token-value")
    assert s.default is not None and s.default.oauth is None, "not inherited"
    exc = error(tmp_path, ROUTE + '[[plugins.smarthost.route]]\nsenders = ["<>"]\n'
                'host = "h.example"\n[plugins.smarthost.route.oauth]\n'
                'provider = "refresh-token"\nclient_id = "c"\nrefresh_token_file = "rt"\n'
                'token_url = "https://t.example/token"\nmailbox = "sender"\n')
    assert exc.key == "plugins.smarthost.route[0].oauth.mailbox"


def test_entra_certificate_assertion_carries_the_thumbprint_and_claims(tmp_path: Path) -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)  # Entra signs assertions with RS256
    leaf = ca.issue_cert("app-1.example", key_type=trustme.KeyType.RSA)
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "app.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "app-key.pem"))
    text = entra(tmp_path).replace('client_secret_file = "entra.secret"\n',
                                   'client_cert = "app.pem"\nclient_key = "app-key.pem"\n')
    route = settings(tmp_path, text).default
    assert route is not None and route.oauth is not None
    cert = x509.load_pem_x509_certificate((tmp_path / "app.pem").read_bytes())
    token = build_assertion(route.oauth, "someone@contoso.example", now=1_700_000_000)
    header = jwt.get_unverified_header(token)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert header["alg"] == "RS256"
    assert header["x5t#S256"] == base64.urlsafe_b64encode(
        hashlib.sha256(der).digest()).rstrip(b"=").decode()
    url = route.oauth.token_url
    claims = jwt.decode(token, cert.public_key(), algorithms=["RS256"], audience=url,  # type: ignore[arg-type]
                        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
    assert claims["iss"] == claims["sub"] == "app-1"
    assert claims["aud"] == url
    assert claims["exp"] - claims["iat"] == 600 and claims["jti"]


def test_google_service_account_assertion_acts_as_the_mailbox(tmp_path: Path) -> None:
    key = rsa_key()
    google_key(tmp_path, key)
    route = settings(tmp_path, ROUTE.replace("smtp.office365.com", "smtp.gmail.com")
                     + '[plugins.smarthost.oauth]\nprovider = "google-service-account"\n'
                     'key_file = "sa.json"\n').default
    assert route is not None and route.oauth is not None
    oauth = route.oauth
    assert oauth.mailbox is None, '"sender" is the default for service accounts'
    assert oauth.token_url == "https://oauth2.googleapis.com/token"
    token = build_assertion(oauth, "printer@corp.example", now=1_700_000_000)
    assert jwt.get_unverified_header(token)["kid"] == "kid-42"
    claims = jwt.decode(token, key.public_key(), algorithms=["RS256"],
                        audience="https://oauth2.googleapis.com/token",
                        options={"verify_exp": False, "verify_iat": False})
    assert claims == {"iss": "relay@proj.iam.gserviceaccount.com",
                      "sub": "printer@corp.example", "scope": "https://mail.google.com/",
                      "aud": "https://oauth2.googleapis.com/token",
                      "iat": 1_700_000_000, "exp": 1_700_000_600}


def test_google_key_file_that_is_not_a_service_account(tmp_path: Path) -> None:
    (tmp_path / "sa.json").write_text('{"type": "authorized_user"}')
    exc = error(tmp_path, ROUTE + '[plugins.smarthost.oauth]\n'
                'provider = "google-service-account"\nkey_file = "sa.json"\n')
    assert exc.key == "plugins.smarthost.oauth.key_file" and "service account" in exc.message


def token(now: float, lifetime: float, name: str = "t") -> Token:
    return Token(value=Secret(name), expires_at=now + lifetime, lifetime=lifetime, host="h")


async def test_cache_single_flight_for_concurrent_callers(autojump_clock: trio.testing.MockClock
                                                          ) -> None:
    cache = TokenCache()
    calls = 0

    async def fetch() -> Token:
        nonlocal calls
        calls += 1
        await trio.sleep(2)  # a slow endpoint
        return token(trio.current_time(), 3600, f"t{calls}")

    got: list[str] = []

    async def one() -> None:
        t, _ = await cache.get(("route", "a@b"), fetch)
        got.append(t.value.reveal())

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert calls == 1 and got == ["t1"] * 50 and cache.requests == 1


async def test_cache_refreshes_five_minutes_or_a_tenth_of_the_lifetime_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = TokenCache()
    lifetimes = iter([3600.0, 3600.0, 120.0, 120.0])

    async def fetch() -> Token:
        return token(trio.current_time(), next(lifetimes))

    key = ("route", "")
    first, fresh = await cache.get(key, fetch)
    assert fresh
    await trio.sleep(3600 - 300 - 1)
    assert (await cache.get(key, fetch))[0] is first, "still more than 5 minutes left"
    await trio.sleep(2)
    second, fresh = await cache.get(key, fetch)
    assert fresh and second is not first, "refreshed with 5 minutes left"
    await trio.sleep(3600)
    short, _ = await cache.get(key, fetch)  # a 2-minute token: refreshed with 12 s left
    await trio.sleep(120 - 12 - 1)
    assert (await cache.get(key, fetch))[0] is short
    await trio.sleep(2)
    assert (await cache.get(key, fetch))[0] is not short
    cache.invalidate(key, short)  # a replaced token is not dropped by a late refusal
    assert cache.requests == 4


async def test_bounce_on_a_sender_mailbox_route_is_deferred_with_the_reason(
    tmp_path: Path,
) -> None:
    config = configured(tmp_path, entra(tmp_path))
    rcpt = (Recipient(address="a@example.net"),)
    envelope = Envelope(sender="", recipients=rcpt, params=MailParams(), username=None,
                        queue_id="Q1")
    handle = MessageHandle(path=Path("/nonexistent"), size=10, headers=[], body_offset=0)
    outcomes = await smarthost.submitd_deliver(config=config, envelope=envelope,
                                               message=handle, recipients=rcpt)
    assert outcomes is not None
    outcome = outcomes["a@example.net"]
    assert outcome.kind is OutcomeKind.TEMPORARY
    assert (outcome.reply.code, outcome.reply.status) == (451, "4.7.0")
    assert "a bounce (<>) has none" in outcome.reply.text


def test_plugin_imports_without_the_extra_and_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import sys

    blocked = "import sys; sys.modules['httpx'] = sys.modules['jwt'] = None; "
    subprocess.run([sys.executable, "-c", blocked + "import submitd_plugins.smarthost"],
                   check=True, timeout=60)  # importing the plugin needs neither
    monkeypatch.setitem(sys.modules, "httpx", None)  # "not installed"
    monkeypatch.setitem(sys.modules, "jwt", None)
    settings(tmp_path, ROUTE)  # nor does a route without OAuth
    exc = error(tmp_path, entra(tmp_path))
    assert exc.key == "plugins.smarthost.oauth"
    assert "pip install 'submitd[oauth]'" in exc.message
