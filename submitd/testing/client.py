"""Send one message through a running server in one call: :func:`send_mail`."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import trio

from ..protocol._replies import Reply

if TYPE_CHECKING:
    from . import RunningServer

__all__ = ["SMTPRefused", "send_mail", "server_tls_context"]


class SMTPRefused(Exception):
    """The server refused a step of :func:`send_mail`; ``reply`` is its exact answer.

    ``stage`` is ``"greeting"``, ``"ehlo"``, ``"starttls"``, ``"auth"``, ``"mail"``,
    ``"rcpt"`` (``recipient`` says which), ``"data"`` or ``"message"`` (the reply after the
    body); ``None`` as ``reply`` means the server closed the connection.
    """

    def __init__(self, stage: str, reply: Reply | None, recipient: str | None = None) -> None:
        self.stage = stage
        self.reply = reply
        self.recipient = recipient
        shown = ("connection closed" if reply is None
                 else f"{reply.code} {reply.status} {reply.text}")
        where = f" <{recipient}>" if recipient else ""
        super().__init__(f"{stage}{where} refused: {shown}")


def server_tls_context(server: RunningServer) -> ssl.SSLContext:
    """A client context that trusts exactly the certificate ``server`` presents.

    The server's certificate file is the trust anchor (``VERIFY_X509_PARTIAL_CHAIN``), so no
    CA object is needed; host names are still checked (``localhost`` is used).
    """
    tls = server.config.tls
    if tls is None:  # pragma: no cover - a Server refuses to start without [tls]
        raise ValueError("the server has no [tls] table")
    context = ssl.create_default_context(cafile=str(tls.cert))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _message_bytes(body: bytes | str) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


async def send_mail(
    server: RunningServer,
    user: str,
    password: str,
    sender: str,
    recipients: Sequence[str],
    body: bytes | str,
    *,
    mode: Literal["implicit", "starttls"] = "implicit",
    tls: ssl.SSLContext | None = None,
    within: float = 30.0,
) -> Reply:
    """Log in as ``user`` and send ``body`` (a whole message) from ``sender`` to ``recipients``.

    Connects to the server's first ``mode`` listener (TLS from the first byte, or plain then
    ``STARTTLS``), authenticates with AUTH PLAIN, and sends MAIL, each RCPT and DATA (line
    endings made CRLF, dot-stuffed). Returns the ``250`` reply to the message (its text holds
    the queue id). Raises :class:`SMTPRefused` at the first refusal, with the exact reply;
    ``tls`` defaults to :func:`server_tls_context`. It all must end ``within`` seconds.
    """
    # Imported here: this module is imported by the package, which defines RawSMTPClient.
    from . import RawSMTPClient

    context = tls or server_tls_context(server)
    port = server.port(mode)
    host = next(b.host for b in server.listeners if b.port == port)
    with trio.fail_after(within):
        client = await RawSMTPClient.connect(
            host, port, tls=context if mode == "implicit" else None
        )
        async with client:

            async def step(stage: str, line: str | bytes | None, code: int,
                           recipient: str | None = None) -> Reply:
                reply = await (client.reply() if line is None else client.command(line))
                if reply is None or reply.code != code:
                    raise SMTPRefused(stage, reply, recipient)
                return reply

            await step("greeting", None, 220)
            await step("ehlo", "EHLO client.test.example", 250)
            if mode == "starttls":
                await step("starttls", "STARTTLS", 220)
                await client.starttls(context)
                await step("ehlo", "EHLO client.test.example", 250)
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            await step("auth", f"AUTH PLAIN {token}", 235)
            await step("mail", f"MAIL FROM:<{sender}>", 250)
            for rcpt in recipients:
                await step("rcpt", f"RCPT TO:<{rcpt}>", 250, rcpt)
            await step("data", "DATA", 354)
            await client.send(_message_bytes(body))
            reply = await step("message", None, 250)
            await client.command("QUIT")
            return reply
