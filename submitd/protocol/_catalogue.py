"""Every reply the protocol core, or the driver around it, sends on its own, by name.

Reply text never echoes client input, so nothing a client sends can end up in a reply line.
Enhanced status codes follow RFC 3463 (and the registry of RFC 5248); the greeting and the
EHLO/HELO answers carry none (RFC 2034 §3), nor do 3xx intermediate replies.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._replies import Reply

__all__ = [
    "AUTH_CANCELLED",
    "AUTH_FAILED",
    "AUTH_REQUIRED",
    "AUTH_SUCCESSFUL",
    "BARE_CR_COMMAND",
    "BARE_LF_COMMAND",
    "BYE",
    "CANNOT_VRFY",
    "CONTROL_IN_ADDRESS",
    "CREDENTIALS_NOT_UTF8",
    "DATA_BARE_CR_LF",
    "DATA_LINE_TOO_LONG",
    "DATA_NUL",
    "EMPTY_COMMAND",
    "HEADER_TOO_LARGE",
    "HELP",
    "INVALID_BASE64",
    "INVALID_PLAIN",
    "LINE_TOO_LONG",
    "LOCAL_PROBLEM",
    "LOGIN_HAS_CONTROL",
    "LOGIN_PASSWORD",
    "LOGIN_USERNAME",
    "MESSAGE_TOO_LARGE",
    "NEEDS_SMTPUTF8",
    "NOT_IMPLEMENTED",
    "NO_VALID_RECIPIENTS",
    "OK",
    "PARAMETERS_NEED_EHLO",
    "PLAIN_CHALLENGE",
    "READY_TO_START_TLS",
    "RECIPIENT_OK",
    "SASL_LINE_TOO_LONG",
    "SENDER_OK",
    "SHUTTING_DOWN",
    "STARTTLS_REQUIRED",
    "STARTTLS_UNAVAILABLE",
    "START_DATA",
    "TIMEOUT",
    "TOO_MANY_AUTH_FAILURES",
    "TOO_MANY_ERRORS",
    "TOO_MANY_JUNK_COMMANDS",
    "TOO_MANY_RECIPIENTS",
    "TOO_MANY_TRANSACTIONS",
    "UNKNOWN_MECHANISM",
    "UNKNOWN_PARAMETER",
    "UNRECOGNIZED",
    "bad_recipient",
    "bad_sender",
    "bad_sequence",
    "ehlo",
    "greeting",
    "helo",
    "relay_denied",
    "sender_rejected",
    "syntax_error",
]


# -- greeting and hello (no enhanced status code, RFC 2034 §3) ---------------------------------


def greeting(hostname: str) -> Reply:
    """``220 {hostname} ESMTP submitd``: the connection greeting (RFC 5321 §4.2)."""
    return Reply(code=220, lines=(f"{hostname} ESMTP submitd",))


def ehlo(hostname: str, keywords: Iterable[str]) -> Reply:
    """The multi-line ``250`` EHLO answer: the hostname, then one extension per line."""
    return Reply(code=250, lines=(hostname, *keywords))


def helo(hostname: str) -> Reply:
    """``250 {hostname}``: the HELO answer."""
    return Reply(code=250, lines=(hostname,))


# -- positive ----------------------------------------------------------------------------------

OK = Reply.make(250, "2.0.0", "OK")
SENDER_OK = Reply.make(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply.make(250, "2.1.5", "Recipient OK")
AUTH_SUCCESSFUL = Reply.make(235, "2.7.0", "Authentication successful")
READY_TO_START_TLS = Reply.make(220, "2.0.0", "Ready to start TLS")
BYE = Reply.make(221, "2.0.0", "Bye")
# RFC 5321 §3.5.3: 252 when the server will not verify but will accept the address.
CANNOT_VRFY = Reply.make(
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
HELP = Reply.make(
    214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"
)

# -- intermediate (3xx: no enhanced status code) -----------------------------------------------

START_DATA = Reply(code=354, lines=("End data with <CR><LF>.<CR><LF>",))
# RFC 4954 §4: an empty challenge is "334" followed by a single space.
PLAIN_CHALLENGE = Reply(code=334, lines=("",))
# The de-facto LOGIN mechanism: base64 of "Username:" and "Password:".
LOGIN_USERNAME = Reply(code=334, lines=("VXNlcm5hbWU6",))
LOGIN_PASSWORD = Reply(code=334, lines=("UGFzc3dvcmQ6",))

# -- temporary, closing (421: RFC 5321 §3.8) and limits ----------------------------------------

TOO_MANY_ERRORS = Reply.make(421, "4.7.0", "Too many errors")
TOO_MANY_AUTH_FAILURES = Reply.make(421, "4.7.0", "Too many authentication failures")
TOO_MANY_TRANSACTIONS = Reply.make(421, "4.7.0", "Too many messages in one session")
TOO_MANY_JUNK_COMMANDS = Reply.make(421, "4.7.0", "Too many commands that send no mail")
# The driver's own closing replies: a deadline passed, the server stops, something broke.
TIMEOUT = Reply.make(421, "4.4.2", "Timeout, closing connection")
SHUTTING_DOWN = Reply.make(421, "4.3.2", "Service shutting down, try again later")
LOCAL_PROBLEM = Reply.make(421, "4.3.0", "Temporary local problem, closing connection")
# RFC 5321 §4.5.3.1.8 and RFC 3463 §3.6: 452 4.5.3 keeps the accepted recipients.
TOO_MANY_RECIPIENTS = Reply.make(452, "4.5.3", "Too many recipients")

# -- permanent: framing and syntax -------------------------------------------------------------

BARE_LF_COMMAND = Reply.make(
    500, "5.5.2", "Line must end with CRLF (bare LF received; with openssl s_client use -crlf)"
)
BARE_CR_COMMAND = Reply.make(500, "5.5.2", "Line must end with CRLF (bare CR received)")
LINE_TOO_LONG = Reply.make(500, "5.5.2", "Line too long")
EMPTY_COMMAND = Reply.make(500, "5.5.2", "Syntax error, empty command")
UNRECOGNIZED = Reply.make(500, "5.5.1", "Command unrecognized")
SASL_LINE_TOO_LONG = Reply.make(500, "5.5.6", "Authentication exchange line is too long")
AUTH_CANCELLED = Reply.make(501, "5.0.0", "Authentication cancelled")
INVALID_BASE64 = Reply.make(501, "5.5.2", "Invalid base64")
INVALID_PLAIN = Reply.make(501, "5.5.2", "Malformed PLAIN response")  # RFC 4616 §2
CREDENTIALS_NOT_UTF8 = Reply.make(501, "5.5.2", "Credentials must be UTF-8")
# A login name is text: control characters in it would reach plugins and users files.
LOGIN_HAS_CONTROL = Reply.make(501, "5.5.2", "Control characters are not allowed in a login")
# docs/security.md §1: controls in an address get 5.1.7 whichever command carried them.
CONTROL_IN_ADDRESS = Reply.make(501, "5.1.7", "Control characters are not allowed in addresses")
NOT_IMPLEMENTED = Reply.make(502, "5.5.1", "Command not implemented")
STARTTLS_UNAVAILABLE = Reply.make(502, "5.5.1", "STARTTLS not available")
UNKNOWN_MECHANISM = Reply.make(504, "5.5.4", "Unrecognized authentication mechanism")
UNKNOWN_PARAMETER = Reply.make(555, "5.5.4", "Parameter not recognized or not implemented")
# RFC 5321 §4.1.1.11 and §3.3: MAIL and RCPT parameters belong to ESMTP, opened by EHLO.
PARAMETERS_NEED_EHLO = Reply.make(555, "5.5.4", "Parameters are not allowed after HELO; use EHLO")

# -- permanent: policy -------------------------------------------------------------------------

STARTTLS_REQUIRED = Reply.make(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply.make(530, "5.7.0", "Authentication required")  # RFC 6409 §4.3
AUTH_FAILED = Reply.make(535, "5.7.8", "Authentication credentials invalid")
NEEDS_SMTPUTF8 = Reply.make(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531
NO_VALID_RECIPIENTS = Reply.make(554, "5.5.1", "No valid recipients")

# -- message content (DataComplete.error) ------------------------------------------------------

DATA_BARE_CR_LF = Reply.make(
    550, "5.5.2", "Message contains bare CR or LF; lines must end with CRLF"
)
MESSAGE_TOO_LARGE = Reply.make(552, "5.3.4", "Message size exceeds fixed limit")
HEADER_TOO_LARGE = Reply.make(552, "5.3.4", "Message header too large")
DATA_LINE_TOO_LONG = Reply.make(554, "5.6.0", "Message contains a line longer than 998 characters")
DATA_NUL = Reply.make(554, "5.6.0", "Message contains NUL characters")


def syntax_error(detail: str) -> Reply:
    """``501 5.5.4`` naming what is wrong (``detail`` is our text, never client input)."""
    return Reply.make(501, "5.5.4", f"Syntax error: {detail}")


def bad_sender(reason: str) -> Reply:
    """``501 5.1.7`` for a sender address that is not a valid mailbox (RFC 3463 §3.2)."""
    return Reply.make(501, "5.1.7", f"Bad sender address syntax: {reason}")


def bad_recipient(reason: str) -> Reply:
    """``501 5.1.3`` for a recipient address that is not a valid mailbox (RFC 3463 §3.2)."""
    return Reply.make(501, "5.1.3", f"Bad recipient address syntax: {reason}")


def bad_sequence(detail: str) -> Reply:
    """``503 5.5.1`` bad sequence of commands, with a hint what to send first."""
    return Reply.make(503, "5.5.1", f"Bad sequence of commands: {detail}")


def relay_denied(reason: str) -> Reply:
    """``554 5.7.1`` for a recipient that is a relay trick (docs/security.md §4)."""
    return Reply.make(554, "5.7.1", f"Relay access denied: {reason}")


def sender_rejected(reason: str) -> Reply:
    """``553 5.7.1`` for a sender address that is a relay trick (docs/security.md §4)."""
    return Reply.make(553, "5.7.1", f"Sender address rejected: {reason}")
