"""Client side: the submission load (smtplib in threads) and the large-message probe.

Every connection does what a mail client does on port 587: connect, EHLO, STARTTLS with the
certificate verified against the test CA, EHLO again, AUTH PLAIN, then several messages
(MAIL, RCPT, DATA) and QUIT. The message phase starts for all connections at once (a barrier
after AUTH), so connection set-up and argon2 are reported apart from message throughput.
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
import statistics
import threading
import time
from dataclasses import dataclass, field

from proctree import status_kib
from servers import (
    PASSWORD,
    RECIPIENT,
    SENDER,
    USER,
    ServerHandle,
    count_delivered,
    cpu_seconds,
    reset_peak_rss,
    wait_delivered,
)

TIMEOUT = 120.0  # seconds for any one SMTP reply (a 20 MiB DATA on a loaded machine)


def make_message(size: int, index: int) -> bytes:
    """A plain-text message of about ``size`` bytes (CRLF lines of <= 76 octets).

    One body line in 16 starts with a dot, so both sides do transparency work (RFC 5321
    §4.5.2). ``From:`` is the login's own address: submitd's ``passwdfile`` checks it.
    """
    header = (
        f"From: Bench <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench message {index}\r\n"
        f"Message-ID: <{index}.{time.time_ns()}@bench.example>\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    block = bytearray()
    for n in range(16):
        text = f"line {n:02d} of a bench message body, padded to a typical width of text"
        block += (("." if n == 7 else "") + text).encode() + b"\r\n"
    repeat = max(1, (size - len(header)) // len(block))
    return header + bytes(block) * repeat


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; ``values`` need not be sorted."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def open_session(port: int, context: ssl.SSLContext) -> smtplib.SMTP:
    """Connect, STARTTLS (verified), AUTH PLAIN; the caller closes the session."""
    smtp = smtplib.SMTP("localhost", port, timeout=TIMEOUT)
    try:
        smtp.ehlo("client.bench.example")
        smtp.starttls(context=context)
        smtp.ehlo("client.bench.example")
        smtp.login(USER, PASSWORD, initial_response_ok=True)
    except BaseException:
        smtp.close()
        raise
    return smtp


@dataclass(kw_only=True)
class LoadResult:
    """One round of the load against one server."""

    messages: int
    setup_s: float  # first connect until every connection is authenticated
    accept_s: float  # barrier until the last 250 (what clients wait for)
    deliver_s: float  # barrier until every message is in the Maildir
    server_cpu_s: float  # server process CPU from the barrier to the Maildir
    latencies: list[float] = field(default_factory=list)
    tls: str = ""

    @property
    def msgs_per_s(self) -> float:
        """Accepted messages per second of the message phase."""
        return self.messages / self.accept_s


def run_load(
    server: ServerHandle, context: ssl.SSLContext, *, connections: int, messages: int,
    size: int,
) -> LoadResult:
    """Send ``messages`` over ``connections`` concurrent sessions; wait for the Maildir."""
    per_conn = [messages // connections + (1 if i < messages % connections else 0)
                for i in range(connections)]
    bodies = [make_message(size, i) for i in range(max(per_conn))]
    before = count_delivered(server.maildir)
    barrier = threading.Barrier(connections + 1, timeout=TIMEOUT)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors: list[BaseException] = []
    tls: list[str] = []

    def worker(slot: int) -> None:
        try:
            smtp = open_session(server.port, context)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            return
        try:
            sock = smtp.sock
            if isinstance(sock, ssl.SSLSocket) and not tls:
                tls.append(f"{sock.version()} {(sock.cipher() or ('?',))[0]}")
            barrier.wait()
            for body in bodies[: per_conn[slot]]:
                start = time.perf_counter()
                refused = smtp.sendmail(SENDER, [RECIPIENT], body)
                latencies[slot].append(time.perf_counter() - start)
                if refused:
                    raise RuntimeError(f"recipients refused: {refused}")
            smtp.quit()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            smtp.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    t_setup = time.perf_counter()
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    t0 = time.perf_counter()
    cpu0 = cpu_seconds(server.pid)
    for t in threads:
        t.join(TIMEOUT * 2)
    t1 = time.perf_counter()
    if errors or any(t.is_alive() for t in threads):
        server.check_alive()
        raise RuntimeError(f"{server.name}: the load failed: {errors[:1]!r}")
    t2 = wait_delivered(server, before + messages)
    return LoadResult(
        messages=messages, setup_s=t0 - t_setup, accept_s=t1 - t0, deliver_s=t2 - t0,
        server_cpu_s=cpu_seconds(server.pid) - cpu0,
        latencies=[x for per in latencies for x in per], tls=tls[0] if tls else "",
    )


def summarize(rounds: list[LoadResult]) -> dict[str, object]:
    """Median over rounds of each rate; latency percentiles over every message of every round."""
    lat = [x for r in rounds for x in r.latencies]
    n = rounds[0].messages
    return {
        "msgs_per_s": round(statistics.median(r.msgs_per_s for r in rounds), 1),
        "msgs_per_s_rounds": [round(r.msgs_per_s, 1) for r in rounds],
        "delivered_msgs_per_s": round(statistics.median(n / r.deliver_s for r in rounds), 1),
        "latency_ms": {
            "p50": round(percentile(lat, 0.50) * 1000, 2),
            "p95": round(percentile(lat, 0.95) * 1000, 2),
            "max": round(max(lat) * 1000, 2),
        },
        "setup_s": round(statistics.median(r.setup_s for r in rounds), 3),
        "server_cpu_ms_per_msg": round(
            statistics.median(r.server_cpu_s / n for r in rounds) * 1000, 3
        ),
        "tls": rounds[0].tls,
    }


# --- one large message -----------------------------------------------------------------------


def large_message_probe(
    server: ServerHandle, context: ssl.SSLContext, *, body: bytes,
) -> dict[str, object]:
    """Send ``body`` once; return the server's peak RSS growth from DATA to the Maildir.

    A small message goes first so that lazy imports and first-use allocations are not
    counted. After AUTH (argon2 allocates and frees 64 MiB), MAIL and RCPT, the peak is
    reset (``/proc/PID/clear_refs``) and the RSS taken as the baseline; the peak (``VmHWM``)
    is read once the message is in the Maildir. A thread also samples ``VmRSS`` every
    millisecond, as a cross-check and as the fallback where the peak cannot be reset.
    """
    before = count_delivered(server.maildir)
    warm = open_session(server.port, context)
    try:
        warm.sendmail(SENDER, [RECIPIENT], make_message(10_000, 0))
        warm.quit()
    finally:
        warm.close()
    wait_delivered(server, before + 1)

    smtp = open_session(server.port, context)
    stop = threading.Event()
    peak = [0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], status_kib(server.pid, "VmRSS"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        code, _ = smtp.mail(SENDER, [f"SIZE={len(body)}"])
        if code != 250:
            raise RuntimeError(f"{server.name}: MAIL answered {code}")
        code, _ = smtp.rcpt(RECIPIENT)
        if code != 250:
            raise RuntimeError(f"{server.name}: RCPT answered {code}")
        hwm_reset = reset_peak_rss(server.pid)
        baseline = status_kib(server.pid, "VmRSS")
        peak[0] = baseline
        sampler.start()
        start = time.perf_counter()
        code, reply = smtp.data(body)
        if code != 250:
            raise RuntimeError(f"{server.name}: DATA answered {code} {reply!r}")
        accepted = time.perf_counter() - start
        wait_delivered(server, before + 2)
        stored = time.perf_counter() - start
        stop.set()
        sampler.join()
        hwm = status_kib(server.pid, "VmHWM")
        smtp.quit()
    finally:
        stop.set()
        smtp.close()
    sampled = peak[0] - baseline
    # The kernel updates RSS counters in batches, so either reading can be a little short:
    # report the larger of the two.
    growth = max(hwm - baseline, sampled) if hwm_reset else sampled
    return {
        "rss_baseline_kib": baseline,
        "peak_growth_kib": growth,
        "peak_source": "max(VmHWM after clear_refs, VmRSS sampled every 1 ms)" if hwm_reset
        else "VmRSS sampled every 1 ms",
        "hwm_growth_kib": hwm - baseline if hwm_reset else None,
        "sampled_peak_growth_kib": sampled,
        "accepted_s": round(accepted, 3),
        "stored_s": round(stored, 3),
    }
