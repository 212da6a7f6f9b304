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

With ``[server] workers`` above 1 this server is the spool's owner and starts the other
worker processes once the spool is recovered and the listeners are bound
(:mod:`submitd.server.workers`); each of those runs a ``Server`` built with ``worker=``: no
queue runner, no control socket, the owner's listening sockets, and the spool's writer lock.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, replace

import pluggy
import trio

from .._hookcall import HookCaller, PluginDelivery
from .._logfmt import logfmt
from ..config import Config, ListenerConfig, load_config
from ..errors import ConfigError
from ..mailqueue._ids import set_process_tag
from ..mailqueue._lock import admit_writers, join_writers, leave_writers
from ..mailqueue.runner import QueueRunner
from ..mailqueue.spool import Spool
from ..plugin_manager import configure_plugins, create_plugin_manager, unconfigure_plugins
from ..session import Notifier, ServerContext
from ._link import Link
from .connection import ConnectionHandler
from .control import serve_control, socket_path
from .deadlines import Stress
from .limits import ConnectionLimiter
from .shared import SharedCounts, SharedLimiter, SharedThrottle
from .throttle import AuthThrottle, ThrottleSettings
from .tls import TLSContextHolder, make_server_context
from .workers import TrackingRunner, WorkerPool, WorkerSpec

__all__ = ["BoundListener", "Server"]

log = logging.getLogger("submitd.server")


@dataclass(frozen=True, kw_only=True)
class BoundListener:
    """A listener and the address it actually bound (port 0 becomes a real port)."""

    config: ListenerConfig
    host: str
    port: int


class Server:
    """One submitd instance. Build it from a validated :class:`Config`, then ``await serve()``.

    ``worker`` makes it one of the worker processes of a server with ``[server] workers``
    above 1 (:func:`submitd.server.worker_main` passes it); without it, a configuration with
    several workers makes this the spool's owner, which starts the others (``pool``).
    """

    def __init__(self, config: Config, *, extra_plugins: Iterable[tuple[str, object]] = (),
                 worker: WorkerSpec | None = None) -> None:
        if config.tls is None:
            raise ConfigError(config.path, "tls", "a [tls] table is required to serve")
        self._extra = tuple(extra_plugins)
        self.pm: pluggy.PluginManager = create_plugin_manager(config, extra=self._extra)
        configure_plugins(self.pm, config)
        self.tls = TLSContextHolder(config.tls)
        # The queue reads header sections under the same bound as the session.
        self.spool = Spool(config.queue.dir, max_header_size=config.limits.max_header_size)
        self.hooks = HookCaller(self.pm, config.plugins)
        self._config = config
        self._worker = worker
        self.pool: WorkerPool | None = None
        self.link: Link | None = None
        if worker is not None or config.server.workers > 1:
            # Queue IDs made by two processes in one millisecond must differ.
            set_process_tag(worker.index if worker is not None else 0)
        settings = ThrottleSettings.from_limits(config.limits)
        runner_type = QueueRunner if config.server.workers == 1 else TrackingRunner
        self.runner = runner_type(
            self.spool, PluginDelivery(self.hooks, lambda: self._config), config.queue,
            hostname=config.hostname,
        )
        notifier: Notifier = self.runner
        if worker is not None:  # a worker process: the owner delivers
            stream = trio.SocketStream(
                trio.socket.from_stdlib_socket(socket.socket(fileno=worker.link_fd))
            )
            self.link = notifier = Link(stream, peer="owner")
            table = SharedCounts(worker.table_fd)
            self.throttle: AuthThrottle = SharedThrottle(settings, self.link.publish)
            self.limiter: ConnectionLimiter = SharedLimiter(table, worker.index, config.limits)
        elif isinstance(self.runner, TrackingRunner):  # the owner of several workers
            table = SharedCounts.create(config.server.workers)
            shared = SharedThrottle(settings, lambda ok, ip, login: self._publish(ok, ip, login))
            self.pool = WorkerPool(count=config.server.workers, config_path=config.path,
                                   table=table, on_notify=self.runner.notify,
                                   on_auth=shared.apply)
            self.throttle = shared
            self.limiter = SharedLimiter(table, 0, config.limits)
        else:
            self.throttle = AuthThrottle(settings)
            self.limiter = ConnectionLimiter.from_limits(config.limits)
        self.stress = Stress(threshold=config.limits.stress_threshold,
                             timeout=config.limits.stress_timeout)
        self.context = ServerContext(
            config=config, hooks=self.hooks, spool=self.spool, runner=notifier,
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
        writer_fd: int | None = None
        try:
            async with trio.open_nursery() as root:
                control: trio.CancelScope | None = None
                if self._worker is None:
                    await root.start(self._run_runner)
                    if self.pool is not None:  # recovered: the workers may commit now
                        admit_writers(self._config.queue.dir)
                    # The runner holds the spool lock now: operator commands (`submitd queue
                    # ...`) reach it through the control socket in the spool directory.
                    control = await root.start(
                        serve_control, self.runner, socket_path(self._config.queue.dir)
                    )
                else:
                    writer_fd = await trio.to_thread.run_sync(join_writers,
                                                              self._config.queue.dir)
                    self._runner_done.set()
                    root.start_soon(self._follow_owner)
                async with trio.open_nursery() as sessions:
                    listeners = await self._open_listeners()
                    accept_scopes = [trio.CancelScope() for _ in listeners]
                    for (handler, tcp), scope in zip(listeners, accept_scopes, strict=True):
                        sessions.start_soon(self._accept, handler, tcp, sessions, scope)
                    if self.pool is not None and isinstance(self.runner, TrackingRunner):
                        await root.start(self.pool.run, self._sockets(listeners), self.runner,
                                         lambda: self._config.limits.shutdown_grace)
                    task_status.started(list(self.bound))
                    await self._shutdown.wait()
                    if control is not None:
                        control.cancel()  # operator commands end with the server
                    if self.pool is not None:
                        self.pool.stop(now=self._force)
                    # Both the sessions and the deliveries in flight get the same grace.
                    self.runner.stop(self._config.limits.shutdown_grace)
                    for scope in accept_scopes:
                        scope.cancel()
                    for _, tcp in listeners:
                        await tcp.aclose()
                    await self._drain()
                # The root nursery now waits for the runner to finish its attempts in flight
                # (and the owner for its workers to exit).
                if self.link is not None:
                    await self._last_words(root)
        finally:
            if writer_fd is not None:
                leave_writers(writer_fd)
            unconfigure_plugins(self.pm, self._config)
        log.info(logfmt("shutdown_complete"))

    def _sockets(self, listeners: list[tuple[ConnectionHandler, trio.SocketListener]]
                 ) -> list[tuple[trio.socket.SocketType, int]]:
        index = {id(lc): i for i, lc in enumerate(self._config.listeners)}
        return [(tcp.socket, index[id(handler.listener)]) for handler, tcp in listeners]

    def _publish(self, ok: bool, ip: str, login: str) -> None:
        if self.pool is not None:
            self.pool.publish(ok, ip, login)

    async def _follow_owner(self) -> None:
        """A worker: act on the owner's messages; drain when the owner is gone."""
        assert self.link is not None
        assert isinstance(self.throttle, SharedThrottle)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.link.send_loop)
            async for message in self.link.receive():
                op = message.get("op")
                if op == "stop":
                    self.request_shutdown(now=message.get("now") is True)
                elif op == "reload":
                    nursery.start_soon(self.reload)
                elif op == "auth":
                    ok, ip, login = message.get("ok"), message.get("ip"), message.get("login")
                    if isinstance(ok, bool) and isinstance(ip, str) and isinstance(login, str):
                        self.throttle.apply(ok, ip, login)
            if not self._shutdown.is_set():
                log.error(logfmt("owner_gone", action="shut_down"))
                self.request_shutdown()
            await trio.sleep_forever()  # the send loop may still flush; cancelled at the end

    async def _last_words(self, root: trio.Nursery) -> None:
        """A worker after its drain: let the last notifications out, then close the link."""
        assert self.link is not None
        with trio.move_on_after(2.0):
            await self.link.wait_sent()
        root.cancel_scope.cancel()

    async def _open_listeners(self) -> list[tuple[ConnectionHandler, trio.SocketListener]]:
        if self._worker is not None:
            return self._inherited_listeners(self._worker)
        out: list[tuple[ConnectionHandler, trio.SocketListener]] = []
        for lc in self._config.listeners:
            try:
                tcps = await trio.open_tcp_listeners(lc.port, host=lc.host)
            except OSError as exc:
                for _, opened in out:
                    await opened.aclose()
                raise ConfigError(self._config.path, "listen", f"cannot listen on {lc.address}: "
                                  f"{exc.strerror or exc}") from exc
            handler = self._handler(lc)
            for tcp in tcps:
                host, port = tcp.socket.getsockname()[:2]
                self.bound.append(BoundListener(config=lc, host=host, port=port))
                log.info(logfmt("listening", address=host, port=port, mode=lc.mode.value))
                out.append((handler, tcp))
        return out

    def _inherited_listeners(self, spec: WorkerSpec
                             ) -> list[tuple[ConnectionHandler, trio.SocketListener]]:
        out: list[tuple[ConnectionHandler, trio.SocketListener]] = []
        handlers: dict[int, ConnectionHandler] = {}
        for fd, index in spec.listeners:
            if index >= len(self._config.listeners):
                raise ConfigError(self._config.path, "listen",
                                  "the listeners changed since the server started; restart it")
            lc = self._config.listeners[index]
            handler = handlers.get(index) or handlers.setdefault(index, self._handler(lc))
            tcp = trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
            host, port = tcp.socket.getsockname()[:2]
            self.bound.append(BoundListener(config=lc, host=host, port=port))
            out.append((handler, tcp))
        return out

    def _handler(self, lc: ListenerConfig) -> ConnectionHandler:
        handler = ConnectionHandler(
            listener=lc, context=lambda: self.context, tls=self.tls, limiter=self.limiter,
            stress=self.stress,
        )
        self._handlers.append(handler)
        return handler

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
        if self.pool is not None:
            self.pool.stop(now=now)
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
        if self.pool is not None:
            self.pool.reload()  # every worker reads the configuration itself
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
        if new.server != old.server:
            log.warning(logfmt("reload_partial", setting="server.workers",
                               reason="a new number of workers needs a restart"))
        log.info(logfmt("reloaded", config=new.path))
        return True
