"""The two ways an SMTP conversation goes wrong: our caller's mistake, or the peer's."""

from __future__ import annotations

from ._replies import Reply

__all__ = ["LocalProtocolError", "RemoteProtocolError"]


class LocalProtocolError(Exception):
    """The *caller* misused the API (for example ``next_event()`` while an answer is pending).

    This is a bug in the session or the driver, never something a client can trigger.
    """


class RemoteProtocolError(Exception):
    """The peer broke the protocol; ``reply`` is what the server answers.

    ``closes`` is True when the reply also ends the connection (a ``421``).
    """

    def __init__(self, reply: Reply, *, closes: bool = False) -> None:
        self.reply = reply
        self.closes = closes
        super().__init__(str(reply))
