"""Await hook implementations in pluggy's order and apply submitd's stop rules.

pluggy calls implementations but does not await coroutines, so this module walks
``hook.get_hookimpls()`` itself (pluggy calls the list back to front), awaits each result,
runs every call under the plugin's deadline, and turns exceptions and timeouts into
:class:`PluginError` carrying the plugin's name. ``Reject(reply)`` is an answer, not an error.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pluggy
import trio

from ._logfmt import logfmt
from .config import Config, PluginsConfig
from .errors import PluginError, Reject
from .message import MessageHandle
from .protocol._replies import Reply
from .views import DeliveryOutcome, Envelope, Recipient

__all__ = ["HookCaller", "PluginDelivery"]

log = logging.getLogger("submitd.plugins")

T = TypeVar("T")

_NOT_HANDLED = Reply.make(451, "4.3.0", "No delivery plugin accepted this recipient")
_PLUGIN_FAILED = Reply.make(451, "4.3.0", "Delivery plugin failed, will retry")


class HookCaller:
    """Call submitd hooks on a pluggy ``PluginManager`` with deadlines and stop rules."""

    def __init__(self, pm: pluggy.PluginManager, plugins: PluginsConfig) -> None:
        self.pm = pm
        self.plugins = plugins
        for impl in pm.hook.__dict__.values():
            if not isinstance(impl, pluggy.HookCaller):
                continue
            for hi in impl.get_hookimpls():
                if hi.hookwrapper or hi.wrapper:
                    raise ValueError(
                        f"plugin {hi.plugin_name!r}: hook wrappers are not supported by submitd"
                    )

    def _impls(self, name: str) -> list[pluggy.HookImpl]:
        hook: pluggy.HookCaller = getattr(self.pm.hook, name)
        return list(reversed(hook.get_hookimpls()))

    async def _call(self, impl: pluggy.HookImpl, name: str, kwargs: Mapping[str, Any]) -> Any:
        """Call one implementation under its deadline; ``Reject`` returns its reply."""
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        timeout = self.plugins.timeout_for(impl.plugin_name)
        session = kwargs.get("session")
        sid = getattr(session, "session_id", "-")
        try:
            with trio.fail_after(timeout):
                result = impl.function(**args)
                if inspect.isawaitable(result):
                    result = await result
        except Reject as exc:
            return exc.reply
        except trio.TooSlowError:
            log.error(logfmt("plugin_timeout", session=sid, plugin=impl.plugin_name, hook=name,
                             timeout=timeout))
            raise PluginError(impl.plugin_name, name, f"timed out after {timeout:g}s") from None
        except Exception as exc:
            log.error(logfmt("plugin_error", session=sid, plugin=impl.plugin_name, hook=name,
                             error=type(exc).__name__), exc_info=True)
            raise PluginError(impl.plugin_name, name, type(exc).__name__) from exc
        return result

    async def first(
        self, name: str, validate: Callable[[object], T], **kwargs: Any
    ) -> tuple[str, T] | None:
        """Stop rule *first answer*: the first non-None result, validated, and its plugin.

        ``validate`` returns the typed value or raises ``TypeError``/``ValueError``, which
        becomes a :class:`PluginError` naming the plugin.
        """
        for impl in self._impls(name):
            result = await self._call(impl, name, kwargs)
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
        for impl in self._impls(name):
            try:
                result = await self._call(impl, name, kwargs)
            except PluginError:
                continue
            if result is not None:
                results.append((impl.plugin_name, result))
        return results


class PluginDelivery:
    """The queue runner's view of the ``submitd_deliver`` and ``submitd_delivery_result`` hooks."""

    def __init__(self, caller: HookCaller, config: Callable[[], Config]) -> None:
        self._caller = caller
        self._config = config

    async def deliver(
        self, envelope: Envelope, message: MessageHandle, recipients: tuple[Recipient, ...]
    ) -> dict[str, DeliveryOutcome]:
        """Stop rule *handled-set*; never raises. Unhandled recipients come back temporary."""
        remaining = {r.address: r for r in recipients}
        outcomes: dict[str, DeliveryOutcome] = {}
        for impl in self._caller._impls("submitd_deliver"):
            if not remaining:
                break
            kwargs = {
                "config": self._config(),
                "envelope": envelope,
                "message": message,
                "recipients": tuple(remaining.values()),
            }
            try:
                result = await self._caller._call(impl, "submitd_deliver", kwargs)
            except PluginError:
                for address in remaining:
                    outcomes[address] = DeliveryOutcome.temporary(_PLUGIN_FAILED)
                return outcomes
            if result is None:
                continue
            if not isinstance(result, Mapping):
                log.error(logfmt("plugin_bad_answer", plugin=impl.plugin_name,
                                 hook="submitd_deliver", queue_id=envelope.queue_id))
                for address in remaining:
                    outcomes[address] = DeliveryOutcome.temporary(_PLUGIN_FAILED)
                return outcomes
            for address, outcome in result.items():
                if address in remaining and isinstance(outcome, DeliveryOutcome):
                    outcomes[address] = outcome
                    del remaining[address]
        for address in remaining:
            outcomes[address] = DeliveryOutcome.temporary(_NOT_HANDLED)
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
