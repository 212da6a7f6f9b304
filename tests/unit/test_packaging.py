"""The wheel ships exactly the two packages, the console script and the plugin entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_exactly_submitd_and_submitd_plugins(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=120,
    )
    (wheel,) = tmp_path.glob("submitd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert tops == {"submitd", "submitd_plugins"}
    assert "submitd/py.typed" in names and "submitd_plugins/py.typed" in names
    assert "submitd = submitd.cli:main" in entry_points
    assert "passwdfile = submitd_plugins.passwdfile" in entry_points
    assert "maildir = submitd_plugins.maildir" in entry_points
