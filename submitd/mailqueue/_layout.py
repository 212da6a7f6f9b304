"""Where the spool keeps what, under ``[queue] dir``.

``tmp/`` holds files being written (removed by recovery); ``msg/ID`` the final message bytes
(CRLF, not dot-stuffed, header edits applied); ``env/ID.json`` the envelope sidecar, whose
presence is the commit point; ``corrupt/`` sidecars that could not be read, kept for people.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import durable as _durable

__all__ = ["Layout"]


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The spool's directories and the names of one message's files."""

    base: Path

    @property
    def tmp(self) -> Path:
        """In-progress files; anything here at start-up is a fragment."""
        return self.base / "tmp"

    @property
    def msg(self) -> Path:
        """Committed message bytes, one file per queue ID."""
        return self.base / "msg"

    @property
    def env(self) -> Path:
        """Committed envelope sidecars, ``ID.json``."""
        return self.base / "env"

    @property
    def corrupt(self) -> Path:
        """Unreadable entries moved aside for an operator to inspect."""
        return self.base / "corrupt"

    def msg_path(self, queue_id: str) -> Path:
        """Return the committed message file of ``queue_id``."""
        return self.msg / queue_id

    def env_path(self, queue_id: str) -> Path:
        """Return the committed sidecar of ``queue_id``."""
        return self.env / f"{queue_id}.json"

    def create(self) -> None:
        """Create missing directories (blocking) and make their names durable."""
        created = False
        for path in (self.base, self.tmp, self.msg, self.env, self.corrupt):
            if not path.is_dir():
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                created = True
        if created:
            _durable.fsync_dir(self.base)
            if self.base.parent != self.base and os.access(self.base.parent, os.R_OK):
                _durable.fsync_dir(self.base.parent)
