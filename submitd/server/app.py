"""The server: plugins, spool, queue runner and listeners in one trio nursery.

``Server.serve`` is what ``submitd serve`` runs and what the in-process test helpers start.
The queue runner takes the spool's lock before anything touches the spool: a second server on
the same spool stops with :class:`~submitd.mailqueue.SpoolLocked` before it listens.
SIGTERM (``request_shutdown``) stops accepting, lets sessions and delivery attempts in flight
finish within ``limits.shutdown_grace`` (attempts record their outcome), then ends the rest:
sessions with ``421 4.3.2``, attempts as abandoned (tried again after a restart). A second
SIGTERM or Ctrl-C (``request_shutdown(now=True)``) ends the rest at once. Committed messages
stay in the spool either way. SIGHUP
(``reload``) re-reads the configuration, the certificate and (through the plugins) the users
file without dropping sessions; a bad new configuration is logged and the old one stays.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, replace

import pluggy
import trio

from .._hookcall import HookCaller, PluginDelivery
from .._logfmt import logfmt
from ..config import Config, ListenerConfig, load_config
from ..errors import ConfigError
from ..mailqueue.runner import QueueRunner
from ..mailqueue.spool import Spool
from ..plugin_manager import configure_plugins, create_plugin_manager, unconfigure_plugins
from ..session import ServerContext
from .connection import ConnectionHandler
from .control import serve_control, socket_path
from .deadlines import Stress
from .limits import ConnectionLimiter
from .throttle import AuthThrottle, ThrottleSettings
from .tls import TLSContextHolder, make_server_context

__all__ = ["BoundListener", "Server"]

log = logging.getLogger("submitd.server")


@dataclass(frozen=True, kw_only=True)
class BoundListener:
    """A listener and the address it actually bound (port 0 becomes a real port)."""

    config: ListenerConfig
    host: str
    port: int


class Server:
    """One submitd instance. Build it from a validated :class:`Config`, then ``await serve()``."""

    def __init__(self, config: Config, *, extra_plugins: Iterable[tuple[str, object]] = ()) -> None:
        if config.tls is None:
            raise ConfigError(config.path, "tls", "a [tls] table is required to serve")
        self._extra = tuple(extra_plugins)
        self.pm: pluggy.PluginManager = create_plugin_manager(config, extra=self._extra)
        configure_plugins(self.pm, config)
        self.tls = TLSContextHolder(config.tls)
        # The queue reads header sections under the same bound as the session.
        self.spool = Spool(config.queue.dir, max_header_size=config.limits.max_header_size)
        self.hooks = HookCaller(self.pm, config.plugins)
        self.throttle = AuthThrottle(ThrottleSettings.from_limits(config.limits))
        self._config = config
        self.runner = QueueRunner(
            self.spool, PluginDelivery(self.hooks, lambda: self._config), config.queue,
            hostname=config.hostname,
        )
        self.limiter = ConnectionLimiter.from_limits(config.limits)
        self.stress = Stress(threshold=config.limits.stress_threshold,
                             timeout=config.limits.stress_timeout)
        self.context = ServerContext(
            config=config, hooks=self.hooks, spool=self.spool, runner=self.runner,
            throttle=self.throttle,
        )
        self.bound: list[BoundListener] = []
        self._shutdown = trio.Event()
        self._force = False
        self._drain_scope: trio.CancelScope | None = None
        self._drained = False
        self._runner_scope = trio.CancelScope()
        self._runner_done = trio.Event()
        self._handlers: list[ConnectionHandler] = []

    @property
    def config(self) -> Config:
        """The configuration new sessions get."""
        return self._config

    async def serve(self, *, task_status: trio.TaskStatus[list[BoundListener]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_shutdown`; ``task_status.started`` gets the bound listeners."""
        try:
            async with trio.open_nursery() as root:
                await root.start(self._run_runner)
                # The runner holds the spool lock now: operator commands (`submitd queue ...`)
                # reach it through the control socket in the spool directory.
                control = await root.start(
                    serve_control, self.runner, socket_path(self._config.queue.dir)
                )
                async with trio.open_nursery() as sessions:
                    listeners = await self._open_listeners()
                    accept_scopes = [trio.CancelScope() for _ in listeners]
                    for (handler, tcp), scope in zip(listeners, accept_scopes, strict=True):
                        sessions.start_soon(self._accept, handler, tcp, sessions, scope)
                    task_status.started(list(self.bound))
                    await self._shutdown.wait()
                    control.cancel()  # operator commands end with the server
                    # Both the sessions and the deliveries in flight get the same grace.
                    self.runner.stop(self._config.limits.shutdown_grace)
                    for scope in accept_scopes:
                        scope.cancel()
                    for _, tcp in listeners:
                        await tcp.aclose()
                    await self._drain()
                # The root nursery now waits for the runner to finish its attempts in flight.
        finally:
            unconfigure_plugins(self.pm, self._config)
        log.info(logfmt("shutdown_complete"))

    async def _open_listeners(self) -> list[tuple[ConnectionHandler, trio.SocketListener]]:
        out: list[tuple[ConnectionHandler, trio.SocketListener]] = []
        for lc in self._config.listeners:
            try:
                tcps = await trio.open_tcp_listeners(lc.port, host=lc.host)
            except OSError as exc:
                for _, opened in out:
                    await opened.aclose()
                raise ConfigError(self._config.path, "listen", f"cannot listen on {lc.address}: "
                                  f"{exc.strerror or exc}") from exc
            handler = ConnectionHandler(
                listener=lc, context=lambda: self.context, tls=self.tls, limiter=self.limiter,
                stress=self.stress,
            )
            self._handlers.append(handler)
            for tcp in tcps:
                host, port = tcp.socket.getsockname()[:2]
                self.bound.append(BoundListener(config=lc, host=host, port=port))
                log.info(logfmt("listening", address=host, port=port, mode=lc.mode.value))
                out.append((handler, tcp))
        return out

    async def _accept(
        self,
        handler: ConnectionHandler,
        tcp: trio.SocketListener,
        sessions: trio.Nursery,
        scope: trio.CancelScope,
    ) -> None:
        with scope, contextlib.suppress(trio.ClosedResourceError):
            await trio.serve_listeners(handler, [tcp], handler_nursery=sessions)

    async def _run_runner(self, *, task_status: trio.TaskStatus[None]
                          = trio.TASK_STATUS_IGNORED) -> None:
        """The queue runner, under a scope a forced shutdown cancels (attempts abandoned)."""
        try:
            with self._runner_scope:
                await self.runner.run(task_status=task_status)
        finally:
            self._runner_done.set()

    def _sessions(self) -> int:
        return sum(len(h.active) for h in self._handlers)

    async def _drain(self) -> None:
        """Wait for sessions and deliveries to end, at most the grace, then end the rest."""
        grace = self._config.limits.shutdown_grace
        sessions, deliveries = self._sessions(), len(self.runner.in_flight)
        started = trio.current_time()
        waiting = bool(sessions or deliveries)
        if waiting:
            log.info(logfmt("shutdown_waiting", sessions=sessions, deliveries=deliveries,
                            grace=f"{grace:g}s",
                            hint="send SIGTERM (or press Ctrl-C) again to stop at once"))
        else:
            log.info(logfmt("shutdown_started", sessions=0, deliveries=0))
        with trio.move_on_after(grace) as self._drain_scope:
            if self._force:
                self._drain_scope.cancel()
            for handler in self._handlers:
                await handler.idle.wait()
            await self._runner_done.wait()
        self._drain_scope = None
        sessions, deliveries = self._sessions(), len(self.runner.in_flight)
        if sessions or deliveries or self._force:
            outcome = "forced" if self._force else "grace_expired"
            # Sessions get 421 4.3.2; deliveries still running are logged attempt_abandoned
            # and tried again after a restart; committed messages stay in the spool.
            log.warning(logfmt("shutdown_wait_over", outcome=outcome, closing_sessions=sessions,
                               abandoning_deliveries=deliveries,
                               waited=f"{trio.current_time() - started:.1f}s"))
        elif waiting:
            log.info(logfmt("shutdown_wait_over", outcome="drained",
                            waited=f"{trio.current_time() - started:.1f}s"))
        self._drained = True
        if self._force:
            self._runner_scope.cancel()
        for handler in self._handlers:
            for scope in list(handler.active):
                scope.cancel()  # each session then sends 421 4.3.2 and closes

    def request_shutdown(self, *, now: bool = False) -> None:
        """Stop accepting and drain (what SIGTERM does); ``now``: end everything at once.

        ``now`` (a second SIGTERM or Ctrl-C) ends the grace period, or skips it: open sessions
        get ``421 4.3.2`` at once and delivery attempts in flight are abandoned (their messages
        stay queued). Without ``now``, calling again changes nothing.
        """
        if now:
            self._force = True
            if self._drain_scope is not None:
                self._drain_scope.cancel()  # _drain counts what is left, then ends it
            elif self._drained:
                self._runner_scope.cancel()
        self._shutdown.set()

    def _prepare_reload(self) -> tuple[Config, ssl.SSLContext]:
        # Plugin state that outlives a reload rides along in the server-lifetime stash.
        new = replace(load_config(self._config.path), server_stash=self._config.server_stash)
        if new.plugins.enable != self._config.plugins.enable:
            raise ConfigError(new.path, "plugins.enable", "changing plugins needs a restart")
        if new.tls is None:
            raise ConfigError(new.path, "tls", "a [tls] table is required to serve")
        context = make_server_context(new.tls)
        configure_plugins(self.pm, new)
        return new, context

    async def reload(self) -> bool:
        """Re-read config, certificate and plugin configuration (what SIGHUP does).

        Returns False (and keeps everything as it was) when the new configuration is invalid.
        The plugin set cannot change on reload: a different ``[plugins] enable`` needs a restart,
        and so do new listeners and a new queue directory or retry schedule.
        """
        try:
            # Reading files and plugin set-up may block: keep them off the event loop.
            new, context = await trio.to_thread.run_sync(self._prepare_reload)
        except ConfigError as exc:
            log.error(logfmt("reload_failed", error=exc))
            return False
        old, self._config = self._config, new
        self.tls.context = context
        self.hooks.plugins = new.plugins
        self.limiter.configure(new.limits)
        self.stress.configure(new.limits)
        self.throttle.configure(ThrottleSettings.from_limits(new.limits))  # counts kept
        self.context = replace(self.context, config=new)
        unconfigure_plugins(self.pm, old)
        log.info(logfmt("reloaded", config=new.path))
        return True
