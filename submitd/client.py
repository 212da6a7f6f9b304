"""An SMTP client on trio, for relaying queued mail to a smarthost (RFC 5321, RFC 6409).

The conversation itself lives in the sans-I/O :class:`~submitd.protocol.ClientConnection`;
this module only moves bytes: it connects, reads under the RFC 5321 §4.5.3.2 deadlines, wraps
the stream in TLS (implicit, RFC 8314, or STARTTLS, RFC 3207) and streams the stored message
from disk in worker threads. Every failure of the transport (``OSError``, trio's stream
errors, timeouts, a server breaking the protocol) becomes :class:`SMTPClientError` at one
boundary, :meth:`SMTPClient._boundary`. The settings, result and error types (and that mapping)
are defined in ``submitd._client_types`` and exported from here.

Credentials are sent only inside TLS, never on ``tls = none``: a password with AUTH PLAIN or
LOGIN (RFC 4954, RFC 4616), or an OAuth 2.0 bearer token with AUTH XOAUTH2 (the exchange of
RFC 7628 in Google's and Microsoft's older framing). Neither the password nor the token
appears in an exception, repr or log line; replies that echo them back have them blanked.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import trio

from ._client_types import (
    TRANSPORT_ERRORS,
    ClientSettings,
    ClientTimeouts,
    ClientTLSMode,
    SMTPClientError,
    TransactionResult,
    connect_error,
    detail,
    transport_error,
)
from ._logfmt import logfmt
from .message import MessageHandle
from .protocol import (
    NEED_DATA,
    ClientConnection,
    ClientState,
    ContentScanner,
    MailParams,
    Reply,
    TransactionPlan,
    blank_secret,
    choose_mechanism,
    parse_extensions,
    plan_transaction,
)
from .protocol._client_oauth import XOAUTH2, offers_xoauth2, xoauth2_error
from .secret import Secret
from .views import Recipient

__all__ = [
    "ClientSettings",
    "ClientTLSMode",
    "ClientTimeouts",
    "SMTPClient",
    "SMTPClientError",
    "TransactionResult",
]

_log = logging.getLogger("submitd.client")

#: The body is read from disk and written in pieces of this size (one worker-thread trip and
#: one TLS write each).
CHUNK_SIZE = 256 * 1024
#: Replies are read in pieces of at most this size.
_RECEIVE_SIZE = 64 * 1024
#: QUIT and the TLS close_notify get at most this long when closing.
_CLOSE_DEADLINE = 5.0
#: A server that answers every SASL response with another 334 is cut off after this many.
_MAX_SASL_STEPS = 4
#: The error for a transaction or RSET on a connection that failed or was closed.
_UNUSABLE = Reply.make(451, "4.4.2", "the connection is no longer usable")


def _scan(message: MessageHandle) -> tuple[ContentScanner, bytes | None]:
    """Read the stored message once (blocking: run in a worker thread).

    Returns what the plan needs to know of the content and, for a message that fits in one
    chunk (most of them), its bytes: the body is then sent without opening the file again.
    """
    scanner = ContentScanner(message.body_offset)
    with message.open() as f:
        first = f.read(CHUNK_SIZE)
        whole = first if len(first) < CHUNK_SIZE else None  # a short read of a file is its end
        if first:
            scanner.feed(first)
        while not scanner.done and (chunk := f.read(CHUNK_SIZE)):
            scanner.feed(chunk)
    return scanner, whole


class SMTPClient:
    """One connection to an SMTP server; :meth:`connect` opens it, :meth:`aclose` ends it.

    ``extensions`` maps the EHLO keywords (upper-case) to their parameters; ``remote`` is the
    host name, for ``DeliveryOutcome.remote`` and logs. One transaction at a time.
    """

    def __init__(self, settings: ClientSettings, stream: trio.abc.Stream) -> None:
        self._settings = settings
        self._timeouts = settings.timeouts
        self._stream = stream
        self._conn = ClientConnection(tls_active=False)
        self._usable = True
        self._closed = False
        self.extensions: Mapping[str, str] = types.MappingProxyType({})
        self.remote = settings.host

    def __repr__(self) -> str:
        s = self._settings
        return f"<SMTPClient {s.host}:{s.port} tls={s.tls.value} usable={self.usable}>"

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use (``"TLSv1.3"``), or None on a plaintext connection."""
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            version = stream.version()
            return str(version) if version else None
        return None

    @property
    def usable(self) -> bool:
        """False after an error, a 421, or :meth:`aclose`."""
        return self._usable and not self._closed and self._conn.state is ClientState.READY

    # -- the transport boundary ---------------------------------------------------------------

    @contextmanager
    def _boundary(self, stage: str, action: str) -> Iterator[None]:
        """Map every transport and protocol failure to :class:`SMTPClientError`."""
        try:
            yield
        except SMTPClientError:
            self._usable = False
            raise
        except TRANSPORT_ERRORS as exc:
            self._usable = False
            raise transport_error(exc, stage, action) from None

    async def _write(self, data: bytes, stage: str, seconds: float, what: str) -> None:
        # One line per body chunk would drown the log.
        if what != "message" and _log.isEnabledFor(logging.DEBUG):
            _log.debug(logfmt("smtp_client_send", remote=self.remote, command=what))
        with self._boundary(stage, f"sending {what}"), trio.fail_after(seconds):
            await self._stream.send_all(data)

    async def _read(self, stage: str, seconds: float) -> Reply:
        """The next reply; a ``421`` (the server is closing) raises."""
        waiting_for = self._conn.expected[0].value if self._conn.expected else "reply"
        with self._boundary(stage, f"waiting for the reply to {waiting_for}"):
            with trio.fail_after(seconds):
                while (event := self._conn.next_event()) is NEED_DATA:
                    self._conn.receive_data(await self._stream.receive_some(_RECEIVE_SIZE))
            s = self._settings
            reply = blank_secret(event.reply, s.username, s.password, oauth_token=s.oauth_token)
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(logfmt("smtp_client_reply", remote=self.remote, to=event.to.value,
                                  reply=str(reply)))
            if reply.code == 421:
                raise SMTPClientError(stage, reply)
        return reply

    async def _command(self, data: bytes, stage: str, seconds: float, what: str) -> Reply:
        await self._write(data, stage, seconds, what)
        return await self._read(stage, seconds)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, settings: ClientSettings) -> SMTPClient:
        """Connect, read the greeting, EHLO (HELO on 5xx), STARTTLS + EHLO, then AUTH.

        With a password AUTH PLAIN is preferred, LOGIN used when PLAIN is not offered; with
        an OAuth token AUTH XOAUTH2 is used and must be offered (else ``504 5.5.4``). AUTH
        happens only when credentials are set, and only inside TLS. Raises
        :class:`SMTPClientError` (with ``oauth_error`` when the provider refused the token).
        """
        where = f"{settings.host}:{settings.port}"
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(logfmt("smtp_client_connect", remote=where, tls=settings.tls.value))
        try:
            with trio.fail_after(settings.timeouts.connect):
                stream = await trio.open_tcp_stream(settings.host, settings.port)
        except (trio.TooSlowError, OSError) as exc:
            raise connect_error(exc, where) from None
        client = cls(settings, stream)
        try:
            await client._open()
        except BaseException:
            client._usable = False
            await client._abort()
            raise
        return client

    async def _open(self) -> None:
        s, t = self._settings, self._timeouts
        if s.tls is ClientTLSMode.IMPLICIT:
            await self._start_tls()
            self._conn = ClientConnection(tls_active=True)
        greeting = await self._read("greeting", t.greeting)
        if greeting.code != 220:
            raise SMTPClientError("greeting", greeting)
        await self._hello()
        if s.tls is ClientTLSMode.STARTTLS:
            if "STARTTLS" not in self.extensions:  # never a silent downgrade
                reply = Reply.make(454, "4.7.0", f"STARTTLS not offered by {s.host}")
                raise SMTPClientError("starttls", reply)
            reply = await self._command(self._conn.send_starttls(), "starttls", t.greeting,
                                        "STARTTLS")
            if reply.code != 220:
                raise SMTPClientError("starttls", reply)
            if self._conn.trailing_data:
                _log.warning(logfmt("smtp_client_starttls_injection", remote=self.remote,
                                    discarded=self._conn.trailing_data))
            await self._start_tls()
            self._conn.tls_started()
            await self._hello()
        if s.username and s.oauth_token:
            await self._auth_xoauth2(s.username, s.oauth_token)
        elif s.username and s.password:
            await self._auth(s.username, s.password)

    async def _start_tls(self) -> None:
        s = self._settings
        assert s.ssl_context is not None  # ClientSettings guarantees it
        stream = trio.SSLStream(self._stream, s.ssl_context,
                                server_hostname=s.server_hostname or s.host)
        self._stream = stream
        with self._boundary("tls", "in the TLS handshake"), trio.fail_after(
            self._timeouts.greeting
        ):
            await stream.do_handshake()
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(logfmt("smtp_client_tls", remote=self.remote, version=stream.version(),
                              cipher=(stream.cipher() or ("",))[0]))

    async def _hello(self) -> None:
        t, name = self._timeouts, self._settings.helo_name
        reply = await self._command(self._conn.send_ehlo(name), "ehlo", t.greeting, "EHLO")
        if reply.code // 100 == 2:
            self.extensions = types.MappingProxyType(dict(parse_extensions(reply)))
            return
        if reply.code // 100 != 5:
            raise SMTPClientError("ehlo", reply)
        reply = await self._command(self._conn.send_helo(name), "ehlo", t.greeting, "HELO")
        if reply.code // 100 != 2:
            raise SMTPClientError("ehlo", reply)
        self.extensions = types.MappingProxyType({})

    async def _auth(self, username: str, password: Secret) -> None:
        mechanism = choose_mechanism(self.extensions)
        if mechanism is None:
            offered = detail(self.extensions.get("AUTH", "nothing"))
            raise SMTPClientError("auth", Reply.make(504, "5.5.4", f"no usable AUTH mechanism "
                                                     f"among those offered: {offered}"))
        data = self._conn.send_auth(mechanism, username, password)
        reply, _ = await self._sasl(data, mechanism.value)
        if reply.code // 100 != 2:
            raise SMTPClientError("auth", reply)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(logfmt("smtp_client_authenticated", remote=self.remote,
                              mechanism=mechanism.value))

    async def _auth_xoauth2(self, username: str, token: Secret) -> None:
        """AUTH XOAUTH2; a refusal keeps the provider's JSON error as ``oauth_error``."""
        if not offers_xoauth2(self.extensions):
            reply = Reply.make(504, "5.5.4", f"{XOAUTH2} not offered by {self.remote}")
            raise SMTPClientError("auth", reply)
        reply, challenge = await self._sasl(self._conn.send_auth_xoauth2(username, token),
                                            XOAUTH2)
        if reply.code // 100 != 2:
            oauth_error = None
            if challenge is not None:
                oauth_error = xoauth2_error(challenge, secrets=(token.reveal(),))
            raise SMTPClientError("auth", reply, oauth_error=oauth_error)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(logfmt("smtp_client_authenticated", remote=self.remote, mechanism=XOAUTH2,
                              username=username))

    async def _sasl(self, data: bytes, mechanism: str) -> tuple[Reply, Reply | None]:
        """Send the AUTH line, answer each ``334``; the final reply and the first challenge."""
        seconds = self._timeouts.greeting
        reply = await self._command(data, "auth", seconds, f"AUTH {mechanism}")
        first: Reply | None = None
        for _ in range(_MAX_SASL_STEPS):
            if reply.code != 334:
                break
            if first is None:
                first = reply
            data = self._conn.send_auth_response()
            reply = await self._command(data, "auth", seconds, "<SASL response>")
        return reply, first

    # -- transactions -------------------------------------------------------------------------

    async def send(
        self,
        *,
        sender: str,
        recipients: Sequence[Recipient],
        message: MessageHandle,
        params: MailParams,
    ) -> TransactionResult:
        """Run one MAIL/RCPT/DATA transaction; see :class:`TransactionResult` for the replies.

        ``params`` are the original MAIL parameters; SIZE, BODY and SMTPUTF8 are worked out
        again from the stored message and what the server offers, and ``params.auth`` is never
        passed on. RET and ENVID (and the recipients' NOTIFY and ORCPT) are sent only when
        the server offers DSN (RFC 3461 §4); ``TransactionResult.dsn_passed_on`` says whether
        they were. Raises :class:`SMTPClientError` if the connection breaks.
        """
        if not self.usable:
            raise SMTPClientError("mail", _UNUSABLE)
        try:
            return await self._transaction(sender, list(recipients), message, params)
        except BaseException:
            self._usable = False
            await self._abort()
            raise

    async def _transaction(
        self, sender: str, recipients: list[Recipient], message: MessageHandle,
        params: MailParams,
    ) -> TransactionResult:
        """Plan from the extensions and the content, then MAIL/RCPT, DATA and the body."""
        with self._local_file():
            content, whole = await trio.to_thread.run_sync(_scan, message)
        plan = plan_transaction(
            extensions=self.extensions, sender=sender,
            recipients=[(r.address, r.params) for r in recipients], size=message.size,
            eight_bit=content.eight_bit, utf8_headers=content.utf8_headers,
            ret=params.ret, envid=params.envid,
        )
        replies = dict(plan.refused)
        done = partial(TransactionResult, replies=replies, dsn_passed_on=plan.dsn)
        if not plan.recipients:
            return done()
        accepted = await self._envelope(sender, plan, replies)
        if not accepted:
            await self._reset_after_failure()
            return done()
        t = self._timeouts
        reply = await self._command(self._conn.send_data(), "data", t.data_init, "DATA")
        if reply.code != 354:
            replies.update((address, reply) for address in accepted)
            await self._reset_after_failure()
            return done()
        await self._body(message, whole)
        reply = await self._read("data", t.data_end)
        replies.update((address, reply) for address in accepted)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(logfmt("smtp_client_sent", remote=self.remote, size=message.size,
                              accepted=len(accepted), reply=str(reply), dsn=plan.dsn))
        return done()

    async def _envelope(
        self, sender: str, plan: TransactionPlan, replies: dict[str, Reply]
    ) -> list[str]:
        """MAIL and RCPT, pipelined when offered (RFC 2920); returns the accepted addresses."""
        t, addresses = self._timeouts, plan.recipients
        rcpt_replies: list[Reply] = []
        if "PIPELINING" in self.extensions:
            data = self._conn.send_envelope(sender, plan.params, addresses,
                                            plan.recipient_params)
            await self._write(data, "mail", t.mail, f"MAIL + {len(addresses)} RCPT")
            mail = await self._read("mail", t.mail)
            rcpt_replies = [await self._read("rcpt", t.rcpt) for _ in addresses]
        else:
            mail = await self._command(self._conn.send_mail(sender, plan.params), "mail",
                                       t.mail, "MAIL")
            if mail.code // 100 == 2:
                for address, params in zip(addresses, plan.recipient_params, strict=True):
                    rcpt_replies.append(await self._command(
                        self._conn.send_rcpt(address, params), "rcpt", t.rcpt, "RCPT"))
        if mail.code // 100 != 2:
            replies.update((address, mail) for address in addresses)
            return []
        replies.update(zip(addresses, rcpt_replies, strict=True))
        return [a for a, reply in zip(addresses, rcpt_replies, strict=True)
                if reply.code // 100 == 2]

    @contextmanager
    def _local_file(self) -> Iterator[None]:
        """Reading the stored message failed: not the server's fault, but the attempt's end."""
        try:
            yield
        except OSError as exc:
            reply = Reply.make(451, "4.3.0", f"cannot read the stored message: "
                               f"{detail(exc.strerror or exc)}")
            raise SMTPClientError("data", reply) from None

    async def _body(self, message: MessageHandle, whole: bytes | None) -> None:
        """Send the stored message: ``whole`` if the scan read all of it, else from the file.

        From the file, it is read in a worker thread and written one chunk at a time.
        """
        t = self._timeouts
        if whole is not None:
            if data := self._conn.send_body(whole):
                await self._write(data, "data", t.data_block, "message")
            await self._write(self._conn.end_body(), "data", t.data_block, "end of message")
            return
        with self._local_file():
            f = await trio.to_thread.run_sync(message.open)
        try:
            while True:
                with self._local_file():
                    chunk = await trio.to_thread.run_sync(f.read, CHUNK_SIZE)
                if not chunk:
                    break
                if data := self._conn.send_body(chunk):
                    await self._write(data, "data", t.data_block, "message")
            await self._write(self._conn.end_body(), "data", t.data_block, "end of message")
        finally:
            f.close()

    async def _reset_after_failure(self) -> None:
        """RSET after a failed transaction; a broken RSET only costs the connection."""
        try:
            await self.reset()
        except SMTPClientError as exc:
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(logfmt("smtp_client_reset_failed", remote=self.remote, error=str(exc)))
            await self._abort()

    async def reset(self) -> None:
        """RSET: abort the current transaction. Raises :class:`SMTPClientError`."""
        if not self.usable:
            raise SMTPClientError("reset", _UNUSABLE)
        reply = await self._command(self._conn.send_rset(), "reset", self._timeouts.greeting,
                                    "RSET")
        if reply.code // 100 != 2:
            self._usable = False
            raise SMTPClientError("reset", reply)

    # -- closing ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """QUIT (best effort, short deadline), then close the connection. Never raises."""
        if self._closed:
            return
        try:
            if self.usable:
                with trio.move_on_after(min(_CLOSE_DEADLINE, self._timeouts.greeting)):
                    await self._command(self._conn.send_quit(), "reset", _CLOSE_DEADLINE,
                                        "QUIT")
        except Exception as exc:  # closing is best effort; Cancelled still propagates
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(logfmt("smtp_client_quit_failed", remote=self.remote, error=str(exc)))
        finally:
            self._usable = False
            await self._abort()

    async def _abort(self) -> None:
        """Close the stream (TLS close_notify if it goes quickly), forget the connection."""
        if self._closed:
            return
        self._closed = True
        with trio.move_on_after(_CLOSE_DEADLINE):
            try:
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            else:
                return
        await trio.aclose_forcefully(self._stream)

