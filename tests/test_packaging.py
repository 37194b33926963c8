"""A wheel (`pip install .` without -e builds one) holds every file of the package, not only its modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_every_package_file(tmp_path):
    src = tmp_path / "project"  # a copy: the build writes build/ and an egg-info beside the sources
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("cleantune-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("cleantune/")}
    package = {str(f.relative_to(src / "src")) for f in (src / "src" / "cleantune").rglob("*") if f.is_file()}
    assert "cleantune/MANIFEST.json" in package  # split sizes and download checksums: the installed code reads it
    assert package - shipped == set()
