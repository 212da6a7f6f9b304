"""The trio layer: listeners, connection driver, TLS, limits, and ``run_server``."""

from __future__ import annotations

import logging
import signal
import sys

import trio

from .._logfmt import logfmt
from ..config import Config
from ..errors import ConfigError
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
    """Serve in the foreground until SIGTERM/SIGINT; return the process exit code."""
    setup_logging()
    # trio restores these when its receiver closes: a second SIGTERM during the last steps of
    # shutdown must not turn a clean exit into death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        trio.run(_main, config)
    except ConfigError as exc:
        print(f"submitd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"submitd: {exc}", file=sys.stderr)
        return 1
    return 0
