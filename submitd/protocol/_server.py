"""``ServerConnection``: the server role of the sans-I/O SMTP core.

Bytes go in with :meth:`~ServerConnection.receive_data`; :meth:`~ServerConnection.next_event`
turns them into events, answering on its own whatever needs no policy (syntax errors, 503s,
NOOP, RSET, HELP, VRFY, QUIT) and stopping at every event that does. Replies are queued in
command order, so pipelining (RFC 2920) needs nothing special: the core simply keeps reading
buffered commands after each answer. :meth:`~ServerConnection.data_to_send` drains the queue.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _catalogue as R
from ._answers import (
    FRAMING_REPLIES,
    Refusal,
    check_positive,
    check_refusal,
    ehlo_reply,
    simple_reply,
)
from ._commands import (
    AUTH_LINE_MAX,
    Command,
    Verb,
    command_line_limit,
    is_cross_protocol,
    parse_auth,
    parse_command,
    parse_hello,
    parse_mail,
    parse_rcpt,
    require_no_argument,
)
from ._data import DataReader
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    AuthRequest,
    ConnectionClosed,
    DataComplete,
    DataStart,
    Event,
    Hello,
    MailFrom,
    NeedData,
    RcptTo,
    StartTLS,
)
from ._grammar import has_control
from ._limits import ProtocolLimits
from ._lines import Line, LineProblem, LineReader
from ._replies import Reply
from ._sasl import Challenge, SaslExchange, SaslFailure, SaslStep
from ._state import Facts, Greeting, ServerState, Transaction, check_sequence

__all__ = ["ServerConnection"]

_Answerable = Hello | AuthRequest | MailFrom | RcptTo | DataStart | DataComplete
_VERB_MAX = 10
#: Commands that never bring a message closer (Postfix's "junk commands"); a repeated
#: EHLO/HELO counts too (see ``_is_junk``).
_JUNK_VERBS = frozenset(
    {Verb.NOOP, Verb.RSET, Verb.VRFY, Verb.HELP, Verb.EXPN, Verb.TURN, Verb.ETRN, Verb.BDAT}
)


def _sasl_limit(prefix: bytes) -> int:
    return AUTH_LINE_MAX  # RFC 4954 §4


class ServerConnection:
    """One SMTP server conversation, with no I/O of its own.

    ``tls_active`` is True from the first byte on an implicit-TLS listener (RFC 8314);
    ``tls_available`` says whether STARTTLS may be offered (RFC 3207).
    """

    def __init__(
        self, *, hostname: str, limits: ProtocolLimits, tls_active: bool, tls_available: bool
    ) -> None:
        if not hostname or has_control(hostname) or any(c.isspace() for c in hostname):
            raise ValueError("hostname must be a non-empty name without spaces or controls")
        self._hostname = hostname
        self._limits = limits
        self._tls_active = tls_active
        self._tls_available = tls_available
        self._state = ServerState.NOT_GREETED
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._lines = LineReader()
        self._data: DataReader | None = None
        self._sasl: SaslExchange | None = None
        self._pending: _Answerable | None = None
        self._close_reason = ""
        self._client_done = False
        self._greeting = Greeting.NONE
        self._authenticated = False
        self._transaction = Transaction.NONE
        self._recipients = 0
        self._smtputf8 = False
        self._errors = 0
        self._auth_failures = 0
        self._transactions = 0
        self._junk = 0
        self._verb = ""
        self._refusals: list[Refusal] = []

    # -- what the driver and session may look at ----------------------------------------------

    @property
    def state(self) -> ServerState:
        """Where the conversation is."""
        return self._state

    @property
    def tls_active(self) -> bool:
        """True once the conversation runs inside TLS."""
        return self._tls_active

    @property
    def authenticated(self) -> bool:
        """True after an AUTH the session accepted (forgotten when TLS starts)."""
        return self._authenticated

    @property
    def closed(self) -> bool:
        """True when nothing more will be read; flush :meth:`data_to_send` and close."""
        return self._state is ServerState.CLOSED

    # -- the driver's side --------------------------------------------------------------------

    def greet(self, refusal: Reply | None = None) -> None:
        """Queue the ``220`` greeting, or ``refusal`` which ends the connection."""
        if self._state is not ServerState.NOT_GREETED:
            raise LocalProtocolError("greet() was already called")
        if refusal is not None:
            check_refusal(refusal, status=False)  # greetings carry no status (RFC 2034 §3)
            self._shut("refused at greeting", refusal, own=False)
            return
        self._send(R.greeting(self._hostname))
        self._goto(ServerState.COMMAND)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if self._state in (ServerState.CLOSED, ServerState.TLS_HANDSHAKE):
            # After STARTTLS nothing sent in plaintext is ever read (CVE-2011-0411).
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after end of file")
        self._buf += data

    def take_refusals(self) -> list[Refusal]:
        """The refusals the core sent on its own since the last call (not :meth:`reject`'s).

        Syntax and sequence errors (``530`` before STARTTLS or AUTH, ``503``), failed SASL
        exchanges, limits (``452``, ``421``): the driver logs them; replies passed to
        :meth:`reject`, :meth:`close` and :meth:`greet` are the caller's to log.
        """
        refusals, self._refusals = self._refusals, []
        return refusals

    def data_to_send(self) -> bytes:
        """Take every reply queued so far, in order, as bytes for the wire."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The driver finished the TLS handshake after :class:`StartTLS`.

        Everything learnt in plaintext is forgotten (RFC 3207 §4.2): EHLO is required again,
        no one is authenticated, and STARTTLS is no longer offered.
        """
        if self._state is not ServerState.TLS_HANDSHAKE:
            raise LocalProtocolError("tls_started() without an accepted STARTTLS")
        self._tls_active = True
        self._greeting = Greeting.NONE
        self._authenticated = False
        self._reset_transaction()
        self._buf.clear()
        self._lines.reset()
        self._goto(ServerState.COMMAND)

    def close(self, reply: Reply | None = None) -> None:
        """End the conversation from the server side, queueing ``reply`` (a ``421``) if given.

        Closing a closed connection does nothing.
        """
        if self._state is ServerState.CLOSED:
            return
        if reply is not None:
            check_refusal(reply)
        self._shut("closed by server", reply, own=False)

    # -- events -------------------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA` when the buffer holds no complete input."""
        if self._state is ServerState.NOT_GREETED:
            raise LocalProtocolError("call greet() before next_event()")
        if self._pending is not None:
            name = type(self._pending).__name__
            raise LocalProtocolError(f"answer {name} (accept_...() or reject()) first")
        if self._state is ServerState.TLS_HANDSHAKE:
            raise LocalProtocolError("call tls_started() once the TLS handshake is done")
        while self._state is not ServerState.CLOSED:
            event = self._read_data() if self._state is ServerState.DATA else self._read_line()
            if event is NEED_DATA:
                return NEED_DATA
            if event is not None:
                if isinstance(event, _Answerable):
                    self._pending = event
                    self._goto(ServerState.AWAITING_ANSWER)
                return event
        return ConnectionClosed(reason=self._close_reason, client_done=self._client_done)

    def _read_data(self) -> Event | NeedData | None:
        assert self._data is not None
        result = self._data.read(self._buf)
        if result is None:
            if self._eof:
                self._shut("connection closed by client during DATA", client_done=True)
                return None
            return NEED_DATA
        if isinstance(result, DataComplete):
            self._data = None
        return result

    def _read_line(self) -> Event | NeedData | None:
        sasl = self._state is ServerState.SASL
        line = self._lines.next_line(self._buf, _sasl_limit if sasl else command_line_limit)
        if line is None:
            if self._eof:
                self._shut("connection closed by client", client_done=True)
                return None
            return NEED_DATA
        return self._on_sasl_line(line) if sasl else self._on_command_line(line)

    def _on_command_line(self, line: Line) -> Event | None:
        word = line.text.split(b" ", 1)[0][: _VERB_MAX + 1]
        short_word = word.isalpha() and len(word) <= _VERB_MAX  # bytes.isalpha: ASCII only
        self._verb = word.decode("ascii").upper() if short_word else ""
        if is_cross_protocol(line.text):
            # ALPACA: say nothing a browser could take for an HTTP response.
            self._shut("cross-protocol request")
            return None
        if line.problem is not LineProblem.NONE:
            self._send(FRAMING_REPLIES[line.problem])
            return None
        try:
            command = parse_command(line.text)
            self._count_junk(command.verb)
            rule = check_sequence(command.verb, self._facts())
            if rule is not None:
                raise RemoteProtocolError(rule.reply, closes=rule.closes)
            return self._dispatch(command)
        except RemoteProtocolError as exc:
            if exc.closes:
                self._shut(exc.reply.text, exc.reply)
            else:
                self._send(exc.reply)
            return None

    def _count_junk(self, verb: Verb) -> None:
        """Close after ``max_junk_commands`` commands that send no mail (docs/security.md §5).

        Like Postfix's ``smtpd_junk_command_limit``, the count is forgiven when a message is
        accepted, so a long session that sends mail is never cut; it is not forgiven by a
        MAIL or RCPT alone, so MAIL/RSET cycles end too.
        """
        repeated_hello = verb in (Verb.EHLO, Verb.HELO) and self._greeting is not Greeting.NONE
        if verb not in _JUNK_VERBS and not repeated_hello:
            return
        self._junk += 1
        if self._junk > self._limits.max_junk_commands:
            raise RemoteProtocolError(R.TOO_MANY_JUNK_COMMANDS, closes=True)

    def _dispatch(self, command: Command) -> Event | None:
        verb, argument = command.verb, command.argument
        if verb in (Verb.EHLO, Verb.HELO):
            domain = parse_hello(argument)
            self._reset_transaction()  # RFC 5321 §4.1.4: EHLO implies RSET
            return Hello(domain=domain, extended=verb is Verb.EHLO)
        if verb is Verb.STARTTLS:
            require_no_argument(command)
            return self._start_tls()
        if verb is Verb.AUTH:
            mechanism, initial = parse_auth(argument)
            self._sasl = SaslExchange(mechanism)
            return self._sasl_step(self._sasl.start(initial))
        if verb is Verb.MAIL:
            sender, params = parse_mail(
                argument, max_size=self._limits.max_message_size, esmtp=self._esmtp
            )
            return MailFrom(sender=sender, params=params)
        if verb is Verb.RCPT:
            if self._recipients >= self._limits.max_recipients:
                raise RemoteProtocolError(R.TOO_MANY_RECIPIENTS)
            recipient, rcpt_params = parse_rcpt(
                argument, smtputf8=self._smtputf8, esmtp=self._esmtp
            )
            return RcptTo(recipient=recipient, params=rcpt_params)
        if verb is Verb.DATA:
            require_no_argument(command)
            return DataStart()
        self._send(simple_reply(command))
        if verb is Verb.RSET:
            self._reset_transaction()
        if verb is Verb.QUIT:
            self._shut("quit", client_done=True)
        return None

    def _start_tls(self) -> StartTLS:
        self._send(R.READY_TO_START_TLS)
        # RFC 3207 §4.2 / CVE-2011-0411: pipelined plaintext must not run inside TLS. Only
        # what is already buffered is counted; nothing waits for more.
        discarded = len(self._buf)
        self._buf.clear()
        self._lines.reset()
        self._goto(ServerState.TLS_HANDSHAKE)
        return StartTLS(discarded=discarded)

    # -- AUTH ---------------------------------------------------------------------------------

    def _on_sasl_line(self, line: Line) -> Event | None:
        assert self._sasl is not None
        if line.problem is not LineProblem.NONE:
            self._sasl = None
            self._goto(ServerState.COMMAND)
            too_long = line.problem is LineProblem.TOO_LONG
            self._send(R.SASL_LINE_TOO_LONG if too_long else FRAMING_REPLIES[line.problem])
            return None
        return self._sasl_step(self._sasl.respond(line.text))

    def _sasl_step(self, step: SaslStep) -> Event | None:
        if isinstance(step, Challenge):
            self._send(step.reply)
            self._goto(ServerState.SASL)
            return None
        self._sasl = None
        self._goto(ServerState.COMMAND)
        if isinstance(step, SaslFailure):
            if step.counted:
                self._auth_failed(step.reply)
            else:
                self._send(step.reply)
            return None
        return AuthRequest(credentials=step)

    def _auth_failed(self, reply: Reply, *, own: bool = True) -> None:
        self._send(reply, own=own)
        self._auth_failures += 1
        if self._auth_failures >= self._limits.max_auth_failures:
            self._shut("too many authentication failures", R.TOO_MANY_AUTH_FAILURES)

    # -- answers ------------------------------------------------------------------------------
    # One accept method per event that needs an answer, each taking that event: an answer that
    # does not fit the event is a type error. reject() refuses any of them.

    def accept_hello(self, event: Hello, keywords: Sequence[str] = ()) -> None:
        """Answer EHLO with the core's extensions followed by ``keywords``; HELO with one line.

        ``keywords`` are EHLO extension lines (``"X-EXAMPLE a=b"``); HELO has none to carry.
        """
        self._take(event, Hello)
        if event.extended:
            answer = ehlo_reply(
                self._hostname,
                max_message_size=self._limits.max_message_size,
                tls_active=self._tls_active,
                tls_available=self._tls_available,
                keywords=keywords,
            )
        else:
            answer = R.helo(self._hostname)
        self._greeting = Greeting.EHLO if event.extended else Greeting.HELO
        self._answer(answer)

    def accept_auth(self, event: AuthRequest) -> None:
        """The session verified the credentials: ``235 2.7.0``, the client is logged in."""
        self._take(event, AuthRequest)
        self._authenticated = True
        self._answer(R.AUTH_SUCCESSFUL)

    def accept_mail(self, event: MailFrom) -> None:
        """Start the transaction with this sender: ``250 2.1.0``."""
        self._take(event, MailFrom)
        self._transaction = Transaction.SENDER
        self._smtputf8 = event.params.smtputf8
        self._answer(R.SENDER_OK)

    def accept_rcpt(self, event: RcptTo, reply: Reply | None = None) -> None:
        """Add the recipient: ``250 2.1.5``, or ``reply`` (a 2xx with a status, e.g. ``251``)."""
        self._take(event, RcptTo)
        answer = check_positive(R.RECIPIENT_OK if reply is None else reply, range(200, 300))
        self._transaction = Transaction.RECIPIENTS
        self._recipients += 1
        self._answer(answer)

    def accept_data(self, event: DataStart) -> None:
        """The session is ready to store the message: ``354``, then the content is read."""
        self._take(event, DataStart)
        self._data = DataReader(
            max_size=self._limits.max_message_size,
            max_header_size=self._limits.max_header_size,
        )
        self._answer(R.START_DATA, ServerState.DATA)

    def accept_message(self, event: DataComplete, reply: Reply) -> None:
        """The message is stored: ``reply`` is the session's 2xx (``250 2.0.0`` + queue id).

        A message the core refused (``event.error`` set) is answered ``reject(event.error)``.
        """
        self._take(event, DataComplete)
        if event.error is not None:
            raise LocalProtocolError("a refused message must be answered reject(event.error)")
        answer = check_positive(reply, range(200, 300))
        self._end_transaction()
        self._junk = 0  # a message was accepted: the session is doing real work
        self._answer(answer)

    def _take(self, event: _Answerable, kind: type[_Answerable]) -> None:
        """Check that ``event`` is the pending event and of the kind the answer is for.

        The type checker already ensures the kind; this guards untyped callers and answers
        to an event that is no longer pending.
        """
        pending = self._waiting()
        if event is not pending or not isinstance(event, kind):
            name = type(pending).__name__
            raise LocalProtocolError(f"the event waiting for an answer is {name}")

    def _waiting(self) -> _Answerable:
        if self._pending is None:
            raise LocalProtocolError("no event is waiting for an answer")
        return self._pending

    def _answer(self, reply: Reply, next_state: ServerState = ServerState.COMMAND) -> None:
        self._pending = None
        self._goto(next_state)
        self._send(reply)

    def reject(self, reply: Reply) -> None:
        """Refuse the pending event with ``reply`` (4xx or 5xx); a ``421`` also closes."""
        event = self._waiting()
        check_refusal(reply)
        self._pending = None
        self._goto(ServerState.COMMAND)
        if isinstance(event, Hello):
            self._greeting = Greeting.NONE
        elif isinstance(event, DataComplete):
            self._end_transaction()
        if isinstance(event, AuthRequest):
            self._auth_failed(reply, own=False)
        else:
            self._send(reply, own=False)
        if reply.code == 421:  # RFC 5321 §3.8: 421 means the server closes the channel
            self._shut("closed after a 421 reply")

    # -- bookkeeping --------------------------------------------------------------------------

    @property
    def _esmtp(self) -> bool:
        return self._greeting is Greeting.EHLO

    def _facts(self) -> Facts:
        return Facts(
            tls_active=self._tls_active,
            tls_available=self._tls_available,
            greeting=self._greeting,
            authenticated=self._authenticated,
            transaction=self._transaction,
            transactions_left=self._transactions < self._limits.max_transactions,
        )

    def _reset_transaction(self) -> None:
        self._transaction = Transaction.NONE
        self._recipients = 0
        self._smtputf8 = False

    def _end_transaction(self) -> None:
        self._transactions += 1
        self._reset_transaction()

    def _goto(self, state: ServerState) -> None:
        if self._state is not ServerState.CLOSED:
            self._state = state

    def _send(self, reply: Reply, *, own: bool = True) -> None:
        if self._state is ServerState.CLOSED:
            return
        self._out += reply.to_bytes()
        if own and reply.code >= 400:
            self._refusals.append(Refusal(command=self._verb, reply=reply))
        if reply.code >= 500:
            self._errors += 1
            if self._errors >= self._limits.max_errors:
                self._shut("too many errors", R.TOO_MANY_ERRORS)

    def _shut(
        self, reason: str, reply: Reply | None = None, *, client_done: bool = False,
        own: bool = True,
    ) -> None:
        if self._state is ServerState.CLOSED:
            return
        self._client_done = client_done
        if reply is not None:
            self._out += reply.to_bytes()
            if own:
                self._refusals.append(Refusal(command=self._verb, reply=reply))
        self._state = ServerState.CLOSED
        self._close_reason = reason
        self._pending = None
        self._sasl = None
        self._data = None
        self._buf.clear()

