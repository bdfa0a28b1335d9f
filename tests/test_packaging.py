"""The wheel: built with `python -m build --wheel`, installed into a clean venv, runs there
without a compiler or Cython, and carries the MIT license in its metadata."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_wheel_builds_installs_and_runs(tmp_path):
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), ROOT], check=True,
                   capture_output=True, timeout=800)
    wheels = glob.glob(str(out / "rtserver-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
        assert any(n.startswith("rtcore/") and n.endswith(".so") for n in names), "compiled rtcore missing"
        assert not any(n.endswith((".pyx", ".c")) for n in names)
        # `rtserver serve --demo` serves these; type checkers of embedders read the markers.
        assert {"rtserver/static/index.html", "rtserver/static/rtclient.js"} <= set(names)
        assert {"rtserver/py.typed", "rtcore/py.typed"} <= set(names)
        meta = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
        assert "License-Expression: MIT" in meta or "License: MIT" in meta
        assert any(n.endswith("LICENSE") for n in names)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    # Only the venv: a PYTHONPATH to the source tree (its rtserver.egg-info left by the build)
    # made pip skip the wheel as "already satisfied", and the checks below import the sources.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run([py, "-m", "pip", "install", "-q", wheels[0]], check=True, capture_output=True, timeout=600,
                   env=clean, cwd=str(tmp_path))
    ran = subprocess.run([str(env_dir / "bin" / "rtserver"), "--version"], capture_output=True, text=True,
                         timeout=60, cwd=str(tmp_path), env=clean)
    assert ran.returncode == 0 and ran.stdout.startswith("rtserver "), ran.stderr
    check = subprocess.run([py, "-c", "import rtcore.engine as e, rtserver; print(e.COMPILED, rtserver.__file__)"],
                           capture_output=True, text=True, cwd=str(tmp_path), timeout=60, env=clean)
    compiled, where = check.stdout.split()
    assert compiled == "True", check.stderr
    assert where.startswith(str(env_dir)), f"imported {where}, not the installed wheel"
