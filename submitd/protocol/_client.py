"""``ClientConnection``: the client role of the sans-I/O SMTP core.

Commands go out through ``send_*`` methods that return the bytes to write; replies come in
with :meth:`~ClientConnection.receive_data` and leave :meth:`~ClientConnection.next_event` as
:class:`ServerReply` events, each naming the command it answers. The core keeps the queue of
replies it expects, in command order, so pipelining (RFC 2920) is just several ``send_*``
calls before reading. Which command may be sent when is decided in :meth:`_check_send` alone.

Envelope values are checked before a single byte is rendered: an address with CR, LF or any
other control character raises :class:`~submitd.protocol.AddressError` and leaves the
connection as it was (aiosmtplib GHSA-v3q9-hj7j-63hq).
"""

from __future__ import annotations

import base64
import enum
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..secret import Secret
from ._client_data import DataEncoder
from ._client_oauth import XOAUTH2, xoauth2_initial_response
from ._client_replies import ReplyReader, malformed
from ._commands import RcptParams, Verb, render_command, render_mail_from, render_rcpt_to
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import NEED_DATA, MailParams, NeedData
from ._grammar import GrammarError, parse_hello_domain
from ._replies import Reply
from ._sasl import Mechanism

__all__ = ["ClientConnection", "ClientState", "ReplyTo", "ServerReply", "choose_mechanism"]


class ReplyTo(enum.Enum):
    """What a server reply answers: the greeting or one command."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"  # the AUTH line and every SASL response after a 334
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    MESSAGE = "message"  # the reply after the terminating CRLF.CRLF
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


class ClientState(enum.Enum):
    """Where the client side of the conversation is."""

    READY = "ready"  # commands may be sent (once the replies they wait for have come)
    AUTH_CHALLENGE = "auth challenge"  # a 334 arrived: send_auth_response() next
    TLS_HANDSHAKE = "TLS handshake"  # 220 to STARTTLS: handshake, then tls_started()
    BODY = "body"  # 354 arrived: send_body() chunks, then end_body()
    CLOSED = "closed"  # QUIT answered, 421, or the server went away


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerReply:
    """One complete reply from the server and what it answers."""

    to: ReplyTo
    reply: Reply


# RFC 2920 §3.1: these may only end a pipelined group; nothing is sent until they are answered.
# STARTTLS (RFC 3207 §4.2) and AUTH (RFC 4954 §4) change the conversation, so they end one too.
_GROUP_ENDS = frozenset(
    {
        ReplyTo.GREETING, ReplyTo.EHLO, ReplyTo.HELO, ReplyTo.STARTTLS, ReplyTo.AUTH,
        ReplyTo.DATA, ReplyTo.MESSAGE, ReplyTo.NOOP, ReplyTo.QUIT,
    }
)  # fmt: skip

# Intermediate (3xx) replies exist only for AUTH (334, RFC 4954 §4) and DATA (354).
_INTERMEDIATE = {ReplyTo.AUTH: 334, ReplyTo.DATA: 354}

_CONNECTION_LOST = Reply.make(451, "4.4.2", "connection closed by the server")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _utf8(text: str, what: str) -> bytes:
    # The exception text names the field, never the value: it may be a password.
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None
    if b"\0" in data:
        raise ValueError(f"{what} contains NUL")
    return data


class ClientConnection:
    """One SMTP client conversation, with no I/O of its own.

    ``tls_active`` is True from the first byte for implicit TLS (RFC 8314). The first event
    is the server's greeting.
    """

    def __init__(self, *, tls_active: bool = False) -> None:
        self._tls_active = tls_active
        self._state = ClientState.READY
        self._buf = bytearray()
        self._eof = False
        self._reader = ReplyReader()
        self._expected: deque[ReplyTo] = deque([ReplyTo.GREETING])
        self._sasl: list[bytes] = []
        self._encoder: DataEncoder | None = None
        self._trailing_data = 0

    # -- what the driver may look at ----------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """Where the conversation is."""
        return self._state

    @property
    def tls_active(self) -> bool:
        """True once the conversation runs inside TLS (only :meth:`tls_started` sets it)."""
        return self._tls_active

    @property
    def expected(self) -> tuple[ReplyTo, ...]:
        """The replies still to come, in order."""
        return tuple(self._expected)

    @property
    def trailing_data(self) -> int:
        """Octets the server sent after its ``220`` to STARTTLS, thrown away unread.

        A non-zero value means a server (or a man in the middle) tried to inject replies into
        the TLS session (CVE-2021-38371); it is worth a log line.
        """
        return self._trailing_data

    # -- receiving ----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the server; ``b""`` means it closed its side."""
        if self._state is ClientState.TLS_HANDSHAKE:
            self._trailing_data += len(data)  # plaintext after 220: never parsed
            return
        if self._state is ClientState.CLOSED:
            return
        if not data:
            self._eof = True
            return
        self._buf += data

    def next_event(self) -> ServerReply | NeedData:
        """The next reply, or :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` when the server breaks the reply framing, answers
        with a reply that cannot answer the command, or closes the connection while a reply is
        still due (``451 4.4.2``). The connection is then closed.
        """
        if not self._expected:
            raise LocalProtocolError("no reply is expected: send a command first")
        if self._state is ClientState.CLOSED:
            raise LocalProtocolError("the connection is closed")
        try:
            reply = self._reader.next_reply(self._buf)
            if reply is None:
                if self._eof:
                    raise RemoteProtocolError(_CONNECTION_LOST, closes=True)
                return NEED_DATA
            to = self._expected.popleft()
            self._on_reply(to, reply)
        except RemoteProtocolError:
            self._close()
            raise
        return ServerReply(to=to, reply=reply)

    def _on_reply(self, to: ReplyTo, reply: Reply) -> None:
        if reply.code // 100 == 3 and _INTERMEDIATE.get(to) != reply.code:
            raise malformed(f"{reply.code} cannot answer {to.value}")
        if to is ReplyTo.DATA and reply.code < 300:
            raise malformed(f"{reply.code} cannot answer DATA")
        if reply.code == 421 or to is ReplyTo.QUIT:
            self._close()  # RFC 5321 §3.8: after 421 the server closes the channel
        elif to is ReplyTo.STARTTLS and reply.code == 220:
            # CVE-2021-38371: whatever followed the 220 in plaintext is discarded, not parsed
            # as a reply inside TLS.
            self._trailing_data = len(self._buf)
            self._buf.clear()
            self._reader.reset()
            self._state = ClientState.TLS_HANDSHAKE
        elif to is ReplyTo.DATA:
            self._encoder = DataEncoder()
            self._state = ClientState.BODY
        elif to is ReplyTo.AUTH:
            if reply.code == 334:
                self._state = ClientState.AUTH_CHALLENGE
            else:
                self._sasl = []

    def tls_started(self) -> None:
        """The driver finished the TLS handshake after the ``220`` to STARTTLS.

        Everything learnt before is forgotten (RFC 3207 §4.2): send EHLO again.
        """
        if self._state is not ClientState.TLS_HANDSHAKE:
            raise LocalProtocolError("tls_started() without a 220 to STARTTLS")
        self._tls_active = True
        self._state = ClientState.READY

    # -- sending ------------------------------------------------------------------------------

    def _check_send(self, to: ReplyTo) -> None:
        """The one place that decides whether a command may be sent now."""
        if self._state is ClientState.AUTH_CHALLENGE:
            raise LocalProtocolError("answer the 334 with send_auth_response() first")
        if self._state is not ClientState.READY:
            raise LocalProtocolError(f"cannot send {to.value} in state {self._state.value}")
        if any(pending in _GROUP_ENDS for pending in self._expected):
            pending = next(p for p in self._expected if p in _GROUP_ENDS)
            raise LocalProtocolError(f"wait for the reply to {pending.value} first")
        if to is ReplyTo.AUTH and not self._tls_active:
            raise LocalProtocolError("AUTH is only sent inside TLS")
        if to is ReplyTo.STARTTLS and self._tls_active:
            raise LocalProtocolError("TLS is already active")

    def _command(self, to: ReplyTo, line: bytes) -> bytes:
        self._check_send(to)
        self._expected.append(to)
        return line

    def send_ehlo(self, name: str) -> bytes:
        """``EHLO name`` (RFC 5321 §4.1.1.1); ``name`` must be a domain or address literal."""
        return self._command(ReplyTo.EHLO, render_command(Verb.EHLO, _hello_name(name)))

    def send_helo(self, name: str) -> bytes:
        """``HELO name``, for servers that refuse EHLO."""
        return self._command(ReplyTo.HELO, render_command(Verb.HELO, _hello_name(name)))

    def send_starttls(self) -> bytes:
        """``STARTTLS`` (RFC 3207); on its ``220`` the core waits for :meth:`tls_started`."""
        return self._command(ReplyTo.STARTTLS, render_command(Verb.STARTTLS))

    def send_auth(self, mechanism: Mechanism, username: str, password: Secret) -> bytes:
        """``AUTH PLAIN <initial response>`` or ``AUTH LOGIN`` (RFC 4954, RFC 4616).

        Allowed only inside TLS. The password leaves the core only inside the returned bytes.
        """
        self._check_send(ReplyTo.AUTH)
        user = _utf8(username, "username")
        secret = _utf8(password.reveal(), "password")
        if not user:
            raise ValueError("username is empty")
        if mechanism is Mechanism.PLAIN:
            # RFC 4616 §2: [authzid] NUL authcid NUL passwd, with no authzid.
            initial = _b64(b"\0" + user + b"\0" + secret)
            line = render_command(Verb.AUTH, f"PLAIN {initial}")
            self._sasl = []
        else:
            line = render_command(Verb.AUTH, "LOGIN")
            self._sasl = [_b64(user).encode("ascii"), _b64(secret).encode("ascii")]
        return self._command(ReplyTo.AUTH, line)

    def send_auth_xoauth2(self, username: str, token: Secret) -> bytes:
        """``AUTH XOAUTH2 <initial response>`` with the mailbox and an OAuth 2.0 bearer token.

        Allowed only inside TLS. A ``334`` (the server's JSON error challenge) is answered
        with an empty line by :meth:`send_auth_response`; the final reply follows. The token
        leaves the core only inside the returned bytes.
        """
        self._check_send(ReplyTo.AUTH)
        initial = xoauth2_initial_response(username, token.reveal())
        line = render_command(Verb.AUTH, f"{XOAUTH2} {initial}")
        self._sasl = [b""]  # the one answer to the error challenge: an empty line
        return self._command(ReplyTo.AUTH, line)

    def send_auth_response(self) -> bytes:
        """The next SASL response after a ``334``; ``*`` (cancel) when there is none left.

        For XOAUTH2 the one response is the empty line that acknowledges the error challenge.
        """
        if self._state is not ClientState.AUTH_CHALLENGE:
            raise LocalProtocolError("send_auth_response() without a 334 challenge")
        self._state = ClientState.READY
        response = self._sasl.pop(0) if self._sasl else b"*"
        return self._command(ReplyTo.AUTH, response + b"\r\n")

    def send_mail(self, sender: str, params: MailParams) -> bytes:
        """``MAIL FROM:<sender>`` with SIZE, BODY, SMTPUTF8, RET and ENVID as ``params`` holds.

        ``params.auth`` is never sent; leaving RET and ENVID out for a server without DSN is
        the plan's job (``plan_transaction``).
        """
        return self.send_envelope(sender, params, ())

    def send_rcpt(self, recipient: str, params: RcptParams = ()) -> bytes:
        """``RCPT TO:<recipient>`` with optional ESMTP parameters (DSN's NOTIFY, ORCPT)."""
        line = render_rcpt_to(recipient, params)
        return self._command(ReplyTo.RCPT, line)

    def send_envelope(
        self,
        sender: str,
        params: MailParams,
        recipients: Sequence[str],
        recipient_params: Sequence[RcptParams] = (),
    ) -> bytes:
        """MAIL and every RCPT as one pipelined write (RFC 2920 §3.1).

        Every line is rendered before any is queued: one bad address raises and nothing is
        sent. ``recipient_params``, when given, pairs with ``recipients``.
        """
        if recipient_params and len(recipient_params) != len(recipients):
            raise ValueError("recipient_params must pair with recipients")
        lines = [render_mail_from(sender, params)]
        for i, recipient in enumerate(recipients):
            lines.append(render_rcpt_to(recipient, recipient_params[i] if recipient_params else ()))
        self._check_send(ReplyTo.MAIL)
        self._expected.append(ReplyTo.MAIL)
        self._expected.extend([ReplyTo.RCPT] * len(recipients))
        return b"".join(lines)

    def send_data(self) -> bytes:
        """``DATA``; on its ``354`` send the message with :meth:`send_body` and :meth:`end_body`."""
        return self._command(ReplyTo.DATA, render_command(Verb.DATA))

    def send_body(self, chunk: bytes) -> bytes:
        """A piece of the stored message, dot-stuffed and CRLF canonical (see DataEncoder)."""
        if self._state is not ClientState.BODY or self._encoder is None:
            raise LocalProtocolError("send_body() is only allowed after a 354")
        return self._encoder.feed(chunk)

    def end_body(self) -> bytes:
        """The end of the message (CRLF if missing, then ``.`` CRLF); its reply comes next."""
        if self._state is not ClientState.BODY or self._encoder is None:
            raise LocalProtocolError("end_body() is only allowed after a 354")
        data = self._encoder.end()
        self._encoder = None
        self._state = ClientState.READY
        self._expected.append(ReplyTo.MESSAGE)
        return data

    def send_rset(self) -> bytes:
        """``RSET``: abort the transaction (RFC 5321 §4.1.1.5)."""
        return self._command(ReplyTo.RSET, render_command(Verb.RSET))

    def send_noop(self) -> bytes:
        """``NOOP``: checks that the connection is still alive."""
        return self._command(ReplyTo.NOOP, render_command(Verb.NOOP))

    def send_quit(self) -> bytes:
        """``QUIT``; its reply closes the conversation."""
        return self._command(ReplyTo.QUIT, render_command(Verb.QUIT))

    def _close(self) -> None:
        self._state = ClientState.CLOSED
        self._expected.clear()
        self._buf.clear()
        self._reader.reset()
        self._sasl = []
        self._encoder = None


def _hello_name(name: str) -> str:
    try:
        return parse_hello_domain(name)
    except GrammarError:
        raise ValueError("EHLO name must be a domain or address literal") from None


def choose_mechanism(extensions: Mapping[str, str]) -> Mechanism | None:
    """The SASL mechanism to use from the EHLO ``AUTH`` keyword: PLAIN, else LOGIN, else None."""
    offered = extensions.get("AUTH", "").upper().split()
    for mechanism in (Mechanism.PLAIN, Mechanism.LOGIN):
        if mechanism.value in offered:
            return mechanism
    return None
