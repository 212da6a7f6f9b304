"""Property tests for the parsers hostile input reaches first: addresses, SASL, the users file.

Each parser either returns a value or raises its documented error type — never anything else —
and where a value can be written back out, writing and re-reading it gives the same value.
``make fuzz`` runs these with many more examples (``SUBMITD_HYPOTHESIS_PROFILE=fuzz``; the
profiles are registered in ``tests/unit/test_protocol_fuzz.py`` and repeated here so this file
runs alone).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from submitd.passwords import UserEntry, UsersFile, UsersFileError
from submitd.protocol import (
    AddressError,
    AddressProblem,
    GrammarError,
    Mailbox,
    decode_xtext,
    encode_xtext,
    format_path,
    parse_mailbox,
    relay_trick,
)
from submitd.protocol._grammar import has_control
from submitd.protocol._sasl import (
    Challenge,
    Credentials,
    Mechanism,
    SaslExchange,
    SaslFailure,
    decode_base64,
)
from tests.support import HASHER

settings.register_profile("default", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SUBMITD_HYPOTHESIS_PROFILE", "default"))

# --- the address grammar -------------------------------------------------------------------

# Characters that matter to the grammar, the relay tricks and framing, plus some non-ASCII.
ADDRESS_CHARS = st.sampled_from(list(
    'ab.-_+%!@"\\[]:<>() ,;=\r\n\x00\x01\x7f\t' "0123456789" "éü€\u2028\ud800\U0001f600"
))
ADDRESS_TEXT = st.lists(ADDRESS_CHARS | st.characters(), max_size=40).map("".join)
LOCAL = st.from_regex(r"\A[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\.[a-z0-9_%!-]{1,5}){0,2}\Z")
DOMAIN = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9]{1,6}){0,3}\Z")
CONTROLS = st.sampled_from(["\r", "\n", "\x00", "\x01", "\x1b", "\x7f", "\t"])


def _check_mailbox(text: str, mailbox: Mailbox) -> None:
    assert mailbox.address == text, "the mailbox is the address as the client wrote it"
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in mailbox.address)
    trick = relay_trick(mailbox)
    assert trick is None or (isinstance(trick, str) and trick)


@given(ADDRESS_TEXT)
@example("a@b@c.example")
@example('"a@b"@c.example')
@example("@a:b@c.example")
@example("a%b@c.example")
@example("a@[192.0.2.1]")
@example("a@\ud800.example")
def test_parse_mailbox_returns_a_mailbox_or_raises_address_error(text: str) -> None:
    try:
        mailbox = parse_mailbox(text)
    except AddressError as exc:
        error: AddressError | None = exc
    else:
        error = None
    if error is not None:
        assert isinstance(error.problem, AddressProblem) and error.reason
        return
    _check_mailbox(text, mailbox)
    try:
        path = format_path(mailbox.address)
    except AddressError:
        return  # longer than an SMTP path may be
    assert path == f"<{text}>"


@given(LOCAL, DOMAIN)
def test_well_formed_addresses_parse_and_round_trip(local: str, domain: str) -> None:
    text = f"{local}@{domain}"
    mailbox = parse_mailbox(text)
    assert (mailbox.local_part, mailbox.domain) == (local, domain)
    _check_mailbox(text, mailbox)
    assert parse_mailbox(mailbox.address) == mailbox
    trick = relay_trick(mailbox)
    if "%" in local or "!" in local:
        assert trick is not None
    if "." not in domain or domain.rsplit(".", 1)[1].isdigit():
        assert trick is not None


@given(LOCAL, DOMAIN, CONTROLS, st.integers(min_value=0, max_value=60))
def test_a_control_character_anywhere_is_refused_as_such(
    local: str, domain: str, control: str, where: int
) -> None:
    text = f"{local}@{domain}"
    where %= len(text) + 1
    broken = text[:where] + control + text[where:]
    with pytest.raises(AddressError) as caught:
        parse_mailbox(broken)
    assert caught.value.problem is AddressProblem.CONTROL


@given(st.text())
def test_xtext_round_trips(text: str) -> None:
    try:
        encoded = encode_xtext(text)
    except UnicodeEncodeError:
        assert any("\ud800" <= c <= "\udfff" for c in text)  # lone surrogates have no UTF-8
        return
    assert decode_xtext(encoded) == text


@given(st.text(max_size=30))
def test_decode_xtext_returns_text_or_raises_grammar_error(value: str) -> None:
    try:
        decoded = decode_xtext(value)
    except GrammarError:
        return
    assert isinstance(decoded, str)


# --- SASL ------------------------------------------------------------------------------------

B64_ALPHABET = st.sampled_from(
    list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=* \r\n\x00-_")
)
B64ISH = st.lists(B64_ALPHABET, max_size=40).map(bytes) | st.binary(max_size=40)


@given(B64ISH)
@example(b"YR==")  # non-zero padding bits
@example(b"YQ==YQ==")  # padding in the middle
@example(b"YQ")  # missing padding
@example(b"=")
def test_decode_base64_accepts_only_canonical_base64(text: bytes) -> None:
    try:
        decoded = decode_base64(text)
    except ValueError:
        return
    assert (text == b"=" and decoded == b"") or base64.b64encode(decoded) == text


@given(st.binary(max_size=200))
def test_base64_round_trips(raw: bytes) -> None:
    assert decode_base64(base64.b64encode(raw)) == raw


SASL_LINES = st.lists(
    B64ISH | st.binary(max_size=30).map(base64.b64encode) | st.just(b"*"), max_size=4
)


@given(st.sampled_from(Mechanism), st.none() | B64ISH, SASL_LINES)
def test_a_sasl_exchange_only_challenges_succeeds_or_fails(
    mechanism: Mechanism, initial: bytes | None, lines: list[bytes]
) -> None:
    exchange = SaslExchange(mechanism)
    step = exchange.start(initial)
    for line in lines:
        if not isinstance(step, Challenge):
            break
        assert step.reply.code == 334
        step = exchange.respond(line)
    assert isinstance(step, Challenge | Credentials | SaslFailure)
    if isinstance(step, SaslFailure):
        assert 500 <= step.reply.code < 600
    if isinstance(step, Credentials):
        assert step.username and step.password.reveal()
        assert step.authzid in ("", step.username), "RFC 4616 §2: no acting as someone else"
        assert "password=Secret('***')" in repr(step), "the password never shows in a repr"


# Text that can travel in SASL: any UTF-8 but NUL (the PLAIN separator).
NO_NUL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                 max_size=20)


@given(NO_NUL, NO_NUL, NO_NUL)
def test_plain_credentials_round_trip(authzid: str, username: str, password: str) -> None:
    blob = base64.b64encode(f"{authzid}\0{username}\0{password}".encode())
    step = SaslExchange(Mechanism.PLAIN).start(blob)
    if username and password and authzid in ("", username) and has_control(username):
        assert isinstance(step, SaslFailure) and (step.reply.code, step.reply.status) == (
            501, "5.5.2")  # a login is text: no control characters
    elif username and password and authzid in ("", username):
        assert isinstance(step, Credentials)
        assert (step.username, step.password.reveal(), step.authzid) == (
            username, password, authzid)
    else:
        assert isinstance(step, SaslFailure) and (step.reply.code, step.reply.status) == (
            535, "5.7.8")


@given(NO_NUL, NO_NUL)
def test_login_credentials_round_trip(username: str, password: str) -> None:
    exchange = SaslExchange(Mechanism.LOGIN)
    assert isinstance(exchange.start(None), Challenge)
    assert isinstance(exchange.respond(base64.b64encode(username.encode())), Challenge)
    step = exchange.respond(base64.b64encode(password.encode()))
    if username and password and not has_control(username):
        assert isinstance(step, Credentials)
        assert (step.username, step.password.reveal()) == (username, password)
    else:
        assert isinstance(step, SaslFailure)


# --- the users file --------------------------------------------------------------------------

HASH = HASHER.hash("x")
PATH = Path("/nonexistent/users")
USERS_PIECES = st.sampled_from([
    "demo", "alice", "#", "# comment", " ", "\t", "\r", "\n", "\r\n", HASH, HASH[:20],
    HASH.replace("argon2id", "argon2i"), "a@example.com", "@example.org", "<>", "a@b", "@",
    "a b@example.com", "é", "\x00", "\x85", "\u2028", "\ufeff",
])
USERS_BYTES = (
    st.lists(USERS_PIECES | st.text(max_size=5), max_size=25).map(lambda p: " ".join(p).encode())
    | st.binary(max_size=60)
)


def _entries(users: UsersFile) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(e.login, e.hash, e.senders) for e in users.entries]


@given(USERS_BYTES)
@example(b"demo " + HASH.encode() + b" a@EXAMPLE.com a@example.com\n")
@example(b"demo " + HASH.encode() + b"\ndemo " + HASH.encode() + b"\n")
@example(b"\xff\n")
def test_users_file_parses_or_raises_users_file_error(data: bytes) -> None:
    try:
        users = UsersFile.parse(PATH, data)
    except UsersFileError as exc:
        message = str(exc)
        assert str(PATH) in message, message
        return
    again = UsersFile.parse(PATH, users.render())
    assert _entries(again) == _entries(users), "rewriting the file keeps every entry"
    for entry in users.entries:
        assert users.lookup(entry.login) == entry


LOGINS = st.from_regex(r"\A[A-Za-z0-9._@+-]{1,12}\Z")
SENDERS = st.lists(
    st.sampled_from(["<>", "@example.org", "a@example.com", "b.c+d@Mail.Example.NET"]),
    max_size=4,
)


@given(st.lists(st.tuples(LOGINS, SENDERS), max_size=6, unique_by=lambda t: t[0]))
def test_users_file_written_by_submitd_reads_back(rows: list[tuple[str, list[str]]]) -> None:
    entries = [UserEntry(login=login, hash=HASH, senders=tuple(s)) for login, s in rows]
    users = UsersFile(path=PATH, lines=tuple(["# users", *entries]))
    parsed = UsersFile.parse(PATH, users.render())
    assert [e.login for e in parsed.entries] == [login for login, _ in rows]
    for entry, (_, senders) in zip(parsed.entries, rows, strict=True):
        assert entry.hash == HASH
        assert entry.senders == tuple(dict.fromkeys(
            s if s == "<>" else s.rpartition("@")[0] + "@" + s.rpartition("@")[2].lower()
            for s in senders
        ))
