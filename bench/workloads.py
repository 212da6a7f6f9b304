"""The issue workloads, one round at a time against one :class:`targets.Target`.

- :func:`session_round`: N clients at once, each STARTTLS + AUTH PLAIN once, then M messages;
  the message phase starts for all together (after every AUTH) and ends when every message
  was delivered (sink or Maildir).
- :func:`reconnect_round`: N clients, each looping connect, STARTTLS, AUTH, 1 message, QUIT for
  a fixed time; every refusal (``421`` at the greeting) and error is counted.
- :func:`big_round`: one large message; MiB/s from DATA to the 250, RSS growth of the server.
- :func:`idle_round`: K authenticated TLS sessions opened and left idle; memory per session.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import proctree
import trio
from client import Login, Session, SmtpError, stuff
from load import make_message
from targets import Target

MIB = 1024 * 1024


@dataclass(kw_only=True)
class Round:
    """One round of one workload against one server."""

    rate: float  # msg/s, conn/s or MiB/s
    units: int  # messages, connections or MiB
    latencies: list[float] = field(default_factory=list)  # seconds
    cpu_s: float = 0.0  # server CPU (whole process tree) for the round
    client_cpu_s: float = 0.0  # the load generator's own CPU (this process) for the round
    peak_rss_kib: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    extra: dict[str, object] = field(default_factory=dict)


def _error_key(exc: BaseException) -> str:
    if isinstance(exc, SmtpError):
        if exc.stage == "greeting" and exc.code == 421:
            return "421_greeting"
        return f"{exc.stage}_{exc.code}" if exc.code else f"{exc.stage}_closed"
    return type(exc).__name__


async def warm_up(target: Target, context: ssl.SSLContext, login: Login) -> None:
    """One untimed session with one message (imports, first TLS, first AUTH)."""
    session = await Session.open(target.port, context, login)
    await session.send(login, stuff(make_message(4096, 0)))
    await session.quit()


def session_round(
    target: Target, context: ssl.SSLContext, login: Login, *, clients: int, messages: int,
    size: int,
) -> Round:
    """``clients`` sessions at once, ``messages`` each; until every message is delivered."""
    bodies = [stuff(make_message(size, i)) for i in range(messages)]
    before = target.delivered()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    sent = [0]
    marks: dict[str, float] = {}

    async def one(ready: trio.Event, go: trio.Event, opened: list[int]) -> None:
        try:
            session = await Session.open(target.port, context, login)
        except (SmtpError, OSError, trio.BrokenResourceError) as exc:
            errors[_error_key(exc)] += 1
            return
        finally:
            opened[0] += 1
            if opened[0] == clients:
                ready.set()
        await go.wait()
        try:
            for wire in bodies:
                start = time.perf_counter()
                await session.send(login, wire)
                latencies.append(time.perf_counter() - start)
                sent[0] += 1
            await session.quit()
        except (SmtpError, OSError, trio.BrokenResourceError) as exc:
            errors[_error_key(exc)] += 1
            await session.close()

    async def main() -> None:
        ready, go = trio.Event(), trio.Event()
        opened = [0]
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one, ready, go, opened)
            await ready.wait()
            marks["cpu0"] = proctree.cpu_seconds(target.pid)
            marks["client0"] = time.process_time()
            marks["t0"] = time.perf_counter()
            go.set()
        marks["t1"] = time.perf_counter()
        marks["client1"] = time.process_time()

    trio.run(main)
    t2 = target.wait_delivered(before + sent[0])
    cpu = proctree.cpu_seconds(target.pid) - marks["cpu0"]
    n = max(sent[0], 1)
    return Round(rate=sent[0] / (marks["t1"] - marks["t0"]), units=sent[0],
                 latencies=latencies, cpu_s=cpu, peak_rss_kib=proctree.hwm_kib(target.pid),
                 errors=errors, client_cpu_s=marks["client1"] - marks["client0"],
                 extra={"delivered_per_s": round(sent[0] / (t2 - marks["t0"]), 1),
                        "cpu_ms_per_unit": round(cpu / n * 1000, 3),
                        "pss_kib_after_round": proctree.tree_pss_kib(target.pid)})


def reconnect_round(
    target: Target, context: ssl.SSLContext, login: Login, *, clients: int, duration: float,
    size: int,
) -> Round:
    """``clients`` loops of connect + STARTTLS + AUTH + 1 message + QUIT for ``duration`` s."""
    wire = stuff(make_message(size, 0))
    before = target.delivered()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    done = [0]

    async def loop(deadline: float) -> None:
        while trio.current_time() < deadline:
            start = time.perf_counter()
            session: Session | None = None
            try:
                session = await Session.open(target.port, context, login)
                await session.send(login, wire)
                done[0] += 1
                await session.quit()
                latencies.append(time.perf_counter() - start)
            except (SmtpError, OSError, trio.BrokenResourceError) as exc:
                errors[_error_key(exc)] += 1
                if session is not None:
                    await session.close()
                await trio.sleep(0.05)  # a refused client waits a little before it retries

    async def main() -> None:
        deadline = trio.current_time() + duration
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(loop, deadline)

    cpu0 = proctree.cpu_seconds(target.pid)
    client0 = time.process_time()
    t0 = time.perf_counter()
    trio.run(main)
    t1 = time.perf_counter()
    client_cpu = time.process_time() - client0
    target.wait_delivered(before + done[0])
    cpu = proctree.cpu_seconds(target.pid) - cpu0
    n = max(done[0], 1)
    return Round(rate=done[0] / (t1 - t0), units=done[0], latencies=latencies, cpu_s=cpu,
                 peak_rss_kib=proctree.hwm_kib(target.pid), errors=errors,
                 client_cpu_s=client_cpu,
                 extra={"cpu_ms_per_unit": round(cpu / n * 1000, 3),
                        "pss_kib_after_round": proctree.tree_pss_kib(target.pid)})


class _Sampler:
    """Samples ``VmRSS`` of some processes every 2 ms in a thread; keeps each one's peak."""

    def __init__(self, pids: list[int]) -> None:
        self.baseline = {pid: proctree.status_kib(pid, "VmRSS") for pid in pids}
        self.peaks = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, peak in self.peaks.items():
                self.peaks[pid] = max(peak, proctree.status_kib(pid, "VmRSS"))
            time.sleep(0.002)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def big_round(
    target: Target, context: ssl.SSLContext, login: Login, *, wire: bytes,
) -> Round:
    """One large message; RSS growth of the processes that existed once RCPT was accepted.

    After MAIL and RCPT the peak RSS of every process of the server's tree is reset
    (``clear_refs``) and its RSS taken as its baseline; growth per process is the larger of
    ``VmHWM`` and a 2 ms ``VmRSS`` sampling, minus the baseline, read once the message was
    delivered (sink or Maildir). The sum over those processes is the figure (for Postfix: the
    session's smtpd, the cleanup daemon and the rest of the tree); processes started after
    that point (Postfix's smtp client to the sink) are listed apart with their RSS.
    """
    before = target.delivered()
    marks: dict[str, float] = {}
    growth: dict[str, int] = {}
    new: dict[str, int] = {}

    async def main() -> None:
        session = await Session.open(target.port, context, login)
        mail = f"MAIL FROM:<{login.sender}> SIZE={len(wire)}\r\n".encode()
        await session.command("mail", mail, 250)
        await session.command("rcpt", f"RCPT TO:<{login.recipient}>\r\n".encode(), 250)
        procs = proctree.tree(target.pid)
        hwm_reset = proctree.reset_peak_rss(p.pid for p in procs)
        with _Sampler([p.pid for p in procs]) as sampler:
            marks["cpu0"] = proctree.cpu_seconds(target.pid)
            marks["t0"] = time.perf_counter()
            await session.command("data", b"DATA\r\n", 354)
            await session.send_body(wire)
            code, text = await session.reply("data end")
            if code != 250:
                raise SmtpError("data end", code, text)
            marks["t1"] = time.perf_counter()
            marks["t2"] = await trio.to_thread.run_sync(target.wait_delivered, before + 1)
            for p in procs:
                hwm = proctree.status_kib(p.pid, "VmHWM") if hwm_reset else 0
                grew = max(sampler.peaks[p.pid], hwm) - sampler.baseline[p.pid]
                growth[f"{p.name}[{p.pid}]"] = max(grew, 0)
            for p in proctree.tree(target.pid):
                if p.pid not in sampler.baseline:
                    new[f"{p.name}[{p.pid}]"] = proctree.status_kib(p.pid, "VmRSS")
        marks["cpu1"] = proctree.cpu_seconds(target.pid)
        await session.quit()

    trio.run(main)
    mib = len(wire) / MIB
    accepted = marks["t1"] - marks["t0"]
    total = sum(growth.values())
    return Round(
        rate=mib / accepted, units=1, latencies=[accepted], cpu_s=marks["cpu1"] - marks["cpu0"],
        peak_rss_kib=proctree.hwm_kib(target.pid),
        extra={
            "rss_growth_kib": total,
            "rss_growth_by_process_kib": {k: v for k, v in growth.items() if v},
            "processes_measured": sorted({k.partition("[")[0] for k in growth}),
            "new_processes_rss_kib": new,
            "accepted_s": round(accepted, 3),
            "delivered_s": round(marks["t2"] - marks["t0"], 3),
        },
    )


def idle_round(
    target: Target, context: ssl.SSLContext, login: Login, *, connections: int,
    parallel: int, open_timeout: float,
) -> Round:
    """Open ``connections`` authenticated TLS sessions (``parallel`` handshakes at a time).

    Server memory is read before and once every session is open (a second later): Pss summed
    over the server's process tree (``/proc/PID/smaps_rollup``; shared pages split between the
    processes sharing them) and, for reference, the sum of RSS. Opening stops at
    ``open_timeout`` seconds; figures are per session actually opened.
    """
    pss0, rss0 = proctree.tree_pss_kib(target.pid), proctree.rss_kib(target.pid)
    cpu0 = proctree.cpu_seconds(target.pid)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    streams: list[trio.abc.Stream] = []
    marks: dict[str, float] = {}

    async def one(limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            start = time.perf_counter()
            try:
                session = await Session.open(target.port, context, login)
            except (SmtpError, OSError, trio.BrokenResourceError) as exc:
                errors[_error_key(exc)] += 1
                return
            latencies.append(time.perf_counter() - start)
            streams.append(session.detach_tls())

    async def main() -> None:
        limiter = trio.CapacityLimiter(parallel)
        marks["t0"] = time.perf_counter()
        with trio.move_on_after(open_timeout) as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(connections):
                    nursery.start_soon(one, limiter)
        marks["t1"] = time.perf_counter()
        marks["timed_out"] = float(scope.cancelled_caught)
        marks["cpu1"] = proctree.cpu_seconds(target.pid)
        await trio.sleep(1.0)
        marks["pss1"] = proctree.tree_pss_kib(target.pid)
        marks["rss1"] = proctree.rss_kib(target.pid)
        marks["procs"] = len(proctree.tree(target.pid))
        for stream in streams:
            await trio.aclose_forcefully(stream)

    trio.run(main)
    opened = len(streams)
    n = max(opened, 1)
    return Round(
        rate=opened / (marks["t1"] - marks["t0"]), units=opened, latencies=latencies,
        cpu_s=marks["cpu1"] - cpu0, peak_rss_kib=proctree.hwm_kib(target.pid), errors=errors,
        extra={
            "opened": opened,
            "asked": connections,
            "open_timed_out": bool(marks["timed_out"]),
            "pss_kib_before": pss0,
            "pss_kib_open": int(marks["pss1"]),
            "pss_kib_per_connection": round((marks["pss1"] - pss0) / n, 2),
            "rss_kib_before": rss0,
            "rss_kib_open": int(marks["rss1"]),
            "rss_kib_per_connection": round((marks["rss1"] - rss0) / n, 2),
            "server_processes_open": int(marks["procs"]),
        },
    )
