"""The queue's control socket: how ``submitd queue`` steers a running server.

The server listens on a unix socket (``<queue dir>/control.sock``, mode 0600, owner-only
directory) and the CLI sends one request per connection: one JSON line::

    {"op": "flush" | "hold" | "release" | "delete", "id": "QUEUE-ID" | null, "bounce": false}

and reads one JSON line back: ``{"ok": true}`` or ``{"ok": false, "error": "..."}``. Both
lines are bounded (:data:`MAX_LINE`) and every step has a deadline on both sides. The server
acts only through the queue runner (so the CLI and the runner never both act on a message),
answers every malformed request with an error instead of failing, and accepts only peers
running as its own user or root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from .._logfmt import logfmt
from ..errors import SpoolError, SubmitdError
from ..mailqueue import QueueEntryMissing, QueueRecord, is_queue_id

__all__ = [
    "CONTROL_SOCKET_NAME",
    "MAX_LINE",
    "OPERATION_TIMEOUT",
    "ControlError",
    "ControlRefused",
    "ControlRequest",
    "QueueControl",
    "send_request",
    "serve_control",
    "socket_path",
]

log = logging.getLogger("submitd.control")

#: The socket's file name inside the queue directory.
CONTROL_SOCKET_NAME = "control.sock"
#: The longest request or response line, newline included.
MAX_LINE = 4096
#: How long a peer may take to send its request or read the response (seconds).
IO_TIMEOUT = 5.0
#: How long the server waits for the runner (an attempt in flight on the message may have to
#: finish first); the CLI waits this plus the I/O allowance.
OPERATION_TIMEOUT = 60.0
_MAX_CONNECTIONS = 8
_MAX_ERROR = 1000
_MAX_DRAIN = 65536
_OPS = ("flush", "hold", "release", "delete")
# AF_UNIX paths are limited (108 bytes on Linux, 104 on the BSDs); longer ones are reached
# through the directory's descriptor (Linux /proc/self/fd).
_MAX_SOCKET_PATH = 100


class QueueControl(Protocol):
    """What the control socket asks of the queue runner."""

    @property
    def in_flight(self) -> frozenset[str]:
        """The queue IDs being attempted right now."""
        ...

    def exclusive(self, queue_id: str, /) -> AbstractAsyncContextManager[QueueRecord]:
        """Keep the runner off ``queue_id`` meanwhile; QueueEntryMissing if unknown."""
        ...

    def notify(self, queue_id: str, /) -> object:
        """Attempt ``queue_id`` now (a held message stays held)."""
        ...

    def flush_all(self) -> object:
        """Attempt every queued message that is not held now."""
        ...

    async def hold(self, queue_id: str, /) -> object:
        """Keep ``queue_id`` from being attempted; raise QueueEntryMissing if unknown."""
        ...

    async def release(self, queue_id: str, /) -> object:
        """Let ``queue_id`` be attempted again; raise QueueEntryMissing if unknown."""
        ...

    async def delete(self, queue_id: str, /, *, bounce: bool) -> object:
        """Remove ``queue_id`` (with a bounce to its sender if asked); QueueEntryMissing."""
        ...


class ControlError(SubmitdError):
    """The server could not be asked (no socket, no answer in time, garbage back)."""


class ControlRefused(ControlError):
    """The server answered and refused the request (no such message, for one)."""


@dataclass(frozen=True, kw_only=True)
class ControlRequest:
    """One validated request: an operation, a queue ID (None: every message) and ``bounce``."""

    op: str
    queue_id: str | None = None
    bounce: bool = False

    def to_line(self) -> bytes:
        """The request as sent: one JSON line."""
        obj = {"op": self.op, "id": self.queue_id, "bounce": self.bounce}
        return json.dumps(obj, ensure_ascii=True).encode("ascii") + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> ControlRequest:
        """Validate a request line; raise ValueError with a message for the peer."""
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError("the request is not a JSON line") from None
        if not isinstance(obj, dict):
            raise ValueError("the request is not a JSON object")
        op = obj.get("op")
        if op not in _OPS:
            raise ValueError(f"unknown op; expected one of {', '.join(_OPS)}")
        queue_id = obj.get("id")
        bounce = obj.get("bounce", False)
        if not isinstance(bounce, bool):
            raise ValueError("bounce must be true or false")
        if queue_id is None and op != "flush":
            raise ValueError(f"{op} needs a queue ID")
        if queue_id is not None and not (isinstance(queue_id, str) and is_queue_id(queue_id)):
            shown = queue_id if isinstance(queue_id, str) else json.dumps(queue_id)
            raise ValueError(f"no queued message {shown[:40]}")
        return cls(op=op, queue_id=queue_id, bounce=bounce)


# --- paths ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _socket_address(path: Path) -> Iterator[str]:
    """An address for ``path`` that fits in ``sockaddr_un`` (valid inside the ``with``)."""
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENAMETOOLONG, "too long for a unix socket", str(path))
        yield short
    finally:
        os.close(fd)


# --- the server -----------------------------------------------------------------------------


async def serve_control(
    runner: QueueControl,
    path: Path,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    operation_timeout: float = OPERATION_TIMEOUT,
) -> None:
    """Listen on ``path`` and carry out requests through ``runner`` until cancelled.

    Start it with ``scope = await nursery.start(serve_control, runner, path)``; cancelling
    ``scope`` stops it (requests in progress are cut off) and removes the socket. The caller
    holds the spool lock: that is what makes a socket left at ``path`` by a server that died
    stale, so it is replaced; if something still answers there, this raises
    OSError(EADDRINUSE) instead.
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        inode = await _bind(sock, path)
        sock.listen(_MAX_CONNECTIONS)
    except BaseException:
        sock.close()
        raise
    listener = trio.SocketListener(sock)
    slots = trio.Semaphore(_MAX_CONNECTIONS)
    log.info(logfmt("control_listening", path=path))
    try:
        async with listener, trio.open_nursery() as nursery:
            task_status.started(nursery.cancel_scope)
            while True:
                await slots.acquire()
                try:
                    stream = await listener.accept()
                except BaseException:
                    slots.release()
                    raise
                nursery.start_soon(_handle, runner, stream, slots, operation_timeout)
    finally:
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == inode:  # never remove a later server's socket
                os.unlink(path)


async def _bind(sock: trio.socket.SocketType, path: Path) -> int:
    """Bind ``sock`` at ``path`` with mode 0600, replacing a stale socket; return its inode."""
    await _refuse_live_socket(path)
    # Bound under a random name, restricted, then renamed: the final name never exists with
    # looser permissions, and the rename replaces a stale socket atomically.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    with _socket_address(tmp) as address:
        await sock.bind(address)
    try:
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return os.lstat(path).st_ino


async def _refuse_live_socket(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "exists and is not a socket; remove it", str(path))
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe, _socket_address(path) as address:
        try:
            await probe.connect(address)
        except OSError:
            return  # nobody listens: left by a server that died
    raise OSError(errno.EADDRINUSE, "another process answers on this control socket", str(path))


def _peer_allowed(stream: trio.SocketStream) -> bool:
    """Only our own user and root may steer the queue (the socket's mode says the same)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:  # not Linux: the 0600 socket in a 0700 directory is the check
        return True
    # struct ucred: pid_t pid, uid_t uid, gid_t gid (socket(7))
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("iII"))
    _pid, uid, _gid = struct.unpack("iII", creds)
    return uid in (0, os.geteuid())


async def _handle(
    runner: QueueControl, stream: trio.SocketStream, slots: trio.Semaphore, patience: float
) -> None:
    try:
        async with stream:
            response = await _respond(runner, stream, patience)
            with trio.move_on_after(IO_TIMEOUT):
                await stream.send_all(_response_line(response))
                # Read what the peer sent beyond the request (bounded): closing with unread
                # input would reset the connection and could destroy the response.
                drained = 0
                while drained < _MAX_DRAIN and (data := await stream.receive_some(MAX_LINE)):
                    drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the peer went away; it will report that itself
    except Exception:  # a bug must not take the server down with it
        log.exception(logfmt("control_failed"))
    finally:
        slots.release()


async def _respond(
    runner: QueueControl, stream: trio.SocketStream, patience: float
) -> Mapping[str, Any]:
    if not _peer_allowed(stream):
        log.warning(logfmt("control_refused", reason="peer is neither our user nor root"))
        return _failure("permission denied")
    received = False
    with trio.move_on_after(IO_TIMEOUT):
        try:
            line = await _receive_line(stream)
        except ValueError as exc:
            return _failure(str(exc))
        received = True
    if not received:
        return _failure("no complete request line in time")
    if line is None:
        return _failure("the request ended without a newline")
    try:
        request = ControlRequest.parse(line)
    except ValueError as exc:
        return _failure(str(exc))
    with trio.move_on_after(patience) as scope:
        try:
            await _perform(runner, request)
        except QueueEntryMissing:
            result = _failure(f"no queued message {request.queue_id}")
        except ControlRefused as exc:
            result = _failure(str(exc))
        except SpoolError as exc:
            result = _failure(str(exc))
        except Exception as exc:
            log.exception(logfmt("control_op_failed", op=request.op, queue_id=request.queue_id))
            result = _failure(f"internal error: {type(exc).__name__}")
        else:
            result = {"ok": True}
    if scope.cancelled_caught:
        result = _failure(f"gave up after {patience:g}s waiting for the queue; try again")
    log.info(logfmt("control", op=request.op, queue_id=request.queue_id, bounce=request.bounce
                    or None, ok=result["ok"], error=result.get("error")))
    return result


async def _perform(runner: QueueControl, request: ControlRequest) -> None:
    queue_id = request.queue_id
    if request.op == "flush" and queue_id is None:
        runner.flush_all()
        return
    if request.op == "flush" and queue_id is not None:
        if queue_id in runner.in_flight:  # it exists: attempted again right after this one
            runner.notify(queue_id)
            return
        async with runner.exclusive(queue_id) as record:  # raises if there is no such message
            if record.held:
                raise ControlRefused(f"{queue_id} is held: release it first")
            runner.notify(queue_id)  # due at once when the block ends
        return
    assert queue_id is not None  # ControlRequest.parse guarantees it
    if request.op == "hold":
        await runner.hold(queue_id)
    elif request.op == "release":
        await runner.release(queue_id)
    else:
        await runner.delete(queue_id, bounce=request.bounce)


def _failure(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error[:_MAX_ERROR]}


def _response_line(response: Mapping[str, Any]) -> bytes:
    return json.dumps(response, ensure_ascii=True).encode("ascii") + b"\n"


async def _receive_line(stream: trio.abc.ReceiveStream) -> bytes | None:
    """One line (without its newline); None at end of stream before a newline.

    Raises ValueError for a line longer than :data:`MAX_LINE` bytes.
    """
    buffer = bytearray()
    while b"\n" not in buffer:
        if len(buffer) >= MAX_LINE:
            raise ValueError(f"the line is longer than {MAX_LINE} bytes")
        data = await stream.receive_some(MAX_LINE - len(buffer))
        if not data:
            return None
        buffer += data
    return bytes(buffer[: buffer.index(b"\n")])


# --- the client -----------------------------------------------------------------------------


async def send_request(
    path: Path, request: ControlRequest, *, patience: float = OPERATION_TIMEOUT + 2 * IO_TIMEOUT
) -> None:
    """Send ``request`` to the server listening on ``path``; raise ControlError if it failed.

    A server refusing the request (no such message, for one) raises :class:`ControlRefused`
    with the server's own message.
    """
    with trio.move_on_after(patience) as scope:
        response = await _exchange(path, request)
    if scope.cancelled_caught:
        raise ControlError(f"the server did not answer on {path} within {patience:g}s")
    if response.get("ok") is True:
        return
    error = response.get("error")
    raise ControlRefused(str(error) if isinstance(error, str) else "the server refused")


async def _exchange(path: Path, request: ControlRequest) -> Mapping[str, Any]:
    try:
        with _socket_address(path) as address:
            stream = await trio.open_unix_socket(address)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(f"no server answers on {path}: {exc.strerror}") from None
    except OSError as exc:
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    async with stream:
        try:
            await stream.send_all(request.to_line())
            line = await _receive_line(stream)
        except (trio.BrokenResourceError, OSError) as exc:
            raise ControlError(f"the server at {path} dropped the connection: {exc}") from None
        except ValueError:
            line = None
    try:
        obj = json.loads(line) if line is not None else None
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise ControlError(f"no readable answer from the server at {path}")
    return obj


def socket_path(queue_dir: Path) -> Path:
    """The control socket of the spool in ``queue_dir``."""
    return Path(queue_dir) / CONTROL_SOCKET_NAME

