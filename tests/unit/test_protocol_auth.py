"""AUTH: PLAIN and LOGIN exchanges, strict base64, cancel, failures and the failure limit."""

from __future__ import annotations

import base64

import pytest

from submitd.protocol import (
    NEED_DATA,
    AuthRequest,
    ConnectionClosed,
    Credentials,
    Event,
    Reply,
    ServerConnection,
    ServerState,
)
from submitd.secret import Secret
from tests.unit.protocol_support import accept_event, connection, greeted

SUCCESS = b"235 2.7.0 Authentication successful\r\n"
FAILED = b"535 5.7.8 Authentication credentials invalid\r\n"
BAD_B64 = b"501 5.5.2 Invalid base64\r\n"
BAD_PLAIN = b"501 5.5.2 Malformed PLAIN response\r\n"
CANCELLED = b"501 5.0.0 Authentication cancelled\r\n"
LOGIN_CONTROL = b"501 5.5.2 Control characters are not allowed in a login\r\n"
TOO_MANY = b"421 4.7.0 Too many authentication failures\r\n"


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def feed(conn: ServerConnection, data: bytes) -> tuple[bytes, list[Event]]:
    """Feed ``data`` and collect events without answering them."""
    conn.receive_data(data)
    events: list[Event] = []
    while not events or not isinstance(events[-1], AuthRequest | ConnectionClosed):
        event = conn.next_event()
        if event is NEED_DATA:
            break
        events.append(event)
    return conn.data_to_send(), events


def request(username: str, password: str, authzid: str = "", mechanism: str = "PLAIN") -> Event:
    return AuthRequest(credentials=Credentials(
        mechanism=mechanism, username=username, authzid=authzid, password=Secret(password)
    ))


def test_plain_with_initial_response() -> None:
    conn = greeted()
    out, events = feed(conn, b"AUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n")
    assert (out, events) == (b"", [request("user", "secret")])
    accept_event(conn, events[0])
    assert conn.data_to_send() == SUCCESS
    assert conn.authenticated


def test_plain_without_initial_response_gets_an_empty_challenge() -> None:
    conn = greeted()
    assert feed(conn, b"AUTH PLAIN\r\n") == (b"334 \r\n", [])
    assert conn.state is ServerState.SASL
    events = feed(conn, b64(b"user\0user\0secret") + b"\r\n")[1]
    assert events == [request("user", "secret", authzid="user")]


def test_mechanism_name_is_case_insensitive() -> None:
    conn = greeted()
    assert feed(conn, b"auth plain\r\n")[0] == b"334 \r\n"


def test_login_asks_for_username_then_password() -> None:
    conn = greeted()
    assert feed(conn, b"AUTH LOGIN\r\n")[0] == b"334 VXNlcm5hbWU6\r\n"
    assert feed(conn, b64(b"user") + b"\r\n")[0] == b"334 UGFzc3dvcmQ6\r\n"
    assert feed(conn, b64(b"secret") + b"\r\n") == (
        b"", [request("user", "secret", mechanism="LOGIN")]
    )


def test_login_may_carry_the_username_as_initial_response() -> None:
    conn = greeted()
    assert feed(conn, b"AUTH LOGIN " + b64(b"user") + b"\r\n")[0] == b"334 UGFzc3dvcmQ6\r\n"
    assert feed(conn, b64(b"secret") + b"\r\n")[1] == [request("user", "secret", mechanism="LOGIN")]


def test_credentials_are_utf8() -> None:
    conn = greeted()
    out, events = feed(conn, b"AUTH PLAIN " + b64("\0jörg\0pässwörd".encode()) + b"\r\n")
    assert (out, events) == (b"", [request("jörg", "pässwörd")])


def test_password_never_shows_in_the_event_repr() -> None:
    conn = greeted()
    _, events = feed(conn, b"AUTH PLAIN " + b64(b"\0user\0hunter2") + b"\r\n")
    assert "hunter2" not in repr(events)


@pytest.mark.parametrize("start", [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"])
def test_star_cancels_the_exchange(start: bytes) -> None:
    conn = greeted()
    feed(conn, start)
    assert feed(conn, b"*\r\n") == (CANCELLED, [])
    assert conn.state is ServerState.COMMAND
    assert feed(conn, b"NOOP\r\n")[0] == b"250 2.0.0 OK\r\n"


@pytest.mark.parametrize(
    "encoded",
    [
        b"AHVzZXIAc2VjcmV0",  # missing padding is fine here: this one is canonical
    ],
)
def test_canonical_base64_is_accepted(encoded: bytes) -> None:
    conn = greeted()
    assert feed(conn, b"AUTH PLAIN " + encoded + b"\r\n")[1] == [request("user", "secret")]


GOOD = b64(b"\0user\0secret!")  # "AHVzZXIAc2VjcmV0IQ=="


@pytest.mark.parametrize(
    "encoded",
    [
        GOOD[:-1],  # bad padding
        GOOD[:-2],  # missing padding
        GOOD + b"=",  # too much padding
        GOOD[:8] + b"\t" + GOOD[8:],  # whitespace
        GOOD[:8] + b"!" + GOOD[8:],  # outside the alphabet
        GOOD[:8] + b"-_" + GOOD[10:],  # URL-safe alphabet
        b"AHVzZXIAc2VjcmV0IR==",  # non-canonical padding bits
        GOOD + GOOD,  # padding in the middle
        b"*",  # cancel is not an initial response
        b"\xc3\xa9",
    ],
)
def test_invalid_base64_initial_response_is_refused(encoded: bytes) -> None:
    conn = greeted()
    assert feed(conn, b"AUTH PLAIN " + encoded + b"\r\n") == (BAD_B64, [])


@pytest.mark.parametrize("encoded", [GOOD[:-1], b"=", b"a b"])
def test_invalid_base64_response_line_is_refused(encoded: bytes) -> None:
    conn = greeted()
    feed(conn, b"AUTH PLAIN\r\n")
    out = feed(conn, encoded + b"\r\n")[0]
    assert out == BAD_B64 if encoded != b"=" else BAD_PLAIN
    assert conn.state is ServerState.COMMAND


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b"\0user\0secret\0", BAD_PLAIN),  # extra NUL
        (b"\0\0user\0secret", BAD_PLAIN),
        (b"user\0secret", BAD_PLAIN),  # missing part
        (b"usersecret", BAD_PLAIN),
        (b"", BAD_PLAIN),
        (b"\0us\xffer\0secret", b"501 5.5.2 Credentials must be UTF-8\r\n"),
        (b"\0user\0sec\xc3", b"501 5.5.2 Credentials must be UTF-8\r\n"),
        (b"admin\0user\0secret", FAILED),  # authzid is somebody else
        (b"\0\0secret", FAILED),  # empty username
        (b"\0user\0", FAILED),  # empty password
        (b"\0us\x01er\0secret", LOGIN_CONTROL),  # a control character in the login
        (b"\0user\x7f\0secret", LOGIN_CONTROL),
    ],
)
def test_malformed_plain_credentials_are_refused_without_an_event(raw: bytes, reply: bytes) -> None:
    conn = greeted()
    encoded = b64(raw) if raw else b"="
    assert feed(conn, b"AUTH PLAIN " + encoded + b"\r\n") == (reply, [])
    assert not conn.authenticated


def test_login_mechanism_refuses_a_user_name_with_control_characters() -> None:
    # Found by the fuzz targets: AUTH LOGIN handed a NUL in the user name on to the plugins.
    conn = greeted()
    feed(conn, b"AUTH LOGIN " + b64(b"us\0er") + b"\r\n")
    assert feed(conn, b64(b"secret") + b"\r\n") == (LOGIN_CONTROL, [])
    assert not conn.authenticated


def test_empty_login_username_or_password_fails() -> None:
    conn = greeted()
    feed(conn, b"AUTH LOGIN =\r\n")
    assert feed(conn, b64(b"secret") + b"\r\n") == (FAILED, [])
    feed(conn, b"AUTH LOGIN " + b64(b"user") + b"\r\n")
    assert feed(conn, b"\r\n") == (FAILED, [])


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"AUTH\r\n", b"501 5.5.4 Syntax error: AUTH needs a mechanism\r\n"),
        (b"AUTH PLAIN a b\r\n", b"501 5.5.4 Syntax error: AUTH needs a mechanism\r\n"),
        (b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Unrecognized authentication mechanism\r\n"),
        (b"AUTH XOAUTH2 abc\r\n", b"504 5.5.4 Unrecognized authentication mechanism\r\n"),
    ],
)
def test_auth_command_syntax(line: bytes, reply: bytes) -> None:
    conn = greeted()
    assert feed(conn, line) == (reply, [])


def test_second_auth_is_a_bad_sequence() -> None:
    conn = greeted()
    accept_event(conn, feed(conn, b"AUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n")[1][0])
    conn.data_to_send()
    assert feed(conn, b"AUTH PLAIN " + b64(b"\0user\0secret") + b"\r\n")[0] == (
        b"503 5.5.1 Bad sequence of commands: already authenticated\r\n"
    )


def test_auth_after_helo_is_a_bad_sequence() -> None:
    conn = connection()
    conn.greet()
    conn.receive_data(b"HELO client.example\r\n")
    accept_event(conn, conn.next_event())
    assert conn.data_to_send() == b"220 mx.example.org ESMTP submitd\r\n250 mx.example.org\r\n"
    assert feed(conn, b"AUTH PLAIN\r\n")[0] == (
        b"503 5.5.1 Bad sequence of commands: send EHLO first\r\n"
    )


def test_session_refusal_counts_as_failure_and_third_closes() -> None:
    conn = greeted()
    for attempt in range(3):
        out, events = feed(conn, b"AUTH PLAIN " + b64(b"\0user\0wrong") + b"\r\n")
        assert (out, events) == (b"", [request("user", "wrong")])
        conn.reject(Reply.make(535, "5.7.8", "Authentication credentials invalid"))
        expected = FAILED + (TOO_MANY if attempt == 2 else b"")
        assert conn.data_to_send() == expected
    assert conn.closed
    assert conn.next_event() == ConnectionClosed(reason="too many authentication failures")


def test_core_and_session_failures_share_one_count() -> None:
    conn = greeted(max_auth_failures=2)
    assert feed(conn, b"AUTH PLAIN " + b64(b"admin\0user\0pw") + b"\r\n") == (FAILED, [])
    assert feed(conn, b"AUTH PLAIN " + b64(b"\0user\0pw") + b"\r\n")[1] == [request("user", "pw")]
    conn.reject(Reply.make(535, "5.7.8", "Authentication credentials invalid"))
    assert conn.data_to_send() == FAILED + TOO_MANY
    assert conn.closed


def test_syntax_errors_and_cancels_are_not_authentication_failures() -> None:
    conn = greeted(max_auth_failures=1)
    feed(conn, b"AUTH PLAIN !!!\r\n")
    feed(conn, b"AUTH LOGIN\r\n")
    feed(conn, b"*\r\n")
    assert not conn.closed


def test_sasl_line_too_long_aborts_the_exchange() -> None:
    conn = greeted()
    feed(conn, b"AUTH PLAIN\r\n")
    assert feed(conn, b"A" * 12287 + b"\r\n")[0] == (
        b"500 5.5.6 Authentication exchange line is too long\r\n"
    )
    assert conn.state is ServerState.COMMAND


def test_sasl_line_of_exactly_12288_octets_is_read() -> None:
    conn = greeted()
    feed(conn, b"AUTH PLAIN\r\n")
    # Read and judged as base64 (12286 is not a multiple of 4), not refused as too long.
    assert feed(conn, b"A" * 12286 + b"\r\n")[0] == BAD_B64


def test_bare_lf_in_sasl_line_aborts_the_exchange() -> None:
    conn = greeted()
    feed(conn, b"AUTH LOGIN\r\n")
    out, events = feed(conn, b64(b"user") + b"\n")
    assert out.startswith(b"500 5.5.2 Line must end with CRLF") and events == []
    assert conn.state is ServerState.COMMAND

