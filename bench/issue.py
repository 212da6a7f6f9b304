"""The four issue workloads (``session``, ``reconnect``, ``big``, ``idle``) across the servers.

For each workload every server is started fresh (:func:`targets.start_target`), gets one
untimed warm-up session, and then the rounds alternate between the servers (round n runs
them in one order, round n+1 in the reverse), so drift on the shared machine hits all alike.
``idle`` runs one server at a time (K open sessions each). The summary per server holds the
rate, latency percentiles, server CPU per unit, peak RSS, errors, and ``ratio_to_postfix``:
the rate divided by Postfix's rate in the same round, per round and the median.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import workloads
from client import Login, stuff
from load import make_message, percentile
from profiling import PySpy
from servers import PASSWORD, RECIPIENT, SENDER, USER, Workspace, progress
from targets import Setup, Target, start_target
from workloads import MIB, Round

WORKLOADS = ("session", "reconnect", "big", "idle")
LOGIN = Login(user=USER, password=PASSWORD, sender=SENDER, recipient=RECIPIENT)
UNITS = {"session": "msg/s", "reconnect": "conn/s", "big": "MiB/s", "idle": "conn/s"}


@dataclass(frozen=True, kw_only=True)
class IssuePlan:
    """Sizes of the issue workloads (``--quick`` and the options change them)."""

    servers: tuple[str, ...]
    rounds: int  # reconnect
    session_rounds: int = 10
    clients: int = 20
    messages: int = 10  # per connection (session)
    message_size: int = 4096
    reconnect_s: float = 8.0  # length of one reconnect round
    big_size: int = 100 * MIB
    big_rounds: int = 3
    idle: int = 10_000
    idle_postfix: int = 1_000
    idle_parallel: int = 100
    idle_open_timeout: float = 120.0
    workers: int | None = None
    profile: Path | None = None


@contextlib.contextmanager
def started(
    plan: IssuePlan, ws: Workspace, work: Path, name: str, setup: Setup,
    keys: tuple[str, ...] | None = None,
) -> Iterator[dict[str, Target]]:
    """Every server of the plan (or ``keys``) running with ``setup``, warmed up."""
    context = ws.ca.client_context()
    with contextlib.ExitStack() as stack:
        targets: dict[str, Target] = {}
        for key in keys or plan.servers:
            target = stack.enter_context(start_target(key, ws, work / f"{name}-{key}", setup))
            trio.run(workloads.warm_up, target, context, LOGIN)
            targets[key] = target
        yield targets


def alternate(
    plan: IssuePlan, targets: dict[str, Target], rounds: int, name: str,
    run: Callable[[Target], Round],
) -> dict[str, list[Round]]:
    """``rounds`` rounds per server, the order reversed every other round."""
    results: dict[str, list[Round]] = {key: [] for key in targets}
    keys = list(targets)
    for n in range(rounds):
        for key in keys if n % 2 == 0 else keys[::-1]:
            result = run(targets[key])
            results[key].append(result)
            errors = f", errors {dict(result.errors)}" if result.errors else ""
            progress(f"{name} round {n + 1}/{rounds} {key}: {result.rate:.1f} {UNITS[name]}"
                     f"{errors}")
    return results


@contextlib.contextmanager
def profiled(plan: IssuePlan, targets: dict[str, Target], name: str) -> Iterator[dict[str, Any]]:
    """py-spy on every submitd server while the block runs (with ``--profile``)."""
    out: dict[str, Any] = {}
    spies: dict[tuple[str, str], PySpy] = {}
    if plan.profile is not None:
        plan.profile.mkdir(parents=True, exist_ok=True)
        for key, target in targets.items():
            if key.startswith("submitd"):
                for view, gil in (("gil", True), ("threads", False)):
                    raw = plan.profile / f"{name}-{key}-{view}.txt"
                    spies[key, view] = PySpy(target.pid, raw, gil=gil)
    try:
        yield out
    finally:
        for (key, view), spy in spies.items():
            out.setdefault(key, {})[view] = spy.stop()


def summarize(name: str, results: dict[str, list[Round]]) -> dict[str, Any]:
    """Per server: rate, latency, CPU per unit, peak RSS, errors; ratios to Postfix."""
    out: dict[str, Any] = {}
    for key, rounds in results.items():
        lat = [x for r in rounds for x in r.latencies]
        units = [r.units for r in rounds]
        errors: Counter[str] = Counter()
        for r in rounds:
            errors.update(r.errors)
        cpu = [r.cpu_s / r.units * 1000 for r in rounds if r.units]
        client = [r.client_cpu_s / r.units * 1000 for r in rounds if r.units and r.client_cpu_s]
        out[key] = {
            "rate": round(statistics.median(r.rate for r in rounds), 2),
            "unit": UNITS[name],
            "rate_rounds": [round(r.rate, 2) for r in rounds],
            "latency_ms": {
                "p50": round(percentile(lat, 0.50) * 1000, 2) if lat else None,
                "p99": round(percentile(lat, 0.99) * 1000, 2) if lat else None,
            },
            "server_cpu_ms_per_unit": round(statistics.median(cpu), 3) if cpu else None,
            # The load generator shares the machine's cores: server + client CPU per unit
            # bounds the rate any server can reach here.
            "client_cpu_ms_per_unit": round(statistics.median(client), 3) if client else None,
            "peak_rss_kib": max(r.peak_rss_kib for r in rounds),
            "units_per_round": units,
            "errors": dict(errors),
            "refused_421_greeting": errors.get("421_greeting", 0),
            "errors_4xx": sum(n for k, n in errors.items() if k.split("_")[-1].startswith("4")),
        }
        if any(r.extra for r in rounds):
            out[key]["rounds"] = [r.extra for r in rounds]
    base = results.get("postfix")
    for key, rounds in results.items():
        if key == "postfix" or not base:
            continue
        pairs = [round(r.rate / b.rate, 3) if b.rate else None
                 for r, b in zip(rounds, base, strict=False)]
        valid = [p for p in pairs if p is not None]
        out[key]["ratio_to_postfix"] = {
            "rounds": pairs, "median": round(statistics.median(valid), 3) if valid else None,
        }
        for field, value in (("p99_latency", out[key]["latency_ms"]["p99"]),
                             ("cpu_per_unit", out[key]["server_cpu_ms_per_unit"])):
            theirs = (out["postfix"]["latency_ms"]["p99"] if field == "p99_latency"
                      else out["postfix"]["server_cpu_ms_per_unit"])
            out[key][f"{field}_ratio_to_postfix"] = (
                round(value / theirs, 3) if value is not None and theirs else None)
    return out


def bench_session(plan: IssuePlan, ws: Workspace, work: Path) -> dict[str, Any]:
    """``session``: 20 clients x 10 messages of 4 KiB per connection, several rounds."""
    context = ws.ca.client_context()
    setup = Setup(max_size=32 * MIB, submitd_limits={"max_connection_rate": 100_000},
                  workers=plan.workers)
    with started(plan, ws, work, "session", setup) as targets, \
            profiled(plan, targets, "session") as profile:
        results = alternate(plan, targets, plan.session_rounds, "session",
                            lambda t: workloads.session_round(
                                t, context, LOGIN, clients=plan.clients,
                                messages=plan.messages, size=plan.message_size))
    out = {"load": {"clients": plan.clients, "messages_per_connection": plan.messages,
                    "message_bytes": len(make_message(plan.message_size, 0)),
                    "rounds": plan.session_rounds,
                    "cpu": "server process tree, from the start of the message phase until "
                           "every message was delivered (sink or Maildir)"},
           "servers": summarize("session", results)}
    if profile:
        out["profile"] = profile
    return out


def bench_reconnect(plan: IssuePlan, ws: Workspace, work: Path) -> dict[str, Any]:
    """``reconnect``: 20 clients, one message per TLS+AUTH connection; submitd default limits."""
    context = ws.ca.client_context()
    setup = Setup(max_size=32 * MIB, workers=plan.workers)
    with started(plan, ws, work, "reconnect", setup) as targets, \
            profiled(plan, targets, "reconnect") as profile:
        results = alternate(plan, targets, plan.rounds, "reconnect",
                            lambda t: workloads.reconnect_round(
                                t, context, LOGIN, clients=plan.clients,
                                duration=plan.reconnect_s, size=plan.message_size))
    out = {"load": {"clients": plan.clients, "round_s": plan.reconnect_s,
                    "rounds": plan.rounds,
                    "submitd_limits": "defaults (argon2id default parameters in the users file)",
                    "latency": "connect to the 221 after QUIT, one message"},
           "servers": summarize("reconnect", results)}
    if profile:
        out["profile"] = profile
    return out


def bench_big(plan: IssuePlan, ws: Workspace, work: Path) -> dict[str, Any]:
    """``big``: one large message per round over STARTTLS; MiB/s and RSS growth."""
    context = ws.ca.client_context()
    wire = stuff(make_message(plan.big_size, 0))
    setup = Setup(max_size=len(wire) + 4 * MIB, workers=plan.workers)
    with started(plan, ws, work, "big", setup) as targets:
        results = alternate(plan, targets, plan.big_rounds, "big",
                            lambda t: workloads.big_round(t, context, LOGIN, wire=wire))
    servers = summarize("big", results)
    for key, rounds in results.items():
        growth = [int(str(r.extra["rss_growth_kib"])) for r in rounds]
        servers[key]["rss_growth_kib"] = max(growth)
        servers[key]["rss_growth_kib_rounds"] = growth
    return {"load": {"message_bytes": len(wire), "rounds": plan.big_rounds,
                     "rate": "MiB from DATA to the 250",
                     "rss_growth": "sum over the server's processes present after RCPT of "
                                   "max(VmHWM after clear_refs, VmRSS sampled every 2 ms) minus "
                                   "their RSS then, until the message was delivered"},
            "servers": servers}


def bench_idle(plan: IssuePlan, ws: Workspace, work: Path) -> dict[str, Any]:
    """``idle``: K authenticated TLS sessions left open, one server at a time."""
    context = ws.ca.client_context()
    results: dict[str, list[Round]] = {}
    for key in plan.servers:
        k = plan.idle_postfix if key == "postfix" else plan.idle
        setup = Setup(max_size=32 * MIB, idle_connections=k, workers=plan.workers)
        with started(plan, ws, work, "idle", setup, keys=(key,)) as targets:
            progress(f"idle {key}: opening {k} sessions")
            result = workloads.idle_round(
                targets[key], context, LOGIN, connections=k, parallel=plan.idle_parallel,
                open_timeout=plan.idle_open_timeout)
        results[key] = [result]
        progress(f"idle {key}: {result.units} open at {result.rate:.1f} conn/s, "
                 f"{result.extra['pss_kib_per_connection']} KiB Pss each")
    servers = summarize("idle", results)
    for key, rounds in results.items():
        servers[key].update(rounds[0].extra)
        base = results.get("postfix")
        if key != "postfix" and base:
            b = float(str(base[0].extra["pss_kib_per_connection"]))
            mine = float(str(rounds[0].extra["pss_kib_per_connection"]))
            servers[key]["memory_ratio_to_postfix"] = round(mine / b, 3) if b else None
    return {"load": {"connections": plan.idle, "postfix_connections": plan.idle_postfix,
                     "parallel_opens": plan.idle_parallel,
                     "open_timeout_s": plan.idle_open_timeout,
                     "memory": "Pss summed over the server's process tree "
                               "(/proc/PID/smaps_rollup), open minus before, per session"},
            "servers": servers}


RUNNERS: dict[str, Callable[[IssuePlan, Workspace, Path], dict[str, Any]]] = {
    "session": bench_session, "reconnect": bench_reconnect, "big": bench_big, "idle": bench_idle,
}
