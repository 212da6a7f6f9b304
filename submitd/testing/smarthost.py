"""A fake smarthost for tests: a small SMTP relay on loopback that records what it receives.

It is a relay, not a submission server: mail may flow without AUTH or TLS when the test asks
for it, which the server-role core rightly refuses; so the dialogue is written out here,
compactly. Typical use::

    async with running_smarthost(ca=ca, username="relay", password="pw",
                                 recipient_replies={"bad@example.net": Reply.make(
                                     550, "5.1.1", "No such user")}) as fake:
        ...  # point [plugins.smarthost] at fake.address, submit mail
        (received,) = await fake.wait_for_messages(1)
        assert received.data.endswith(b"...")

Every accepted message is kept as a :class:`ReceivedMessage` (envelope, bytes as received
after dot-unstuffing, the connection it came on); ``transcripts`` holds each connection's
commands (AUTH credentials replaced by ``***``); ``errors`` the failures of connections
(a refused certificate, a dropped connection).
"""

from __future__ import annotations

import base64
import binascii
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..protocol._replies import Reply

if TYPE_CHECKING:
    from . import TestCA

__all__ = ["WAIT_LIMIT", "FakeSmarthost", "ReceivedMessage", "running_smarthost"]

_MAX_LINE = 4096
#: The longest :meth:`FakeSmarthost.wait_until` waits (seconds).
WAIT_LIMIT = 20.0


@dataclass(frozen=True, kw_only=True)
class ReceivedMessage:
    """One message the fake smarthost accepted."""

    sender: str  # "" for <>
    recipients: tuple[str, ...]  # the accepted ones, as given
    mail_params: tuple[str, ...]  # the MAIL FROM parameters, e.g. ("SIZE=120", "BODY=8BITMIME")
    data: bytes  # the content, dot-unstuffed, without the terminating "."
    connection: int  # 0 for the first connection the fake accepted, 1 for the next, ...
    username: str | None  # the login, when the client authenticated
    tls: bool  # the message came inside TLS
    client_names: tuple[str, ...]  # DNS names of the client certificate, when one was required
    # The RCPT TO parameters of each accepted recipient, in order, e.g. (("NOTIFY=NEVER",), ())
    recipient_params: tuple[tuple[str, ...], ...] = ()


class _Closed(Exception):
    """The client went away."""


class FakeSmarthost:
    """An SMTP relay for tests. Start it with :func:`running_smarthost` (or ``serve``).

    ``tls`` is ``"starttls"`` (offered unless ``offer_starttls`` is False), ``"implicit"``
    (TLS from the first byte) or ``"none"``; with TLS the certificate is ``ca``'s
    ``localhost`` certificate. ``require_tls`` (default: on when TLS is possible) refuses
    AUTH and MAIL before TLS with ``530 5.7.0``. With ``username`` and ``password`` set, AUTH
    (``mechanisms``) is offered and required for MAIL. ``recipient_replies`` answers RCPT TO
    per address (case-insensitive); ``mail_reply`` answers every MAIL FROM (e.g. a ``451`` for
    "try again later"); ``data_reply`` answers every message body; ``client_ca`` demands a
    client certificate signed by that CA. ``offer_dsn`` announces DSN (RFC 3461) as Postfix
    does; without it, MAIL with ``RET``/``ENVID`` and RCPT with ``NOTIFY``/``ORCPT`` are
    refused with ``555 5.5.4``, like a server that does not know the extension.
    """

    def __init__(
        self,
        *,
        ca: TestCA | None = None,
        tls: str = "starttls",
        offer_starttls: bool = True,
        require_tls: bool | None = None,
        username: str | None = None,
        password: str | None = None,
        mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
        recipient_replies: Mapping[str, Reply] | None = None,
        mail_reply: Reply | None = None,
        data_reply: Reply | None = None,
        client_ca: Path | None = None,
        hostname: str = "smarthost.test",
        max_size: int = 10 * 1024 * 1024,
        offer_dsn: bool = False,
    ) -> None:
        if tls not in ("starttls", "implicit", "none"):
            raise ValueError(f"tls must be starttls, implicit or none, not {tls!r}")
        if tls != "none" and ca is None:
            raise ValueError("TLS needs a TestCA for the server certificate")
        self.tls = tls
        self.offer_starttls = offer_starttls and tls == "starttls"
        self.require_tls = (tls != "none") if require_tls is None else require_tls
        self.username = username
        self.password = password
        self.mechanisms = tuple(m.upper() for m in mechanisms)
        self.recipient_replies = {k.lower(): v for k, v in (recipient_replies or {}).items()}
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        self.hostname = hostname
        self.max_size = max_size
        self.offer_dsn = offer_dsn
        self.port = 0
        self.messages: list[ReceivedMessage] = []
        self.transcripts: list[list[str]] = []
        self.errors: list[str] = []
        self._changed = trio.Event()
        self._open: set[trio.CancelScope] = set()
        self._context: ssl.SSLContext | None = None
        if ca is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(ca.cert_path), str(ca.key_path))
            if client_ca is not None:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(str(client_ca))
            self._context = ctx

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` for a ``hosts`` entry."""
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """How many connections were accepted so far."""
        return len(self.transcripts)

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` is true, checking after every change (message, connection).

        Raises ``trio.TooSlowError`` after :data:`WAIT_LIMIT` seconds; wrap the call in
        ``trio.fail_after`` for a shorter bound.
        """
        with trio.fail_after(WAIT_LIMIT):
            while not done():
                await self._changed.wait()

    async def wait_for_messages(self, count: int = 1) -> list[ReceivedMessage]:
        """Wait until ``count`` messages arrived and return the first ``count``."""
        await self.wait_until(lambda: len(self.messages) >= count)
        return self.messages[:count]

    def drop_connections(self) -> None:
        """Close every open connection without a word, as a server timing out idle clients."""
        for scope in self._open:
            scope.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Listen on a free loopback port (``task_status.started(port)``) until cancelled."""
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, tcp: trio.SocketStream) -> None:
        number = len(self.transcripts)
        transcript: list[str] = []
        self.transcripts.append(transcript)
        self._notify()
        stream: trio.abc.Stream = tcp
        scope = trio.CancelScope()
        self._open.add(scope)
        try:
            with scope:
                if self.tls == "implicit":
                    stream = await self._wrap(tcp)
                await _Dialogue(self, stream, number, transcript).run()
            if scope.cancelled_caught:
                self.errors.append(f"connection {number}: dropped by drop_connections()")
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                trio.TooSlowError) as exc:
            self.errors.append(f"connection {number}: {exc!r}")
        finally:
            self._open.discard(scope)
            await trio.aclose_forcefully(tcp)  # under TLS too: no close_notify, as a crash
            self._notify()

    async def _wrap(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        assert self._context is not None
        tls = trio.SSLStream(stream, self._context, server_side=True)
        with trio.fail_after(10):
            await tls.do_handshake()
        return tls


class _Dialogue:
    """One connection's SMTP conversation."""

    def __init__(self, fake: FakeSmarthost, stream: trio.abc.Stream, number: int,
                 transcript: list[str]) -> None:
        self.fake = fake
        self.stream = stream
        self.number = number
        self.transcript = transcript
        self.buffer = bytearray()
        self.in_tls = fake.tls == "implicit"
        self.greeted = False
        self.user: str | None = None
        self.sender: str | None = None
        self.params: tuple[str, ...] = ()
        self.recipients: list[str] = []
        self.recipient_params: list[tuple[str, ...]] = []
        self.handlers: dict[str, Callable[[str], Awaitable[bool]]] = {
            "EHLO": self.do_ehlo, "HELO": self.do_helo, "STARTTLS": self.do_starttls,
            "AUTH": self.do_auth, "MAIL": self.do_mail, "RCPT": self.do_rcpt,
            "DATA": self.do_data, "RSET": self.do_rset, "NOOP": self.do_noop,
            "QUIT": self.do_quit,
        }

    async def reply(self, code: int, status: str, text: str, *more: str) -> None:
        await self.stream.send_all(Reply.make(code, status, text, *more).to_bytes())

    async def send(self, reply: Reply) -> None:
        await self.stream.send_all(reply.to_bytes())

    async def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > _MAX_LINE:
                raise _Closed("line too long")
            with trio.fail_after(60):
                data = await self.stream.receive_some(65536)
            if not data:
                raise _Closed("client closed the connection")
            self.buffer += data
        out = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return out

    async def run(self) -> None:
        await self.stream.send_all(f"220 {self.fake.hostname} ESMTP fake smarthost\r\n".encode())
        while True:
            raw = await self.line()
            text = raw.decode("utf-8", "replace")
            verb, _, argument = text.partition(" ")
            verb = verb.upper()
            self.transcript.append(f"AUTH {argument.split(' ')[0]} ***" if verb == "AUTH"
                                   else text)
            handler = self.handlers.get(verb)
            if handler is None:
                await self.reply(500, "5.5.2", "Command not recognised")
            elif await handler(argument):
                return

    async def do_ehlo(self, argument: str) -> bool:
        fake = self.fake
        lines = [fake.hostname, "PIPELINING", f"SIZE {fake.max_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if fake.offer_dsn:
            lines.append("DSN")
        if fake.offer_starttls and not self.in_tls:
            lines.append("STARTTLS")
        if fake.username is not None and (self.in_tls or not fake.require_tls):
            lines.append("AUTH " + " ".join(fake.mechanisms))
        self.greeted = True
        self.reset()
        await self.send(Reply(code=250, lines=tuple(lines)))
        return False

    async def do_helo(self, argument: str) -> bool:
        self.greeted = True
        self.reset()
        await self.send(Reply(code=250, lines=(self.fake.hostname,)))
        return False

    async def do_starttls(self, argument: str) -> bool:
        if not self.fake.offer_starttls or self.in_tls:
            await self.reply(502, "5.5.1", "STARTTLS not available")
            return False
        await self.reply(220, "2.0.0", "Ready to start TLS")
        self.buffer.clear()  # RFC 3207 §4.2: nothing pipelined in plaintext is kept
        self.stream = await self.fake._wrap(self.stream)
        self.in_tls = True
        self.greeted = False
        self.user = None
        self.reset()
        return False

    def _tls_missing(self) -> bool:
        return self.fake.require_tls and not self.in_tls

    async def do_auth(self, argument: str) -> bool:
        fake = self.fake
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if self._tls_missing():
            await self.reply(530, "5.7.0", "Must issue a STARTTLS command first")
        elif fake.username is None or mechanism not in fake.mechanisms:
            await self.reply(504, "5.5.4", "Unrecognized authentication type")
        elif self.user is not None:
            await self.reply(503, "5.5.1", "Already authenticated")
        else:
            login = await (self._plain(initial) if mechanism == "PLAIN" else self._login())
            if login is not None and login == (fake.username, fake.password):
                self.user = login[0]
                await self.reply(235, "2.7.0", "Authentication successful")
            else:
                await self.reply(535, "5.7.8", "Authentication credentials invalid")
        return False

    async def _challenge(self, prompt: str) -> str | None:
        await self.stream.send_all(f"334 {prompt}\r\n".encode())
        answer = await self.line()
        self.transcript.append("***")
        try:
            return base64.b64decode(answer, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None

    async def _plain(self, initial: str) -> tuple[str, str] | None:
        if initial:
            try:
                text: str | None = base64.b64decode(initial, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                text = None
        else:
            text = await self._challenge("")
        parts = text.split("\0") if text is not None else []
        return (parts[1], parts[2]) if len(parts) == 3 else None

    async def _login(self) -> tuple[str, str] | None:
        user = await self._challenge("VXNlcm5hbWU6")
        password = await self._challenge("UGFzc3dvcmQ6")
        return (user, password) if user is not None and password is not None else None

    async def do_mail(self, argument: str) -> bool:
        path, params = _path(argument, "FROM:")
        if self._tls_missing():
            await self.reply(530, "5.7.0", "Must issue a STARTTLS command first")
        elif not self.greeted:
            await self.reply(503, "5.5.1", "Send EHLO first")
        elif self.fake.username is not None and self.user is None:
            await self.reply(530, "5.7.0", "Authentication required")
        elif self.sender is not None:
            await self.reply(503, "5.5.1", "Nested MAIL command")
        elif path is None:
            await self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        elif self._unoffered(params, ("RET", "ENVID")):
            await self.reply(555, "5.5.4", "Unsupported option")
        elif self.fake.mail_reply is not None and self.fake.mail_reply.code >= 400:
            await self.send(self.fake.mail_reply)
        else:
            self.sender, self.params = path, params
            await self.send(self.fake.mail_reply or Reply.make(250, "2.1.0", "Sender ok"))
        return False

    async def do_rcpt(self, argument: str) -> bool:
        path, params = _path(argument, "TO:")
        if self.sender is None:
            await self.reply(503, "5.5.1", "Need MAIL command")
        elif not path:
            await self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        elif self._unoffered(params, ("NOTIFY", "ORCPT")):
            await self.reply(555, "5.5.4", "Unsupported option")
        else:
            answer = self.fake.recipient_replies.get(path.lower())
            if answer is None or answer.code < 400:
                self.recipients.append(path)
                self.recipient_params.append(params)
            await self.send(answer or Reply.make(250, "2.1.5", "Recipient ok"))
        return False

    def _unoffered(self, params: tuple[str, ...], dsn: tuple[str, ...]) -> bool:
        """A DSN parameter sent although DSN was not offered (RFC 3461 §4)."""
        return not self.fake.offer_dsn and any(
            p.partition("=")[0].upper() in dsn for p in params
        )

    async def do_data(self, argument: str) -> bool:
        if self.sender is None or not self.recipients:
            await self.reply(554, "5.5.1", "No valid recipients")  # RFC 2920 §3.1
            return False
        await self.stream.send_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        content = bytearray()
        while (line := await self.line()) != b".":
            content += (line[1:] if line.startswith(b".") else line) + b"\r\n"
            if len(content) > self.fake.max_size:
                raise _Closed("message too large")
        answer = self.fake.data_reply or Reply.make(
            250, "2.0.0", f"Ok: queued as FAKE{len(self.fake.messages)}")
        if answer.code < 400:
            self.fake.messages.append(ReceivedMessage(
                sender=self.sender, recipients=tuple(self.recipients), mail_params=self.params,
                data=bytes(content), connection=self.number, username=self.user,
                tls=self.in_tls, client_names=self._client_names(),
                recipient_params=tuple(self.recipient_params)))
            self.fake._notify()
        self.reset()
        await self.send(answer)
        return False

    def _client_names(self) -> tuple[str, ...]:
        if not isinstance(self.stream, trio.SSLStream):
            return ()
        cert: Any = self.stream.getpeercert()
        if not cert:
            return ()
        return tuple(value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")

    def reset(self) -> None:
        self.sender = None
        self.params = ()
        self.recipients = []
        self.recipient_params = []

    async def do_rset(self, argument: str) -> bool:
        self.reset()
        await self.reply(250, "2.0.0", "Ok")
        return False

    async def do_noop(self, argument: str) -> bool:
        await self.reply(250, "2.0.0", "Ok")
        return False

    async def do_quit(self, argument: str) -> bool:
        await self.reply(221, "2.0.0", "Bye")
        return True


def _path(argument: str, prefix: str) -> tuple[str | None, tuple[str, ...]]:
    """``FROM:<a@b> SIZE=1`` -> ``("a@b", ("SIZE=1",))``; None when malformed."""
    if not argument.upper().startswith(prefix):
        return None, ()
    rest = argument[len(prefix):].lstrip(" ")
    if not rest.startswith("<") or ">" not in rest:
        return None, ()
    path, _, params = rest[1:].partition(">")
    return path, tuple(params.split())


@asynccontextmanager
async def running_smarthost(**options: Any) -> AsyncIterator[FakeSmarthost]:
    """Start a :class:`FakeSmarthost` (keyword arguments as for it); stop it on exit."""
    fake = FakeSmarthost(**options)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()
