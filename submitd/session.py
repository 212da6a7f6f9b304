"""Per-connection policy: protocol events → hook calls → replies. Fails closed.

The session never touches the stream: the connection driver feeds it events from the protocol
core and it answers each through the ``ServerConnection.accept_...`` method for its kind or
``reject``. It owns the transaction's spool file while DATA is in progress, and says 250 only
after the spool committed; that 250 is then :attr:`Session.unacknowledged` until the driver
has sent it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import trio

from ._hookcall import HookCaller
from ._logfmt import logfmt
from .config import Config
from .errors import PluginError, SpoolError
from .message import MessageHandle
from .protocol import (
    AuthRequest,
    DataChunk,
    DataComplete,
    DataStart,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    MailParams,
    RcptTo,
    Reply,
    ServerConnection,
    check_refusal,
    is_ehlo_keyword,
    require_status,
)
from .protocol import catalogue as R
from .views import AuthResult, Envelope, Recipient, SessionInfo

if TYPE_CHECKING:
    from .mailqueue.spool import IncomingMessage, Spool
    from .server.throttle import AuthThrottle

__all__ = ["ServerContext", "Session", "any_answer", "refusal_answer", "refusal_reason"]

log = logging.getLogger("submitd.session")

R_PLUGIN_FAILED = Reply.make(451, "4.3.0", "Temporary local problem, try again later")
R_NOT_QUEUED = Reply.make(451, "4.3.0", "Temporary failure, message not queued")
R_AUTH_THROTTLED = Reply.make(454, "4.7.0", "Too many failed logins, try again later")
# RFC 5321 §6.3: a message that has passed through too many relays is in a loop.
R_TOO_MANY_HOPS = Reply.make(554, "5.4.6", "Too many hops: the message is looping")


class Notifier(Protocol):
    """What the session needs of the queue runner."""

    def notify(self, queue_id: str) -> None:
        """A message was committed."""


@dataclass(frozen=True, kw_only=True)
class ServerContext:
    """Everything sessions share; the server swaps in a new one on reload."""

    config: Config
    hooks: HookCaller
    spool: Spool
    runner: Notifier
    throttle: AuthThrottle


# Plugin answers are checked with the core's own rules, so that an answer the core would
# refuse becomes a PluginError (451 4.3.0) here instead of a broken connection there.


def _reply(value: object) -> Reply:
    if not isinstance(value, Reply):
        raise TypeError(f"expected a Reply, got {type(value).__name__}")
    if value.code == 521:  # RFC 6409 §7: never sent on a submission port
        return Reply.make(554, "5.7.1", *value.lines)
    return value


def refusal_answer(value: object) -> Reply:
    """A hook's refusal as the session sends it: a valid 4xx/5xx reply, else ValueError."""
    reply = _reply(value)
    try:
        check_refusal(reply)
    except LocalProtocolError as exc:
        raise ValueError(str(exc)) from None
    return reply


def any_answer(value: object) -> Reply:
    """A hook's verdict that may accept (2xx with a status) or refuse; else ValueError."""
    reply = _reply(value)
    if reply.code >= 400:
        return refusal_answer(reply)
    if reply.code >= 300:
        raise ValueError("3xx replies are reserved for the protocol core")
    try:
        require_status(reply)
    except LocalProtocolError as exc:
        raise ValueError(str(exc)) from None
    return reply


def refusal_reason(reply: Reply) -> str:
    """A refusal's text for a log line's ``reason=`` (our words or a plugin's, never a secret)."""
    return " ".join(reply.lines)


def _auth_result(value: object) -> AuthResult:
    if not isinstance(value, AuthResult):
        raise TypeError(f"expected an AuthResult, got {type(value).__name__}")
    if value.reply is not None:
        return replace(value, reply=refusal_answer(value.reply))
    return value


class Session:
    """The policy side of one SMTP session."""

    def __init__(self, ctx: ServerContext, conn: ServerConnection, info: SessionInfo) -> None:
        self.ctx = ctx
        self.conn = conn
        self.info = info
        self._sender: str | None = None
        self._params = MailParams()
        self._recipients: list[Recipient] = []
        self._incoming: IncomingMessage | None = None
        self._write_failed = False
        #: trio.current_time() by which the DATA phase must end (None outside DATA).
        self.data_deadline: float | None = None
        #: The queue ID of a committed message whose ``250`` is queued on the connection but
        #: not yet sent. The driver must send that reply before anything else may happen on
        #: the connection, shutdown included, then call :meth:`acknowledged`.
        self.unacknowledged: str | None = None

    @property
    def sid(self) -> str:
        """The session id every log line about this session carries."""
        return self.info.session_id

    async def start(self) -> bool:
        """Run ``submitd_connect`` and queue the greeting; False when the client is refused."""
        try:
            answer = await self.ctx.hooks.first(
                "submitd_connect", refusal_answer, session=self.info
            )
        except PluginError:
            self.conn.greet(R.LOCAL_PROBLEM)
            return False
        if answer is not None:
            plugin, reply = answer
            log.info(logfmt("connect_refused", session=self.sid, peer=self.info.peer_host,
                            plugin=plugin, reply=reply.code, reason=refusal_reason(reply)))
            self.conn.greet(reply)
            return False
        self.conn.greet()
        return True

    def tls_started(self, version: str | None, cipher: str | None) -> None:
        """The driver finished a STARTTLS handshake: forget everything but the connection."""
        self._reset_transaction()
        self.info = replace(
            self.info, tls=True, tls_version=version, tls_cipher=cipher, ehlo=None, username=None
        )

    async def handle(self, event: Event) -> None:
        """Answer one event from the protocol core."""
        if isinstance(event, Hello):
            await self._hello(event)
        elif isinstance(event, AuthRequest):
            await self._auth(event)
        elif isinstance(event, MailFrom):
            await self._mail(event)
        elif isinstance(event, RcptTo):
            await self._rcpt(event)
        elif isinstance(event, DataStart):
            await self._data_start(event)
        elif isinstance(event, DataChunk):
            await self._data_chunk(event)
        elif isinstance(event, DataComplete):
            await self._data_complete(event)
        else:  # pragma: no cover - the driver handles StartTLS and ConnectionClosed
            raise TypeError(f"unexpected event {event!r}")

    def acknowledged(self) -> None:
        """The driver sent (or gave up sending) the ``250`` of :attr:`unacknowledged`."""
        self.unacknowledged = None

    async def aclose(self) -> None:
        """Drop an unfinished transaction's spool files (nothing was acknowledged)."""
        await self._discard_incoming()

    # -- EHLO ---------------------------------------------------------------------------------

    async def _hello(self, event: Hello) -> None:
        self._reset_transaction()
        self.info = replace(self.info, ehlo=event.domain)
        keywords: list[str] = []
        if event.extended:
            for plugin, answer in await self.ctx.hooks.collect(
                "submitd_ehlo_keywords", session=self.info
            ):
                keywords.extend(self._valid_keywords(plugin, answer))
        self.conn.accept_hello(event, keywords)

    def _valid_keywords(self, plugin: str, answer: object) -> list[str]:
        if isinstance(answer, str) or not isinstance(answer, Iterable):
            log.error(logfmt("plugin_bad_answer", plugin=plugin, hook="submitd_ehlo_keywords"))
            return []
        given = list(answer)  # once: the answer may be a generator
        good = [k for k in given if is_ehlo_keyword(k)]
        if len(good) != len(given):
            log.error(logfmt("plugin_bad_keyword", plugin=plugin, hook="submitd_ehlo_keywords"))
        return good

    # -- AUTH ---------------------------------------------------------------------------------

    async def _auth(self, event: AuthRequest) -> None:
        credentials = event.credentials
        ip, who, mechanism = self.info.peer_host, credentials.username, credentials.mechanism
        # The login throttle (docs/security.md §3) answers before any plugin or password hash.
        if not await self._admitted(ip, who):
            return
        try:
            answer = await self.ctx.hooks.first(
                "submitd_auth", _auth_result, session=self.info, credentials=credentials
            )
        except PluginError:
            self.conn.reject(R_PLUGIN_FAILED)
            return
        result = answer[1] if answer else None
        if result is not None and result.accepted:
            username = result.username or who
            self.ctx.throttle.succeeded(ip, who)
            self.info = replace(self.info, username=username)
            log.info(logfmt("auth_ok", session=self.sid, user=username, mechanism=mechanism))
            self.conn.accept_auth(event)
            return
        reply = (result.reply if result is not None else None) or R.AUTH_FAILED
        if reply.code == 535:
            # One WARNING line per failed login, fields in this order: the fail2ban filter in
            # deploy/fail2ban/ matches it (peer= is the address to ban).
            self.ctx.throttle.failed(ip, who)
            log.warning(logfmt("auth_failed", session=self.sid, peer=ip, user=who,
                               mechanism=mechanism, reply=reply.code))
        else:  # a temporary failure (454) or a plugin's other refusal: not a wrong password
            log.info(logfmt("auth_refused", session=self.sid, peer=ip, user=who,
                            mechanism=mechanism, reply=reply.code,
                            reason=refusal_reason(reply)))
        self.conn.reject(reply)

    async def _admitted(self, ip: str, who: str) -> bool:
        """Apply the login throttle: False when the attempt was refused with ``454 4.7.0``."""
        admission = self.ctx.throttle.check(ip, who)
        if admission.slowed_for > 0:
            # Many addresses are guessing at this login: slow it down, never refuse it.
            log.info(logfmt("auth_slowed", session=self.sid, peer=ip, user=who,
                            delay=math.ceil(admission.slowed_for)))
            await trio.sleep(admission.slowed_for)
            # Parallel sessions from one address may have used up its allowance meanwhile.
            admission = self.ctx.throttle.check(ip, who)
        if admission.refused_for > 0:
            log.warning(logfmt("auth_throttled", session=self.sid, peer=ip, user=who,
                               wait=math.ceil(admission.refused_for)))
            self.conn.reject(R_AUTH_THROTTLED)
            return False
        return True

    # -- transaction --------------------------------------------------------------------------

    def _envelope(self) -> Envelope:
        return Envelope(
            sender=self._sender or "",
            recipients=tuple(self._recipients),
            params=self._params,
            username=self.info.username,
            received_at=time.time(),
        )

    def _reset_transaction(self) -> None:
        self._sender = None
        self._params = MailParams()
        self._recipients = []
        self.data_deadline = None

    async def _mail(self, event: MailFrom) -> None:
        self._reset_transaction()
        try:
            answer = await self.ctx.hooks.first(
                "submitd_mail_from", refusal_answer, session=self.info, sender=event.sender,
                params=event.params,
            )
        except PluginError:
            self.conn.reject(R_PLUGIN_FAILED)
            return
        if answer is not None:
            log.info(logfmt("mail_refused", session=self.sid, peer=self.info.peer_host,
                            user=self.info.username, sender=f"<{event.sender}>",
                            plugin=answer[0], reply=answer[1].code,
                            reason=refusal_reason(answer[1])))
            self.conn.reject(answer[1])
            return
        self._sender = event.sender
        self._params = event.params
        self.conn.accept_mail(event)

    async def _rcpt(self, event: RcptTo) -> None:
        recipient = Recipient(address=event.recipient, params=event.params)
        try:
            answer = await self.ctx.hooks.first(
                "submitd_rcpt_check", any_answer, session=self.info, envelope=self._envelope(),
                recipient=recipient,
            )
        except PluginError:
            self.conn.reject(R_PLUGIN_FAILED)
            return
        if answer is not None and answer[1].code >= 400:
            log.info(logfmt("rcpt_refused", session=self.sid, peer=self.info.peer_host,
                            user=self.info.username, rcpt=f"<{event.recipient}>",
                            plugin=answer[0], reply=answer[1].code,
                            reason=refusal_reason(answer[1])))
            self.conn.reject(answer[1])
            return
        self._recipients.append(recipient)
        self.conn.accept_rcpt(event, answer[1] if answer is not None else None)

    async def _data_start(self, event: DataStart) -> None:
        try:
            self._incoming = await self.ctx.spool.open_incoming()
        except (SpoolError, OSError) as exc:
            log.error(logfmt("spool_open_failed", session=self.sid, error=exc))
            self.conn.reject(R_NOT_QUEUED)
            return
        self._write_failed = False
        self.data_deadline = trio.current_time() + self.ctx.config.limits.data_timeout
        self.conn.accept_data(event)

    async def _data_chunk(self, event: DataChunk) -> None:
        if self._incoming is None or self._write_failed:
            return
        try:
            await self._incoming.write(event.data)
        except (SpoolError, OSError) as exc:
            # Keep reading to the end of data, then refuse: the client must get a reply.
            log.error(logfmt("spool_write_failed", session=self.sid, error=exc))
            self._write_failed = True

    async def _data_complete(self, event: DataComplete) -> None:
        self.data_deadline = None
        if event.error is not None:
            log.info(logfmt("data_refused", session=self.sid, peer=self.info.peer_host,
                            reply=event.error.code, size=event.size,
                            reason=refusal_reason(event.error)))
            await self._discard_incoming()
            self.conn.reject(event.error)
            self._reset_transaction()
            return
        incoming = self._incoming
        if incoming is None or self._write_failed:
            await self._discard_incoming()
            self.conn.reject(R_NOT_QUEUED)
            self._reset_transaction()
            return
        envelope = self._envelope()
        try:
            stored = await self._store(incoming, envelope)
        finally:
            self._incoming = None
            self._reset_transaction()
        if isinstance(stored, Reply):
            self.conn.reject(stored)
            return
        # Committed: the message is ours (RFC 5321 §6.1) and the client must be told so.
        # No checkpoint lies between the commit and here, so a shutdown cannot get in between;
        # the driver sends this reply shielded before it lets a shutdown 421 out.
        self.conn.accept_message(event, Reply.make(250, "2.0.0", f"Ok: queued as {stored}"))
        self.unacknowledged = stored
        self.ctx.runner.notify(stored)
        # The observers run before the 250 leaves, shielded: a shutdown must not separate the
        # commit from its 250 (each observer still has its hook deadline).
        if not self.ctx.hooks.impls("submitd_accepted"):
            return  # no observer: no envelope copy, no shielded scope
        with trio.CancelScope(shield=True):
            await self.ctx.hooks.collect(
                "submitd_accepted", session=self.info,
                envelope=replace(envelope, queue_id=stored), queue_id=stored,
            )

    async def _store(self, incoming: IncomingMessage, envelope: Envelope) -> Reply | str:
        """Filter and commit: the queue ID, or the 4xx/5xx refusal (the spool files removed).

        Cancelled (a shutdown) before the commit starts, nothing is queued; once it has
        started, the commit finishes whatever happens meanwhile.
        """
        committed = False
        try:
            message: MessageHandle = await incoming.finish(
                max_header_size=self.ctx.config.limits.max_header_size
            )
            looping = self._loop_refusal(message)
            if looping is not None:
                return looping
            try:
                answer = await self.ctx.hooks.first(
                    "submitd_data_filter", refusal_answer, session=self.info, envelope=envelope,
                    message=message,
                )
            except PluginError:
                return R_PLUGIN_FAILED
            if answer is not None:
                log.info(logfmt("message_refused", session=self.sid, peer=self.info.peer_host,
                                plugin=answer[0], reply=answer[1].code,
                                reason=refusal_reason(answer[1])))
                return answer[1]
            message.freeze()
            # Once the commit starts it finishes: a half-done commit helps nobody.
            with trio.CancelScope(shield=True):
                queue_id = await incoming.commit(
                    envelope, message, session_info=self._session_record()
                )
            committed = True
        except (SpoolError, OSError) as exc:
            log.error(logfmt("spool_commit_failed", session=self.sid, error=exc))
            return R_NOT_QUEUED
        finally:
            if not committed:
                with trio.CancelScope(shield=True):
                    await incoming.abort()
        log.info(logfmt("accepted", session=self.sid, queue_id=queue_id, user=self.info.username,
                        sender=f"<{envelope.sender}>", nrcpt=len(envelope.recipients),
                        size=message.size))
        return queue_id

    def _loop_refusal(self, message: MessageHandle) -> Reply | None:
        """``554 5.4.6`` when the message carries more ``Received:`` fields than ``max_hops``.

        RFC 5321 §6.3: a message that went through that many relays is in a mail loop. Counted
        on the received header section (read up to ``max_header_size``), before any filter.
        """
        hops = len(message.get_all("Received"))
        limit = self.ctx.config.limits.max_hops
        if hops <= limit:
            return None
        log.info(logfmt("message_refused", session=self.sid, peer=self.info.peer_host,
                        user=self.info.username, reply=R_TOO_MANY_HOPS.code, hops=hops,
                        reason=f"too many Received: fields (limit {limit}), a mail loop"))
        return R_TOO_MANY_HOPS

    def _session_record(self) -> dict[str, str]:
        info = self.info
        return {
            "session_id": info.session_id,
            "peer": info.peer_host,
            "ehlo": info.ehlo or "",
            "tls_version": info.tls_version or "",
            "tls_cipher": info.tls_cipher or "",
            "listener": info.listener.address,
            "mode": info.listener.mode.value,
        }

    async def _discard_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            with trio.CancelScope(shield=True):
                await incoming.abort()
