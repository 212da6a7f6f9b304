"""Shutdown and restart lose nothing and deliver nothing twice; one server per spool."""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from submitd import DeliveryOutcome, hookimpl
from submitd.mailqueue import SpoolLocked
from submitd.server import Server
from submitd.testing import RawSMTPClient, RunningServer, running_server
from tests.support import PASSWORD, RECIPIENT, SENDER, USER

PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


class SlowDelivery:
    """An async delivery plugin that takes ``delay`` seconds, like a smarthost on a slow link."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = trio.Event()
        self.delivered: list[str] = []

    @hookimpl
    async def submitd_deliver(self, envelope, message, recipients):  # type: ignore[no-untyped-def]
        self.started.set()
        await trio.sleep(self.delay)
        self.delivered.append(envelope.queue_id)
        return {r.address: DeliveryOutcome.delivered(remote="slow.example") for r in recipients}


async def submit(srv: RunningServer, tls: ssl.SSLContext) -> str:
    """Submit one message over implicit TLS with AUTH; return its queue id."""
    async with await RawSMTPClient.connect("127.0.0.1", srv.port("implicit"), tls=tls) as c:
        assert (await c.reply()).code == 220
        assert (await c.command("EHLO client.example")).code == 250
        assert (await c.command(f"AUTH PLAIN {PLAIN}")).code == 235
        assert (await c.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await c.command(f"RCPT TO:<{RECIPIENT}>")).code == 250
        assert (await c.command("DATA")).code == 354
        await c.send(f"From: <{SENDER}>\r\nSubject: slow\r\n\r\nbody\r\n.\r\n".encode())
        reply = await c.reply()
        assert reply is not None and reply.code == 250, reply
        await c.command("QUIT")
        return reply.text.rsplit(" ", 1)[-1]


def queued(spool: Path) -> list[str]:
    env = spool / "env"
    return sorted(p.name.removesuffix(".json") for p in env.iterdir()) if env.exists() else []


async def test_shutdown_lets_a_slow_delivery_finish_and_records_it(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(enable=("passwdfile",), limits={"shutdown_grace": "10s"})
    slow = SlowDelivery(delay=1.0)
    caplog.set_level(logging.INFO)
    with trio.fail_after(30):
        async with running_server(config, extra_plugins=[("slow", slow)]) as srv:
            queue_id = await submit(srv, client_tls)
            await slow.started.wait()
            srv.server.request_shutdown()  # what SIGTERM does, while the delivery is in flight
    assert slow.delivered == [queue_id]
    assert queued(tmp_path / "spool") == []  # the outcome was recorded before the exit
    assert not any("attempt_abandoned" in r.getMessage() for r in caplog.records)

    again = SlowDelivery(delay=0.0)
    with trio.fail_after(30):
        async with running_server(config, extra_plugins=[("slow", again)]):
            pass
    assert again.delivered == []  # not delivered a second time after the restart
    assert any("queue_runner_started queued=0" in r.getMessage() for r in caplog.records)


async def test_delivery_outlasting_the_grace_is_abandoned_logged_and_retried_after_restart(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(enable=("passwdfile",), limits={"shutdown_grace": "1s"})
    hung = SlowDelivery(delay=3600.0)
    caplog.set_level(logging.INFO)
    with trio.fail_after(30):
        async with running_server(config, extra_plugins=[("slow", hung)]) as srv:
            queue_id = await submit(srv, client_tls)
            await hung.started.wait()
    abandoned = [r.getMessage() for r in caplog.records if "attempt_abandoned" in r.getMessage()]
    assert len(abandoned) == 1 and f"queue_id={queue_id}" in abandoned[0]
    assert queued(tmp_path / "spool") == [queue_id]  # still queued: nothing was lost

    fast = SlowDelivery(delay=0.0)
    with trio.fail_after(30):
        async with running_server(config, extra_plugins=[("slow", fast)]):
            while queued(tmp_path / "spool"):
                await trio.sleep(0.02)
    assert fast.delivered == [queue_id]


async def test_second_server_on_the_same_spool_refuses_to_start_and_touches_nothing(
    make_config: Callable[..., Path], client_tls: ssl.SSLContext, tmp_path: Path,
) -> None:
    config = make_config(enable=("passwdfile",), queue={"retry": ["1h"]})
    spool = tmp_path / "spool"
    with trio.fail_after(60):
        async with running_server(config) as srv:
            queue_id = await submit(srv, client_tls)  # no delivery plugin: deferred, kept
            sidecar = spool / "env" / f"{queue_id}.json"
            while json.loads(sidecar.read_bytes())["recipients"][0]["attempts"] == 0:
                await trio.sleep(0.02)  # wait until the deferral is recorded
            fragment = spool / "tmp" / "0123456789ABCDEF.msg"  # as if a commit were running
            fragment.write_bytes(b"half")
            before = sorted(str(p.relative_to(spool)) for p in spool.rglob("*"))

            second = Server(srv.server.config)
            with pytest.raises(ExceptionGroup) as info:
                await second.serve()
            assert info.group_contains(SpoolLocked, match=f"process {os.getpid()}")

            exe = Path(sys.executable).with_name("submitd")
            result = await trio.to_thread.run_sync(lambda: subprocess.run(
                [str(exe), "serve", "-c", str(config)], capture_output=True, text=True,
                timeout=30,
            ))
            assert result.returncode == 1
            assert f"submitd: the spool {spool} is in use by process {os.getpid()}" \
                in result.stderr
            assert "Traceback" not in result.stderr
            assert sorted(str(p.relative_to(spool)) for p in spool.rglob("*")) == before
            assert queued(spool) == [queue_id]
            fragment.unlink()
