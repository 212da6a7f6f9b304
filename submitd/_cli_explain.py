"""``submitd explain``: why would this message be refused? A dry run through the plugins.

The configuration is loaded and the plugins are loaded and configured exactly as ``submitd
serve`` does (:func:`create_plugin_manager`, :func:`configure_plugins`), and the hooks are
called through the server's own :class:`HookCaller` with the session's own answer checks, so
the replies printed are the replies the server would send. The envelope goes through the
protocol core's own parsers first (syntax, relay tricks, ``SIZE`` against ``[limits]
max_message_size``).

The dry-run session (:func:`dry_run_session`) says what it is: session id ``dry-run``, the
first ``[[listen]]`` table as its listener, peer ``127.0.0.1`` port 0, EHLO name
``dry-run.invalid``, TLS on with the placeholder version and cipher ``dry-run``, and the
login given with ``--user``. AUTH is assumed to have succeeded (``submitd_auth`` is not
called, no password is checked). Nothing is queued or delivered: ``submitd_accepted`` and
``submitd_deliver`` are not called; the delivery stage lists the delivery plugins in the order
they would be offered the message. Plugins that keep state only read it at these stages (a
rate limit counts at ``submitd_accepted``), so a dry run does not use anyone's allowance.

Exit status: 0 when the message would be accepted for every recipient, 1 when the server
would refuse it or any recipient, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import email.utils
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import trio

from ._cli_common import config_from_args, configured_plugins
from ._hookcall import HookCaller
from .config import Config
from .errors import ConfigError, PluginError, UsageError
from .message import MessageHandle, parse_header_section
from .protocol import RemoteProtocolError, catalogue
from .protocol._commands import parse_mail, parse_rcpt
from .protocol._replies import Reply
from .session import R_PLUGIN_FAILED, any_answer, refusal_answer
from .views import Envelope, Recipient, SessionInfo

__all__ = ["DRY_RUN", "ExplainRequest", "add_explain_command", "dry_run_session", "explain"]

#: The session id, TLS version and cipher of the dry-run session.
DRY_RUN = "dry-run"

_ACCEPTED = "accepted (no plugin objected)"
_QUEUED = Reply.make(250, "2.0.0", "Ok: queued as DRY-RUN")


@dataclass(frozen=True, kw_only=True)
class ExplainRequest:
    """What to explain: the login, the envelope, and the synthetic message's size and From."""

    user: str
    sender: str
    recipients: tuple[str, ...]
    size: int | None = None
    header_from: str | None = None


def add_explain_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    config_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``submitd explain`` on the ``submitd`` sub-command parser."""
    p = commands.add_parser(
        "explain", help="dry run: which plugin would refuse a message, with which reply",
        description="Run a message through the configured plugins without sending, queueing "
        "or delivering anything, and print each stage's decision. Exit 0 when it would be "
        "accepted, 1 when refused, 2 for a usage or configuration error.",
    )
    config_option(p)
    p.add_argument("--user", required=True, metavar="LOGIN",
                   help="the login (assumed authenticated; no password is checked)")
    p.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                   help="the envelope sender (MAIL FROM); '' for <>")
    p.add_argument("--rcpt", action="append", required=True, metavar="ADDRESS",
                   help="a recipient (RCPT TO); repeat for several")
    p.add_argument("--size", type=int, metavar="BYTES",
                   help="the message size (sent as MAIL FROM SIZE=, and the synthetic "
                   "message is padded to it)")
    p.add_argument("--header-from", metavar="ADDRESS",
                   help="the From: header field of the synthetic message (default: --from)")
    p.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    """``submitd explain``: print the dry run; 0 accepted, 1 refused."""
    if args.size is not None and args.size < 0:
        raise UsageError("--size must be zero or more bytes")
    config = config_from_args(args)
    request = ExplainRequest(user=args.user, sender=args.sender, recipients=tuple(args.rcpt),
                             size=args.size, header_from=args.header_from)
    import sys

    accepted = trio.run(explain, config, request, sys.stdout)
    return 0 if accepted else 1


def dry_run_session(config: Config, user: str) -> SessionInfo:
    """The :class:`SessionInfo` a dry run hands to the hooks (see the module docstring)."""
    if not config.listeners:
        raise ConfigError(config.path, "listen", "no [[listen]] table: nothing to explain")
    return SessionInfo(
        session_id=DRY_RUN, config=config, listener=config.listeners[0], peer_host="127.0.0.1",
        peer_port=0, tls=True, tls_version=DRY_RUN, tls_cipher=DRY_RUN,
        ehlo="dry-run.invalid", username=user,
    )


@dataclass
class _Report:
    """Prints stages as ``STAGE  OUTCOME`` lines and remembers whether anything was refused."""

    out: TextIO
    refused: list[str] = field(default_factory=list)

    def line(self, stage: str, text: str) -> None:
        print(f"{stage:<30} {text}", file=self.out)

    def decided(self, stage: str, answer: tuple[str, Reply] | None, default: Reply | None,
                ) -> Reply | None:
        """Print a hook's answer; return the refusal, or None when accepted."""
        if answer is None:
            shown = f": {_show(default)}" if default is not None else ""
            self.line(stage, _ACCEPTED + shown)
            return None
        plugin, reply = answer
        if reply.code < 400:
            self.line(stage, f"accepted by {plugin}: {_show(reply)}")
            return None
        self.line(stage, f"REFUSED by {plugin}: {_show(reply)}")
        self.refused.append(stage)
        return reply

    def core(self, stage: str, reply: Reply) -> None:
        self.line(stage, f"REFUSED by the protocol core: {_show(reply)}")
        self.refused.append(stage)

    def failed(self, stage: str, exc: PluginError, reply: Reply) -> None:
        self.line(stage, f"FAILED: {exc}; the server answers {_show(reply)}")
        self.refused.append(stage)


def _show(reply: Reply) -> str:
    return f"{reply.code} {reply.status} {' / '.join(reply.lines)}".replace("  ", " ")


async def explain(config: Config, request: ExplainRequest, out: TextIO,
                  *, extra_plugins: Sequence[tuple[str, object]] = ()) -> bool:
    """Print the dry run of ``request`` to ``out``; True when every stage accepts.

    ``extra_plugins`` are registered as ``Server(extra_plugins=...)`` registers them.
    """
    with configured_plugins(config, extra=extra_plugins) as pm:
        hooks = HookCaller(pm, config.plugins)
        session = dry_run_session(config, request.user)
        report = _Report(out)
        print(f"dry run of {config.path}: nothing is sent, queued or delivered", file=out)
        print(f"plugins enabled: {', '.join(config.plugins.enable) or 'none'}", file=out)
        print(f"session: id {DRY_RUN}, listener {session.listener.address} "
              f"({session.listener.mode.value}), peer 127.0.0.1, TLS assumed "
              f"(placeholder version {DRY_RUN})", file=out)
        await _run(hooks, session, request, report)
        verdict = "refused" if report.refused else "accepted"
        print(f"result: {verdict}" + (f" at {', '.join(report.refused)}" if report.refused
                                      else ""), file=out)
        return not report.refused


async def _run(hooks: HookCaller, session: SessionInfo, request: ExplainRequest,
               report: _Report) -> None:
    config = session.config
    try:
        answer = await hooks.first("submitd_connect", refusal_answer,
                                   session=replace(session, username=None, ehlo=None))
    except PluginError as exc:
        report.failed("connect", exc, catalogue.LOCAL_PROBLEM)
        return
    if report.decided("connect", answer, None) is not None:
        return
    report.line("auth", f"assumed successful for {request.user!r} (no password checked; "
                "submitd_auth not called)")
    # MAIL FROM, through the core's parser (syntax, relay tricks, SIZE limit).
    argument = f"FROM:<{request.sender}>"
    if request.size is not None:
        argument += f" SIZE={request.size}"
    if not (request.sender + "".join(request.recipients)).isascii():
        argument += " SMTPUTF8"
    stage = f"MAIL FROM:<{request.sender}>"
    try:
        sender, params = parse_mail(argument, max_size=config.limits.max_message_size)
    except RemoteProtocolError as exc:
        report.core(stage, exc.reply)
        return
    try:
        answer = await hooks.first("submitd_mail_from", refusal_answer, session=session,
                                   sender=sender, params=params)
    except PluginError as exc:
        report.failed(stage, exc, R_PLUGIN_FAILED)
        return
    if report.decided(stage, answer, catalogue.SENDER_OK) is not None:
        return
    envelope = Envelope(sender=sender, recipients=(), params=params, username=request.user,
                        received_at=time.time())
    for address in request.recipients:
        stage = f"RCPT TO:<{address}>"
        try:
            rcpt, rparams = parse_rcpt(f"TO:<{address}>", smtputf8=params.smtputf8)
        except RemoteProtocolError as exc:
            report.core(stage, exc.reply)
            continue
        recipient = Recipient(address=rcpt, params=rparams)
        try:
            answer = await hooks.first("submitd_rcpt_check", any_answer, session=session,
                                       envelope=envelope, recipient=recipient)
        except PluginError as exc:
            report.failed(stage, exc, R_PLUGIN_FAILED)
            continue
        if report.decided(stage, answer, catalogue.RECIPIENT_OK) is None:
            envelope = replace(envelope, recipients=(*envelope.recipients, recipient))
    if not envelope.recipients:
        report.core("DATA", catalogue.NO_VALID_RECIPIENTS)
        return
    if await _data(hooks, session, envelope, request, report):
        _delivery(hooks, report)


async def _data(hooks: HookCaller, session: SessionInfo, envelope: Envelope,
                request: ExplainRequest, report: _Report) -> bool:
    """Run ``submitd_data_filter`` on the synthetic message; True when it passes."""
    data = synthetic_message(envelope, request.header_from or request.sender, request.size)
    stage = f"data_filter ({len(data)} bytes)"
    if len(data) > session.config.limits.max_message_size:
        report.core(stage, catalogue.MESSAGE_TOO_LARGE)
        return False
    with tempfile.TemporaryDirectory(prefix="submitd-explain-") as tmp:
        path = Path(tmp) / "message"
        await trio.to_thread.run_sync(path.write_bytes, data)
        headers, body_offset = parse_header_section(data)
        message = MessageHandle(path=path, size=len(data), headers=headers,
                                body_offset=body_offset, editable=True)
        try:
            answer = await hooks.first("submitd_data_filter", refusal_answer, session=session,
                                       envelope=envelope, message=message)
        except PluginError as exc:
            report.failed(stage, exc, R_PLUGIN_FAILED)
            return False
    if report.decided(stage, answer, _QUEUED) is not None:
        return False
    for name, value in message.edits.prepend:
        report.line("  header added", f"{name}: {value}")
    for name in sorted(message.edits.remove):
        report.line("  header removed", name)
    return True


def _delivery(hooks: HookCaller, report: _Report) -> None:
    plugins = [impl.plugin_name for impl in hooks.impls("submitd_deliver")]
    if not plugins:
        report.line("delivery", "no enabled plugin delivers mail: it would wait in the queue "
                    "and bounce after [queue] max_age")
        return
    rest = f", then {', '.join(plugins[1:])} for recipients it does not take" if plugins[1:] \
        else ""
    report.line("delivery", f"would be offered to {plugins[0]}{rest} (not attempted)")


def synthetic_message(envelope: Envelope, header_from: str, size: int | None) -> bytes:
    """A small message with ``From: header_from``, padded with body lines to ``size`` bytes."""
    to = ", ".join(r.address for r in envelope.recipients)
    head = (f"From: <{header_from}>\r\nTo: {to}\r\nSubject: submitd explain (dry run)\r\n"
            f"Date: {email.utils.formatdate()}\r\n"
            f"Message-ID: <dry-run.{time.time_ns()}@dry-run.invalid>\r\n\r\n")
    data = (head + "This message was made up by submitd explain.\r\n").encode()
    if size is None or size <= len(data):
        return data
    full, rest = divmod(size - len(data), 78)
    if rest == 1:  # one byte cannot be a line of its own: lengthen the text line instead
        data, rest = data[:-2] + b".\r\n", 0
    body = (b"x" * 76 + b"\r\n") * full
    if rest:
        body += b"x" * (rest - 2) + b"\r\n"
    return data + body
