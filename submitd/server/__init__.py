"""The trio layer: listeners, connection driver, TLS, limits, and ``run_server``."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator

import trio

from .._logfmt import logfmt
from ..config import Config
from ..errors import ConfigError, SubmitdError
from .app import BoundListener, Server

__all__ = ["BoundListener", "Server", "run_server", "setup_logging"]

log = logging.getLogger("submitd.server")


def setup_logging(level: int = logging.INFO) -> None:
    """One line per event on stderr, ``key=value`` after the logger name (container-friendly)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def _main(config: Config) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        server = Server(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            log.info(logfmt("ready", hostname=config.hostname))
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await server.reload()
                    continue
                log.info(logfmt("signal", name=signal.Signals(signum).name))
                server.request_shutdown()
                break


def run_server(config: Config) -> int:
    """Serve in the foreground until SIGTERM/SIGINT; return the process exit code.

    A start-up failure the server reports on purpose (another server holds the spool's lock,
    a listener cannot bind, a bad certificate) is one ``submitd: ...`` line on stderr: exit 2
    for a configuration error, 1 for anything else, never a traceback.
    """
    setup_logging()
    # trio restores these when its receiver closes: a second SIGTERM during the last steps of
    # shutdown must not turn a clean exit into death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        trio.run(_main, config)
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
