"""py-spy profiles of a running server (``bench/run.py --profile DIR``).

:class:`PySpy` runs ``py-spy record --format raw --nonblocking`` against a process (and its
subprocesses: ``[server] workers``) while a workload runs: with ``--gil`` only the thread
holding the GIL is sampled (where Python spends CPU), without it every thread that is not idle
(worker threads blocked in ``fsync`` included: where sessions wait). Then :func:`aggregate`
reads the collapsed stacks (one ``frame;frame;...;leaf COUNT`` line per distinct stack) into
the functions with the most self time (the leaf frame) and the most total time (anywhere on
the stack, once per stack).
The raw file is kept (flamegraph.pl and https://www.speedscope.app read it as it is), and a
speedscope JSON (``.speedscope.json``) is written next to it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 200  # samples per second
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME_LINENO = re.compile(r":\d+\)$")


def py_spy() -> str:
    """The py-spy executable (next to this Python first, then on PATH)."""
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed (bench/setup-peers installs it into .venv)")
    return found


class PySpy:
    """``py-spy record`` attached to ``pid`` until :meth:`stop`."""

    def __init__(self, pid: int, raw: Path, *, gil: bool) -> None:
        self.raw = raw
        self.log = raw.with_suffix(".log")
        argv = [py_spy(), "record", "--pid", str(pid), "--format", "raw", "--output", str(raw),
                "--rate", str(RATE), "--subprocesses", "--nonblocking"]
        if gil:
            argv.append("--gil")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def stop(self) -> dict[str, Any]:
        """Stop recording (SIGINT: py-spy writes its file), aggregate, write speedscope JSON."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.raw.exists():
            return {"error": "py-spy wrote no profile: "
                    + self.log.read_text(errors="replace")[-500:]}
        stacks = read_raw(self.raw)
        speedscope = self.raw.with_suffix(".speedscope.json")
        speedscope.write_text(json.dumps(to_speedscope(stacks, self.raw.stem)))
        return {"raw": str(self.raw), "speedscope": str(speedscope), **aggregate(stacks)}


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """The collapsed stacks of a py-spy ``raw`` file: (frames root first, samples)."""
    out: list[tuple[list[str], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if m:
            out.append((m.group("stack").split(";"), int(m.group("count"))))
    return out


def _function(frame: str) -> str:
    """``name (file.py:123)`` -> ``name (file.py)``: one entry per function, not per line."""
    return _FRAME_LINENO.sub(")", frame.strip())


def aggregate(stacks: list[tuple[list[str], int]], top: int = 20) -> dict[str, Any]:
    """Top functions by self time (leaf) and by total time (on the stack), in % of samples."""
    total = sum(count for _, count in stacks) or 1
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    for frames, count in stacks:
        # py-spy puts "process ..." and "thread ..." pseudo-frames first with some options.
        funcs = [_function(f) for f in frames if not f.startswith(("process ", "thread "))]
        if not funcs:
            continue
        self_time[funcs[-1]] += count
        for func in set(funcs):
            total_time[func] += count

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": name, "samples": n, "percent": round(100 * n / total, 1)}
                for name, n in counter.most_common(top)]

    return {"samples": total, "rate_hz": RATE, "top_self": table(self_time),
            "top_total": table(total_time)}


def to_speedscope(stacks: list[tuple[list[str], int]], name: str) -> dict[str, Any]:
    """A speedscope "sampled" profile (https://www.speedscope.app/file-format-schema.json)."""
    index: dict[str, int] = {}
    samples: list[list[int]] = []
    weights: list[int] = []
    for frames, count in stacks:
        samples.append([index.setdefault(f, len(index)) for f in frames])
        weights.append(count)
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": [{"name": f} for f in index]},
        "profiles": [{"type": "sampled", "name": name, "unit": "none", "startValue": 0,
                      "endValue": sum(weights), "samples": samples, "weights": weights}],
        "name": name,
        "exporter": "submitd bench/profiling.py",
    }
