"""A server as a tree of processes read from /proc: CPU, RSS, Pss and peak RSS of them all.

Postfix is a master process and many children (smtpd per connection, cleanup, qmgr, smtp, ...);
``submitd serve`` with ``workers`` is a parent and its workers; aiosmtpd is one process. The same
readers serve all three: the tree is every live process whose parent chain reaches ``root``.

CPU: ``utime + stime + cutime + cstime`` of every live process of the tree. A child that exited
and was reaped by a process of the tree moved its CPU into that parent's ``cutime``/``cstime``,
so the difference of two readings counts every process that ran in between, short-lived ones
included (Postfix's smtpd and cleanup come and go).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, kw_only=True)
class ProcInfo:
    """One process as ``/proc/PID/stat`` shows it."""

    pid: int
    ppid: int
    name: str
    cpu_ticks: int  # utime + stime + cutime + cstime


def _read_stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    name = head.partition("(")[2]
    fields = rest.split()
    if fields[0] == "Z":
        return None
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ProcInfo(pid=pid, ppid=int(fields[1]), name=name, cpu_ticks=ticks)


def _all_processes() -> list[ProcInfo]:
    out: list[ProcInfo] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _read_stat(int(entry))
            if info is not None:
                out.append(info)
    return out


def tree(root: int) -> list[ProcInfo]:
    """``root`` and its live descendants (empty when ``root`` is gone)."""
    procs = _all_processes()
    children: dict[int, list[ProcInfo]] = {}
    by_pid = {p.pid: p for p in procs}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    if root not in by_pid:
        return []
    out = [by_pid[root]]
    i = 0
    while i < len(out):
        out.extend(children.get(out[i].pid, ()))
        i += 1
    return out


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) of the tree so far, reaped children included."""
    return sum(p.cpu_ticks for p in tree(root)) / _CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` value in KiB (``VmRSS``, ``VmHWM``); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def pss_kib(pid: int) -> int:
    """The proportional set size (``/proc/PID/smaps_rollup``); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def rss_kib(root: int) -> int:
    """Sum of ``VmRSS`` over the tree (shared pages counted once per process)."""
    return sum(status_kib(p.pid, "VmRSS") for p in tree(root))


def tree_pss_kib(root: int) -> int:
    """Sum of Pss over the tree: shared pages split between the processes sharing them."""
    return sum(pss_kib(p.pid) for p in tree(root))


def hwm_kib(root: int) -> int:
    """Sum of ``VmHWM`` (peak RSS) over the live processes of the tree."""
    return sum(status_kib(p.pid, "VmHWM") for p in tree(root))


def reset_peak_rss(pids: Iterable[int]) -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5) of each; False if any refused."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok
