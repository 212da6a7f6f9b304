"""Stand-ins for an OAuth2 provider: an HTTPS token endpoint and an SMTP server with XOAUTH2.

:class:`TokenEndpoint` is a small HTTP/1.1 server on trio (TLS from :class:`TestCA`) that
answers every POST with a fresh bearer token of ``lifetime`` seconds, records each request's
form, and can revoke a token, fail (``mode = "503"`` or ``"refuse"``) or hang. Its ``gate``,
when set, holds answers until the test opens it.

:class:`XOAuth2Server` is aiosmtpd's SMTP server (its Controller runs in a thread) offering
STARTTLS and only AUTH XOAUTH2 (RFC 7628 as Google and Microsoft speak it); a token is good
when the endpoint issued it, did not revoke it, and it has not expired. A refusal is the
provider's ``334`` base64 JSON challenge, then ``535``. Messages are recorded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import trio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from submitd.testing import TestCA

LONG_ERROR = ("AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in "
              "the request is the client secret value, not the client secret ID, for a secret "
              "added to app '00000000-0000-0000-0000-000000000001'. Trace ID: "
              + "0123456789abcdef" * 8)


@dataclass(frozen=True, kw_only=True)
class Issued:
    """One token the endpoint handed out."""

    token: str
    form: dict[str, str]
    issued_at: float  # time.time()
    expires_at: float


class TokenEndpoint:
    """An RFC 6749 token endpoint on https://127.0.0.1:PORT/token."""

    def __init__(self, ca: TestCA, *, lifetime: int = 3600) -> None:
        self.lifetime = lifetime
        self.mode = "ok"  # ok | 503 | refuse | hang
        self.gate: trio.Event | None = None
        self.requests: list[dict[str, str]] = []
        self.issued: list[Issued] = []
        self.revoked: set[str] = set()
        self.rejections = 0  # tokens the SMTP server refused
        self.accepted = True  # False: the SMTP server refuses every token (no mailbox rights)
        self.port = 0
        self._lock = threading.Lock()
        self._changed = trio.Event()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(ca.cert_path), str(ca.key_path))
        self._context = ctx

    @property
    def url(self) -> str:
        """The token URL."""
        return f"https://127.0.0.1:{self.port}/token"

    def valid(self, token: str) -> bool:
        """Issued here, not revoked, not expired (called from the SMTP server's thread)."""
        with self._lock:
            found = [i for i in self.issued if i.token == token]
            ok = (self.accepted and bool(found) and token not in self.revoked
                  and time.time() < found[0].expires_at)
            if not ok:
                self.rejections += 1
            return ok

    def revoke(self, token: str) -> None:
        """Make ``token`` invalid from now on."""
        with self._lock:
            self.revoked.add(token)

    async def wait_for_requests(self, count: int) -> None:
        """Wait until ``count`` token requests arrived."""
        with trio.fail_after(20):
            while len(self.requests) < count:
                await self._changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Listen on a free loopback port until cancelled."""
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self._context, server_side=True)
        try:
            with trio.fail_after(30):
                request = await _read_request(stream)
            if request is None:
                return
            form = {k: v[0] for k, v in parse_qs(request.decode("ascii")).items()}
            self.requests.append(form)
            self._changed.set()
            self._changed = trio.Event()
            if self.gate is not None:
                await self.gate.wait()
            if self.mode == "hang":
                await trio.sleep_forever()
            status, body = self._answer(form)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            await stream.send_all(head.encode() + body)
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        finally:
            await trio.aclose_forcefully(tcp)

    def _answer(self, form: dict[str, str]) -> tuple[str, bytes]:
        if self.mode == "503":
            return "503 Service Unavailable", json.dumps({
                "error": "temporarily_unavailable",
                "error_description": "The service is down for maintenance"}).encode()
        if self.mode == "refuse":
            return "401 Unauthorized", json.dumps({
                "error": "invalid_client", "error_description": LONG_ERROR}).encode()
        now = time.time()
        with self._lock:
            token = f"ya29.token-{len(self.issued) + 1}-{int(now * 1000)}"
            self.issued.append(Issued(token=token, form=form, issued_at=now,
                                      expires_at=now + self.lifetime))
        answer: dict[str, object] = {"access_token": token, "token_type": "Bearer",
                                     "expires_in": self.lifetime}
        if form.get("grant_type") == "refresh_token":  # rotated, as Microsoft does
            answer["refresh_token"] = f"rotated-rt-{len(self.issued)}"
        return "200 OK", json.dumps(answer).encode()


async def _read_request(stream: trio.abc.Stream) -> bytes | None:
    """The body of one POST (Content-Length), or None."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk or len(data) > 65536:
            return None
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    rest = bytearray(body)
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        rest += chunk
    return bytes(rest[:length])


@dataclass(frozen=True, kw_only=True)
class Received:
    """One message the XOAUTH2 server accepted."""

    login: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes


class _Handler:
    def __init__(self, server: XOAuth2Server) -> None:
        self.server = server

    async def auth_XOAUTH2(self, smtp: SMTP, args: list[str]) -> AuthResult:
        if len(args) < 2:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Initial "
                                                                    "response required")
        try:
            text = base64.b64decode(args[1], validate=True).decode()
            user_part, auth_part, *_ = text.split("\x01")
            user = user_part.removeprefix("user=")
            token = auth_part.removeprefix("auth=Bearer ")
        except (ValueError, UnicodeDecodeError):
            return AuthResult(success=False, handled=False, message="501 5.5.2 Bad XOAUTH2")
        self.server.logins.append((user, token))
        if self.server.endpoint.valid(token):
            return AuthResult(success=True, auth_data=user)
        # RFC 7628 §3.2.2: the error as a challenge, the client answers with an empty line.
        error = json.dumps({"status": "401", "schemes": "bearer",
                            "scope": "https://mail.google.com/"})
        await smtp.challenge_auth(base64.b64encode(error.encode()).decode(),
                                  encode_to_b64=False)
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")

    async def handle_DATA(self, smtp: SMTP, session: Session,
                          envelope: Envelope) -> str:
        self.server.messages.append(Received(
            login=str(session.auth_data), sender=str(envelope.mail_from),
            recipients=tuple(envelope.rcpt_tos), data=bytes(envelope.original_content or b"")))
        return "250 2.0.0 Ok: queued"


class _Controller(Controller):
    """aiosmtpd's Controller that can close every open connection before it stops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sessions: list[SMTP] = []

    def factory(self) -> SMTP:
        smtp = super().factory()
        self.sessions.append(smtp)
        return smtp

    def stop(self, no_assert: bool = False) -> None:
        # Connections left open (an idle pooled one, a half-closed one) would outlive the loop.
        async def abort_all() -> None:
            for smtp in self.sessions:
                for transport in (smtp.transport, smtp._original_transport):
                    if isinstance(transport, asyncio.Transport):
                        transport.abort()
            for _ in range(3):  # let connection_lost run
                await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(abort_all(), self.loop).result(timeout=10)
        super().stop(no_assert)


class XOAuth2Server:
    """aiosmtpd on 127.0.0.1 with STARTTLS and AUTH XOAUTH2 checked against ``endpoint``."""

    def __init__(self, ca: TestCA, endpoint: TokenEndpoint) -> None:
        self.endpoint = endpoint
        self.messages: list[Received] = []
        self.logins: list[tuple[str, str]] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(str(ca.cert_path), str(ca.key_path))
        self.controller = _Controller(
            _Handler(self), hostname="127.0.0.1", port=self.port, server_hostname="smtp.test",
            tls_context=tls, require_starttls=True, auth_required=True, auth_require_tls=True,
            auth_exclude_mechanism=["PLAIN", "LOGIN"],
        )


@asynccontextmanager
async def oauth_provider(ca: TestCA, *, lifetime: int = 3600
                         ) -> AsyncIterator[tuple[TokenEndpoint, XOAuth2Server]]:
    """Start the token endpoint and the XOAUTH2 SMTP server; stop both on exit."""
    endpoint = TokenEndpoint(ca, lifetime=lifetime)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.serve)
        smtp = XOAuth2Server(ca, endpoint)
        await trio.to_thread.run_sync(smtp.controller.start)
        try:
            yield endpoint, smtp
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(smtp.controller.stop)
            nursery.cancel_scope.cancel()


def oauth_toml(table: dict[str, Any], prefix: str = "plugins.smarthost.oauth") -> str:
    """``[prefix]`` with ``table``'s keys, for appending to a config file."""
    lines = [f"[{prefix}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"
