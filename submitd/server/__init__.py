"""The trio layer: listeners, connection driver, TLS, limits, ``run_server`` and workers."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator

import trio

from .._logfmt import logfmt
from ..config import Config, load_config
from ..errors import ConfigError, SubmitdError
from .app import BoundListener, Server
from .workers import WORKER_ENV, WorkerSpec

__all__ = [
    "LOG_LEVELS",
    "BoundListener",
    "Server",
    "run_server",
    "setup_logging",
    "worker_main",
]

log = logging.getLogger("submitd.server")

#: The names ``submitd serve --log-level`` accepts (default INFO).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    name = level.upper()
    if name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return int(getattr(logging, name))


class _Formatter(logging.Formatter):
    """``%(asctime)s`` as local ``YYYY-MM-DDTHH:MM:SS``, formatted once per second."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt, "%Y-%m-%dT%H:%M:%S")
        self._last = (-1, "")  # (second, its text): one tuple, so threads see a pair

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The record's local time to the second; the text of the last second is reused."""
        second = int(record.created)
        last_second, stamp = self._last
        if second != last_second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(second))
            self._last = (second, stamp)
        return stamp


def setup_logging(level: int | str = logging.INFO, *, worker: int | None = None) -> None:
    """One line per event on stderr, ``key=value`` after the logger name (container-friendly).

    ``level`` is a :mod:`logging` level or one of :data:`LOG_LEVELS`. INFO logs every
    session, refusal and delivery; WARNING keeps failed logins and problems; DEBUG adds
    delivery attempts. No level logs passwords or message content. ``worker`` (with
    ``[server] workers`` above 1) starts every line's fields with ``worker=N`` (0: the owner).
    """
    # The line shows none of the caller's file, thread or process: skip finding them for
    # every record (the stack walk of findCaller is most of what a log call costs).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the documented way to switch it off
    handler = logging.StreamHandler(sys.stderr)
    field = "" if worker is None else f"worker={worker} "
    handler.setFormatter(_Formatter(f"%(asctime)s %(levelname)s %(name)s {field}%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_level(level))


async def _serve_until_done(
    server: Server, done: trio.CancelScope, *,
    task_status: trio.TaskStatus[list[BoundListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await server.serve(task_status=task_status)
    done.cancel()  # the server has stopped: stop listening for signals too


async def _main(config: Config, worker: WorkerSpec | None = None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        server = Server(config, worker=worker)
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_until_done, server, nursery.cancel_scope)
            log.info(logfmt("ready", hostname=config.hostname,
                            workers=config.server.workers if server.pool else None,
                            pid=os.getpid() if worker is not None else None))
            stopping = False
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if stopping:
                        log.info(logfmt("signal_ignored", name=name, reason="shutting down"))
                    else:
                        await server.reload()
                    continue
                # The first SIGTERM/SIGINT drains within limits.shutdown_grace; a second one
                # stops at once (sessions get 421 4.3.2, committed messages stay queued). A
                # worker stops at once only when its owner says so: Ctrl-C in a terminal and
                # a service manager signal the whole process group as well as the owner.
                now = stopping and worker is None
                log.info(logfmt("signal", name=name, action="stop_now" if now else "shut_down"))
                server.request_shutdown(now=now)
                stopping = True


def run_server(config: Config, *, log_level: int | str = logging.INFO) -> int:
    """Serve in the foreground until SIGTERM/SIGINT (a second one stops at once); exit code.

    A start-up failure the server reports on purpose (another server holds the spool's lock,
    a listener cannot bind, a bad certificate) is one ``submitd: ...`` line on stderr: exit 2
    for a configuration error, 1 for anything else, never a traceback.
    """
    setup_logging(log_level, worker=0 if config.server.workers > 1 else None)
    return _run(config, None)


def worker_main() -> int:
    """A worker process's entry point (its :class:`WorkerSpec` is in :data:`WORKER_ENV`)."""
    try:
        spec = WorkerSpec.from_env(os.environ.get(WORKER_ENV, ""))
    except ValueError as exc:
        print(f"submitd: {exc}", file=sys.stderr)
        return 2
    setup_logging(spec.log_level, worker=spec.index)
    try:
        config = load_config(spec.config)
    except ConfigError as exc:
        print(f"submitd: worker {spec.index}: {exc}", file=sys.stderr)
        return 2
    return _run(config, spec)


def _run(config: Config, worker: WorkerSpec | None) -> int:
    # trio restores these when its receiver closes: a second SIGTERM during the last steps of
    # shutdown must not turn a clean exit into death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        trio.run(_main, config, worker)
    except (SubmitdError, OSError) as exc:
        errors: list[BaseException] = [exc]
    except BaseExceptionGroup as group:
        # trio's nurseries wrap errors in exception groups; unwrap ours, re-raise the rest.
        errors = list(_leaf_errors(group))
        if not all(isinstance(exc, SubmitdError | OSError) for exc in errors):
            raise
    else:
        return 0
    for message in dict.fromkeys(str(exc) for exc in errors):
        print(f"submitd: {message}", file=sys.stderr)
    return 2 if any(isinstance(exc, ConfigError) for exc in errors) else 1


def _leaf_errors(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaf_errors(inner)
    else:
        yield exc
