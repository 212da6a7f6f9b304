"""Scan a real ``submitd serve`` with testssl on both listener kinds (policy: RFC 9325, RFC 8996).

Usage: ``.venv/bin/python bench/tls_scan.py [--raw DIR] [--no-cipher-list]``

Starts the server as a child process on 127.0.0.1 (ports the OS picks, a trustme CA and
certificate in a temporary directory), runs testssl (Debian package ``testssl.sh``) against
the STARTTLS listener (``-t smtp``) and the implicit-TLS listener, and prints one JSON
document to stdout; progress goes to stderr. testssl's own exit code is not a verdict, so the
verdict comes from its JSON findings:

- exit 1 if a protocol below TLS 1.2 is offered, a CBC / non-AEAD or non-forward-secret suite
  is offered, or any finding is MEDIUM or worse other than the two that every trustme
  certificate draws (validity period, no CRL/OCSP URI);
- exit 2 if the scan itself could not run (no testssl, server did not start, no JSON,
  a FATAL finding, a timeout);
- exit 0 otherwise.

The server is always stopped by PID (SIGTERM, then SIGKILL), also on errors and ^C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from submitd.testing import TestCA, write_config

START_TIMEOUT = 30.0
SCAN_TIMEOUT = 150.0  # one testssl run; about 35 s for STARTTLS with -E on 2 cores

# -p protocols, -S server defaults (certificate, resumption), -U vulnerabilities (incl.
# renegotiation), -s standard cipher categories, -f forward secrecy, -E ciphers per protocol.
# -4 only IPv4: the listeners are on 127.0.0.1.
TESTSSL_CHECKS = ["-p", "-S", "-U", "-s", "-f", "-E", "-4"]
TESTSSL_COMMON = ["--quiet", "--warnings", "batch", "--nodns", "none", "--color", "0"]

SEVERITY_RANK = {"OK": 0, "INFO": 0, "LOW": 1, "WARN": 1, "MEDIUM": 2, "HIGH": 3,
                 "CRITICAL": 4, "FATAL": 5}
# A trustme certificate lives 1000 years and names no CRL or OCSP responder: testssl rates
# both HIGH whatever the server does. A production certificate from a real CA draws neither.
EXPECTED_WITH_TRUSTME = {"cert_validityPeriod", "cert_revocation"}

PROTOCOL_IDS = {"SSLv2": "SSLv2", "SSLv3": "SSLv3", "TLS1": "TLSv1", "TLS1_1": "TLSv1.1",
                "TLS1_2": "TLSv1.2", "TLS1_3": "TLSv1.3"}
LEGACY_PROTOCOLS = {"SSLv2", "SSLv3", "TLSv1", "TLSv1.1"}
CIPHER_PROTOCOLS = {"ssl2": "SSLv2", "ssl3": "SSLv3", "tls1": "TLSv1", "tls1_1": "TLSv1.1",
                    "tls1_2": "TLSv1.2", "tls1_3": "TLSv1.3"}
CIPHER_ID = re.compile(r"cipher-(\w+?)_x([0-9a-f]+)")
# testssl's cipher categories (-s) that must all be "not offered" (the AVERAGE one is
# "Obsolete CBC ciphers"): a second opinion next to the per-suite list of -E.
BAD_CATEGORIES = ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                  "cipherlist_3DES_IDEA", "cipherlist_AVERAGE")
AEAD_MARKERS = ("_GCM_", "_CHACHA20_POLY1305_", "_CCM")
LISTENING = re.compile(r"event=listening address=(\S+) port=(\d+) mode=(starttls|implicit)")


class ScanError(Exception):
    """The scan could not be carried out (as opposed to a finding)."""


def log(msg: str) -> None:
    """Progress on stderr (stdout is kept for the JSON document)."""
    print(f"tls_scan: {msg}", file=sys.stderr, flush=True)


# --- the server --------------------------------------------------------------------------


def start_server(workdir: Path, ca: TestCA) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``submitd serve`` on a fresh config in ``workdir``; log to ``workdir/server.log``."""
    # testssl opens hundreds of connections from 127.0.0.1: lift the per-address rate.
    config = write_config(workdir, ca=ca, enable=[], plugins={},
                          limits={"max_connection_rate": 100_000})
    exe = Path(sys.executable).with_name("submitd")
    if not exe.exists():
        raise ScanError(f"{exe} not found: run this with the project's .venv/bin/python")
    server_log = workdir / "server.log"
    with server_log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(exe), "serve", "-c", str(config)], cwd=workdir, stdin=subprocess.DEVNULL,
            stdout=sink, stderr=sink, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, server_log


def wait_ports(proc: subprocess.Popen[bytes], server_log: Path) -> dict[str, int]:
    """The bound port per listener mode, once the server logged ``event=ready``."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = server_log.read_text(errors="replace")
        if "event=ready" in text:
            ports = {m.group(3): int(m.group(2)) for m in LISTENING.finditer(text)}
            if set(ports) != {"starttls", "implicit"}:
                raise ScanError(f"server ready but listeners are {ports}:\n{text}")
            return ports
        if proc.poll() is not None:
            raise ScanError(f"submitd exited with {proc.returncode}:\n{text}")
        time.sleep(0.05)
    raise ScanError("submitd did not log event=ready in time:\n" + server_log.read_text())


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit within ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- testssl -----------------------------------------------------------------------------


def run_testssl(
    testssl: str, ca_pem: Path, port: int, *, smtp: bool, checks: list[str], workdir: Path
) -> tuple[list[dict[str, Any]], float]:
    """Run one scan; return its JSON findings and how long it took."""
    kind = "starttls" if smtp else "implicit"
    out = workdir / f"testssl-{kind}.json"
    cmd = [testssl, *TESTSSL_COMMON, "--add-ca", str(ca_pem), "--jsonfile", str(out), *checks]
    if smtp:
        cmd += ["-t", "smtp"]
    cmd.append(f"127.0.0.1:{port}")
    log(f"{kind}: {' '.join(cmd)}")
    started = time.monotonic()
    with (workdir / f"testssl-{kind}.txt").open("wb") as text:
        # Own session: on a timeout the whole group (testssl and its openssl children) goes.
        proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=text,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=SCAN_TIMEOUT)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    elapsed = time.monotonic() - started
    try:
        findings = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        raise ScanError(f"testssl ({kind}) wrote no readable JSON ({exc}); exit "
                        f"{proc.returncode}; its output is lost with the temp dir, "
                        f"rerun with --raw DIR") from exc
    if not isinstance(findings, list) or not findings:
        raise ScanError(f"testssl ({kind}) JSON holds no findings")
    return findings, elapsed


# --- verdict -----------------------------------------------------------------------------


def parse_cipher(finding: dict[str, Any]) -> tuple[str, str, str] | None:
    """(protocol, OpenSSL name, IANA name) of a ``cipher-<proto>_x<hex>`` finding (-E)."""
    m = CIPHER_ID.fullmatch(finding["id"])
    if m is None or m.group(1) not in CIPHER_PROTOCOLS:
        return None
    # "TLS 1.2   xc02c   ECDHE-ECDSA-AES256-GCM-SHA384   ECDH 253   AESGCM   256   TLS_ECDHE_..."
    tokens = finding["finding"].split()
    hex_at = next(i for i, t in enumerate(tokens) if t.lower() == "x" + m.group(2))
    return CIPHER_PROTOCOLS[m.group(1)], tokens[hex_at + 1], tokens[-1]


def is_aead(protocol: str, iana: str) -> bool:
    """TLS 1.3 suites are all AEAD; below, GCM, ChaCha20-Poly1305 and CCM are."""
    return protocol == "TLSv1.3" or any(marker in iana for marker in AEAD_MARKERS)


def is_forward_secret(protocol: str, iana: str) -> bool:
    """TLS 1.3 always is; below only ephemeral (EC)DHE key exchange (anon counts as not)."""
    return protocol == "TLSv1.3" or iana.startswith(("TLS_ECDHE_", "TLS_DHE_"))


def brief(finding: dict[str, Any]) -> dict[str, str]:
    """The part of a finding worth printing."""
    return {"id": finding["id"], "severity": finding["severity"], "finding": finding["finding"]}


def summarise(
    port: int, findings: list[dict[str, Any]], elapsed: float, *, cipher_list: bool = True
) -> dict[str, Any]:
    """One listener's summary, with ``failures`` listing why it fails (empty: it passes)."""
    by_id = {f["id"]: f for f in findings}
    offered = [name for fid, name in PROTOCOL_IDS.items()
               if by_id.get(fid, {}).get("finding", "").startswith("offered")]
    ciphers: dict[str, list[str]] = {}
    weak_enc: list[str] = []
    not_fs: list[str] = []
    for f in findings:
        parsed = parse_cipher(f)
        if parsed is None:
            continue
        protocol, name, iana = parsed
        ciphers.setdefault(protocol, []).append(name)
        if not is_aead(protocol, iana):
            weak_enc.append(f"{protocol} {name}")
        if not is_forward_secret(protocol, iana):
            not_fs.append(f"{protocol} {name}")
    bad_categories = [brief(by_id[c]) for c in BAD_CATEGORIES
                      if by_id.get(c, {}).get("finding", "not offered") != "not offered"]
    serious = [f for f in findings if SEVERITY_RANK.get(f["severity"], 0) >= 2]
    expected = [brief(f) for f in serious if f["id"] in EXPECTED_WITH_TRUSTME]
    unexpected = [brief(f) for f in serious if f["id"] not in EXPECTED_WITH_TRUSTME]

    failures: list[str] = []
    if legacy := [p for p in offered if p in LEGACY_PROTOCOLS]:
        failures.append(f"protocols below TLS 1.2 offered: {legacy}")
    if "TLSv1.2" not in offered and "TLSv1.3" not in offered:
        failures.append("neither TLS 1.2 nor TLS 1.3 detected")
    if cipher_list and not ciphers:
        failures.append("no cipher list (-E) in the scan")
    if weak_enc:
        failures.append(f"CBC / non-AEAD suites offered: {weak_enc}")
    if not_fs:
        failures.append(f"non-forward-secret suites offered: {not_fs}")
    if bad_categories:
        failures.append(f"weak cipher categories offered: {[c['id'] for c in bad_categories]}")
    if unexpected:
        failures.append(f"findings MEDIUM or worse: {[f['id'] for f in unexpected]}")
    if fatal := [f["id"] for f in findings if f["severity"] == "FATAL"]:
        raise ScanError(f"testssl reported FATAL: {fatal}")
    return {
        "port": port,
        "scan_s": round(elapsed, 1),
        "protocols_offered": offered,
        "ciphers_offered": ciphers,
        "cbc_or_non_aead_offered": weak_enc,
        "non_forward_secret_offered": not_fs,
        "weak_cipher_categories_offered": bad_categories,
        "renegotiation": [brief(f) for f in findings if "renego" in f["id"]],
        "resumption": [brief(f) for f in findings
                       if f["id"].startswith(("sessionresumption", "TLS_session_ticket"))],
        "findings_medium_or_higher": unexpected,
        "expected_trustme_findings": expected,
        "scanner_warnings": [brief(f) for f in findings if f["severity"] == "WARN"],
        "failures": failures,
    }


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run both scans and print the summary; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, help="copy testssl's JSON and text output here")
    parser.add_argument("--no-cipher-list", action="store_true",
                        help="drop -E (per-protocol cipher list, the slow part); the CBC and "
                             "forward-secrecy checks then rest on -s/-f categories only")
    parser.add_argument("--testssl", default="testssl", help="testssl executable")
    args = parser.parse_args(argv)

    testssl = shutil.which(args.testssl)
    if testssl is None:
        log(f"{args.testssl} not found: apt-get install -y testssl.sh")
        return 2
    checks = [c for c in TESTSSL_CHECKS if not (args.no_cipher_list and c == "-E")]
    started = time.monotonic()
    result: dict[str, Any] = {"listeners": {}}
    with tempfile.TemporaryDirectory(prefix="submitd-tls-scan-") as tmp:
        workdir = Path(tmp)
        ca = TestCA(workdir / "tls")
        proc, server_log = start_server(workdir, ca)
        try:
            ports = wait_ports(proc, server_log)
            log(f"submitd pid {proc.pid} listening on {ports}")
            for kind in ("starttls", "implicit"):
                findings, elapsed = run_testssl(testssl, ca.ca_path, ports[kind],
                                                smtp=kind == "starttls", checks=checks,
                                                workdir=workdir)
                result["listeners"][kind] = summarise(ports[kind], findings, elapsed,
                                                      cipher_list=not args.no_cipher_list)
                if proc.poll() is not None:
                    raise ScanError(f"submitd died during the {kind} scan:\n"
                                    + server_log.read_text(errors="replace"))
        except ScanError as exc:
            log(f"error: {exc}")
            return 2
        finally:
            stop(proc)
            if args.raw is not None:
                args.raw.mkdir(parents=True, exist_ok=True)
                for path in [*workdir.glob("testssl-*"), server_log]:
                    shutil.copy(path, args.raw / path.name)
    failures = [f"{kind}: {msg}" for kind, s in result["listeners"].items()
                for msg in s["failures"]]
    result = {"verdict": "fail" if failures else "pass", "failures": failures,
              "testssl_checks": checks, "runtime_s": round(time.monotonic() - started, 1),
              **result}
    print(json.dumps(result, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
