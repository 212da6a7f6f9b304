"""The headers plugin, its hook called as the session calls it: Received, Date, Message-ID."""

from __future__ import annotations

import email.utils
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pluggy
import pytest

from submitd import (
    Config,
    ConfigError,
    Envelope,
    MailParams,
    MessageHandle,
    Recipient,
    Reply,
    SessionInfo,
    hookimpl,
)
from submitd import hookspec as hookspec_module
from submitd._hookcall import HookCaller
from submitd.config import load_config
from submitd.mailqueue._edits import edited_header_section
from submitd.message import check_field, parse_header_section
from submitd_plugins import headers

CONFIG = """\
hostname = "mail.example.org"
[[listen]]
address = "127.0.0.1:2587"
mode = "starttls"
[tls]
cert = "cert.pem"
key = "key.pem"
[plugins]
enable = ["headers"]
"""
NOW = datetime(2024, 3, 5, 10, 0, 0, tzinfo=timezone(timedelta(hours=1)))
NOW_TEXT = "Tue, 05 Mar 2024 10:00:00 +0100"
CIPHER = "TLS_AES_256_GCM_SHA384"
ENVELOPE = Envelope(
    sender="alice@example.com", recipients=(Recipient(address="bob@example.net"),),
    params=MailParams(), username="alice",
)
FULL = (("From", "Alice <alice@example.com>"), ("To", "bob@example.net"),
        ("Date", "Mon, 04 Mar 2024 09:00:00 +0000"), ("Message-ID", "<abc.123@laptop.example>"),
        ("Subject", "hello"))


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headers, "_now", lambda: NOW)


def configured(tmp_path: Path, table: str | None = None) -> Config:
    path = tmp_path / "submitd.toml"
    path.write_text(CONFIG + (f"[plugins.headers]\n{table}\n" if table is not None else ""))
    config = load_config(path)
    headers.submitd_configure(config)
    return config


def session(config: Config, **changes: object) -> SessionInfo:
    values: dict[str, object] = {
        "session_id": "S1", "config": config, "listener": config.listeners[0],
        "peer_host": "192.0.2.7", "peer_port": 40000, "tls": True, "tls_version": "TLSv1.3",
        "tls_cipher": CIPHER, "ehlo": "laptop.example", "username": "alice",
    }
    values.update(changes)
    return SessionInfo(**values)  # type: ignore[arg-type]


def message(tmp_path: Path, *fields: tuple[str, str], queue_id: str | None = "Q7xK2") -> (
    MessageHandle
):
    path = tmp_path / "msg"
    path.write_bytes(b"".join(f"{n}: {v}\r\n".encode() for n, v in fields) + b"\r\nbody\r\n")
    parsed, body_offset = parse_header_section(path.read_bytes())
    return MessageHandle(path=path, size=path.stat().st_size, headers=parsed,
                         body_offset=body_offset, queue_id=queue_id, editable=True)


def stored_header(msg: MessageHandle) -> list[tuple[str, str]]:
    """The header section as the spool will write it, parsed back."""
    head = msg.path.read_bytes()
    section = edited_header_section(head, msg.body_offset, msg.edits)
    fields, _ = parse_header_section(section + b"\r\n")
    return fields


def run(sess: SessionInfo, msg: MessageHandle) -> list[tuple[str, str]]:
    assert headers.submitd_data_filter(session=sess, envelope=ENVELOPE, message=msg) is None
    return stored_header(msg)


def received(fields: list[tuple[str, str]]) -> str:
    values = [v for n, v in fields if n == "Received"]
    assert len(values) == 1, fields
    assert fields[0][0] == "Received", "the Received field is on top"
    return values[0]


# --- Received ----------------------------------------------------------------------------------


def test_default_received_records_esmtpsa_tls_and_queue_id_and_hides_the_client(
    tmp_path: Path,
) -> None:
    fields = run(session(configured(tmp_path)), message(tmp_path, *FULL))
    assert received(fields) == (
        f"from laptop.example (unknown) by mail.example.org (submitd) with ESMTPSA "
        f"(TLSv1.3 {CIPHER}) id Q7xK2; {NOW_TEXT}"
    )
    assert all("192.0.2.7" not in v for _, v in fields)
    assert all("alice" not in v for n, v in fields if n == "Received")


def test_received_date_is_rfc5322_and_the_id_clause_is_left_out_without_a_queue_id(
    tmp_path: Path,
) -> None:
    value = received(run(session(configured(tmp_path)), message(tmp_path, *FULL, queue_id=None)))
    assert " id " not in value
    stamp = value.rpartition("; ")[2]
    assert email.utils.parsedate_to_datetime(stamp) == NOW


def test_hide_client_false_writes_the_address_literal(tmp_path: Path) -> None:
    config = configured(tmp_path, "hide_client = false")
    value = received(run(session(config), message(tmp_path, *FULL)))
    assert value.startswith("from laptop.example ([192.0.2.7]) by mail.example.org ")


@pytest.mark.parametrize(("peer", "literal"), [
    ("2001:db8::7", "[IPv6:2001:db8::7]"),
    ("::ffff:198.51.100.4", "[198.51.100.4]"),
    ("not-an-address", "unknown"),
])
def test_shown_client_address_forms(tmp_path: Path, peer: str, literal: str) -> None:
    config = configured(tmp_path, "hide_client = false")
    value = received(run(session(config, peer_host=peer), message(tmp_path, *FULL)))
    assert value.startswith(f"from laptop.example ({literal}) by ")


def test_an_ehlo_address_literal_is_hidden_with_the_client(tmp_path: Path) -> None:
    sess = session(configured(tmp_path), ehlo="[192.168.1.20]")
    value = received(run(sess, message(tmp_path, *FULL)))
    assert value.startswith("from unknown (unknown) by mail.example.org ")
    assert "192.168" not in value


def test_an_ehlo_address_literal_is_kept_when_the_client_is_shown(tmp_path: Path) -> None:
    sess = session(configured(tmp_path, "hide_client = false"), ehlo="[IPv6:2001:db8::20]")
    value = received(run(sess, message(tmp_path, *FULL)))
    assert value.startswith("from [IPv6:2001:db8::20] ([192.0.2.7]) by ")


@pytest.mark.parametrize("ehlo", [None, "bad name", "x(y)", "a;b", "caf\u00e9.example", ""])
def test_an_ehlo_name_that_is_not_a_plain_domain_is_written_unknown(
    tmp_path: Path, ehlo: str | None
) -> None:
    value = received(run(session(configured(tmp_path), ehlo=ehlo), message(tmp_path, *FULL)))
    assert value.startswith("from unknown (unknown) by ")


def test_show_login_adds_the_login_in_a_comment(tmp_path: Path) -> None:
    config = configured(tmp_path, "show_login = true")
    value = received(run(session(config), message(tmp_path, *FULL)))
    assert f"with ESMTPSA (TLSv1.3 {CIPHER}) (authenticated user alice) id Q7xK2; " in value


def test_the_login_is_escaped_and_stripped_of_controls_and_non_ascii(tmp_path: Path) -> None:
    config = configured(tmp_path, "show_login = true")
    sess = session(config, username="ev(il)\\us\u00e9r\x7f")
    value = received(run(sess, message(tmp_path, *FULL)))
    assert "(authenticated user ev\\(il\\)\\\\us?r?) id " in value


def test_a_long_login_is_cut_and_the_field_stays_one_valid_line(tmp_path: Path) -> None:
    config = configured(tmp_path, "show_login = true")
    sess = session(config, username="(" * 500, ehlo="a" * 63 + ("." + "b" * 63) * 3)
    value = received(run(sess, message(tmp_path, *FULL)))
    assert "(authenticated user " + "\\(" * 64 + "...)" in value
    check_field("Received", value)  # no CR/LF/NUL, within 998 octets


def test_the_protocol_follows_rfc3848(tmp_path: Path) -> None:
    config = configured(tmp_path)
    plain = received(run(session(config, tls=False, tls_version=None, tls_cipher=None),
                         message(tmp_path, *FULL)))
    assert " with ESMTPA id Q7xK2; " in plain
    unauthenticated = received(run(session(config, username=None), message(tmp_path, *FULL)))
    assert f" with ESMTPS (TLSv1.3 {CIPHER}) id " in unauthenticated


def test_odd_tls_names_are_left_out(tmp_path: Path) -> None:
    sess = session(configured(tmp_path), tls_cipher="AES (bad)")
    value = received(run(sess, message(tmp_path, *FULL)))
    assert " with ESMTPSA (TLSv1.3) id " in value


async def test_received_goes_above_fields_other_plugins_add(tmp_path: Path) -> None:
    config = configured(tmp_path)

    class Scanner:
        @hookimpl
        def submitd_data_filter(self, message: MessageHandle) -> None:
            message.add_header("X-Scanned", "yes")

    pm = pluggy.PluginManager("submitd")
    pm.add_hookspecs(hookspec_module)
    pm.register(Scanner(), "scanner")
    pm.register(headers, "headers")  # registered last: pluggy would call it first

    msg = message(tmp_path, *FULL)
    answer = await HookCaller(pm, config.plugins).first(
        "submitd_data_filter", lambda r: r, session=session(config), envelope=ENVELOPE,
        message=msg,
    )
    assert answer is None
    names = [n for n, _ in stored_header(msg)]
    assert names[:2] == ["Received", "X-Scanned"]


# --- Date --------------------------------------------------------------------------------------


def without(name: str) -> tuple[tuple[str, str], ...]:
    return tuple(f for f in FULL if f[0] != name)


def values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in fields if n.lower() == name.lower()]


def test_a_missing_date_is_added_with_the_submission_time(tmp_path: Path) -> None:
    fields = run(session(configured(tmp_path)), message(tmp_path, *without("Date")))
    assert values(fields, "Date") == [NOW_TEXT]
    assert [n for n, _ in fields][:2] == ["Received", "Date"]


@pytest.mark.parametrize("date", ["Mon, 04 Mar 2024 09:00:00 +0000",
                                  "4 Mar 2024 09:00 GMT", "Mon, 4 Mar 2024 09:00:00 +0100 (CET)"])
def test_a_readable_date_is_kept(tmp_path: Path, date: str) -> None:
    msg = message(tmp_path, *without("Date"), ("Date", date))
    fields = run(session(configured(tmp_path)), msg)
    assert values(fields, "Date") == [date]
    assert "date" not in msg.edits.remove


@pytest.mark.parametrize("dates", [("yesterday",), ("Mon, 31 Feb 2024 09:00:00 +0000",), ("",),
                                   ("Mon, 04 Mar 2024 09:00:00 +0000",) * 2])
def test_an_unreadable_or_repeated_date_is_replaced(tmp_path: Path, dates: tuple[str, ...]) -> None:
    msg = message(tmp_path, *without("Date"), *(("Date", d) for d in dates))
    fields = run(session(configured(tmp_path)), msg)
    assert values(fields, "Date") == [NOW_TEXT]


def test_add_date_false_leaves_the_date_alone(tmp_path: Path) -> None:
    config = configured(tmp_path, "add_date = false")
    assert values(run(session(config), message(tmp_path, *without("Date"))), "Date") == []
    bad = run(session(config), message(tmp_path, *without("Date"), ("Date", "soon")))
    assert values(bad, "Date") == ["soon"]


# --- Message-ID --------------------------------------------------------------------------------


def test_a_missing_message_id_is_added_on_the_configured_host(tmp_path: Path) -> None:
    fields = run(session(configured(tmp_path)), message(tmp_path, *without("Message-ID")))
    (mid,) = values(fields, "Message-ID")
    assert mid.startswith("<") and mid.endswith("@mail.example.org>")
    assert headers.valid_message_id([mid])
    again = run(session(configured(tmp_path)), message(tmp_path, *without("Message-ID")))
    assert values(again, "Message-ID") != [mid], "random, never repeated"


@pytest.mark.parametrize("mid", [
    "<abc.123@laptop.example>", " <x@[192.0.2.1]> ", "<\"quoted left\"@host.example>",
    "<a@b> (sent by a phone)", "<caf\u00e9@m\u00fcnchen.example>",
])
def test_a_valid_message_id_is_kept(tmp_path: Path, mid: str) -> None:
    msg = message(tmp_path, *without("Message-ID"), ("Message-ID", mid))
    fields = run(session(configured(tmp_path)), msg)
    assert values(fields, "Message-ID") == [mid.strip()]
    assert "message-id" not in msg.edits.remove


@pytest.mark.parametrize("mids", [("abc@host",), ("<no-at-sign>",), ("<a b@host>",),
                                  ("<a@b><c@d>",), ("<a..b@host>",), ("",),
                                  ("<a@b>", "<c@d>")])
def test_an_invalid_or_repeated_message_id_is_replaced(
    tmp_path: Path, mids: tuple[str, ...]
) -> None:
    msg = message(tmp_path, *without("Message-ID"), *(("Message-ID", m) for m in mids))
    fields = run(session(configured(tmp_path)), msg)
    (mid,) = values(fields, "Message-ID")
    assert mid.endswith("@mail.example.org>") and mid not in mids


def test_add_message_id_false_leaves_it_alone(tmp_path: Path) -> None:
    config = configured(tmp_path, "add_message_id = false")
    assert values(run(session(config), message(tmp_path, *without("Message-ID"))),
                  "Message-ID") == []


def test_a_complete_message_gets_only_the_received_field(tmp_path: Path) -> None:
    msg = message(tmp_path, *FULL)
    fields = run(session(configured(tmp_path)), msg)
    assert fields[1:] == list(FULL)
    assert not msg.edits.remove


def test_the_hook_never_refuses(tmp_path: Path) -> None:
    answer = headers.submitd_data_filter(
        session=session(configured(tmp_path), ehlo=None, username=None, tls=False),
        envelope=ENVELOPE, message=message(tmp_path),
    )
    assert not isinstance(answer, Reply)


# --- configuration -----------------------------------------------------------------------------


def test_defaults_without_a_table(tmp_path: Path) -> None:
    assert configured(tmp_path).stash[headers.SETTINGS] == headers.HeadersSettings(
        hide_client=True, show_login=False, add_date=True, add_message_id=True)


def test_every_option_is_read(tmp_path: Path) -> None:
    config = configured(tmp_path, "hide_client = false\nshow_login = true\nadd_date = false\n"
                                  "add_message_id = false\nhook_timeout = \"5s\"")
    assert config.stash[headers.SETTINGS] == headers.HeadersSettings(
        hide_client=False, show_login=True, add_date=False, add_message_id=False)


def test_an_unknown_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        configured(tmp_path, "hide_clients = true")
    assert info.value.key == "plugins.headers.hide_clients"
    assert "unknown key" in str(info.value) and "hide_client" in str(info.value)


@pytest.mark.parametrize("value", ['"yes"', "1", "[]"])
def test_options_must_be_booleans(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        configured(tmp_path, f"show_login = {value}")
    assert info.value.key == "plugins.headers.show_login"
    assert "true or false" in str(info.value)
