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

    [plugins.smarthost.oauth]             # or [plugins.smarthost.route.oauth]: AUTH XOAUTH2
    provider = "entra"                    # entra | google-service-account | refresh-token
    tenant = "contoso.onmicrosoft.com"    # entra: tenant, client_id, client_secret_file or
    client_id = "00000000-..."            #   client_cert + client_key
    client_secret_file = "entra.secret"   # google: key_file; refresh-token: client_id,
    mailbox = "sender"                    #   refresh_token_file, token_url, mailbox = address
    # scope, token_url, ca_file (the token endpoint's CA), timeout = "30s"

With ``oauth`` the route logs in as a mailbox (the envelope sender's with ``mailbox =
"sender"``, else the one given) with an access token instead of a password; no username or
password keys then. Tokens are cached and refreshed early; a token the server refuses is
fetched once more; a token endpoint that is down or slow defers the message (``451 4.4.3``).
:func:`probe` checks a route (token, DNS, TLS, AUTH) for ``submitd smarthost test``.

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
from dataclasses import dataclass

import trio

from submitd import (
    Config,
    ConfigError,
    DeliveryOutcome,
    Envelope,
    MessageHandle,
    OutcomeKind,
    Recipient,
    Reply,
    Secret,
    StashKey,
    hookimpl,
    logfmt,
)
from submitd.client import ClientSettings, SMTPClient, SMTPClientError, TransactionResult

from ._smarthost_config import HostAddress, Route, SmarthostSettings, parse_settings
from ._smarthost_oauth import Token, TokenError, fetch_token
from ._smarthost_pool import (
    TOKENS,
    ConnectionPool,
    Lease,
    MarkDown,
    MarkDownTable,
    TokenCache,
    discard,
)

__all__ = ["MARKDOWN", "STATE", "ProbeResult", "SmarthostState", "probe", "submitd_configure",
           "submitd_deliver", "submitd_unconfigure"]

log = logging.getLogger("submitd.plugins.smarthost")

# Failures after which nothing was handed over: the next host may be tried at once. An idle
# connection the server closed meanwhile fails this way on reuse too (a 421 to MAIL, or the
# connection lost waiting for the reply).
_BEFORE_DATA = frozenset({"mail", "rcpt", "reset"})


class SmarthostState:
    """What :func:`submitd_configure` keeps in ``config.stash``: settings, mark-down, pool.

    ``markdown`` reads and writes ``table``, the server-lifetime record of failed hosts.
    """

    __slots__ = ("markdown", "pool", "settings", "tokens")

    def __init__(self, settings: SmarthostSettings, table: MarkDownTable | None = None,
                 tokens: TokenCache | None = None) -> None:
        self.settings = settings
        self.tokens = tokens if tokens is not None else TokenCache()
        self.markdown = MarkDown(down_time=settings.host_down_time, clock=trio.current_time,
                                 table=table)
        self.pool: ConnectionPool[SMTPClient] = ConnectionPool(
            reuse_time=settings.reuse_time, max_messages=settings.max_messages_per_connection
        )

    def client_settings(self, route: Route, host: HostAddress, *, mailbox: str | None = None,
                        token: Secret | None = None) -> ClientSettings:
        """How to reach ``host`` of ``route``; with ``token``, AUTH XOAUTH2 as ``mailbox``."""
        if token is not None:
            return ClientSettings(
                host=host.host, port=host.port, tls=route.tls, ssl_context=route.ssl_context,
                server_hostname=route.server_name, helo_name=self.settings.helo_name,
                username=mailbox, oauth_token=token, timeouts=self.settings.timeouts,
            )
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
    tokens = config.server_stash.setdefault(TOKENS, TokenCache())
    config.stash[STATE] = SmarthostState(settings, table, tokens)
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
        if log.isEnabledFor(logging.DEBUG):
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
        oauth = route.oauth
        # With OAuth and mailbox = "sender", a connection is logged in as one sender's mailbox.
        self.mailbox = oauth.mailbox_for(envelope.sender) if oauth is not None else None
        self.pool_key = route.name
        if oauth is not None and oauth.mailbox is None:
            self.pool_key = f"{route.name}\0{self.mailbox}"
        self.token: Token | None = None
        self.token_fresh = False
        self.token_retried = False

    async def run(self) -> dict[str, DeliveryOutcome]:
        try:
            return await self._run()
        except _Defer as defer:
            return self._all(DeliveryOutcome.temporary(defer.reply, remote=defer.remote))

    async def _run(self) -> dict[str, DeliveryOutcome]:
        if self.route.oauth is not None and self.mailbox is None:
            raise _Defer(Reply.make(451, "4.7.0", _bounded(
                f"route {self.route.name} authenticates as the sender's mailbox (OAuth2 "
                "mailbox = \"sender\") and a bounce (<>) has none: set mailbox to an address "
                "with send-as rights, or route <> elsewhere")))
        pool = self.state.pool
        lease = await pool.take(self.pool_key)
        while True:
            if lease is None:
                lease = await self._connect()
                if lease is None:
                    return self._no_host_left()
            elif lease.reused and log.isEnabledFor(logging.DEBUG):
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
            while True:
                log.info(logfmt("smarthost_connect", queue_id=self.envelope.queue_id,
                                route=self.route.name, host=host, tls=self.route.tls.value))
                token = await self._token()
                settings = self.state.client_settings(
                    self.route, host, mailbox=self.mailbox,
                    token=token.value if token is not None else None)
                try:
                    client = await SMTPClient.connect(settings)
                except SMTPClientError as exc:
                    if token is not None and exc.stage == "auth" and exc.reply.code != 504:
                        self._token_refused(host, token, exc)
                        continue  # once more, with a token fetched just now
                    self._mark_down(host, exc)
                    break
                self.state.markdown.clear(self.route, host)
                return Lease(route=self.pool_key, host=host, client=client)
        return None

    def _token_key(self) -> tuple[str, ...]:
        oauth = self.route.oauth
        assert oauth is not None
        mailbox = self.mailbox or "" if oauth.per_mailbox else ""
        return (self.route.name, mailbox, oauth.fingerprint)

    async def _token(self) -> Token | None:
        """The route's access token for the mailbox (None without OAuth); raises _Defer."""
        oauth = self.route.oauth
        if oauth is None:
            return None
        if self.token is not None:
            return self.token
        mailbox = self.mailbox

        async def fetch() -> Token:
            log.info(logfmt("smarthost_token_request", queue_id=self.envelope.queue_id,
                            route=self.route.name, mailbox=mailbox,
                            provider=oauth.provider.value, endpoint=oauth.endpoint_host))
            rotated = self.state.tokens.refresh_tokens
            token = await fetch_token(oauth, mailbox,
                                      refresh_token=rotated.get(oauth.fingerprint))
            if token.refresh_token is not None:
                rotated[oauth.fingerprint] = token.refresh_token
            log.info(logfmt("smarthost_token", route=self.route.name, mailbox=mailbox,
                            endpoint=token.host, expires_in=round(token.lifetime)))
            return token

        try:
            self.token, self.token_fresh = await self.state.tokens.get(self._token_key(), fetch)
        except TokenError as exc:
            log.warning(logfmt("smarthost_token_failed", queue_id=self.envelope.queue_id,
                               route=self.route.name, mailbox=mailbox, error=str(exc)))
            reply = (Reply.make(451, "4.4.3", _bounded(str(exc))) if exc.unreachable
                     else Reply.make(454, "4.7.0", _bounded(str(exc))))
            raise _Defer(reply) from None
        return self.token

    def _token_refused(self, host: HostAddress, token: Token, exc: SMTPClientError) -> None:
        """AUTH XOAUTH2 refused: a cached token is dropped and fetched once more; else defer."""
        log.warning(logfmt("smarthost_token_refused", queue_id=self.envelope.queue_id,
                           route=self.route.name, host=host, mailbox=self.mailbox,
                           cached=not self.token_fresh, error=exc))
        self.state.tokens.invalidate(self._token_key(), token)
        self.token = None
        if self.token_fresh or self.token_retried:
            oauth_error = f" ({exc.oauth_error})" if exc.oauth_error else ""
            reply = Reply.make(454, "4.7.0", _bounded(
                f"AUTH XOAUTH2 as {self.mailbox} refused by {host}: {exc.reply.code} "
                f"{exc.reply.text}{oauth_error}"))
            raise _Defer(reply, remote=host.host)
        self.token_retried = True

    async def _drop_idle(self) -> None:
        """After one stale idle connection, the others of this route are likely stale too."""
        while (lease := await self.state.pool.take(self.pool_key)) is not None:
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


class _Defer(Exception):
    """Give up this attempt: every recipient is deferred with ``reply``."""

    def __init__(self, reply: Reply, remote: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.remote = remote


def _bounded(text: str, limit: int = 400) -> str:
    """Keep a synthesised reply line within RFC 5321 §4.5.3.1.5 and free of controls."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


@dataclass(frozen=True, kw_only=True)
class ProbeResult:
    """What :func:`probe` found: ``ok``, the ``stage`` that failed (or "done"), one line."""

    ok: bool
    stage: str  # "token" | "dns" | "connect" | "tls" | "auth" | "done"
    detail: str


_PROBE_STAGES = {"connect": "connect", "tls": "tls", "starttls": "tls", "auth": "auth"}


async def probe(config: Config, route: str | None, *, mailbox: str | None = None
                ) -> ProbeResult:
    """Check a route without sending mail: token, DNS, connect, TLS, AUTH, then QUIT.

    ``route`` is a route name (None: the default route); ``mailbox`` is the mailbox to log in
    as on an OAuth2 route with ``mailbox = "sender"``. The detail never holds a secret.
    Raises ``ConfigError`` when the plugin is not configured or the route does not exist.
    """
    state = config.stash.get(STATE, None)
    if state is None:
        raise ConfigError(config.path, "plugins.smarthost", "the smarthost plugin is not "
                                                            "configured")
    chosen = _route_named(config, state.settings, route)
    done: list[str] = []
    token: Token | None = None
    oauth = chosen.oauth
    if oauth is not None:
        mailbox = mailbox or oauth.mailbox
        if mailbox is None:
            raise ConfigError(config.path, "plugins.smarthost.oauth.mailbox", (
                f'route {chosen.name} authenticates as the sender (mailbox = "sender"): '
                "name the mailbox to test with --mailbox ADDR"))
        try:
            token = await fetch_token(oauth, mailbox)
        except TokenError as exc:
            return ProbeResult(ok=False, stage="token", detail=str(exc))
        done.append(f"token from {token.host} (expires in {_minutes(token.lifetime)})")
    failure = ProbeResult(ok=False, stage="dns", detail="the route has no host")
    for host in chosen.hosts:
        try:
            await trio.socket.getaddrinfo(host.host, host.port, type=trio.socket.SOCK_STREAM)
        except OSError as exc:
            failure = ProbeResult(ok=False, stage="dns", detail=f"{host.host}: {exc}")
            continue
        settings = state.client_settings(chosen, host, mailbox=mailbox,
                                         token=token.value if token is not None else None)
        try:
            client = await SMTPClient.connect(settings)
        except SMTPClientError as exc:
            why = str(exc.reply) + (f" (XOAUTH2 {exc.oauth_error})" if exc.oauth_error else "")
            failure = ProbeResult(ok=False, stage=_PROBE_STAGES.get(exc.stage, "connect"),
                                  detail=_bounded(f"{host}: {why}"))
            continue
        try:
            version = client.tls_version
            if chosen.tls.value != "none":
                done.append(f"TLS{' ' + version if version else ''} ({chosen.tls.value}) "
                            f"to {host}")
            else:
                done.append(f"connected to {host} without TLS")
            if token is not None:
                done.append(f"AUTH XOAUTH2 as {mailbox} accepted")
            elif chosen.username is not None:
                done.append(f"AUTH as {chosen.username} accepted")
        finally:
            await client.aclose()
        return ProbeResult(ok=True, stage="done", detail=", ".join(done))
    return failure


def _route_named(config: Config, settings: SmarthostSettings, name: str | None) -> Route:
    if name is None or name == "default":
        if settings.default is None:
            raise ConfigError(config.path, "plugins.smarthost", "there is no default route "
                              "(no host or hosts): name a route")
        return settings.default
    for route in settings.routes:
        if route.name == name:
            return route
    known = (["default"] if settings.default is not None else []) + [
        r.name for r in settings.routes]
    names = ", ".join(known) or "none"
    raise ConfigError(config.path, "plugins.smarthost.route",
                      f"no route named {name!r} (routes: {names})")


def _minutes(seconds: float) -> str:
    return f"{round(seconds / 60)}m" if seconds >= 60 else f"{round(seconds)}s"
