"""Await hook implementations in pluggy's order and apply submitd's stop rules.

pluggy calls implementations but does not await coroutines, so this module walks
``hook.get_hookimpls()`` itself (pluggy calls the list back to front), awaits each result,
runs every call under the plugin's deadline, and turns exceptions and timeouts into
:class:`PluginError` carrying the plugin's name. ``Reject(reply)`` is an answer, not an error.
Three stop rules: *first answer* (:meth:`HookCaller.first`), *all*
(:meth:`HookCaller.collect`) and *handled-set* (:meth:`HookCaller.handled_set`, for
``submitd_deliver``).

A plain ``def`` implementation runs on the event loop: while it runs, no other session moves
and no deadline can interrupt it. Each such call is timed; one that takes longer than
:data:`BLOCKED_WARNING` is logged as ``event=plugin_blocked`` with the plugin, the hook and the
milliseconds. An implementation marked with :func:`blocking` runs in a worker thread instead.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import pluggy
import trio

from ._logfmt import logfmt
from .config import Config, PluginsConfig
from .errors import PluginError, Reject
from .mailqueue._outcomes import UNHANDLED
from .message import MessageHandle
from .protocol._grammar import replace_controls
from .protocol._replies import Reply
from .views import DeliveryOutcome, Envelope, Recipient

__all__ = ["BLOCKED_WARNING", "HandledSet", "HookCaller", "PluginDelivery", "blocking"]

log = logging.getLogger("submitd.plugins")

T = TypeVar("T")
K = TypeVar("K")
F = TypeVar("F", bound=Callable[..., Any])

#: A plain ``def`` hook that holds the event loop longer than this (seconds) is logged.
BLOCKED_WARNING = 0.05
#: The attribute :func:`blocking` sets on a hook implementation.
BLOCKING_ATTR = "submitd_blocking"
_MAX_ERROR_TEXT = 200


def blocking(function: F) -> F:
    """Mark a plain ``def`` hook implementation as blocking: submitd runs it in a worker thread.

    Use it for a hook that reads files, queries a database or calls a library without an
    async API::

        @submitd.hookimpl
        @submitd.blocking
        def submitd_rcpt_check(session, envelope, recipient): ...

    The call runs under the hook's usual deadline (``hook_timeout``). When the deadline
    passes, the session goes on (the hook failed) but Python cannot stop a thread: the
    function keeps running in its thread until it returns, and its result is thrown away.
    Keep the work bounded (set timeouts on sockets and database calls). Coroutine functions
    are refused: an ``async def`` hook must await instead of blocking.
    """
    if inspect.iscoroutinefunction(function):
        raise TypeError(
            f"{function.__qualname__} is async: @submitd.blocking is for plain def hooks"
        )
    setattr(function, BLOCKING_ATTR, True)
    return function


def _is_blocking(function: Callable[..., Any]) -> bool:
    return getattr(function, BLOCKING_ATTR, False) is True


class _Kind(enum.Enum):
    """How a hook implementation is called."""

    ASYNC = "async"  # awaited on the event loop
    BLOCKING = "blocking"  # marked @blocking: run in a worker thread
    PLAIN = "plain"  # a plain def on the event loop, timed


def _kind(function: Callable[..., Any]) -> _Kind:
    if _is_blocking(function):
        return _Kind.BLOCKING
    return _Kind.ASYNC if inspect.iscoroutinefunction(function) else _Kind.PLAIN


def error_text(exc: BaseException) -> str:
    """``exc``'s message as one bounded log-safe line (controls replaced, at most 200 chars)."""
    text = " ".join(replace_controls(str(exc), " ").split())
    if len(text) > _MAX_ERROR_TEXT:
        text = text[: _MAX_ERROR_TEXT - 3] + "..."
    return text or "-"

_PLUGIN_FAILED = Reply.make(451, "4.3.0", "Delivery plugin failed, will retry")


class HookCaller:
    """Call submitd hooks on a pluggy ``PluginManager`` with deadlines and stop rules."""

    def __init__(self, pm: pluggy.PluginManager, plugins: PluginsConfig) -> None:
        self.pm = pm
        self.plugins = plugins
        # How each implementation is called, found once (inspect is slow for a per-hook cost).
        self._kinds: dict[Callable[..., Any], _Kind] = {}
        for impl in pm.hook.__dict__.values():
            if not isinstance(impl, pluggy.HookCaller):
                continue
            for hi in impl.get_hookimpls():
                if hi.hookwrapper or hi.wrapper:
                    raise ValueError(
                        f"plugin {hi.plugin_name!r}: hook wrappers are not supported by submitd"
                    )

    def impls(self, name: str) -> list[pluggy.HookImpl]:
        """The implementations of hook ``name`` in the order they are asked."""
        hook: pluggy.HookCaller = getattr(self.pm.hook, name)
        return list(reversed(hook.get_hookimpls()))

    async def call(
        self,
        impl: pluggy.HookImpl,
        name: str,
        kwargs: Mapping[str, Any],
        *,
        default_timeout: float | None = None,
    ) -> Any:
        """Call one implementation under its deadline; ``Reject`` returns its reply.

        The deadline is the plugin's own ``hook_timeout``, else ``default_timeout``, else
        ``[plugins] hook_timeout``. An implementation marked :func:`blocking` runs in a worker
        thread (abandoned, still running, when the deadline passes); a plain ``def`` that
        holds the event loop longer than :data:`BLOCKED_WARNING` is logged as
        ``plugin_blocked``.
        """
        function: Callable[..., Any] = impl.function
        kind = self._kinds.get(function)
        if kind is None:
            kind = self._kinds[function] = _kind(function)
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        timeout = self.plugins.timeout_for(impl.plugin_name, default_timeout)
        session = kwargs.get("session")
        sid = getattr(session, "session_id", "-")
        result: Any = None
        try:
            # A plain CancelScope rather than trio.fail_after: this runs for every hook of
            # every command, and fail_after is a generator-based context manager.
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                if kind is _Kind.ASYNC:
                    result = await function(**args)
                else:
                    if kind is _Kind.BLOCKING:
                        result = await trio.to_thread.run_sync(
                            functools.partial(function, **args), abandon_on_cancel=True
                        )
                    else:
                        result = self._call_on_loop(impl, name, args, sid)
                    if inspect.isawaitable(result):
                        result = await result
        except Reject as exc:
            return exc.reply
        except Exception as exc:
            message = error_text(exc)
            log.error(logfmt("plugin_error", session=sid, plugin=impl.plugin_name, hook=name,
                             error=type(exc).__name__, message=message), exc_info=True)
            raise PluginError(impl.plugin_name, name, f"{type(exc).__name__}: {message}") from exc
        if scope.cancelled_caught:
            log.error(logfmt("plugin_timeout", session=sid, plugin=impl.plugin_name, hook=name,
                             timeout=timeout))
            raise PluginError(impl.plugin_name, name, f"timed out after {timeout:g}s")
        return result

    @staticmethod
    def _call_on_loop(
        impl: pluggy.HookImpl, name: str, args: Mapping[str, Any], sid: str
    ) -> Any:
        """Call a plain ``def`` directly, logging ``plugin_blocked`` when it held the loop."""
        start = time.monotonic()
        try:
            return impl.function(**args)
        finally:
            elapsed = time.monotonic() - start
            if elapsed > BLOCKED_WARNING:
                log.warning(logfmt("plugin_blocked", plugin=impl.plugin_name, hook=name,
                                   ms=round(elapsed * 1000), session=sid,
                                   hint="make it async or mark it @submitd.blocking"))

    async def first(
        self, name: str, validate: Callable[[object], T], **kwargs: Any
    ) -> tuple[str, T] | None:
        """Stop rule *first answer*: the first non-None result, validated, and its plugin.

        ``validate`` returns the typed value or raises ``TypeError``/``ValueError``, which
        becomes a :class:`PluginError` naming the plugin.
        """
        for impl in self.impls(name):
            result = await self.call(impl, name, kwargs)
            if result is None:
                continue
            try:
                return impl.plugin_name, validate(result)
            except (TypeError, ValueError) as exc:
                log.error(logfmt("plugin_bad_answer", plugin=impl.plugin_name, hook=name,
                                 error=exc))
                raise PluginError(impl.plugin_name, name, f"invalid answer: {exc}") from exc
        return None

    async def collect(self, name: str, **kwargs: Any) -> list[tuple[str, object]]:
        """Stop rule *all*: every non-None result; a failing plugin is logged and skipped."""
        results: list[tuple[str, object]] = []
        for impl in self.impls(name):
            try:
                result = await self.call(impl, name, kwargs)
            except PluginError:
                continue
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    async def handled_set(
        self,
        name: str,
        offered: Mapping[K, Any],
        *,
        argname: str,
        validate: Callable[[object], T],
        default_timeout: float | None = None,
        **kwargs: Any,
    ) -> HandledSet[K, T]:
        """Stop rule *handled-set*: each plugin answers for some of what is still offered.

        Implementations are asked in order with ``argname`` = the values of ``offered`` that no
        earlier plugin answered for; each returns a mapping from key to answer (or None to take
        none). An answer that ``validate`` rejects (TypeError/ValueError), a key that was not
        offered, or an answer that is not a mapping is logged as ``plugin_bad_answer`` naming
        the plugin: a bad value puts its key in ``failed`` (the plugin took it; nobody else may
        deliver it again), a non-mapping fails every key still offered. A plugin that raises or
        times out fails every key still offered, and the walk stops. Keys nobody answered for
        are in neither ``answers`` nor ``failed``. ``default_timeout`` is the deadline of
        plugins without their own ``hook_timeout`` (see :meth:`call`).
        """
        remaining = dict(offered)
        out: HandledSet[K, T] = HandledSet()
        for impl in self.impls(name):
            if not remaining:
                break
            plugin = impl.plugin_name
            offer = {**kwargs, argname: tuple(remaining.values())}
            try:
                result = await self.call(impl, name, offer, default_timeout=default_timeout)
            except PluginError:
                out.failed.update(dict.fromkeys(remaining, plugin))
                return out
            if result is None:
                continue
            if not isinstance(result, Mapping):
                log.error(logfmt("plugin_bad_answer", plugin=plugin, hook=name,
                                 error=f"expected a mapping, got {type(result).__name__}"))
                out.failed.update(dict.fromkeys(remaining, plugin))
                return out
            unknown = [key for key in result if key not in remaining]
            if unknown:
                log.error(logfmt("plugin_bad_answer", plugin=plugin, hook=name,
                                 error=f"answered for {len(unknown)} key(s) it was not offered",
                                 keys=",".join(str(k) for k in unknown[:5])))
            for key, value in result.items():
                if key not in remaining:
                    continue
                del remaining[key]
                try:
                    out.answers[key] = validate(value)
                except (TypeError, ValueError) as exc:
                    log.error(logfmt("plugin_bad_answer", plugin=plugin, hook=name, key=key,
                                     error=exc))
                    out.failed[key] = plugin
        return out


class HandledSet(Generic[K, T]):
    """The answers of a *handled-set* walk: per key, the value or the plugin that failed on it."""

    def __init__(self) -> None:
        self.answers: dict[K, T] = {}
        #: Keys a plugin took but failed on (raised, timed out, or answered with a bad value).
        self.failed: dict[K, str] = {}


def _outcome(value: object) -> DeliveryOutcome:
    if not isinstance(value, DeliveryOutcome):
        raise TypeError(f"expected a DeliveryOutcome, got {type(value).__name__}")
    return value


class PluginDelivery:
    """The queue runner's view of the ``submitd_deliver`` and ``submitd_delivery_result`` hooks."""

    def __init__(self, caller: HookCaller, config: Callable[[], Config]) -> None:
        self._caller = caller
        self._config = config

    async def deliver(
        self, envelope: Envelope, message: MessageHandle, recipients: tuple[Recipient, ...]
    ) -> dict[str, DeliveryOutcome]:
        """Stop rule *handled-set*; never raises.

        A recipient whose plugin failed or answered with something that is not a
        :class:`DeliveryOutcome` comes back as a temporary failure (``451 4.3.0``), and so does
        one no plugin took; both are retried.
        """
        result = await self._caller.handled_set(
            "submitd_deliver",
            {r.address: r for r in recipients},
            argname="recipients",
            validate=_outcome,
            default_timeout=self._config().queue.delivery_timeout,
            config=self._config(),
            envelope=envelope,
            message=message,
        )
        outcomes = dict(result.answers)
        for address, plugin in result.failed.items():
            log.warning(logfmt("delivery_plugin_failed", queue_id=envelope.queue_id,
                               plugin=plugin, rcpt=address))
            outcomes[address] = DeliveryOutcome.temporary(_PLUGIN_FAILED)
        for recipient in recipients:
            outcomes.setdefault(recipient.address, UNHANDLED)
        return outcomes

    async def delivery_result(
        self, envelope: Envelope, recipient: Recipient, outcome: DeliveryOutcome
    ) -> None:
        """Tell every observer; their failures are logged and ignored."""
        await self._caller.collect(
            "submitd_delivery_result",
            config=self._config(),
            envelope=envelope,
            recipient=recipient,
            outcome=outcome,
        )
