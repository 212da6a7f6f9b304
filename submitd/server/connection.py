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
from ..session import ServerContext, Session
from ..views import SessionInfo
from .limits import ConnectionLimiter
from .tls import TLSContextHolder

__all__ = ["ConnectionHandler", "protocol_limits"]

log = logging.getLogger("submitd.connection")

R_TOO_MANY = Reply.make(421, "4.7.0", "Too many connections, try again later")
R_TIMEOUT = Reply.make(421, "4.4.2", "Timeout, closing connection")
R_SHUTDOWN = Reply.make(421, "4.3.2", "Service shutting down, try again later")
R_INTERNAL = Reply.make(421, "4.3.0", "Temporary local problem, closing connection")

_RECEIVE_SIZE = 65536
_REFUSAL_TIMEOUT = 5.0
_LINGER = 1.0
_CLOSE_TIMEOUT = 1.0
_MAX_TLS_REFUSALS = 32
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
    ) -> None:
        self.listener = listener
        self._context = context
        self._tls = tls
        self._limiter = limiter
        #: Cancel scopes of the running sessions; the server cancels them when draining ends.
        self.active: set[trio.CancelScope] = set()
        self.idle = trio.Event()
        self.idle.set()
        self._refusing = 0

    async def __call__(self, stream: trio.abc.Stream) -> None:
        """Entry point for ``trio.serve_listeners``; never raises (but lets Cancelled through)."""
        host, port = _peer(stream)
        sid = _new_session_id()
        if not self._limiter.try_acquire(host):
            log.warning(logfmt("connection_refused", session=sid, peer=host, reason="limit"))
            await self._refuse(stream)
            return
        scope = trio.CancelScope()
        self.active.add(scope)
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        try:
            await self._serve(stream, sid, host, port, scope)
        finally:
            self._limiter.release(host)
            self.active.discard(scope)
            if not self.active:
                self.idle.set()

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        """Tell an over-the-cap client ``421 4.7.0`` (inside TLS on an implicit listener).

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
                await stream.send_all(R_TOO_MANY.to_bytes())
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(
        self, stream: trio.abc.Stream, sid: str, host: str, port: int, scope: trio.CancelScope
    ) -> None:
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
        driver = _Driver(stream, conn, session, self._tls, ctx)
        try:
            with scope:
                await driver.run(implicit)
            if scope.cancelled_caught:
                conn.close(R_SHUTDOWN)
                await driver.flush_quietly()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(logfmt("disconnect", session=sid, reason=type(exc).__name__))
        except Exception:
            # The last line of defence: log with the session id, tell the client if we can.
            log.exception(logfmt("connection_error", session=sid))
            conn.close(R_INTERNAL)
            await driver.flush_quietly()
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()
                await _close(driver.stream)
            log.info(logfmt("close", session=sid))


class _Driver:
    """The read-feed-answer loop for one connection."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: ServerConnection,
        session: Session,
        tls: TLSContextHolder,
        ctx: ServerContext,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.session = session
        self.tls = tls
        self.limits = ctx.config.limits
        self.handshake_timeout = ctx.config.tls.handshake_timeout if ctx.config.tls else 30.0
        self.sid = session.info.session_id
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
                # The last reply (221, or the 421 that ends the session) goes out even when a
                # shutdown is under way: a client that quit needs no 421 on top.
                await self.flush_quietly()
                log.info(logfmt("closing", session=self.sid, reason=event.reason))
                if not event.client_done:
                    await self._linger()
                return
            else:
                await self.session.handle(event)
                if self.session.unacknowledged is not None and not await self._acknowledge():
                    return

    async def flush(self) -> None:
        """Send every queued reply within ``_SEND_TIMEOUT`` (``TooSlowError`` otherwise)."""
        data = self.conn.data_to_send()
        if data:
            with trio.fail_after(_SEND_TIMEOUT):
                await self.stream.send_all(data)

    async def flush_quietly(self) -> None:
        """Best effort: send what is queued (a 421) within a short deadline, ignore failures."""
        # The deadline sits inside the shield: outside it, the shield would block it too.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(_CLOSING_REPLY_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                trio.TooSlowError, OSError, ssl.SSLError),
        ):
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
        """Read once under the current deadline; on timeout queue 421 4.4.2 and return False."""
        timeout = self.limits.command_timeout
        deadline = self.session.data_deadline
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - trio.current_time()))
        with trio.move_on_after(timeout):
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            self.eof = not data
            self.conn.receive_data(bytes(data))
            return True
        phase = "data" if deadline is not None else "command"
        log.info(logfmt("timeout", session=self.sid, phase=phase))
        self.conn.close(R_TIMEOUT)
        return False

    async def _handshake(self) -> bool:
        """Wrap the stream in TLS and finish the handshake under its deadline."""
        tls_stream = trio.SSLStream(self.stream, self.tls.context, server_side=True)
        try:
            with trio.fail_after(self.handshake_timeout):
                await tls_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # A failed handshake ends only this connection.
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else _tls_reason(exc)
            log.info(logfmt("tls_failed", session=self.sid, reason=reason))
            return False
        self.stream = tls_stream
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


def _tls_reason(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or type(cause).__name__
    return type(exc).__name__
