"""Limits, plugin failures, reload and drain on a real server over loopback."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd import Reply, StashKey, hookimpl
from submitd.mailqueue.spool import Spool
from submitd.testing import RawSMTPClient, TestCA, running_server
from tests.integration.test_submission import open_session, send_message
from tests.support import PASSWORD, RECIPIENT, SENDER, USER, wait_for_mail


async def test_connections_over_the_per_ip_cap_get_421(
    make_config: Callable[..., Path],
) -> None:
    async with running_server(make_config(limits={"max_connections_per_ip": 2})) as srv:
        port = srv.port("starttls")
        first = await RawSMTPClient.connect("127.0.0.1", port)
        second = await RawSMTPClient.connect("127.0.0.1", port)
        assert (await first.reply()).code == 220
        assert (await second.reply()).code == 220
        third = await RawSMTPClient.connect("127.0.0.1", port)
        reply = await third.reply()
        assert (reply.code, reply.status) == (421, "4.7.0")
        assert await third.at_eof()
        await first.command("QUIT")
        await first.aclose()
        with trio.fail_after(5):
            while True:  # the slot frees once the server has seen the close
                fourth = await RawSMTPClient.connect("127.0.0.1", port)
                if (await fourth.reply()).code == 220:
                    break
                await fourth.aclose()
        for client in (second, third, fourth):
            await client.aclose()


async def test_idle_client_is_closed_with_421_after_the_command_timeout(
    make_config: Callable[..., Path],
) -> None:
    async with running_server(make_config(limits={"command_timeout": "1s"})) as srv:
        client = await RawSMTPClient.connect("127.0.0.1", srv.port("starttls"))
        assert (await client.reply()).code == 220
        with trio.fail_after(5):
            reply = await client.reply()
        assert (reply.code, reply.status) == (421, "4.4.2")
        assert await client.at_eof()
        await client.aclose()


async def test_slow_tls_handshake_is_cut_off(make_config: Callable[..., Path], tmp_path: Path
                                             ) -> None:
    path = make_config()
    text = path.read_text().replace('handshake_timeout = "10s"', 'handshake_timeout = "1s"')
    path.write_text(text)
    async with running_server(path) as srv:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.port("implicit"))
        with trio.fail_after(5):
            data = await stream.receive_some(100)  # we never start the handshake
        assert data == b"", "server closed the connection"
        await stream.aclose()


class Exploding:
    @hookimpl
    async def submitd_rcpt_check(self, session, envelope, recipient):
        if recipient.address.startswith("boom@"):
            raise RuntimeError("plugin bug")
        if recipient.address.startswith("nope@"):
            return Reply.make(550, "5.1.1", "No such user here")
        return None


async def test_plugin_exception_is_451_with_the_plugin_named_in_the_log(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_server(make_config(), extra_plugins=[("exploding", Exploding())]) as srv:
        async with await open_session(srv, "implicit", client_tls) as client:
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            with caplog.at_level(logging.ERROR):
                reply = await client.command("RCPT TO:<boom@example.net>")
            assert (reply.code, reply.status) == (451, "4.3.0")
            assert "Traceback" not in reply.text and "plugin bug" not in reply.text
            assert "plugin=exploding" in caplog.text
            reply = await client.command("RCPT TO:<nope@example.net>")
            assert (reply.code, reply.status, reply.text) == (550, "5.1.1", "No such user here")
            assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250


async def test_reload_swaps_the_certificate_without_dropping_sessions(
    make_config: Callable[..., Path], ca: TestCA, client_tls: ssl.SSLContext,
) -> None:
    async with running_server(make_config()) as srv:
        before = await open_session(srv, "implicit", client_tls)
        old_cert = before.stream.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        ca.reissue()
        assert await srv.server.reload()
        after = await RawSMTPClient.connect("127.0.0.1", srv.port("implicit"), tls=client_tls)
        assert after.stream.getpeercert(binary_form=True) != old_cert  # type: ignore[attr-defined]
        assert (await after.reply()).code == 220
        # The session opened before the reload carries on.
        assert (await before.command("NOOP")).code == 250
        await send_message(before)
        await before.aclose()
        await after.aclose()


async def test_reload_hands_the_server_stash_to_the_new_configuration(
    make_config: Callable[..., Path],
) -> None:
    counter = StashKey[list[str]]()
    async with running_server(make_config()) as srv:
        old = srv.server.config
        old.server_stash[counter] = ["before reload"]
        old.stash[counter] = ["per configuration"]
        assert await srv.server.reload()
        new = srv.server.config
        assert new is not old
        assert new.server_stash[counter] == ["before reload"]
        assert counter not in new.stash  # the per-configuration stash starts afresh


async def test_reload_with_a_broken_config_keeps_the_old_one(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    path = make_config()
    async with running_server(path) as srv:
        good = path.read_text()
        path.write_text(good + "\n[limits.bogus]\n")
        assert not await srv.server.reload()
        async with await open_session(srv, "implicit", client_tls) as client:
            assert (await client.command("NOOP")).code == 250


async def test_shutdown_lets_sessions_finish_then_sends_421(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    async with running_server(make_config(limits={"shutdown_grace": "1s"})) as srv:
        client = await open_session(srv, "implicit", client_tls)
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        srv.server.request_shutdown()
        # Within the grace period the transaction still completes.
        assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(b"Subject: drained\r\n\r\nbye\r\n.\r\n")
        assert (await client.reply()).code == 250
        with trio.fail_after(5):
            reply = await client.reply()
        assert (reply.code, reply.status) == (421, "4.3.2")
        # New connections are no longer accepted.
        with pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream("127.0.0.1", srv.port("implicit"))
        await client.aclose()
    # Accepted during the drain: delivered already, or safe in the spool for the next start.
    delivered = list((maildir / "new").iterdir()) if (maildir / "new").exists() else []
    queued = await Spool(srv.config.queue.dir).queued_ids()
    assert len(delivered) + len(queued) == 1


def shutdown_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The server's shutdown_* log lines, in order (not the sessions' shutdown_closed)."""
    return [r.getMessage() for r in caplog.records
            if r.name == "submitd.server" and r.getMessage().startswith("event=shutdown_")]


class StuckDelivery:
    """A delivery plugin whose attempts never finish (a smarthost that stopped answering)."""

    def __init__(self) -> None:
        self.started = trio.Event()

    @hookimpl
    async def submitd_deliver(self, envelope, message, recipients):  # type: ignore[no-untyped-def]
        self.started.set()
        await trio.sleep_forever()


async def test_shutdown_says_what_it_waits_for_and_how_it_ended(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_server(make_config(limits={"shutdown_grace": "1s"})) as srv:
        client = await open_session(srv, "implicit", client_tls)
        srv.server.request_shutdown()
        with trio.fail_after(5):
            reply = await client.reply()
        assert (reply.code, reply.status) == (421, "4.3.2")
        await client.aclose()
    waiting, over, complete = shutdown_lines(caplog)
    assert waiting == ('event=shutdown_waiting sessions=1 deliveries=0 grace=1s '
                       'hint="send SIGTERM (or press Ctrl-C) again to stop at once"')
    assert over.startswith("event=shutdown_wait_over outcome=grace_expired closing_sessions=1 "
                           "abandoning_deliveries=0 waited=1.")
    assert complete == "event=shutdown_complete"
    assert any(r.getMessage().startswith("event=shutdown_closed ") and "peer=127.0.0.1" in
               r.getMessage() for r in caplog.records)


async def test_stop_now_during_the_grace_sends_421_at_once_and_keeps_the_message_queued(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    stuck = StuckDelivery()
    config = make_config(enable=("passwdfile",), limits={"shutdown_grace": "30s"})
    with trio.fail_after(15):
        async with running_server(config, extra_plugins=[("stuck", stuck)]) as srv:
            client = await open_session(srv, "implicit", client_tls)
            queue_id = (await send_message(client)).rsplit(" ", 1)[-1]
            await stuck.started.wait()
            srv.server.request_shutdown()  # the first SIGTERM: drain for up to 30 s
            while not shutdown_lines(caplog):
                await trio.sleep(0.01)
            assert (await client.command("NOOP")).code == 250  # still served while draining
            started = trio.current_time()
            srv.server.request_shutdown(now=True)  # the second SIGTERM or Ctrl-C
            reply = await client.reply()
            assert (reply.code, reply.status) == (421, "4.3.2")
            assert trio.current_time() - started < 5  # not the 30 s grace
            await client.aclose()
    assert shutdown_lines(caplog)[0] == (
        'event=shutdown_waiting sessions=1 deliveries=1 grace=30s '
        'hint="send SIGTERM (or press Ctrl-C) again to stop at once"')
    assert shutdown_lines(caplog)[1].startswith(
        "event=shutdown_wait_over outcome=forced closing_sessions=1 abandoning_deliveries=1 ")
    assert [r.getMessage() for r in caplog.records if "attempt_abandoned" in r.getMessage()] == [
        f"event=attempt_abandoned queue_id={queue_id} nrcpt=1"]
    # Committed before the stop: still in the spool, delivered after the next start.
    assert await Spool(srv.config.queue.dir).queued_ids() == [queue_id]


class FailClosed:
    """Every session-hook failure must refuse, never wave through."""

    @hookimpl
    async def submitd_auth(self, session, credentials):
        if credentials.username == "crash":
            raise RuntimeError("directory down")
        return None

    @hookimpl
    async def submitd_data_filter(self, session, envelope, message):
        if message.get("Subject") == "crash":
            raise RuntimeError("scanner down")
        return None


async def test_auth_and_filter_plugin_failures_fail_closed(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    import base64

    async with running_server(make_config(), extra_plugins=[("failclosed", FailClosed())]) as srv:
        async with await open_session(srv, "implicit", client_tls, auth=False) as client:
            token = base64.b64encode(b"\0crash\0pw").decode()
            reply = await client.command(f"AUTH PLAIN {token}")
            assert (reply.code, reply.status) == (451, "4.3.0")
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 530
        async with await open_session(srv, "implicit", client_tls) as client:
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
            assert (await client.command("DATA")).code == 354
            await client.send(f"From: <{SENDER}>\r\nSubject: crash\r\n\r\nx\r\n.\r\n".encode())
            reply = await client.reply()
            assert (reply.code, reply.status) == (451, "4.3.0")
            # The refused message is not queued: the next one is the only delivery.
            await send_message(client)
        stored = await wait_for_mail(maildir)
        assert len(stored) == 1 and b"Subject: crash" not in stored[0]
        spool = srv.server.spool
        with trio.fail_after(5):
            while await spool.queued_ids():  # the delivered message leaves the spool
                await trio.sleep(0.02)
        assert not list((spool.directory / "tmp").iterdir()), "no temp files left behind"


class Gatekeeper:
    @hookimpl
    def submitd_connect(self, session):
        return Reply.make(521, "5.3.2", "Go away")


async def test_connect_refusal_never_sends_521_on_a_submission_port(
    make_config: Callable[..., Path],
) -> None:
    async with running_server(make_config(), extra_plugins=[("gate", Gatekeeper())]) as srv:
        async with await RawSMTPClient.connect("127.0.0.1", srv.port("starttls")) as client:
            reply = await client.reply()
            assert (reply.code, reply.status, reply.text) == (554, "5.7.1", "Go away")
            assert await client.at_eof()


async def test_repeated_failed_logins_are_throttled_before_hashing(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    import base64

    bad = base64.b64encode(b"\0demo\0wrong").decode()
    good = base64.b64encode(b"\0demo\0" + PASSWORD.encode()).decode()
    async with running_server(make_config()) as srv:
        async with await open_session(srv, "implicit", client_tls, auth=False) as client:
            for _ in range(3):
                assert (await client.command(f"AUTH PLAIN {bad}")).code == 535
        async with await open_session(srv, "implicit", client_tls, auth=False) as client:
            for _ in range(2):
                assert (await client.command(f"AUTH PLAIN {bad}")).code == 535
            # Five failures: now even the right password waits (growing delay, no lockout).
            reply = await client.command(f"AUTH PLAIN {good}")
            assert (reply.code, reply.status) == (454, "4.7.0")


async def test_users_file_changes_apply_without_restart(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, users_file: Path,
) -> None:
    import base64

    from tests.support import HASHER

    async with running_server(make_config()) as srv:
        token = base64.b64encode(b"\0newbie\0fresh password").decode()
        async with await open_session(srv, "implicit", client_tls, auth=False) as client:
            assert (await client.command(f"AUTH PLAIN {token}")).code == 535
        with users_file.open("a") as f:
            f.write(f"newbie {HASHER.hash('fresh password')} newbie@example.com\n")
        async with await open_session(srv, "implicit", client_tls, auth=False) as client:
            assert (await client.command(f"AUTH PLAIN {token}")).code == 235
            assert (await client.command("MAIL FROM:<newbie@example.com>")).code == 250


async def test_oversized_message_is_refused_552_after_reading_to_its_end(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
) -> None:
    async with running_server(make_config(limits={"max_message_size": 10_000})) as srv:
        async with await open_session(srv, "implicit", client_tls) as client:
            ehlo = await client.command("EHLO again.example")
            assert "SIZE 10000" in ehlo.lines
            reply = await client.command(f"MAIL FROM:<{SENDER}> SIZE=20000")
            assert (reply.code, reply.status) == (552, "5.3.4")
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
            assert (await client.command("DATA")).code == 354
            await client.send(b"Subject: big\r\n\r\n")
            for _ in range(30):
                await client.send(b"y" * 998 + b"\r\n")
            await client.send(b".\r\n")
            reply = await client.reply()
            assert (reply.code, reply.status) == (552, "5.3.4")
            await send_message(client)
        (stored,) = await wait_for_mail(maildir)
        assert b"Subject: big" not in stored


async def test_implicit_tls_port_over_the_cap_says_421_inside_tls(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    async with running_server(make_config(limits={"max_connections": 1})) as srv:
        port = srv.port("implicit")
        first = await RawSMTPClient.connect("127.0.0.1", port, tls=client_tls)
        assert (await first.reply()).code == 220
        second = await RawSMTPClient.connect("127.0.0.1", port, tls=client_tls)
        reply = await second.reply()
        assert (reply.code, reply.status) == (421, "4.7.0")
        await second.aclose()
        await first.aclose()


class Extensions:
    @hookimpl
    def submitd_ehlo_keywords(self, session):
        # A generator: it can be read only once.
        return (k for k in ["X-DEMO", "DSN", "BAD KEYWORD\r\n250 INJECTED", 42])

    @hookimpl
    def submitd_rcpt_check(self, session, envelope, recipient):
        if recipient.address.startswith("nostatus@"):
            return Reply(code=550, lines=("no enhanced status code",))
        return "OK" if recipient.address.startswith("weird@") else None


async def test_plugin_keywords_are_advertised_and_bad_answers_never_reach_the_wire(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    async with running_server(make_config(), extra_plugins=[("ext", Extensions())]) as srv:
        async with await open_session(srv, "implicit", client_tls) as client:
            ehlo = await client.command("EHLO again.example")
            assert "X-DEMO" in ehlo.lines and "DSN" in ehlo.lines
            assert not any("INJECTED" in line for line in ehlo.lines)
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            reply = await client.command("RCPT TO:<weird@example.net>")
            assert (reply.code, reply.status) == (451, "4.3.0"), "a non-Reply answer fails closed"
            reply = await client.command("RCPT TO:<nostatus@example.net>")
            assert (reply.code, reply.status) == (451, "4.3.0"), "checked like the core would"
            assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250


async def test_disk_failure_during_commit_is_451_and_nothing_is_queued(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, maildir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import submitd.durable

    real_fsync_dir = submitd.durable.fsync_dir

    def failing_fsync_dir(path: Path) -> None:
        if path.name == "msg":
            raise OSError(5, "Input/output error")
        real_fsync_dir(path)

    async with running_server(make_config()) as srv:
        async with await open_session(srv, "implicit", client_tls) as client:
            monkeypatch.setattr(submitd.durable, "fsync_dir", failing_fsync_dir)
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
            assert (await client.command("DATA")).code == 354
            await client.send(b"Subject: lost disk\r\n\r\nx\r\n.\r\n")
            reply = await client.reply()
            assert (reply.code, reply.status) == (451, "4.3.0")
            spool = srv.server.spool
            assert await spool.queued_ids() == []
            assert not list((spool.directory / "msg").iterdir())
            assert not list((spool.directory / "tmp").iterdir())
            # The disk recovers; the session goes on and the next message is stored.
            monkeypatch.setattr(submitd.durable, "fsync_dir", real_fsync_dir)
            await send_message(client)
        (stored,) = await wait_for_mail(maildir)
        assert b"lost disk" not in stored


async def test_slow_trickle_in_data_is_cut_at_the_data_deadline(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext,
) -> None:
    config = make_config(limits={"data_timeout": "2s", "command_timeout": "1m"})
    async with running_server(config) as srv:
        async with await open_session(srv, "implicit", client_tls) as client:
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            assert (await client.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
            assert (await client.command("DATA")).code == 354
            start = trio.current_time()
            # A byte every 0.2 s is far within the command timeout (1 min); the DATA phase as a
            # whole is not. The client keeps trickling past the deadline and still reads the 421.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while trio.current_time() - start < 2.5:
                    await client.send(b"x")
                    await trio.sleep(0.2)
            with trio.fail_after(5):
                reply = await client.reply()
            assert (reply.code, reply.status) == (421, "4.4.2")
            assert 1.9 < trio.current_time() - start < 5
            assert await client.at_eof()
        assert await srv.server.spool.queued_ids() == []


class AcceptedRecorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, list[str]]] = []

    @hookimpl
    async def submitd_accepted(self, session, envelope, queue_id):
        self.seen.append((queue_id, session.username, envelope.queue_id,
                          [r.address for r in envelope.recipients]))


class BrokenObserver:
    @hookimpl
    def submitd_accepted(self, session, envelope, queue_id):
        raise RuntimeError("observer bug")


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_accepted_observers_see_each_committed_message_with_its_queue_id(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, mode: str,
) -> None:
    recorder = AcceptedRecorder()
    plugins = [("broken", BrokenObserver()), ("recorder", recorder)]
    async with running_server(make_config(), extra_plugins=plugins) as srv:
        async with await open_session(srv, mode, client_tls) as client:
            first = await send_message(client)
            second = await send_message(client)
    # A failing observer is logged and changes nothing: both messages got their 250.
    ids = [text.rsplit(" ", 1)[1] for text in (first, second)]
    assert recorder.seen == [(qid, USER, qid, [RECIPIENT]) for qid in ids]
