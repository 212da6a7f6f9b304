"""Worker processes (``[server] workers``): one spool owner, N-1 processes that only serve.

The process ``submitd serve`` starts is the *owner*: it takes the spool's lock, recovers the
spool, runs the one queue runner and the control socket, binds the listeners, and only then
starts the other workers with :class:`WorkerPool`. Each worker is a fresh Python process
(``sys.executable``, never a fork of a running event loop) that inherits the listening
sockets and two more descriptors (``pass_fds``), named in the environment variable
:data:`WORKER_ENV`: its end of a :class:`~submitd.server._link.Link` to the owner and the
shared limits table (:mod:`submitd.server.shared`). All processes accept on the same sockets.

A worker commits messages into the spool under a writer's lock
(:func:`submitd.mailqueue._lock.join_writers`) and tells the owner each queue ID over the
link, so delivery starts at once; a notification lost with a worker that died is found by
the owner's rescan of ``env/`` (every :data:`RESCAN_INTERVAL` seconds and after each worker
exit). The owner forwards SIGTERM, a second SIGTERM and SIGHUP to the workers over the link;
it restarts a worker that died, waiting longer after each quick death
(:data:`RESTART_DELAYS`). A worker whose owner died (its link closes) drains and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .._logfmt import logfmt
from ..config import QueueConfig
from ..mailqueue import DeliveryHooks, QueueRunner, Spool, is_queue_id
from ._link import Link
from .shared import SharedCounts

__all__ = [
    "RESCAN_INTERVAL",
    "RESTART_DELAYS",
    "WORKER_ENV",
    "TrackingRunner",
    "WorkerPool",
    "WorkerSpec",
    "worker_command",
]

log = logging.getLogger("submitd.server")

#: The environment variable that makes a process a worker (JSON, see :class:`WorkerSpec`).
WORKER_ENV = "SUBMITD_WORKER"
#: How often the owner looks for committed messages nobody told it about (seconds).
RESCAN_INTERVAL = 30.0
#: Seconds before restarting a worker that died, after 1, 2, ... quick deaths in a row.
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A worker that ran this long before dying is restarted after the first delay again.
_STABLE_AFTER = 60.0
#: After the drain, how long the owner waits for workers before killing them (seconds).
_EXIT_MARGIN = 10.0


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What a worker process is handed: its number, descriptors, config file and log level.

    ``listeners`` pairs each inherited listening socket with the index of its ``[[listen]]``
    table.
    """

    index: int
    link_fd: int
    table_fd: int
    listeners: tuple[tuple[int, int], ...]
    config: Path
    log_level: str

    def to_env(self) -> str:
        """The spec as the value of :data:`WORKER_ENV`."""
        return json.dumps({"index": self.index, "link": self.link_fd, "table": self.table_fd,
                           "listeners": self.listeners, "config": str(self.config),
                           "log_level": self.log_level})

    @classmethod
    def from_env(cls, value: str) -> WorkerSpec:
        """Parse :data:`WORKER_ENV`; ValueError when it is not what an owner writes."""
        try:
            obj = json.loads(value)
            return cls(index=int(obj["index"]), link_fd=int(obj["link"]),
                       table_fd=int(obj["table"]),
                       listeners=tuple((int(fd), int(i)) for fd, i in obj["listeners"]),
                       config=Path(obj["config"]), log_level=str(obj["log_level"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"bad {WORKER_ENV}: {exc}") from None


def worker_command() -> list[str]:
    """The command line of a worker process (the spec travels in the environment)."""
    return [sys.executable, "-c",
            "import sys; from submitd.server import worker_main; sys.exit(worker_main())"]


class TrackingRunner(QueueRunner):
    """The owner's queue runner: remembers every queue ID it was told about.

    :meth:`rescan` finds committed messages whose notification never arrived (a worker died
    between its commit and telling the owner) and attempts them.
    """

    def __init__(self, spool: Spool, hooks: DeliveryHooks, config: QueueConfig, *,
                 hostname: str = "localhost") -> None:
        super().__init__(spool, hooks, config, hostname=hostname)
        self.known: set[str] = set()
        self._tracked_spool = spool

    def notify(self, queue_id: str) -> None:
        """Deliver ``queue_id`` now (see :meth:`QueueRunner.notify`) and remember it."""
        self.known.add(queue_id)
        super().notify(queue_id)

    async def remember_queued(self) -> None:
        """Take every message queued now as known (the runner recovered them at start)."""
        self.known.update(await self._tracked_spool.queued_ids())

    async def rescan(self) -> int:
        """Notify committed messages nobody told us about; return how many there were."""
        before = set(self.known)
        queued = await self._tracked_spool.queued_ids()
        found = [queue_id for queue_id in queued if queue_id not in self.known]
        for queue_id in found:
            self.notify(queue_id)
        self.known -= before - set(queued)  # delivered or deleted since
        if found:
            log.info(logfmt("queue_rescan", found=len(found)))
        return len(found)


@dataclass(kw_only=True)
class _Worker:
    index: int
    link: Link | None = None
    process: trio.Process | None = None


class WorkerPool:
    """The owner's side: starts workers 1..N-1, relays between them, restarts the dead.

    ``on_notify(queue_id)`` and ``on_auth(ok, ip, login)`` receive what workers report.
    """

    def __init__(self, *, count: int, config_path: Path, table: SharedCounts,
                 on_notify: Callable[[str], None],
                 on_auth: Callable[[bool, str, str], None]) -> None:
        self.count = count
        self.config_path = config_path
        self.table = table
        self._on_notify = on_notify
        self._on_auth = on_auth
        self._workers = [_Worker(index=i) for i in range(1, count)]
        self._stopping = False
        self._stop_now = False
        self._stopped = trio.Event()
        self._exited = trio.Event()

    @property
    def pids(self) -> list[int]:
        """The pids of the worker processes running now."""
        return [w.process.pid for w in self._workers
                if w.process is not None and w.process.returncode is None]

    def publish(self, ok: bool, ip: str, login: str, *, source: int = 0) -> None:
        """Tell every worker but ``source`` about a login outcome (the shared throttle)."""
        message = {"op": "auth", "ok": ok, "ip": ip, "login": login}
        for worker in self._workers:
            if worker.index != source and worker.link is not None:
                worker.link.send(message)

    def stop(self, *, now: bool = False) -> None:
        """Tell the workers to drain (``now``: to stop at once); none is restarted after."""
        self._stopping = True
        self._stopped.set()
        self._stop_now = self._stop_now or now
        for worker in self._workers:
            if worker.link is not None:
                worker.link.send({"op": "stop", "now": self._stop_now})

    def reload(self) -> None:
        """Tell the workers to reload their configuration (what SIGHUP does)."""
        for worker in self._workers:
            if worker.link is not None:
                worker.link.send({"op": "reload"})

    async def run(
        self,
        sockets: Sequence[tuple[trio.socket.SocketType, int]],
        runner: TrackingRunner,
        grace: Callable[[], float],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the workers running until :meth:`stop` and they have all exited.

        ``sockets`` are the bound listening sockets with their ``[[listen]]`` index;
        ``grace()`` is the shutdown grace in force (workers still running that long plus a
        margin after :meth:`stop` are killed).
        """
        await runner.remember_queued()
        async with trio.open_nursery() as nursery:
            rescans = trio.CancelScope()
            nursery.start_soon(self._rescan_loop, runner, rescans)
            async with trio.open_nursery() as keepers:
                for worker in self._workers:
                    keepers.start_soon(self._keep, worker, sockets, grace)
                task_status.started()
            rescans.cancel()

    async def _rescan_loop(self, runner: TrackingRunner, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                with trio.move_on_after(RESCAN_INTERVAL):
                    await self._exited.wait()
                self._exited = trio.Event()
                try:
                    await runner.rescan()
                except OSError as exc:  # the runner reports spool trouble itself
                    log.warning(logfmt("queue_rescan_failed", error=exc))

    async def _keep(self, worker: _Worker,
                    sockets: Sequence[tuple[trio.socket.SocketType, int]],
                    grace: Callable[[], float]) -> None:
        quick_deaths = 0
        while not self._stopping:
            started = trio.current_time()
            code: int | None
            try:
                code = await self._run_once(worker, sockets, grace)
            except OSError as exc:  # no process could be started (out of pids, fds, memory)
                log.error(logfmt("worker_start_failed", worker=worker.index, error=exc))
                code = None
            self.table.clear(worker.index)  # its connections are gone
            self._exited.set()
            if self._stopping:
                log.info(logfmt("worker_stopped", worker=worker.index, **_status(code)))
                break
            if trio.current_time() - started >= _STABLE_AFTER:
                quick_deaths = 0
            delay = RESTART_DELAYS[min(quick_deaths, len(RESTART_DELAYS) - 1)]
            quick_deaths += 1
            log.error(logfmt("worker_died", worker=worker.index, **_status(code),
                             restart_in=f"{delay:g}s"))
            with trio.move_on_after(delay):
                await self._stopped.wait()  # a shutdown does not wait for the back-off

    async def _run_once(self, worker: _Worker,
                        sockets: Sequence[tuple[trio.socket.SocketType, int]],
                        grace: Callable[[], float]) -> int | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            spec = WorkerSpec(
                index=worker.index, link_fd=theirs.fileno(), table_fd=self.table.fd,
                listeners=tuple((s.fileno(), i) for s, i in sockets),
                config=self.config_path,
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            )
            env = dict(os.environ, **{WORKER_ENV: spec.to_env()})
            fds = (theirs.fileno(), self.table.fd, *(fd for fd, _ in spec.listeners))
            process = await trio.lowlevel.open_process(
                worker_command(), pass_fds=fds, env=env, stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        link = Link(trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
                    peer=f"worker {worker.index}")
        worker.link, worker.process = link, process
        log.info(logfmt("worker_started", worker=worker.index, pid=process.pid))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.send_loop)
                nursery.start_soon(self._listen, worker.index, link)
                if self._stopping:  # stop() came while this worker was starting
                    link.send({"op": "stop", "now": self._stop_now})
                await self._wait(process, grace)
                nursery.cancel_scope.cancel()
        finally:
            worker.link = None
            with trio.CancelScope(shield=True):
                await link.stream.aclose()
        return process.returncode

    async def _wait(self, process: trio.Process, grace: Callable[[], float]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._kill_late, process, grace)
            await process.wait()
            nursery.cancel_scope.cancel()

    async def _kill_late(self, process: trio.Process, grace: Callable[[], float]) -> None:
        await self._stopped.wait()
        await trio.sleep(grace() + _EXIT_MARGIN)
        log.error(logfmt("worker_killed", pid=process.pid, reason="still running after the grace"))
        process.kill()

    async def _listen(self, index: int, link: Link) -> None:
        async for message in link.receive():
            op = message.get("op")
            if op == "notify":
                for queue_id in message.get("ids") or ():
                    if isinstance(queue_id, str) and is_queue_id(queue_id):
                        self._on_notify(queue_id)
            elif op == "auth":
                ok, ip, login = message.get("ok"), message.get("ip"), message.get("login")
                if isinstance(ok, bool) and isinstance(ip, str) and isinstance(login, str):
                    self._on_auth(ok, ip, login)
                    self.publish(ok, ip, login, source=index)


def _status(code: int | None) -> dict[str, object]:
    """How a worker ended, as log fields: ``exit_code=N`` or ``signal=NAME`` (None: no fields)."""
    if code is None:
        return {}
    if code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": -code}
    return {"exit_code": code}
