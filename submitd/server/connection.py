"""The connection driver: bytes between a trio stream and the protocol core, under deadlines.

It holds no policy. Per connection: take a slot, (implicit TLS) handshake, greet, then loop —
flush replies, read under the command or DATA deadline, feed the core, hand events to the
session. It catches every exception at its top: in trio one escaping handler would stop
``serve_listeners`` and with it the whole service.

A committed message's ``250`` is sent at once and shielded from cancellation, so a shutdown
can never turn "queued" into a ``421`` the client would answer by sending the message again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import ssl
from collections.abc import Callable

import trio

from .._logfmt import logfmt
from ..config import ListenerConfig, ListenMode
from ..protocol import (
    NEED_DATA,
    ConnectionClosed,
    ProtocolLimits,
    Reply,
    ServerConnection,
    StartTLS,
)
from ..protocol import catalogue as R
from ..session import ServerContext, Session, refusal_reason
from ..views import SessionInfo
from .deadlines import ReadDeadlines, Stress
from .limits import ConnectionLimiter, Refused, Slot
from .tls import FirstBytes, TLSContextHolder, explain_tls_failure, receive_buffered, tls_error

__all__ = ["ConnectionHandler", "explain_tls_failure", "protocol_limits"]

log = logging.getLogger("submitd.connection")

R_TOO_MANY = Reply.make(421, "4.7.0", "Too many connections, try again later")
R_TOO_OFTEN = Reply.make(421, "4.7.0", "Too many new connections from your address, try later")

_RECEIVE_SIZE = 65536
# In DATA, what one pass of the loop takes from TLS: the records already received, up to this.
_DATA_RECEIVE_SIZE = 262_144
_REFUSAL_TIMEOUT = 5.0
_LINGER = 1.0
_CLOSE_TIMEOUT = 1.0
_MAX_TLS_REFUSALS = 32
# The longest a reply may take to go out; shorter when the session's read deadline is.
_SEND_TIMEOUT = 60.0
_CLOSING_REPLY_TIMEOUT = 5.0
# A 250 for a committed message is a few dozen bytes: its send blocks only when the client
# stopped reading long ago, so a short deadline is enough and keeps a shutdown short.
_ACK_TIMEOUT = 15.0
_session_counter = itertools.count(1)
_session_prefix = os.urandom(3).hex()


def _new_session_id() -> str:
    return f"{_session_prefix}{next(_session_counter):06x}"


def protocol_limits(ctx: ServerContext) -> ProtocolLimits:
    """The slice of ``[limits]`` the protocol core enforces."""
    lim = ctx.config.limits
    return ProtocolLimits(
        max_message_size=lim.max_message_size,
        max_recipients=lim.max_recipients,
        max_header_size=lim.max_header_size,
        max_auth_failures=lim.max_auth_failures,
        max_errors=lim.max_errors,
        max_transactions=lim.max_transactions,
        max_junk_commands=lim.max_junk_commands,
    )


def _peer(stream: trio.abc.Stream) -> tuple[str, int]:
    sock = getattr(stream, "socket", None)
    try:
        addr = sock.getpeername() if sock is not None else ("unknown", 0)
    except OSError:
        return "unknown", 0
    return str(addr[0]), int(addr[1])


def _local_port(stream: trio.abc.Stream) -> int:
    sock = getattr(stream, "socket", None)
    try:
        return int(sock.getsockname()[1]) if sock is not None else 0
    except OSError:
        return 0


class ConnectionHandler:
    """Serve one listener's connections; one instance per ``[[listen]]`` table."""

    def __init__(
        self,
        *,
        listener: ListenerConfig,
        context: Callable[[], ServerContext],
        tls: TLSContextHolder,
        limiter: ConnectionLimiter,
        stress: Stress,
    ) -> None:
        self.listener = listener
        self._context = context
        self._tls = tls
        self._limiter = limiter
        self._stress = stress
        #: Cancel scopes of the running sessions; the server cancels them when draining ends.
        self.active: set[trio.CancelScope] = set()
        self.idle = trio.Event()
        self.idle.set()
        self._refusing = 0

    async def __call__(self, stream: trio.abc.Stream) -> None:
        """Entry point for ``trio.serve_listeners``; never raises (but lets Cancelled through)."""
        host, port = _peer(stream)
        sid = _new_session_id()
        slot = self._limiter.acquire(host)
        if isinstance(slot, Refused):
            reply = R_TOO_OFTEN if slot.rate else R_TOO_MANY
            log.info(logfmt("connection_refused", session=sid, peer=host, reply=reply.code,
                            reason=slot.reason))
            await self._refuse(stream, reply)
            return
        self._stress.update(self._limiter.total, self._limiter.max_total)
        scope = trio.CancelScope()
        self.active.add(scope)
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        try:
            await self._serve(stream, sid, slot, port, scope)
        finally:
            self._release(slot)
            self.active.discard(scope)
            if not self.active:
                self.idle.set()

    def _release(self, slot: Slot) -> None:
        """Give the slot back (once): when the session ends, not when the socket is closed.

        A client that reconnects as soon as it has read the ``221`` must find the slot free,
        so it is given back before the last reply is sent: the closing that follows (the last
        reply, lingering, the TLS close) is bounded by its own deadlines, a few seconds.
        """
        if not slot.released:
            self._limiter.release(slot)
            self._stress.update(self._limiter.total, self._limiter.max_total)

    async def _refuse(self, stream: trio.abc.Stream, reply: Reply) -> None:
        """Tell an over-the-cap client ``reply`` (inside TLS on an implicit listener).

        Refusals are cheap on a STARTTLS listener; on an implicit one they cost a handshake,
        so only a few run at once and the rest are closed without a word.
        """
        implicit = self.listener.mode is ListenMode.IMPLICIT
        if implicit and self._refusing >= _MAX_TLS_REFUSALS:
            await trio.aclose_forcefully(stream)
            return
        self._refusing += 1
        try:
            with trio.move_on_after(_REFUSAL_TIMEOUT), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, OSError
            ):
                if implicit:
                    tls_stream = trio.SSLStream(stream, self._tls.context, server_side=True)
                    stream = tls_stream
                    await tls_stream.do_handshake()
                await stream.send_all(reply.to_bytes())
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(
        self, stream: trio.abc.Stream, sid: str, slot: Slot, port: int, scope: trio.CancelScope
    ) -> None:
        host = slot.ip
        ctx = self._context()
        implicit = self.listener.mode is ListenMode.IMPLICIT
        info = SessionInfo(
            session_id=sid, config=ctx.config, listener=self.listener, peer_host=host,
            peer_port=port,
        )
        conn = ServerConnection(
            hostname=ctx.config.hostname,
            limits=protocol_limits(ctx),
            tls_active=implicit,
            tls_available=True,
        )
        session = Session(ctx, conn, info)
        log.info(logfmt("connect", session=sid, peer=host, port=port,
                        local_port=_local_port(stream), mode=self.listener.mode.value))
        driver = _Driver(stream, conn, session, self._tls, ctx,
                         deadlines=ReadDeadlines(ctx.config.limits, self._stress),
                         on_login=lambda: self._limiter.logged_in(slot),
                         on_end=lambda: self._release(slot))
        try:
            with scope:
                await driver.run(implicit)
            if scope.cancelled_caught:
                log.info(logfmt("shutdown_closed", session=sid, peer=host,
                                reply=R.SHUTTING_DOWN.code, reason="the server is shutting down"))
                conn.close(R.SHUTTING_DOWN)
                await driver.flush_quietly()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(logfmt("disconnect", session=sid, peer=host, reason=type(exc).__name__))
        except _NotReading:
            # The client stopped reading: its socket buffer is full, and a 421 would not get
            # through either. An ordinary timeout: close at once (no TLS close_notify).
            log.info(logfmt("timeout", session=sid, peer=host, phase="send",
                            reason="the client stopped reading its replies"))
            driver.broken = True
        except Exception:
            # The last line of defence: log with the session id, tell the client if we can.
            log.exception(logfmt("connection_error", session=sid))
            conn.close(R.LOCAL_PROBLEM)
            await driver.flush_quietly()
        finally:
            self._release(slot)
            with trio.CancelScope(shield=True):
                await session.aclose()
                if driver.broken:
                    await trio.aclose_forcefully(driver.stream)
                else:
                    await _close(driver.stream)
            log.info(logfmt("close", session=sid))


class _NotReading(Exception):
    """A reply could not be sent within its deadline: the client stopped reading."""


class _Driver:
    """The read-feed-answer loop for one connection."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: ServerConnection,
        session: Session,
        tls: TLSContextHolder,
        ctx: ServerContext,
        *,
        deadlines: ReadDeadlines,
        on_login: Callable[[], None],
        on_end: Callable[[], None],
    ) -> None:
        self.stream = stream
        self.deadlines = deadlines
        self._on_login: Callable[[], None] | None = on_login
        self._on_end = on_end
        #: The stream cannot be closed politely (a send was cut off).
        self.broken = False
        self.conn = conn
        self.session = session
        self.tls = tls
        self.limits = ctx.config.limits
        self.handshake_timeout = ctx.config.tls.handshake_timeout if ctx.config.tls else 30.0
        self.sid = session.info.session_id
        self.peer = session.info.peer_host
        self.implicit = session.info.listener.mode is ListenMode.IMPLICIT
        self.plain_start = not self.implicit  # the next read is the first in plaintext
        self.eof = False

    async def run(self, implicit: bool) -> None:
        if implicit and not await self._handshake():
            return
        if not await self.session.start():
            await self.flush()
            return
        while True:
            # Replies are flushed only when we are about to wait for the client, so a
            # pipelined batch of commands gets one batch of replies (RFC 2920 §3.2).
            event = self.conn.next_event()
            self._log_refusals()
            if event is NEED_DATA:
                await self.flush()
                if not await self._receive():
                    continue
            elif isinstance(event, StartTLS):
                if event.discarded:
                    log.warning(logfmt("starttls_injection", session=self.sid,
                                       discarded=event.discarded))
                await self.flush()
                if not await self._handshake():
                    return
                self.conn.tls_started()
            elif isinstance(event, ConnectionClosed):
                # The session is over: its slot is free before the client can read the 221.
                self._on_end()
                # The last reply (221, or the 421 that ends the session) goes out even when a
                # shutdown is under way: a client that quit needs no 421 on top.
                await self.flush_quietly()
                log.info(logfmt("closing", session=self.sid, peer=self.peer, reason=event.reason))
                if not event.client_done:
                    await self._linger()
                return
            else:
                await self.session.handle(event)
                if self._on_login is not None and self.session.info.username is not None:
                    self._on_login()  # no longer an unauthenticated session
                    self._on_login = None
                self._log_refusals()  # a refused AUTH can reach the core's failure limit
                if self.session.unacknowledged is not None and not await self._acknowledge():
                    return

    def _log_refusals(self) -> None:
        """One INFO line per refusal the protocol core sent on its own (530, 503, 421, ...)."""
        for refusal in self.conn.take_refusals():
            log.info(logfmt("command_refused", session=self.sid, peer=self.peer,
                            command=refusal.command or None, reply=refusal.reply.code,
                            reason=self._explain(refusal.command, refusal.reply)))

    def _explain(self, command: str, reply: Reply) -> str:
        """The reason for a core refusal in plain words (the reply text when it says enough)."""
        lim = self.limits
        what = command or "a command"
        reasons = {
            R.STARTTLS_REQUIRED: f"the client sent {what} before STARTTLS (TLS is required first)",
            R.AUTH_REQUIRED: f"the client sent {what} without logging in (AUTH is required)",
            R.TOO_MANY_ERRORS: f"too many errors in one session (limit {lim.max_errors})",
            R.TOO_MANY_AUTH_FAILURES:
                f"too many failed logins in one session (limit {lim.max_auth_failures})",
            R.TOO_MANY_TRANSACTIONS:
                f"too many messages in one session (limit {lim.max_transactions})",
            R.TOO_MANY_JUNK_COMMANDS:
                f"too many commands that send no mail (limit {lim.max_junk_commands})",
            R.TOO_MANY_RECIPIENTS:
                f"too many recipients for one message (limit {lim.max_recipients})",
            R.AUTH_FAILED: "malformed login: empty user name or password, or an authorization "
                           "identity other than the user name",
        }
        return reasons.get(reply) or refusal_reason(reply)

    async def flush(self) -> None:
        """Send every queued reply within the send deadline (``_NotReading`` otherwise).

        The deadline is the session's read deadline (``command_timeout``, ``preauth_timeout``
        or ``stress_timeout``), at most ``_SEND_TIMEOUT``.
        """
        data = self.conn.data_to_send()
        if data:
            timeout = min(_SEND_TIMEOUT, self.deadlines.send_timeout(self._authenticated))
            with trio.move_on_after(timeout):
                await self.stream.send_all(data)
                return
            raise _NotReading

    @property
    def _authenticated(self) -> bool:
        return self.session.info.username is not None

    async def flush_quietly(self) -> None:
        """Best effort: send what is queued (a 421) within a short deadline, ignore failures."""
        # The deadline sits inside the shield: outside it, the shield would block it too.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_CLOSING_REPLY_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                _NotReading, OSError, ssl.SSLError),
        ):
            if not self.broken:
                await self.flush()

    async def _acknowledge(self) -> bool:
        """Send the ``250`` of a committed message now, shielded; False if it could not go.

        Once committed the message will be delivered, so the client must hear 250: told 421
        it would send the message again (RFC 5321 §6.1, RFC 1047). A shutdown must not cancel
        this send either: the replies are already taken from the connection, and a cancelled
        send loses them (and breaks a TLS stream). The shield gets its own deadline, so a
        client that stopped reading holds up neither the shutdown nor its slot for long; the
        shutdown's 421, if any, follows at the next checkpoint.
        """
        queue_id = self.session.unacknowledged
        self.session.acknowledged()
        data = self.conn.data_to_send()  # earlier pipelined replies, then the 250
        error = "timeout"
        with trio.CancelScope(shield=True), trio.move_on_after(_ACK_TIMEOUT):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                error = type(exc).__name__
            else:
                return True
        # Queued, but the client may never know: it may send the message again (a duplicate
        # is the lesser harm; the log says which message it was).
        log.warning(logfmt("reply_unsent", session=self.sid, queue_id=queue_id, reason=error))
        return False

    async def _linger(self) -> None:
        """Read and discard until the client closes, for at most a second.

        Closing a socket with unread input makes the kernel send RST, and an RST can destroy
        the final reply (a 421) before the client has read it; draining first makes our
        close an orderly one.
        """
        if self.eof:
            return
        with trio.move_on_after(_LINGER), contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError
        ):
            while await self.stream.receive_some(_RECEIVE_SIZE):
                pass

    async def _receive(self) -> bool:
        """Read once under the current deadline; False when the session must end instead.

        On a timeout ``421 4.4.2`` is queued; a TLS handshake on the STARTTLS port closes.
        """
        now = trio.current_time()
        in_data = self.session.data_deadline is not None
        deadline = self.deadlines.next(now, authenticated=self._authenticated,
                                       data_deadline=self.session.data_deadline)
        with (
            trio.CancelScope(deadline=deadline.at) as scope,
            self.deadlines.stress.watch(scope, deadline.started),
        ):
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if in_data and data and self.conn.tls_active:
                data = receive_buffered(self.stream, bytes(data), _DATA_RECEIVE_SIZE)
            self.eof = not data
            if self.plain_start and data[:2] == b"\x16\x03" and not self.conn.tls_active:
                # A TLS ClientHello where a command belongs: the client will not read a reply.
                log.info(logfmt("tls_mismatch", session=self.sid, peer=self.peer,
                                reason="the client started TLS at once on the STARTTLS port "
                                       "(use the implicit-TLS port, or STARTTLS here)"))
                self.conn.close()
                return False
            self.plain_start = False
            self.deadlines.received(bytes(data), trio.current_time(), in_data=in_data)
            self.conn.receive_data(bytes(data))
            return True
        # Stress mode may have moved the deadline earlier while we waited.
        why = deadline.stress_reason if scope.deadline < deadline.at else deadline.reason
        log.info(logfmt("timeout", session=self.sid, peer=self.peer, phase=deadline.phase,
                        reply=R.TIMEOUT.code, reason=why))
        self.conn.close(R.TIMEOUT)
        return False

    async def _handshake(self) -> bool:
        """Wrap the stream in TLS and finish the handshake under its deadline."""
        first = FirstBytes(self.stream)
        tls_stream = trio.SSLStream(first, self.tls.context, server_side=True)
        try:
            with trio.fail_after(self.handshake_timeout):
                await tls_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # A failed handshake ends only this connection.
            error = None if isinstance(exc, trio.TooSlowError) else tls_error(exc)
            log.info(logfmt("tls_failed", session=self.sid, peer=self.peer, error=error,
                            reason=explain_tls_failure(first.head, error, implicit=self.implicit,
                                                       timeout=self.handshake_timeout)))
            return False
        first.stop()
        self.stream = tls_stream
        self.deadlines.restart()
        # SSLStream forwards version() and cipher() to its SSLObject.
        version: str | None = tls_stream.version()
        cipher = tls_stream.cipher()
        cipher_name: str | None = cipher[0] if cipher else None
        self.session.tls_started(version, cipher_name)
        log.info(logfmt("tls", session=self.sid, version=version, cipher=cipher_name))
        return True


async def _close(stream: trio.abc.Stream) -> None:
    """Close politely (TLS close_notify) within a second, else forcefully.

    Without close_notify, TLS clients see a truncated stream ("unexpected eof" in OpenSSL 3).
    """
    with trio.move_on_after(_CLOSE_TIMEOUT):
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError
        ):
            await stream.aclose()
        return
    await trio.aclose_forcefully(stream)
