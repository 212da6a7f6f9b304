"""``submitd smarthost test``: one line says whether a route logs in, against a fake relay.

The command runs in a worker thread (it calls ``trio.run`` itself) while the fake smarthost
serves on loopback in the test's event loop; the bound of every test is the fake's own
``WAIT_LIMIT`` and the command's deadline.
"""

from __future__ import annotations

import json
import re
import socket
import tomllib
from functools import partial
from pathlib import Path

import pytest
import trio

from submitd import cli
from submitd.testing import TestCA, running_smarthost, write_config

RELAY_USER = "relay-user"
RELAY_PASSWORD = "relay pass \u00e9 2026"
ENTRA_SECRET = "entra~client~secret~C3"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "tls")


def relay_config(tmp_path: Path, ca: TestCA, port: int, *, password: str = RELAY_PASSWORD,
                 more: str = "") -> Path:
    """A configuration whose default route is the fake relay on ``port`` (STARTTLS, AUTH)."""
    secret = tmp_path / "smarthost.secret"
    secret.write_text(password + "\n")
    path = write_config(tmp_path, ca=ca, enable=["smarthost"], plugins={"smarthost": {
        "host": "127.0.0.1", "port": port, "tls": "starttls", "ca_file": str(ca.ca_path),
        "username": RELAY_USER, "password_file": str(secret), "connect_timeout": "5s",
        "command_timeout": "5s",
    }})
    path.write_text(path.read_text() + more)
    return path


async def smarthost_test(config: Path, *args: str) -> int:
    argv = ["smarthost", "test", "-c", str(config), *args]
    return await trio.to_thread.run_sync(partial(cli.main, argv))


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_password_route_that_logs_in_prints_ok_and_sends_no_mail(
    tmp_path: Path, ca: TestCA, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD) as fake:
        config = relay_config(tmp_path, ca, fake.port)
        status = await smarthost_test(config)
        out, err = capsys.readouterr()
        assert status == 0, err
        (line,) = out.splitlines()
        assert line.startswith("ok: ")
        assert RELAY_USER in line
        assert "TLS" in line
        assert RELAY_PASSWORD not in out + err
        assert fake.messages == []
        assert fake.connections == 1


async def test_a_wrong_password_fails_at_auth_with_the_relays_535(
    tmp_path: Path, ca: TestCA, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_smarthost(ca=ca, username=RELAY_USER, password=RELAY_PASSWORD) as fake:
        config = relay_config(tmp_path, ca, fake.port, password="not the password")
        status = await smarthost_test(config)
    out, err = capsys.readouterr()
    assert status == 1, err
    (line,) = out.splitlines()
    assert line.startswith("failed at auth: ")
    assert f"127.0.0.1:{fake.port}" in line
    assert " 535 " in line
    assert "not the password" not in out + err


async def test_a_closed_port_fails_at_connect(
    tmp_path: Path, ca: TestCA, capsys: pytest.CaptureFixture[str]
) -> None:
    config = relay_config(tmp_path, ca, closed_port())
    status = await smarthost_test(config)
    out, err = capsys.readouterr()
    assert status == 1, err
    (line,) = out.splitlines()
    assert line.startswith("failed at connect")
    assert "127.0.0.1" in line


async def test_a_named_route_is_tested_instead_of_the_default_route(
    tmp_path: Path, ca: TestCA, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_smarthost(ca=ca) as partner:
        route = (
            "[[plugins.smarthost.route]]\n"
            'name = "partner"\n'
            'senders = ["@sales.example.org"]\n'
            f'hosts = ["127.0.0.1:{partner.port}"]\n'
            f'ca_file = "{ca.ca_path}"\n'
        )
        config = relay_config(tmp_path, ca, closed_port(), more=route)
        status = await smarthost_test(config, "partner")
        out, err = capsys.readouterr()
        assert status == 0, out + err
        assert out.startswith("ok: ")
        assert partner.connections == 1


async def test_an_unknown_route_is_a_usage_error_naming_the_routes_that_exist(
    tmp_path: Path, ca: TestCA, capsys: pytest.CaptureFixture[str]
) -> None:
    route = (
        "[[plugins.smarthost.route]]\n"
        'name = "partner"\n'
        'senders = ["@sales.example.org"]\n'
        'hosts = ["relay.partner.example:465"]\n'
        'tls = "implicit"\n'
    )
    config = relay_config(tmp_path, ca, closed_port(), more=route)
    status = await smarthost_test(config, "parnter")
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert "parnter" in err
    assert "partner" in err.replace("parnter", "")


def test_without_the_smarthost_plugin_enabled_it_is_a_configuration_error(
    tmp_path: Path, ca: TestCA, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, ca=ca, enable=[])
    assert cli.main(["smarthost", "test", "-c", str(config)]) == 2
    assert "'smarthost' is not enabled" in capsys.readouterr().err


def test_smarthost_alone_lists_its_actions(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["smarthost"]) == 2
    assert "test" in capsys.readouterr().err


# --- the configurations in the OAuth2 guides pass check-config as written --------------------

DOCS = Path(__file__).resolve().parents[2] / "docs"


def guide_configs(page: str) -> list[str]:
    """The ``toml`` blocks of ``docs/PAGE`` that configure a route (with a ``[plugins]`` header
    dropped: the test's own configuration enables the plugin)."""
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    return [re.sub(r"\[plugins\]\nenable = .*\n\n?", "", b) for b in blocks
            if "[plugins.smarthost.oauth]" in b]


def write_rsa_pair(cert: Path, key: Path) -> None:
    """An RSA certificate and key (Entra's certificate credential is RS256)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "submitd relay")])
    now = dt.datetime.now(dt.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
                   .sign(private, hashes.SHA256()))
    cert.parent.mkdir(parents=True, exist_ok=True)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def service_account_key(path: Path) -> None:
    """A JSON key shaped like the one the Google Cloud console downloads."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "example", "private_key_id": "k1",
        "private_key": pem, "client_email": "submitd-relay@example.iam.gserviceaccount.com",
        "client_id": "123456789012345678901", "token_uri": "https://oauth2.googleapis.com/token",
    }))


def guide_examples() -> list[tuple[str, str]]:
    examples = [("microsoft-365", block) for block in guide_configs("microsoft-365.md")]
    text = (DOCS / "microsoft-365.md").read_text()
    certificate = re.search(r"```toml\n(client_cert = .*?)```", text, flags=re.DOTALL)
    assert certificate is not None, "the certificate variant is shown"
    examples.append(("microsoft-365-certificate", re.sub(
        r"client_secret_file = .*\n", certificate.group(1), examples[0][1])))
    examples += [("google-workspace", block) for block in guide_configs("google-workspace.md")]
    return examples


@pytest.mark.parametrize(("page", "example"), guide_examples(),
                         ids=[f"{p}-{i}" for i, (p, _) in enumerate(guide_examples())])
def test_the_oauth_guides_configurations_pass_check_config(
    tmp_path: Path, ca: TestCA, page: str, example: str, capsys: pytest.CaptureFixture[str]
) -> None:
    table = tomllib.loads(example)["plugins"]["smarthost"]["oauth"]
    for key in ("client_secret_file", "refresh_token_file"):
        if key in table:
            (tmp_path / table[key]).write_text("not-the-real-secret\n")
    if "client_cert" in table:
        write_rsa_pair(tmp_path / table["client_cert"], tmp_path / table["client_key"])
    if "key_file" in table:
        service_account_key(tmp_path / table["key_file"])
    path = write_config(tmp_path, ca=ca, enable=["smarthost"])
    path.write_text(path.read_text() + "\n" + example)
    assert cli.main(["check-config", "-c", str(path)]) == 0, capsys.readouterr().err
    assert "not-the-real-secret" not in capsys.readouterr().out


# --- against the OAuth2 stand-ins: a token endpoint and an XOAUTH2 SMTP server ----------------


async def test_an_oauth_route_fetches_a_token_and_logs_in_as_the_mailbox(
    tmp_path: Path, ca: TestCA, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.integration.oauth_support import oauth_provider, oauth_toml

    secret = tmp_path / "entra.secret"
    secret.write_text(ENTRA_SECRET + "\n")
    async with oauth_provider(ca) as (endpoint, smtp):
        config = write_config(tmp_path, ca=ca, enable=["smarthost"], plugins={"smarthost": {
            "host": "127.0.0.1", "port": smtp.port, "tls": "starttls",
            "ca_file": str(ca.ca_path)}})
        config.write_text(config.read_text() + oauth_toml({
            "provider": "entra", "tenant": "contoso.example", "client_id": "app-1234",
            "client_secret_file": str(secret), "token_url": endpoint.url,
            "ca_file": str(ca.ca_path), "mailbox": "sender"}))

        assert await smarthost_test(config, "--mailbox", "alice@example.org") == 0
        ok, err = capsys.readouterr()
        assert ok == (f"ok: token from 127.0.0.1 (expires in 60m), TLS TLSv1.3 (starttls) to "
                      f"127.0.0.1:{smtp.port}, AUTH XOAUTH2 as alice@example.org accepted\n"), err
        assert len(endpoint.requests) == 1
        assert [user for user, _ in smtp.logins] == ["alice@example.org"]

        endpoint.mode = "refuse"
        assert await smarthost_test(config, "--mailbox", "alice@example.org") == 1
        refused, err = capsys.readouterr()
        assert refused.startswith("failed at token: token request refused by 127.0.0.1: "
                                  "invalid_client"), refused + err
        assert len(smtp.logins) == 1, "no SMTP connection without a token"
    assert smtp.messages == []
    for text in (ok, refused, err):
        assert ENTRA_SECRET not in text
        assert all(issued.token not in text for issued in endpoint.issued)
