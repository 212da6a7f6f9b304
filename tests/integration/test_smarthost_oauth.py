"""OAuth2 smarthost routes against stand-ins: a token endpoint and an XOAUTH2 SMTP server."""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from submitd import ConfigError, OutcomeKind
from submitd.config import load_config
from submitd.testing import RawSMTPClient, RunningServer, TestCA, running_server
from submitd_plugins import smarthost
from tests.integration.oauth_support import TokenEndpoint, XOAuth2Server, oauth_provider, oauth_toml
from tests.integration.test_queue_control import submitd_queue
from tests.integration.test_smarthost import PLAIN, Recorder, message, submit
from tests.support import RECIPIENT, SENDER

CLIENT_SECRET = "entra~client~secret~Q8"


@pytest.fixture
def oauth_config(make_config: Callable[..., Path], ca: TestCA, tmp_path: Path
                 ) -> Callable[..., Path]:
    """passwdfile + smarthost to the XOAUTH2 server, tokens from the endpoint (entra)."""
    secret = tmp_path / "entra.secret"
    secret.write_text(CLIENT_SECRET + "\n")

    def make(endpoint: TokenEndpoint, smtp: XOAuth2Server, *, timeout: str = "30s",
             queue: dict[str, object] | None = None) -> Path:
        path = make_config(enable=("passwdfile", "smarthost"), queue=queue, plugins={
            "smarthost": {"host": "127.0.0.1", "port": smtp.port, "tls": "starttls",
                          "ca_file": str(ca.ca_path), "reuse_time": "0s"}})
        path.write_text(path.read_text() + oauth_toml({
            "provider": "entra", "tenant": "contoso.example", "client_id": "app-1234",
            "client_secret_file": str(secret), "token_url": endpoint.url,
            "ca_file": str(ca.ca_path), "mailbox": "sender", "timeout": timeout}))
        return path

    return make


async def submit_many(srv: RunningServer, tls: ssl.SSLContext, count: int) -> list[str]:
    """``count`` messages in one authenticated session; their queue ids."""
    ids = []
    async with await RawSMTPClient.connect("127.0.0.1", srv.port("implicit"), tls=tls) as c:
        assert (await c.reply()).code == 220
        assert (await c.command("EHLO client.example")).code == 250
        assert (await c.command(f"AUTH PLAIN {PLAIN}")).code == 235
        for n in range(count):
            assert (await c.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert (await c.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
            assert (await c.command("DATA")).code == 354
            await c.send(message(subject=f"oauth {n}") + b".\r\n")
            reply = await c.reply()
            assert reply is not None and reply.code == 250, reply
            ids.append(reply.text.rsplit(" ", 1)[-1])
        await c.command("QUIT")
    return ids


def assert_no_secrets(text: str, endpoint: TokenEndpoint) -> None:
    assert CLIENT_SECRET not in text
    for issued in endpoint.issued:
        assert issued.token not in text
        xoauth2 = f"user={SENDER}\x01auth=Bearer {issued.token}\x01\x01"
        assert base64.b64encode(xoauth2.encode()).decode() not in text


async def test_fresh_token_delivers_and_is_reused_until_it_expires(
    oauth_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    async with oauth_provider(ca) as (endpoint, smtp):
        async with running_server(oauth_config(endpoint, smtp),
                                  extra_plugins=[("recorder", recorder)]) as srv:
            for n in range(3):  # one after the other, each on a new connection
                await submit_many(srv, client_tls, 1)
                await recorder.wait_for_outcomes(n + 1)
    assert [o.kind for _, o in recorder.outcomes] == [OutcomeKind.DELIVERED] * 3
    assert len(endpoint.requests) == 1, "one token for three messages"
    (form,) = endpoint.requests
    assert form == {"grant_type": "client_credentials", "client_id": "app-1234",
                    "scope": "https://outlook.office365.com/.default",
                    "client_secret": CLIENT_SECRET}
    assert [m.login for m in smtp.messages] == [SENDER] * 3, "AUTH as the sender's mailbox"
    assert {token for _, token in smtp.logins} == {endpoint.issued[0].token}
    assert "event=smarthost_token " in caplog.text and "expires_in=3600" in caplog.text
    assert_no_secrets(caplog.text, endpoint)


async def test_token_close_to_expiry_is_refreshed_before_use(
    oauth_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
) -> None:
    recorder = Recorder()
    # 10 s tokens: refreshed once less than a tenth of the lifetime (1 s) remains; the first
    # two messages have 9 s to go through, which a loaded machine needs.
    async with oauth_provider(ca, lifetime=10) as (endpoint, smtp):
        async with running_server(oauth_config(endpoint, smtp),
                                  extra_plugins=[("recorder", recorder)]) as srv:
            await submit_many(srv, client_tls, 1)
            await recorder.wait_for_outcomes(1)
            first = endpoint.issued[0]
            await submit_many(srv, client_tls, 1)  # well before the margin: the same token
            await recorder.wait_for_outcomes(2)
            await trio.sleep(first.expires_at - 0.6 - time.time())
            await submit_many(srv, client_tls, 1)  # inside the margin, still valid
            await recorder.wait_for_outcomes(3)
    assert [o.kind for _, o in recorder.outcomes] == [OutcomeKind.DELIVERED] * 3
    assert len(endpoint.requests) == 2
    assert endpoint.issued[1].issued_at < first.expires_at, "refreshed before it expired"
    assert endpoint.rejections == 0, "the server never saw an expired token"
    assert [t for _, t in smtp.logins] == [first.token, first.token, endpoint.issued[1].token]


async def test_revoked_token_is_refetched_once_then_the_message_goes(
    oauth_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    async with oauth_provider(ca) as (endpoint, smtp):
        async with running_server(oauth_config(endpoint, smtp),
                                  extra_plugins=[("recorder", recorder)]) as srv:
            await submit_many(srv, client_tls, 1)
            await recorder.wait_for_outcomes(1)
            endpoint.revoke(endpoint.issued[0].token)  # an admin revoked the app's sessions
            await submit_many(srv, client_tls, 1)
            (_, (_, second)) = await recorder.wait_for_outcomes(2)
    assert second.kind is OutcomeKind.DELIVERED
    assert len(endpoint.requests) == 2 and endpoint.rejections == 1
    assert len(smtp.messages) == 2
    (refused,) = [r.message for r in caplog.records if "smarthost_token_refused" in r.message]
    assert "cached=True" in refused and "status=401" in refused
    assert_no_secrets(caplog.text, endpoint)


@pytest.mark.parametrize("mode", ["503", "hang", "refuse"])
async def test_token_endpoint_failure_keeps_the_message_queued_and_says_why(
    oauth_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture, mode: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    expected = {
        "503": (451, "4.4.3", "token endpoint unreachable: 127.0.0.1 answered HTTP 503: "
                              "temporarily_unavailable: The service is down for maintenance"),
        "hang": (451, "4.4.3", "token endpoint unreachable: 127.0.0.1 did not answer "
                               "within 1s"),
        "refuse": (454, "4.7.0", "token request refused by 127.0.0.1: invalid_client: "
                                 "AADSTS7000215: Invalid client secret provided."),
    }[mode]
    async with oauth_provider(ca) as (endpoint, smtp):
        endpoint.mode = mode
        config = oauth_config(endpoint, smtp, timeout="1s", queue={"retry": ["1h"]})
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            (queue_id,) = await submit_many(srv, client_tls, 1)
            ((_, outcome),) = await recorder.wait_for_outcomes(1)
            status, out, _ = await submitd_queue(config, "list", "--json")
    assert outcome.kind is OutcomeKind.TEMPORARY
    assert (outcome.reply.code, outcome.reply.status) == expected[:2]
    assert outcome.reply.text.startswith(expected[2])
    assert len(outcome.reply.text) < 260, "the provider's text is cut to 200 characters"
    assert not smtp.messages and not smtp.logins, "no connection without a token"
    (listed,) = json.loads(out)["messages"]
    assert status == 0 and listed["id"] == queue_id
    assert listed["recipients"][0]["last_reply"]["text"] == outcome.reply.text
    (logged,) = [r.message for r in caplog.records if "smarthost_token_failed" in r.message]
    assert queue_id in logged and expected[2][:40] in logged
    assert CLIENT_SECRET not in caplog.text


async def test_fifty_concurrent_deliveries_share_one_token_request(
    oauth_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="submitd.plugins.smarthost")
    recorder = Recorder()
    async with oauth_provider(ca) as (endpoint, smtp):
        endpoint.gate = trio.Event()  # the first token request waits for the test
        config = oauth_config(endpoint, smtp, queue={"max_parallel": 50})
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            await submit_many(srv, client_tls, 50)
            with trio.fail_after(20):  # every delivery is now waiting for the token
                while caplog.text.count("event=smarthost_connect") < 50:
                    await trio.sleep(0.01)
            endpoint.gate.set()
            outcomes = await recorder.wait_for_outcomes(50)
    print(f"token requests for 50 concurrent deliveries: {len(endpoint.requests)}")
    assert len(endpoint.requests) == 1
    assert [o.kind for _, o in outcomes] == [OutcomeKind.DELIVERED] * 50
    assert len(smtp.messages) == 50


def service_account(tmp_path: Path, endpoint: TokenEndpoint) -> tuple[Path, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "client_email": "relay@proj.iam.gserviceaccount.com",
        "private_key_id": "kid-1", "token_uri": endpoint.url,
        "private_key": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()}))
    return path, key


async def test_google_service_account_gets_a_token_per_sender_mailbox(
    make_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext, tmp_path: Path,
) -> None:
    recorder = Recorder()
    other = "sales@alias.example"
    async with oauth_provider(ca) as (endpoint, smtp):
        key_file, key = service_account(tmp_path, endpoint)
        config = make_config(enable=("passwdfile", "smarthost"), plugins={"smarthost": {
            "host": "127.0.0.1", "port": smtp.port, "ca_file": str(ca.ca_path),
            "reuse_time": "30s"}})
        config.write_text(config.read_text() + oauth_toml({
            "provider": "google-service-account", "key_file": str(key_file),
            "ca_file": str(ca.ca_path)}))
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            for n, sender in enumerate((SENDER, other, SENDER, other)):
                await submit(srv, client_tls, sender=sender, body=message(sender, f"g{n}"))
                await recorder.wait_for_outcomes(n + 1)
    assert [o.kind for _, o in recorder.outcomes] == [OutcomeKind.DELIVERED] * 4
    assert [(m.login, m.sender) for m in smtp.messages] == [
        (SENDER, SENDER), (other, other), (SENDER, SENDER), (other, other)]
    assert len(smtp.logins) == 2, "one pooled connection per mailbox, reused"
    subjects = []
    for form in endpoint.requests:
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        claims = jwt.decode(form["assertion"], key.public_key(), algorithms=["RS256"],
                            audience=endpoint.url)
        assert claims["iss"] == "relay@proj.iam.gserviceaccount.com"
        assert claims["scope"] == "https://mail.google.com/"
        subjects.append(claims["sub"])
    assert subjects == [SENDER, other], "RFC 7523 sub: the sender's mailbox"


async def test_probe_reports_each_stage_without_sending_mail(
    oauth_config: Callable[..., Path], ca: TestCA,
) -> None:
    async with oauth_provider(ca) as (endpoint, smtp):
        config = load_config(oauth_config(endpoint, smtp))
        smarthost.submitd_configure(config)
        try:
            ok = await smarthost.probe(config, None, mailbox=SENDER)
            with pytest.raises(ConfigError, match="--mailbox"):
                await smarthost.probe(config, None)  # mailbox = "sender": name one
            for issued in endpoint.issued:
                endpoint.revoke(issued.token)
            endpoint.mode = "refuse"
            token_failed = await smarthost.probe(config, None, mailbox=SENDER)
        finally:
            smarthost.submitd_unconfigure(config)
    assert ok.ok and ok.stage == "done"
    assert ok.detail == (f"token from 127.0.0.1 (expires in 60m), TLS TLSv1.3 (starttls) to "
                         f"127.0.0.1:{smtp.port}, AUTH XOAUTH2 as {SENDER} accepted")
    assert not token_failed.ok and token_failed.stage == "token"
    assert token_failed.detail.startswith("token request refused by 127.0.0.1: invalid_client")
    assert not smtp.messages and [u for u, _ in smtp.logins] == [SENDER]


async def test_entra_app_token_serves_every_sender_mailbox(
    oauth_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
) -> None:
    recorder = Recorder()
    other = "sales@alias.example"
    async with oauth_provider(ca) as (endpoint, smtp):
        async with running_server(oauth_config(endpoint, smtp),
                                  extra_plugins=[("recorder", recorder)]) as srv:
            for n, sender in enumerate((SENDER, other)):
                await submit(srv, client_tls, sender=sender, body=message(sender, f"e{n}"))
                await recorder.wait_for_outcomes(n + 1)
    assert [(m.login, m.sender) for m in smtp.messages] == [(SENDER, SENDER), (other, other)]
    assert len(endpoint.requests) == 1, "a client-credentials token is the app's, not a user's"


async def test_refresh_token_provider_uses_the_rotated_refresh_token(
    make_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    (tmp_path / "rt").write_text("initial-refresh-token\n")
    async with oauth_provider(ca) as (endpoint, smtp):
        config = make_config(enable=("passwdfile", "smarthost"), plugins={"smarthost": {
            "host": "127.0.0.1", "port": smtp.port, "ca_file": str(ca.ca_path),
            "reuse_time": "0s"}})
        config.write_text(config.read_text() + oauth_toml({
            "provider": "refresh-token", "client_id": "desktop-app",
            "refresh_token_file": str(tmp_path / "rt"), "token_url": endpoint.url,
            "ca_file": str(ca.ca_path), "mailbox": "relay@example.com"}))
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            await submit_many(srv, client_tls, 1)
            await recorder.wait_for_outcomes(1)
            endpoint.revoke(endpoint.issued[0].token)
            await submit_many(srv, client_tls, 1)
            await recorder.wait_for_outcomes(2)
    assert [o.kind for _, o in recorder.outcomes] == [OutcomeKind.DELIVERED] * 2
    assert [f["refresh_token"] for f in endpoint.requests] == [
        "initial-refresh-token", "rotated-rt-1"]
    assert all(f["grant_type"] == "refresh_token" and f["client_id"] == "desktop-app"
               and "client_secret" not in f for f in endpoint.requests)
    assert [m.login for m in smtp.messages] == ["relay@example.com"] * 2
    for secret in ("initial-refresh-token", "rotated-rt-1"):
        assert secret not in caplog.text


async def test_a_fresh_token_the_server_refuses_defers_with_the_providers_error(
    oauth_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    async with oauth_provider(ca) as (endpoint, smtp):
        endpoint.accepted = False  # e.g. the app has no rights on the mailbox
        config = oauth_config(endpoint, smtp, queue={"retry": ["1h"]})
        async with running_server(config, extra_plugins=[("recorder", recorder)]) as srv:
            await submit_many(srv, client_tls, 1)
            ((_, outcome),) = await recorder.wait_for_outcomes(1)
            status, out, _ = await submitd_queue(config, "list")
    assert outcome.kind is OutcomeKind.TEMPORARY
    assert (outcome.reply.code, outcome.reply.status) == (454, "4.7.0")
    assert outcome.reply.text == (
        f"AUTH XOAUTH2 as {SENDER} refused by 127.0.0.1:{smtp.port}: 535 Username and "
        "Password not accepted (status=401 schemes=bearer scope=https://mail.google.com/)")
    assert len(endpoint.requests) == 1, "a token fetched just now is not fetched again"
    assert status == 0 and "AUTH XOAUTH2 as" in out and "status=401" in out
    assert_no_secrets(caplog.text, endpoint)
