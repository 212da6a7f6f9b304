"""Denial of service under load: does a logged-in user stay served while AUTH is hammered?

One ``submitd serve`` process (passwdfile with argon2-cffi's default parameters, maildir). An
authenticated session (STARTTLS, AUTH PLAIN, from 127.0.0.1) sends ``NOOP`` every 100 ms and
times each round trip, twice in the same server process:

1. **idle**: nobody else is connected;
2. **attack**: 200 concurrent connections, each from its own loopback address (127.0.0.2,
   127.0.0.3, ...; Linux routes all of 127.0.0.0/8 to ``lo``), open implicit TLS, EHLO, and
   send wrong ``AUTH PLAIN`` until the server closes them, then connect again, for the whole
   phase. Half guess at the real login, half at made-up ones.

Reported: the NOOP round trip (p50, p99, max, samples, late/failed NOOPs), the server's RSS
before, at its peak and after each phase (``/proc``), its CPU time, and what the attackers
got back (replies by code, connections, refusals at connect).

The bench config raises three limits, and only these, so that the attack reaches AUTH and the
measuring session survives: ``max_unauthenticated`` (default 200: the 200 attackers would
otherwise be partly turned away at connect, which is the cap working, not AUTH under load),
``max_connection_rate`` (default 30 per 10 s per address: an attacker reconnects after each
``421``) and ``max_junk_commands`` (default 100: the measuring session sends nothing but NOOP).
The login throttle, the per-session failure limit and every other limit keep their defaults.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from load import percentile
from proctree import status_kib
from servers import PASSWORD, USER, Workspace, cpu_seconds, log_tail, reset_peak_rss

from submitd.testing import RawSMTPClient, write_config

ATTACKERS = 200
NOOP_INTERVAL = 0.1
#: The only limits the bench config changes (see the module docstring for why).
RAISED_LIMITS: dict[str, object] = {
    "max_unauthenticated": 1000,
    "max_connection_rate": 100_000,
    "max_junk_commands": 1_000_000,
}


@dataclass(frozen=True, kw_only=True)
class DosPlan:
    """How long each phase runs (seconds) and how many attackers."""

    idle_s: float
    attack_s: float
    attackers: int = ATTACKERS


FULL_DOS = DosPlan(idle_s=10.0, attack_s=20.0)
QUICK_DOS = DosPlan(idle_s=3.0, attack_s=6.0)


@dataclass(frozen=True, kw_only=True)
class _Server:
    proc: subprocess.Popen[bytes]
    starttls: int
    implicit: int
    log: Path


@contextmanager
def _start(ws: Workspace, directory: Path) -> Iterator[_Server]:
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(
        directory, ca=ws.ca, enable=("passwdfile", "maildir"),
        plugins={"passwdfile": {"path": str(ws.users)}, "maildir": {"path": "mail"}},
        limits={**RAISED_LIMITS, "shutdown_grace": "2s"},
        hostname="submitd.bench.example",
    )
    log = directory / "server.log"
    exe = Path(sys.executable).with_name("submitd")
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(exe), "serve", "-c", str(config)], stdin=subprocess.DEVNULL,
            stdout=sink, stderr=sink, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 30
        while "event=ready" not in (text := log.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("submitd did not start:\n" + log_tail(log))
            time.sleep(0.05)
        ports = dict((m.group(2), int(m.group(1))) for m in re.finditer(
            r"event=listening address=\S+ port=(\d+) mode=(\w+)", text))
        yield _Server(proc=proc, starttls=ports["starttls"], implicit=ports["implicit"], log=log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _RssSampler:
    """Samples the server's ``VmRSS`` every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            self._stop.wait(0.02)

    def __enter__(self) -> _RssSampler:
        reset_peak_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, KeyError):  # VmHWM catches spikes between samples
            self.peak = max(self.peak, status_kib(self.pid, "VmHWM"))


async def _login(port: int, ctx: ssl.SSLContext) -> RawSMTPClient:
    """The measuring session: STARTTLS, AUTH PLAIN with the right password, from 127.0.0.1."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.1")
    client = RawSMTPClient(tcp)
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    replies = [await client.reply(), await client.command("EHLO bench.example"),
               await client.command("STARTTLS")]
    await client.starttls(ctx)
    replies += [await client.command("EHLO bench.example"),
                await client.command(f"AUTH PLAIN {token}")]
    codes = [r.code if r else None for r in replies]
    if codes != [220, 250, 220, 250, 235]:
        raise RuntimeError(f"the measuring session did not log in: {codes}")
    return client


async def _noops(client: RawSMTPClient, seconds: float) -> dict[str, Any]:
    """NOOP every 100 ms for ``seconds``; round-trip statistics in milliseconds."""
    rtts: list[float] = []
    failed = 0
    start = trio.current_time()
    tick = start
    while tick - start < seconds:
        t0 = time.perf_counter()
        reply = await client.command("NOOP")
        if reply is None or reply.code != 250:
            failed += 1
            break
        rtts.append((time.perf_counter() - t0) * 1000)
        tick += NOOP_INTERVAL
        await trio.sleep_until(max(tick, trio.current_time()))
    late = sum(1 for r in rtts if r > 100)
    return {
        "samples": len(rtts),
        "p50_ms": round(percentile(rtts, 0.5), 2) if rtts else None,
        "p99_ms": round(percentile(rtts, 0.99), 2) if rtts else None,
        "max_ms": round(max(rtts), 2) if rtts else None,
        "over_100ms": late,
        "failed": failed,
    }


async def _attacker(n: int, port: int, ctx: ssl.SSLContext, stop: trio.Event,
                    stats: Counter[str]) -> None:
    """Wrong AUTH PLAIN from 127.0.0.(n+2) until ``stop``, reconnecting when cut off."""
    local = f"127.0.{(n + 2) // 256}.{(n + 2) % 256}"
    login = USER if n % 2 == 0 else f"user{n}"
    bad = base64.b64encode(f"\0{login}\0wrong guess {n}".encode()).decode()
    while not stop.is_set():
        stream: trio.abc.Stream | None = None
        try:
            tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=local)
            stream = tls = trio.SSLStream(tcp, ctx, server_hostname="localhost")
            await tls.do_handshake()
            client = RawSMTPClient(tls)
            stats["connections"] += 1
            greeting = await client.reply()
            if greeting is None or greeting.code != 220:
                stats[f"refused_at_connect_{greeting.code if greeting else 'eof'}"] += 1
                await trio.sleep(0.2)
                continue
            await client.command("EHLO attacker.example")
            while not stop.is_set():
                reply = await client.command(f"AUTH PLAIN {bad}")
                stats[f"auth_{reply.code if reply else 'eof'}"] += 1
                if reply is None or reply.code == 421:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            stats["errors"] += 1
            await trio.sleep(0.05)
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)


async def _phase(srv: _Server, ctx: ssl.SSLContext, plan: DosPlan, *, attack: bool,
                 client: RawSMTPClient) -> dict[str, Any]:
    pid = srv.proc.pid
    stats: Counter[str] = Counter()
    rss_before = status_kib(pid, "VmRSS")
    cpu_before = cpu_seconds(pid)
    seconds = plan.attack_s if attack else plan.idle_s
    with _RssSampler(pid) as sampler:
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            if attack:
                attack_ctx = ssl.create_default_context(cafile=None)
                attack_ctx.check_hostname = False
                attack_ctx.verify_mode = ssl.CERT_NONE
                for n in range(plan.attackers):
                    nursery.start_soon(_attacker, n, srv.implicit, attack_ctx, stop, stats)
                await trio.sleep(1.0)  # let the attack ramp up before measuring
            noop = await _noops(client, seconds)
            stop.set()
    cpu = cpu_seconds(pid) - cpu_before
    await trio.sleep(3.0)  # closed connections are freed; then memory "after"
    out: dict[str, Any] = {
        "noop_rtt": noop,
        "rss_kib": {"before": rss_before, "peak": sampler.peak,
                    "after": status_kib(pid, "VmRSS")},
        "server_cpu_s": round(cpu, 2),
    }
    if attack:
        out["attack"] = {"attackers": plan.attackers, **dict(sorted(stats.items()))}
    return out


def run_dos(ws: Workspace, directory: Path, plan: DosPlan) -> dict[str, Any]:
    """Both phases against one server process; the JSON section of ``bench/run.py``."""
    ctx = ws.ca.client_context()
    with _start(ws, directory) as srv:

        async def main() -> dict[str, Any]:
            client = await _login(srv.starttls, ctx)
            idle = await _phase(srv, ctx, plan, attack=False, client=client)
            attack = await _phase(srv, ctx, plan, attack=True, client=client)
            await client.aclose()
            return {"idle": idle, "attack": attack}

        result = trio.run(main)
        if srv.proc.poll() is not None:
            raise RuntimeError("submitd exited during the attack:\n" + log_tail(srv.log))
    idle_p99, attack_p99 = result["idle"]["noop_rtt"]["p99_ms"], result["attack"]["noop_rtt"][
        "p99_ms"]
    return {
        "load": {
            "measuring_session": "STARTTLS + AUTH PLAIN from 127.0.0.1, NOOP every 100 ms",
            "attack": f"{plan.attackers} connections from 127.0.0.2.., implicit TLS, wrong "
                      "AUTH PLAIN until closed, then reconnect",
            "idle_s": plan.idle_s,
            "attack_s": plan.attack_s,
            "raised_limits": RAISED_LIMITS,
        },
        **result,
        "ratio_p99_attack_over_idle": round(attack_p99 / idle_p99, 2)
        if idle_p99 and attack_p99 else None,
    }
