"""smarthost: hand every queued message to a provider's relay over SMTP (RFC 5321, RFC 6409).

Configuration (every key optional unless noted)::

    [plugins.smarthost]                   # the default route (may be left out when routes exist)
    host = "smtp.example.net"             # one host, or hosts = ["a:587", "[2001:db8::1]:587"]
    port = 587                            # default 587 (starttls), 465 (implicit), 25 (none)
    tls = "starttls"                      # starttls | implicit | none
    ca_file = "provider-ca.pem"           # default: the system's trust store
    tls_server_name = "smtp.example.net"  # name verified in the certificate (default: the host)
    username = "relay-user"               # with password_file or password_env
    password_file = "smarthost.secret"    # first line of the file
    client_cert = "client.pem"            # optional, with client_key
    client_key = "client-key.pem"
    host_down_time = "1m"                 # a host that failed is skipped this long
    connect_timeout = "30s"
    command_timeout = "5m"                # greeting, EHLO, AUTH, MAIL, RCPT
    data_timeout = "10m"                  # the reply after the body
    reuse_time = "10s"                    # an idle connection waits this long for more mail
    max_messages_per_connection = 100

    [[plugins.smarthost.route]]           # by envelope sender; first match wins
    name = "partner"                      # default "route-N"
    senders = ["@sales.example.org", "ceo@example.org", "<>"]   # required
    hosts = ["relay.partner.example:465"]
    tls = "implicit"                      # connection and credential keys as above

Hosts of a route are tried in order; a host that fails to connect, to start TLS, to greet or
to log in is marked down for ``host_down_time`` and skipped meanwhile. When every host of the
route is marked down the attempt is deferred at once with ``451 4.4.1``. Replies become
outcomes per recipient: 2xx delivered, 4xx temporary, 5xx permanent; a failure of every host
is temporary for every recipient. A sender no route matches takes the default route; without
one this plugin leaves the message to the next delivery plugin.

Idle connections belong to one configuration: ``submitd_unconfigure`` closes the old
configuration's on reload (SIGHUP). Hosts marked down are remembered in
``config.server_stash``, so a reload keeps them: a host stays skipped while the route of the
same name still lists it and reaches it the same way (TLS mode and files, certificate name,
credentials); changing those gives the route's hosts a fresh start.

A delivery attempt runs under ``[queue] delivery_timeout`` (15 minutes unless set), or under
``hook_timeout`` when ``[plugins.smarthost]`` sets one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio

from submitd import (
    Config,
    DeliveryOutcome,
    Envelope,
    MessageHandle,
    OutcomeKind,
    Recipient,
    Reply,
    StashKey,
    hookimpl,
    logfmt,
)
from submitd.client import ClientSettings, SMTPClient, SMTPClientError, TransactionResult

from ._smarthost_config import HostAddress, Route, SmarthostSettings, parse_settings
from ._smarthost_pool import ConnectionPool, Lease, MarkDown, MarkDownTable, discard

__all__ = ["MARKDOWN", "STATE", "SmarthostState", "submitd_configure", "submitd_deliver",
           "submitd_unconfigure"]

log = logging.getLogger("submitd.plugins.smarthost")

# Failures after which nothing was handed over: the next host may be tried at once. An idle
# connection the server closed meanwhile fails this way on reuse too (a 421 to MAIL, or the
# connection lost waiting for the reply).
_BEFORE_DATA = frozenset({"mail", "rcpt", "reset"})


class SmarthostState:
    """What :func:`submitd_configure` keeps in ``config.stash``: settings, mark-down, pool.

    ``markdown`` reads and writes ``table``, the server-lifetime record of failed hosts.
    """

    __slots__ = ("markdown", "pool", "settings")

    def __init__(self, settings: SmarthostSettings, table: MarkDownTable | None = None) -> None:
        self.settings = settings
        self.markdown = MarkDown(down_time=settings.host_down_time, clock=trio.current_time,
                                 table=table)
        self.pool: ConnectionPool[SMTPClient] = ConnectionPool(
            reuse_time=settings.reuse_time, max_messages=settings.max_messages_per_connection
        )

    def client_settings(self, route: Route, host: HostAddress) -> ClientSettings:
        """How to reach ``host`` of ``route``."""
        return ClientSettings(
            host=host.host,
            port=host.port,
            tls=route.tls,
            ssl_context=route.ssl_context,
            server_hostname=route.server_name,
            helo_name=self.settings.helo_name,
            username=route.username,
            password=route.password,
            timeouts=self.settings.timeouts,
        )


#: Where :func:`submitd_configure` keeps this plugin's state.
STATE = StashKey[SmarthostState]()
#: Where the record of failed hosts is kept in ``config.server_stash``, across reloads.
MARKDOWN = StashKey[MarkDownTable]()


@hookimpl
def submitd_configure(config: Config) -> None:
    """Validate ``[plugins.smarthost]``, read the password, and build the TLS contexts."""
    settings = parse_settings(config)
    table = config.server_stash.setdefault(MARKDOWN, MarkDownTable())
    config.stash[STATE] = SmarthostState(settings, table)
    routes = [*(r.name for r in settings.routes), *(["default"] if settings.default else [])]
    log.info(logfmt("smarthost_configured", routes=",".join(routes)))


@hookimpl
def submitd_unconfigure(config: Config) -> None:
    """Stop reusing this configuration's connections; the idle ones are closed (QUIT)."""
    state = config.stash.get(STATE, None)
    if state is not None:
        state.pool.close()


@hookimpl
async def submitd_deliver(
    config: Config,
    envelope: Envelope,
    message: MessageHandle,
    recipients: tuple[Recipient, ...],
) -> Mapping[str, DeliveryOutcome] | None:
    """Relay the message to the route chosen by its sender; None when no route applies."""
    state = config.stash.get(STATE, None)
    if state is None:
        return None
    route = state.settings.route_for(envelope.sender)
    if route is None:
        log.debug(logfmt("smarthost_no_route", queue_id=envelope.queue_id,
                         sender=envelope.sender or "<>"))
        return None
    log.info(logfmt("smarthost_route", queue_id=envelope.queue_id, route=route.name,
                    sender=envelope.sender or "<>", recipients=len(recipients)))
    outcomes = await _Attempt(state, route, envelope, message, recipients).run()
    counts = {kind: sum(o.kind is kind for o in outcomes.values()) for kind in OutcomeKind}
    worst = next((o for o in outcomes.values() if o.kind is not OutcomeKind.DELIVERED), None)
    log.info(logfmt(
        "smarthost_result", queue_id=envelope.queue_id, route=route.name,
        remote=next((o.remote for o in outcomes.values() if o.remote), None),
        delivered=counts[OutcomeKind.DELIVERED], deferred=counts[OutcomeKind.TEMPORARY],
        failed=counts[OutcomeKind.PERMANENT], reply=worst.reply if worst else None,
    ))
    return outcomes


class _Attempt:
    """One delivery attempt of one message over one route, with failover between hosts."""

    def __init__(self, state: SmarthostState, route: Route, envelope: Envelope,
                 message: MessageHandle, recipients: tuple[Recipient, ...]) -> None:
        self.state = state
        self.route = route
        self.envelope = envelope
        self.message = message
        self.recipients = recipients
        self.tried: set[HostAddress] = set()
        self.last: tuple[HostAddress, SMTPClientError] | None = None

    async def run(self) -> dict[str, DeliveryOutcome]:
        pool = self.state.pool
        lease = await pool.take(self.route.name)
        while True:
            if lease is None:
                lease = await self._connect()
                if lease is None:
                    return self._no_host_left()
            elif lease.reused:
                log.debug(logfmt("smarthost_reuse", queue_id=self.envelope.queue_id,
                                 route=self.route.name, host=lease.host, sent=lease.sent))
            try:
                result = await self._send(lease)
            except SMTPClientError as exc:
                await discard(lease)
                if lease.reused and exc.stage in _BEFORE_DATA:
                    # An idle connection the server had closed: not the host's fault.
                    log.info(logfmt("smarthost_stale_connection", route=self.route.name,
                                    host=lease.host, error=exc))
                    await self._drop_idle()
                    lease = None
                    continue
                self._mark_down(lease.host, exc)
                if exc.stage in _BEFORE_DATA:
                    lease = None
                    continue
                return self._all(DeliveryOutcome.temporary(exc.reply, remote=lease.host.host))
            await pool.give_back(lease)
            return self._outcomes(result, lease.host.host)

    async def _send(self, lease: Lease[SMTPClient]) -> TransactionResult:
        try:
            result = await lease.client.send(
                sender=self.envelope.sender, recipients=self.recipients, message=self.message,
                params=self.envelope.params,
            )
        except SMTPClientError:
            raise
        except BaseException:  # cancelled (hook deadline, shutdown): the dialogue is unknown
            await discard(lease)
            raise
        lease.sent += 1
        return result

    async def _connect(self) -> Lease[SMTPClient] | None:
        """Open a connection to the first host not marked down and not tried yet."""
        for host in self.route.hosts:
            if host in self.tried or self.state.markdown.is_down(self.route, host):
                continue
            self.tried.add(host)
            log.info(logfmt("smarthost_connect", queue_id=self.envelope.queue_id,
                            route=self.route.name, host=host, tls=self.route.tls.value))
            try:
                client = await SMTPClient.connect(self.state.client_settings(self.route, host))
            except SMTPClientError as exc:
                self._mark_down(host, exc)
                continue
            self.state.markdown.clear(self.route, host)
            return Lease(route=self.route.name, host=host, client=client)
        return None

    async def _drop_idle(self) -> None:
        """After one stale idle connection, the others of this route are likely stale too."""
        while (lease := await self.state.pool.take(self.route.name)) is not None:
            await discard(lease)

    def _mark_down(self, host: HostAddress, exc: SMTPClientError) -> None:
        self.tried.add(host)
        self.last = (host, exc)
        self.state.markdown.mark(self.route, host, str(exc))
        log.warning(logfmt("smarthost_host_down", queue_id=self.envelope.queue_id,
                           route=self.route.name, host=host, stage=exc.stage, error=exc,
                           reply=exc.reply, skipped_for=self.state.markdown.down_time))

    def _no_host_left(self) -> dict[str, DeliveryOutcome]:
        if self.last is not None:
            host, exc = self.last
            return self._all(DeliveryOutcome.temporary(exc.reply, remote=host.host))
        error = self.state.markdown.all_down(self.route) or "no host could be tried"
        log.warning(logfmt("smarthost_route_down", queue_id=self.envelope.queue_id,
                           route=self.route.name, error=error))
        reply = Reply.make(451, "4.4.1", _bounded(
            f"all smarthosts of route {self.route.name} marked down: {error}"))
        return self._all(DeliveryOutcome.temporary(reply))

    def _all(self, outcome: DeliveryOutcome) -> dict[str, DeliveryOutcome]:
        return {r.address: outcome for r in self.recipients}

    def _outcomes(self, result: TransactionResult, remote: str) -> dict[str, DeliveryOutcome]:
        outcomes: dict[str, DeliveryOutcome] = {}
        for recipient in self.recipients:
            reply = result.replies.get(recipient.address)
            if reply is None:
                outcomes[recipient.address] = DeliveryOutcome.temporary(
                    Reply.make(451, "4.3.0", "The smarthost gave no reply for this recipient"),
                    remote=remote)
            elif reply.code < 400:
                # RFC 3461 §4.1: a next hop that took NOTIFY/ORCPT/RET/ENVID reports itself.
                outcomes[recipient.address] = DeliveryOutcome.delivered(
                    reply, remote=remote, dsn_passed_on=result.dsn_passed_on)
            elif reply.code < 500:
                outcomes[recipient.address] = DeliveryOutcome.temporary(reply, remote=remote)
            else:
                outcomes[recipient.address] = DeliveryOutcome.permanent(reply, remote=remote)
        return outcomes


def _bounded(text: str, limit: int = 400) -> str:
    """Keep a synthesised reply line within RFC 5321 §4.5.3.1.5 and free of controls."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."
