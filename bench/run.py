"""submitd benchmark: one JSON document on stdout, progress on stderr (``make bench``).

By default the four issue workloads (``bench/issue.py``): ``session``, ``reconnect``, ``big``
and ``idle``, each against a private Postfix, aiosmtpd, submitd forwarding to a sink and
submitd delivering into its Maildir, in the same invocation with alternating rounds.

Older measurements, run only when named with ``--workload`` (see bench/README.md):

1. ``throughput``: the same submission load (STARTTLS + AUTH PLAIN + several ~10 KiB
   messages per connection, several connections at once) against ``submitd serve`` and an
   aiosmtpd server set up alike; rounds alternate between the two.
2. ``large_message``: one 20 MiB message to each; the server's peak RSS growth.
3. ``protocol_core``: the sans-I/O core parsing a 10 MiB DATA phase, against a bare
   split-and-unstuff of the same bytes.
4. ``backlog``: the throughput load against ``submitd serve`` with 50,000 deferred messages
   in its spool, against a second ``submitd serve`` with an empty spool; rounds alternate.
5. ``dos``: a logged-in session's NOOP round trip and the server's memory while 200
   connections from 200 loopback addresses send wrong AUTH, against the same with no attack.

Usage: ``python bench/run.py [--quick] [--workload NAME ...] [--servers A,B] [--rounds N]
[--idle-connections K] [--big-size MIB] [--submitd-workers N] [--profile DIR] [--backlog N]``
(``--only`` is the same as ``--workload``). Everything runs on 127.0.0.1, in a temporary
directory; child servers are stopped on any exit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backlog import count_queued, fill_spool, spool_bytes
from core import run_core
from dos import FULL_DOS, QUICK_DOS, run_dos
from issue import RUNNERS, WORKLOADS, IssuePlan
from load import LoadResult, large_message_probe, make_message, run_load, summarize
from proctree import status_kib
from servers import (
    ServerHandle,
    Workspace,
    count_delivered,
    progress,
    start_peer,
    start_submitd,
)
from targets import SERVERS as SERVER_KEYS

MIB = 1024 * 1024
MAX_SIZE = 32 * MIB
SECTIONS = ("throughput", "large_message", "protocol_core", "backlog", "dos")
NOFILE = 65536  # open files for the client and the servers it starts (idle: 10,000 sessions)
BACKLOG_MESSAGE_SIZE = 4 * 1024  # the deferred messages' size (only their sidecars are read)
BACKLOG_START_TIMEOUT = 900.0  # seconds for submitd to recover a full spool and listen


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How big each measurement is (``--quick`` shrinks everything)."""

    rounds: int
    connections: int
    messages: int
    message_size: int
    large_size: int
    core_size: int
    core_repeats: int
    small_size: int
    small_count: int
    backlog: int  # deferred messages in the full spool


FULL = Plan(rounds=5, connections=8, messages=200, message_size=10 * 1024,
            large_size=20 * MIB, core_size=10 * MIB, core_repeats=7,
            small_size=10 * 1024, small_count=300, backlog=50_000)
QUICK = Plan(rounds=1, connections=4, messages=60, message_size=10 * 1024,
             large_size=20 * MIB, core_size=4 * MIB, core_repeats=3,
             small_size=10 * 1024, small_count=100, backlog=5_000)


def ratio(a: float, b: float) -> float | None:
    """``a / b`` rounded, or None when ``b`` is zero."""
    return round(a / b, 3) if b else None


def load_description(plan: Plan) -> dict[str, Any]:
    """The load of ``alternate_rounds`` as the JSON reports it."""
    return {
        "connections": plan.connections,
        "messages": plan.messages,
        "message_bytes": len(make_message(plan.message_size, 0)),
        "rounds": plan.rounds,
        "session": "STARTTLS (verified) + AUTH PLAIN (argon2id, default parameters)",
    }


def alternate_rounds(
    servers: dict[str, ServerHandle], context: ssl.SSLContext, plan: Plan, label: str
) -> dict[str, list[LoadResult]]:
    """The same load against each server, ``plan.rounds`` times, alternating who goes first.

    One untimed warm-up message each first (imports, the first TLS session, the first argon2
    run); alternating the order lets drift on the shared machine hit every server alike.
    """
    for server in servers.values():
        run_load(server, context, connections=1, messages=1, size=plan.message_size)
    results: dict[str, list[LoadResult]] = {key: [] for key in servers}
    keys = list(servers)
    for n in range(plan.rounds):
        for key in keys if n % 2 == 0 else keys[::-1]:
            result = run_load(servers[key], context, connections=plan.connections,
                              messages=plan.messages, size=plan.message_size)
            results[key].append(result)
            progress(f"{label} round {n + 1}/{plan.rounds} {key}: {result.msgs_per_s:.1f} msg/s")
    return results


def bench_throughput(ws: Workspace, work: Path, plan: Plan) -> dict[str, Any]:
    """Alternate rounds of the same load against both servers (one process each)."""
    context = ws.ca.client_context()
    with start_submitd(ws, work / "tp-submitd", max_size=MAX_SIZE) as sd, \
            start_peer(ws, work / "tp-peer", max_size=MAX_SIZE) as peer:
        servers: dict[str, ServerHandle] = {"submitd": sd, "peer": peer}
        results = alternate_rounds(servers, context, plan, "throughput")
    sd_sum, peer_sum = summarize(results["submitd"]), summarize(results["peer"])
    peer_sum["name"] = "aiosmtpd (bench/peer_aiosmtpd.py)"
    return {
        "load": load_description(plan),
        "submitd": sd_sum,
        "peer": peer_sum,
        "ratio_submitd_over_peer": ratio(sd_sum["msgs_per_s"], peer_sum["msgs_per_s"]),
        # Round n of each server ran back to back: these pairs share the machine's mood.
        "ratio_rounds": [ratio(a.msgs_per_s, b.msgs_per_s)
                         for a, b in zip(results["submitd"], results["peer"], strict=True)],
        "ratio_p50_latency_submitd_over_peer": ratio(
            sd_sum["latency_ms"]["p50"], peer_sum["latency_ms"]["p50"]
        ),
        "ratio_cpu_per_msg_submitd_over_peer": ratio(
            sd_sum["server_cpu_ms_per_msg"], peer_sum["server_cpu_ms_per_msg"]
        ),
    }


def bench_large(ws: Workspace, work: Path, plan: Plan) -> dict[str, Any]:
    """One large message to a fresh process of each server."""
    context = ws.ca.client_context()
    body = make_message(plan.large_size, 0)
    out: dict[str, Any] = {"message_bytes": len(body), "max_message_size": MAX_SIZE}
    starters: dict[str, Callable[..., Any]] = {"submitd": start_submitd, "peer": start_peer}
    for key, start in starters.items():
        with start(ws, work / f"large-{key}", max_size=MAX_SIZE) as server:
            out[key] = large_message_probe(server, context, body=body)
        progress(f"large message {server.name}: peak RSS +{out[key]['peak_growth_kib']} KiB")
    out["peer"]["name"] = "aiosmtpd (bench/peer_aiosmtpd.py)"
    out["ratio_submitd_over_peer"] = ratio(
        out["submitd"]["peak_growth_kib"], out["peer"]["peak_growth_kib"]
    )
    out["submitd_growth_over_message_size"] = round(
        out["submitd"]["peak_growth_kib"] * 1024 / len(body), 3
    )
    out["peer_growth_over_message_size"] = round(
        out["peer"]["peak_growth_kib"] * 1024 / len(body), 3
    )
    return out


def bench_core(plan: Plan) -> dict[str, Any]:
    """The protocol core against the split-and-unstuff reference."""
    result = run_core(size=plan.core_size, repeats=plan.core_repeats,
                      small_size=plan.small_size, small_count=plan.small_count)
    small = result["small_messages"]
    progress(f"protocol core: {result['submitd']['mib_per_s']} MiB/s "
             f"(reference {result['peer']['mib_per_s']}); small messages "
             f"{small['submitd']['mib_per_s']} MiB/s (reference {small['peer']['mib_per_s']})")
    return result


def bench_backlog(ws: Workspace, work: Path, plan: Plan) -> dict[str, Any]:
    """The throughput load against a submitd with a full spool and one with an empty spool.

    Both are ``submitd serve`` with the same config; the full one starts on a spool holding
    ``plan.backlog`` deferred messages (:func:`backlog.fill_spool`), none due during the run.
    Rounds alternate between the two, as in ``throughput``.
    """
    context = ws.ca.client_context()
    full_dir = work / "backlog-full"
    body = make_message(BACKLOG_MESSAGE_SIZE, 0)
    progress(f"backlog: writing {plan.backlog} deferred messages into {full_dir / 'spool'}")
    fill = fill_spool(full_dir / "spool", count=plan.backlog, body=body)
    fill["spool_mib"] = round(spool_bytes(full_dir / "spool") / MIB, 1)
    progress(f"backlog: spool filled in {fill['fill_s']} s; starting both servers")
    with start_submitd(ws, full_dir, max_size=MAX_SIZE,
                       start_timeout=BACKLOG_START_TIMEOUT) as full, \
            start_submitd(ws, work / "backlog-empty", max_size=MAX_SIZE) as empty:
        servers: dict[str, ServerHandle] = {"backlog": full, "empty": empty}
        rss_start = {key: status_kib(srv.pid, "VmRSS") for key, srv in servers.items()}
        progress(f"backlog: submitd ready in {full.start_s:.1f} s with the full spool, "
                 f"{empty.start_s:.1f} s with the empty one")
        results = alternate_rounds(servers, context, plan, "backlog")
        rss_end = {key: status_kib(srv.pid, "VmRSS") for key, srv in servers.items()}
        sent = 1 + plan.rounds * plan.messages
        # Only what the load sent may reach the Maildir: the deferred messages must wait.
        early = count_delivered(full.maildir) - sent
        queued_after = count_queued(full_dir / "spool")
    summary = {key: summarize(results[key]) for key in results}
    for key, srv in servers.items():
        summary[key]["start_s"] = round(srv.start_s, 2)
        summary[key]["rss_kib_after_start"] = rss_start[key]
        summary[key]["rss_kib_after_rounds"] = rss_end[key]
    return {
        "load": load_description(plan),
        "spool": {
            "deferred_messages": plan.backlog,
            "deferred_message_bytes": len(body),
            **fill,
            "still_queued_after_rounds": queued_after,
            "deferred_delivered_during_rounds": early,
        },
        "backlog": summary["backlog"],
        "empty": summary["empty"],
        "ratio_backlog_over_empty": ratio(summary["backlog"]["msgs_per_s"],
                                          summary["empty"]["msgs_per_s"]),
        "ratio_rounds": [ratio(a.msgs_per_s, b.msgs_per_s)
                         for a, b in zip(results["backlog"], results["empty"], strict=True)],
        "ratio_cpu_per_msg_backlog_over_empty": ratio(
            summary["backlog"]["server_cpu_ms_per_msg"], summary["empty"]["server_cpu_ms_per_msg"]
        ),
    }


def bench_dos(ws: Workspace, work: Path, quick: bool) -> dict[str, Any]:
    """AUTH flood from 200 loopback addresses against an idle phase, one server process."""
    progress("dos: idle phase, then 200 attackers (wrong AUTH) while one session sends NOOP")
    result = run_dos(ws, work / "dos", QUICK_DOS if quick else FULL_DOS)
    for phase in ("idle", "attack"):
        rtt, rss = result[phase]["noop_rtt"], result[phase]["rss_kib"]
        progress(f"dos {phase}: NOOP p50 {rtt['p50_ms']} ms, p99 {rtt['p99_ms']} ms, "
                 f"max {rtt['max_ms']} ms; RSS {rss['before']} -> peak {rss['peak']} -> "
                 f"{rss['after']} KiB")
    return result


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE (children inherit it); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in ((NOFILE, max(hard, NOFILE)), (min(NOFILE, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, want)
            return want[0]
        except (ValueError, OSError):
            continue
    return soft


def issue_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> IssuePlan:
    """The issue workloads' sizes from the options."""
    servers = tuple(args.servers.split(",")) if args.servers else SERVER_KEYS
    for key in servers:
        if key not in SERVER_KEYS:
            parser.error(f"--servers: unknown server {key!r} (known: {', '.join(SERVER_KEYS)})")
    plan = IssuePlan(servers=servers, rounds=5)
    if args.quick:
        plan = replace(plan, rounds=1, session_rounds=1, reconnect_s=3.0, big_size=20 * MIB,
                       big_rounds=1, idle=500, idle_postfix=100, idle_open_timeout=60.0)
    if args.rounds is not None:
        plan = replace(plan, rounds=args.rounds, session_rounds=args.rounds,
                       big_rounds=args.rounds)
    if args.idle_connections is not None:
        plan = replace(plan, idle=args.idle_connections,
                       idle_postfix=min(args.idle_connections, plan.idle_postfix))
    if args.idle_postfix is not None:
        plan = replace(plan, idle_postfix=args.idle_postfix)
    if args.big_size is not None:
        plan = replace(plan, big_size=args.big_size * MIB)
    if args.reconnect_seconds is not None:
        plan = replace(plan, reconnect_s=args.reconnect_seconds)
    return replace(plan, workers=args.submitd_workers, profile=args.profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="submitd benchmark (JSON on stdout)")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    parser.add_argument("--only", "--workload", choices=WORKLOADS + SECTIONS, action="append",
                        help="run this workload (repeatable; default: "
                             + ", ".join(WORKLOADS) + ")")
    parser.add_argument("--servers", metavar="A,B",
                        help="servers for the issue workloads (default: "
                             + ",".join(SERVER_KEYS) + ")")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="rounds per server of session, reconnect and big (default "
                             "10, 5 and 3; 1 with --quick)")
    parser.add_argument("--idle-connections", type=int, metavar="K",
                        help="idle sessions for submitd and aiosmtpd (default 10,000)")
    parser.add_argument("--idle-postfix", type=int, metavar="K",
                        help="idle sessions for Postfix (default 1,000: a process each)")
    parser.add_argument("--big-size", type=int, metavar="MIB",
                        help="size of the big message in MiB (default 100)")
    parser.add_argument("--reconnect-seconds", type=float, metavar="S",
                        help="length of one reconnect round (default 8)")
    parser.add_argument("--submitd-workers", type=int, metavar="N",
                        help="write [server] workers = N into submitd's config (when != 1)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy the submitd servers during session and reconnect; "
                             "profiles into DIR, top functions into the JSON")
    parser.add_argument("--backlog", type=int, metavar="N",
                        help="deferred messages for the backlog workload "
                             f"(default {FULL.backlog:,}; {QUICK.backlog:,} with --quick)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.backlog is not None:
        if args.backlog < 1:
            parser.error("--backlog must be at least 1")
        plan = replace(plan, backlog=args.backlog)
    wanted = args.only or list(WORKLOADS)
    iplan = issue_plan(args, parser)
    if args.profile is not None:
        args.profile = args.profile.resolve()
        iplan = replace(iplan, profile=args.profile)
    import submitd

    report: dict[str, Any] = {
        "benchmark": "submitd",
        "submitd_version": submitd.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "note": "ratios compare runs made in this same invocation; absolute figures vary "
                "with the machine's load",
    }
    if any(w in WORKLOADS for w in wanted):
        report["servers"] = list(iplan.servers)
        report["submitd_workers"] = iplan.workers or 1
        report["nofile_limit"] = raise_nofile()
        if args.profile is not None:
            report["profiled"] = "py-spy sampled submitd: its figures in this run are perturbed"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="submitd-bench-") as tmp:
        work = Path(tmp)
        # Postfix's daemons (user postfix) open their directories by full path.
        work.chmod(0o755)
        progress(f"work directory {work} (CA, users, configs, spools, Maildirs)")
        ws = Workspace.create(work)
        for name in WORKLOADS:
            if name in wanted:
                progress(f"workload {name}: servers {', '.join(iplan.servers)}")
                report[name] = RUNNERS[name](iplan, ws, work)
        if "protocol_core" in wanted:
            report["protocol_core"] = bench_core(plan)
        if "throughput" in wanted:
            report["throughput"] = bench_throughput(ws, work, plan)
        if "large_message" in wanted:
            report["large_message"] = bench_large(ws, work, plan)
        if "backlog" in wanted:
            report["backlog"] = bench_backlog(ws, work, plan)
        if "dos" in wanted:
            report["dos"] = bench_dos(ws, work, args.quick)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
