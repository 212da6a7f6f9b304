"""Every hook submitd calls; each docstring is the contract.

Implement a hook with :data:`submitd.hookimpl` in a module or class registered under the entry
point group ``submitd`` and named in ``[plugins] enable``. A function named ``submitd_*``
that is not one of these hooks, or lacks ``@hookimpl``, is refused at start-up.

The blocking rule: session and queue hooks are ``async def`` (awaited), or a plain ``def``
that never blocks (called on the event loop: while it runs no other session moves; a call
longer than 50 ms is logged as ``event=plugin_blocked``), or a plain ``def`` marked
``@submitd.blocking`` (run in a worker thread). They run in pluggy's order (last registered
first, ``tryfirst``/``trylast`` respected) under a per-plugin deadline (``[plugins]
hook_timeout``, or ``hook_timeout`` in ``[plugins.NAME]``); a blocking hook that outlives it
is abandoned, and its thread runs on until the function returns.

Stop rules are applied by submitd, not pluggy:

- *first answer*: the walk stops at the first implementation returning something other
  than None;
- *all*: every implementation is called and the answers are collected.

A hook may also refuse by raising :class:`submitd.Reject`. Any other exception, an invalid
return value or a timeout is logged with the plugin's name and answered ``451 4.3.0``
(fail closed) except where a hook says otherwise. Replies are validated: a refusal hook
cannot answer 2xx, and no reply can break the line framing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .config import Config
    from .message import MessageHandle
    from .protocol._events import MailParams
    from .protocol._replies import Reply
    from .views import AuthResult, Credentials, DeliveryOutcome, Envelope, Recipient, SessionInfo

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("submitd")
#: Decorate hook implementations with this.
hookimpl = pluggy.HookimplMarker("submitd")


# --- start, reload, stop ------------------------------------------------------------------


@hookspec
def submitd_configure(config: Config) -> None:
    """Validate this plugin's ``[plugins.NAME]`` table and prepare its state.

    Called synchronously at start-up, by ``submitd check-config``, and on every reload
    (SIGHUP) with the new configuration. Read the table with ``config.plugin_table(NAME)``,
    store what you parsed in ``config.stash`` and raise
    ``ConfigError(config.path, "plugins.NAME.KEY", message)`` for anything wrong: on start-up
    the server refuses to run, on reload it keeps the previous configuration. State that must
    survive a reload (counters, a table of hosts marked down) goes in ``config.server_stash``,
    which the server hands unchanged from the old configuration to the new one.

    Blocking rule: a plain ``def`` (it is called directly, never awaited, and
    ``@submitd.blocking`` does not apply); it runs on the event loop during a reload, so read
    files here but never wait on the network.
    """


@hookspec
def submitd_unconfigure(config: Config) -> None:
    """Release what ``submitd_configure`` set up for ``config`` (at stop, and after a reload).

    Blocking rule: a plain ``def`` (it is called directly, never awaited, and
    ``@submitd.blocking`` does not apply); it runs on the event loop during a reload, so read
    files here but never wait on the network.
    """


# --- session --------------------------------------------------------------------------------


@hookspec
def submitd_connect(session: SessionInfo) -> Reply | None:
    """A client connected (after the PROXY header and, on implicit TLS, the handshake).

    Stop rule: first answer. Return a 4xx or 5xx :class:`Reply` to refuse the connection (it
    is sent instead of the greeting, then the connection closes; a 521 is sent as
    ``554 5.7.1``, since RFC 6409 §7 forbids 521 on a submission port). None: continue.
    Failure: the connection is refused with ``421 4.3.0``.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """


@hookspec
def submitd_ehlo_keywords(session: SessionInfo) -> Iterable[str] | None:
    """Extra EHLO keywords to advertise (e.g. ``"DSN"``), collected from every plugin.

    Stop rule: all. Keywords must be ESMTP keywords (letters, digits, hyphen, optional
    parameters after a space). Failure: logged; the plugin's keywords are left out.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """


@hookspec
def submitd_auth(session: SessionInfo, credentials: Credentials) -> AuthResult | None:
    """Decide a login (AUTH PLAIN or LOGIN, inside TLS, after throttling).

    Stop rule: first answer. Return :class:`AuthResult` (``AuthResult.ok(username)`` or
    ``AuthResult.deny()``). None from every plugin means ``535 5.7.8``. Failure:
    ``451 4.3.0`` and the session stays unauthenticated (fail closed). Verify passwords in a
    worker thread: the event loop must never block.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """


@hookspec
def submitd_mail_from(session: SessionInfo, sender: str, params: MailParams) -> Reply | None:
    """MAIL FROM by an authenticated client; ``sender`` is ``""`` for ``<>``.

    Stop rule: first answer. Return a 4xx/5xx :class:`Reply` to refuse (``550 5.7.1`` for a
    sender the login may not use), or None to accept (``250 2.1.0``). Failure: ``451 4.3.0``.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """


@hookspec
def submitd_rcpt_check(
    session: SessionInfo, envelope: Envelope, recipient: Recipient
) -> Reply | None:
    """RCPT TO; ``envelope`` holds the sender and the recipients accepted so far.

    ``recipient`` is a :class:`Recipient`: ``recipient.address`` and its ESMTP parameters
    (``recipient.param("NOTIFY")``); the same value is stored and handed to the queue hooks.

    Stop rule: first answer. A 2xx :class:`Reply` accepts with that text and ends the walk; a
    4xx/5xx reply refuses. None from every plugin accepts: an authenticated submitter may
    relay, and the ``relay`` plugin narrows this. Failure: ``451 4.3.0``. Relay tricks
    (``%``, ``!``, source routes, quoted ``@``, address literals, unqualified domains) are
    refused by the core before this hook runs.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """


@hookspec
def submitd_data_filter(
    session: SessionInfo, envelope: Envelope, message: MessageHandle
) -> Reply | None:
    """The body is complete and spooled (not yet committed); inspect it, edit its headers.

    Stop rule: first answer. Return a 4xx/5xx :class:`Reply` to refuse the message (nothing is
    queued), or None to pass it on. ``message.add_header`` / ``remove_header`` record edits
    that the spool applies on commit. Failure: ``451 4.3.0`` and nothing is queued.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """


@hookspec
def submitd_accepted(session: SessionInfo, envelope: Envelope, queue_id: str) -> None:
    """Observe a message that was just committed to the queue (``envelope.queue_id`` is set).

    Called after the commit and before its ``250`` leaves, for counters, rate limits and
    audit logs. Stop rule: all; return values are ignored and an observer cannot refuse (the
    message is already queued). Each call runs under its hook deadline and is not cancelled
    by a shutdown, so keep it short; a failure is logged and never affects the message.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """


# --- queue ----------------------------------------------------------------------------------


@hookspec
def submitd_deliver(
    config: Config,
    envelope: Envelope,
    message: MessageHandle,
    recipients: tuple[Recipient, ...],
) -> Mapping[str, DeliveryOutcome] | None:
    """Deliver a committed message to some or all of ``recipients``.

    ``recipients`` are the recipients still pending, as :class:`Recipient` values: the
    address, the ESMTP parameters given with ``RCPT TO`` (``recipient.param("NOTIFY")``) and
    the number of attempts made so far. ``message`` is a read-only handle on the stored
    bytes (stream them with ``message.open()``).

    Stop rule: handled-set. Implementations are walked in order; each returns a mapping from
    address to :class:`DeliveryOutcome` for the recipients it took, or None to take none.
    Recipients with an outcome are removed from what the next implementation sees; the walk
    stops when none is left. Set ``DeliveryOutcome.remote`` to the host that gave the reply:
    it becomes the ``Remote-MTA`` of the bounce (RFC 3464 §2.3.5). Permanent failures are
    reported to the sender in one bounce per attempt; temporary ones are retried on the
    ``[queue] retry`` schedule until ``max_age``.

    A recipient no plugin took gets a temporary failure (``451 4.3.0``) and is retried.
    Failure: an exception or a timeout gives every recipient the plugin was offered a
    temporary failure. An answer that is not a mapping, a value that is not a
    ``DeliveryOutcome`` or a key that was not offered is logged as ``plugin_bad_answer``
    with the plugin's name; the recipients concerned get a temporary failure (they are not
    offered to the next plugin: this one may have delivered them). Delivery is
    at-least-once: an attempt interrupted by a crash, or by a shutdown that ran out of
    ``[limits] shutdown_grace``, is repeated.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """


@hookspec
def submitd_delivery_result(
    config: Config, envelope: Envelope, recipient: Recipient, outcome: DeliveryOutcome
) -> None:
    """Observe the outcome of one delivery attempt for one recipient (logs, metrics, webhooks).

    Called after the new state is stored. ``recipient.attempts`` counts this attempt;
    ``outcome.remote`` names the host that answered, when known. A recipient that outlived
    ``[queue] max_age`` is reported as permanent with status ``4.4.7``. Stop rule: all.
    Return values are ignored. Failure: logged, never affects delivery.

    Blocking rule: ``async def``, or a plain ``def`` that never blocks, or mark it
    ``@submitd.blocking``.
    """
