"""The exceptions submitd raises and maps at its boundaries."""

from __future__ import annotations

from pathlib import Path

from .protocol._replies import Reply

__all__ = [
    "ConfigError",
    "PluginError",
    "Reject",
    "SpoolError",
    "SubmitdError",
    "UsageError",
]


class SubmitdError(Exception):
    """Base class of every error submitd raises on purpose."""


class UsageError(SubmitdError):
    """A command-line mistake (exit code 2)."""


class ConfigError(SubmitdError):
    """A configuration problem, naming the file and the dotted key (exit code 2)."""

    def __init__(self, path: Path | str | None, key: str, message: str) -> None:
        self.path = Path(path) if path is not None else None
        self.key = key
        self.message = message
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


class PluginError(SubmitdError):
    """A plugin raised, timed out or returned something invalid; the session answers 451 4.3.0."""

    def __init__(self, plugin: str, hook: str, message: str) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} in {hook}: {message}")


class Reject(SubmitdError):
    """Raise from a hook to refuse with ``reply`` (equivalent to returning the reply)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class SpoolError(SubmitdError):
    """The spool could not store or update a message (the client gets 451 4.3.0)."""
