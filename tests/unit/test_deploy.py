"""What docs/install.md ships: the systemd unit, the certbot hook, the sample config's commands.

The unit is checked by systemd's own tools (``systemd-analyze verify`` and ``security``); the
certbot hook runs as certbot would run it, against a fake certificate lineage and a
``systemctl`` stand-in; the sample config's self-signed certificate commands are run as printed.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from submitd.config import Limits, load_config
from submitd.testing import TestCA

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "submitd.service"
HOOK = ROOT / "deploy" / "certbot" / "submitd-reload.sh"
SAMPLE = ROOT / "etc" / "submitd.toml"
SUBMITD = Path(sys.executable).with_name("submitd")  # the venv's console script


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    return path


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's submitd (/opt/submitd is not here)."""
    text = UNIT.read_text()
    assert "\nExecStart=/opt/submitd/bin/submitd serve -c /etc/submitd/submitd.toml\n" in text
    unit = tmp_path / "submitd.service"
    unit.write_text(text.replace("ExecStart=/opt/submitd/bin/submitd ", f"ExecStart={SUBMITD} "))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = runnable_unit(tmp_path)
    result = subprocess.run([systemd_analyze(), "verify", str(unit)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt keys are only warnings ("Unknown key 'X' in section [Service],
    # ignoring."): any complaint about the unit fails the test.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "submitd.service" in line]
    assert complaints == []


def test_unit_sandbox_keeps_its_exposure_low(tmp_path: Path) -> None:
    unit = runnable_unit(tmp_path)
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--threshold=20", "--no-pager",
         str(unit)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    # Exposure is 0.0 (locked down) .. 10.0 (unprotected); --threshold counts in tenths.
    exposure = re.search(r"Overall exposure level for submitd\.service: (\d+\.\d+)",
                         result.stdout)
    assert exposure is not None, result.stdout + result.stderr
    assert float(exposure.group(1)) <= 2.0, result.stdout
    assert result.returncode == 0, result.stderr


def test_unit_runs_as_submitd_and_outwaits_the_shutdown_grace() -> None:
    settings = unit_settings()
    assert settings["User"] == ["submitd"]
    assert settings["Type"] == ["simple"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["KillSignal"] == ["SIGTERM"]
    assert settings["ReadWritePaths"] == ["/var/spool/submitd"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    stop = settings["TimeoutStopSec"][0]
    assert stop.endswith("s")
    # systemd kills with SIGKILL when TimeoutStopSec runs out: it must not cut the drain short.
    assert float(stop[:-1]) >= Limits().shutdown_grace + 10


def run_hook(tmp_path: Path, lineage: Path, **env: str) -> tuple[subprocess.CompletedProcess[str],
                                                               Path]:
    """Run the hook as certbot does, with ``systemctl`` replaced by a recorder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "systemctl.calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n')
    fake.chmod(0o755)
    result = subprocess.run(
        [str(HOOK)], capture_output=True, text=True, timeout=60,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "RENEWED_LINEAGE": str(lineage),
             "RENEWED_DOMAINS": "mail.example.org", "SUBMITD_TLS_DIR": str(tmp_path / "tls"),
             "SUBMITD_GROUP": str(os.getgid()), **env},
    )
    return result, calls


def lineage(tmp_path: Path, name: str = "mail.example.org") -> Path:
    """A certbot live/NAME directory: fullchain.pem and privkey.pem of a working certificate."""
    ca = TestCA(tmp_path / "ca")
    live = tmp_path / "letsencrypt" / "live" / name
    live.mkdir(parents=True)
    shutil.copy(ca.cert_path, live / "fullchain.pem")
    shutil.copy(ca.key_path, live / "privkey.pem")
    return live


def test_certbot_hook_installs_certificate_and_requests_a_reload(tmp_path: Path) -> None:
    live = lineage(tmp_path)
    tls = tmp_path / "tls"
    result, calls = run_hook(tmp_path, live)  # the first issue: no tls/ yet
    assert result.returncode == 0, result.stderr
    assert "reload of submitd.service requested" in result.stdout
    assert calls.read_text() == "try-reload-or-restart submitd.service\n"
    assert stat.S_IMODE(tls.stat().st_mode) == 0o750  # the server's group may enter
    assert tls.stat().st_gid == os.getgid()
    # A renewal: certbot replaced the files in the lineage; the hook replaces the installed ones.
    renewed = TestCA(tmp_path / "renewed")
    shutil.copy(renewed.cert_path, live / "fullchain.pem")
    shutil.copy(renewed.key_path, live / "privkey.pem")
    result, calls = run_hook(tmp_path, live)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["try-reload-or-restart submitd.service"] * 2
    for name, mode in (("fullchain.pem", 0o644), ("privkey.pem", 0o640)):
        installed = tls / name
        assert installed.read_bytes() == (live / name).read_bytes()
        assert stat.S_IMODE(installed.stat().st_mode) == mode
        assert installed.stat().st_gid == os.getgid()
    assert sorted(p.name for p in tls.iterdir()) == ["fullchain.pem", "privkey.pem"]
    # What the server will load on SIGHUP is a certificate and its own key.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        tls / "fullchain.pem", tls / "privkey.pem")


def test_certbot_hook_says_so_when_the_reload_fails(tmp_path: Path) -> None:
    live = lineage(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text("#!/bin/sh\necho 'Unit submitd.service not found.' >&2\n"
                                       "exit 5\n")
    (bin_dir / "systemctl").chmod(0o755)
    result = subprocess.run(
        [str(HOOK)], capture_output=True, text=True, timeout=60,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "RENEWED_LINEAGE": str(live),
             "SUBMITD_TLS_DIR": str(tmp_path / "tls"), "SUBMITD_GROUP": str(os.getgid())},
    )
    assert result.returncode == 1
    assert "could not be reloaded; run: systemctl reload submitd.service" in result.stderr
    assert (tmp_path / "tls" / "privkey.pem").read_bytes() == (live / "privkey.pem").read_bytes()


def test_certbot_hook_leaves_other_certificates_alone(tmp_path: Path) -> None:
    live = lineage(tmp_path, name="www.example.org")
    result, calls = run_hook(tmp_path, live, SUBMITD_CERT_NAME="mail.example.org")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "tls").exists()
    assert not calls.exists()


def test_certbot_hook_refuses_without_a_lineage_or_unreadable_files(tmp_path: Path) -> None:
    empty = tmp_path / "letsencrypt" / "live" / "mail.example.org"
    empty.mkdir(parents=True)
    result, calls = run_hook(tmp_path, empty)
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "fullchain.pem" in result.stderr
    result, calls = run_hook(tmp_path, empty, RENEWED_LINEAGE="")
    assert result.returncode == 2
    assert "RENEWED_LINEAGE" in result.stderr
    assert not calls.exists()
    assert os.access(HOOK, os.X_OK)
    assert HOOK.read_text().startswith("#!/bin/sh\n")


def test_sample_config_selfsigned_commands_write_the_files_it_names(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "submitd cert selfsigned" in line)
    commands = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        commands.append(line.removeprefix("#   "))
    assert len(commands) == 2
    config = tmp_path / "submitd.toml"
    config.write_text(text)
    env = {**os.environ, "PATH": f"{SUBMITD.parent}:{os.environ['PATH']}"}
    for command in commands:
        subprocess.run(["sh", "-ec", command], cwd=tmp_path, env=env, check=True, timeout=60)
    tls = load_config(config).tls
    assert tls is not None
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)


def test_install_guide_names_files_that_exist_and_the_unit_it_ships() -> None:
    guide = (ROOT / "docs" / "install.md").read_text()
    shipped = set(re.findall(r"/usr/local/src/submitd/([\w./-]+\w)", guide))
    assert {"etc/submitd.toml", "deploy/systemd/submitd.service",
            "deploy/certbot/submitd-reload.sh", "deploy/fail2ban/filter.d/submitd.conf",
            "deploy/fail2ban/jail.d/submitd.local"} <= shipped
    assert [path for path in sorted(shipped) if not (ROOT / path).exists()] == []
    # The guide's commands use the unit's own ExecStart, config path and spool.
    settings = unit_settings()
    assert settings["ExecStart"][0] in guide
    assert f'"{settings["ReadWritePaths"][0]}/queue"' in guide
    # The config keys it tells the reader to change are in the sample.
    sample = SAMPLE.read_text()
    for key in ('\nhostname = "', '\n[queue]\ndir = "', '\n[plugins.maildir]\npath = "'):
        assert key in sample
