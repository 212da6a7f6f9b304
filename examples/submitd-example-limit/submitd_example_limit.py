"""example_limit: at most ``max_recipients`` recipients per message (``452 4.5.3``)."""

import logging

import submitd

log = logging.getLogger("submitd.plugins.example_limit")
LIMIT = submitd.StashKey[int]()


@submitd.hookimpl
def submitd_configure(config: submitd.Config) -> None:
    """Read ``[plugins.example_limit] max_recipients`` (default 10); refuse other keys."""
    table = dict(config.plugin_table("example_limit"))
    limit = table.pop("max_recipients", 10)
    for key in table:
        raise submitd.ConfigError(config.path, f"plugins.example_limit.{key}", "unknown key")
    if type(limit) is not int or limit < 1:
        raise submitd.ConfigError(config.path, "plugins.example_limit.max_recipients",
                                  "must be a positive integer")
    config.stash[LIMIT] = limit


@submitd.hookimpl
def submitd_rcpt_check(session: submitd.SessionInfo, envelope: submitd.Envelope) -> object:
    """Refuse recipients past the limit (RFC 5321 §4.5.3.1.10: the client sends them later)."""
    if len(envelope.recipients) < session.config.stash[LIMIT]:
        return None
    log.info(submitd.logfmt("too_many_recipients", session=session.session_id))
    return submitd.Reply.make(452, "4.5.3", "Too many recipients")
