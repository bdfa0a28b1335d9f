"""The wheel: built with `python -m build` (the sdist, then the wheel from it), installed into a
clean venv, runs there without a compiler or Cython (zero-config `rtserver serve` serves a client
and the demo page), and carries the MIT license in its metadata. The sdist carries what builds
rtcore with Cython or without it."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
import venv
import zipfile

import pytest
import websockets

from tests.harness.fixtures_gateway import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(900)
def test_wheel_builds_installs_and_runs(tmp_path):
    out = tmp_path / "dist"
    # No --wheel: the operator's `python -m build` builds the wheel from the sdist it builds.
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), ROOT], check=True,
                   capture_output=True, timeout=800)
    wheels = glob.glob(str(out / "rtserver-*.whl"))
    assert len(wheels) == 1 and not wheels[0].endswith("-none-any.whl"), wheels
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

    # Zero configuration, as the README's set-up: `rtserver serve` from the wheel serves a client
    # (dev token from `rtserver token`) and the demo page, and stops cleanly on SIGTERM.
    port = free_port()
    serve_env = {k: v for k, v in clean.items() if not k.startswith("RT_")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(env_dir / "bin" / "rtserver"), "serve", "--port", str(port), "--demo"],
                                cwd=str(tmp_path), env=serve_env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while b'"listening"' not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/demo/rtclient.js", timeout=10) as r:
            assert r.status == 200 and b"class" in r.read()
        token = subprocess.run([str(env_dir / "bin" / "rtserver"), "token", "--workspace", "demo"], check=True,
                               capture_output=True, text=True, cwd=str(tmp_path), env=serve_env, timeout=60)

        async def client() -> dict:
            async with websockets.connect(f"ws://127.0.0.1:{port}/workspaces/demo/realtime/connect") as ws:
                await ws.send(json.dumps({"type": "auth", "token": token.stdout.strip()}))
                return json.loads(await asyncio.wait_for(ws.recv(), 10))

        assert asyncio.run(client())["type"] == "auth_ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]  # one JSON object a line
    assert next(line for line in lines if line["msg"] == "listening")["compiled_core"] is True


def _source_tree(dest) -> None:
    """What the sdist is built from: the tracked sources, none of the .c or .so built here."""
    skip = shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.egg-info", "build", "target", "node_modules")
    for name in ("rtcore", "rtserver", "docs", "tests"):
        shutil.copytree(os.path.join(ROOT, name), dest / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), dest / name)


# setup.py run as if Cython were not installed (a build with --no-build-isolation without it).
_WITHOUT_CYTHON = """
import sys

class NoCython:
    def find_spec(self, name, path=None, target=None):
        if name == "Cython" or name.startswith("Cython."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoCython())
sys.argv = ["setup.py", "--name"]
exec(compile(open("setup.py").read(), "setup.py", "exec"))
"""


def test_the_sdist_builds_rtcore_with_or_without_cython(tmp_path):
    """The sdist carries each extension's .pyx and the .c generated from it: the wheel built
    from it (the default `python -m build`, `pip install rtserver-*.tar.gz`) compiled nothing
    when it had only the .c, and installed the pure-Python engine. Without Cython, setup.py
    takes the sdist's .c, and in a source tree says that Cython is needed."""
    src = tmp_path / "src"
    _source_tree(src)
    without = subprocess.run([sys.executable, "-c", _WITHOUT_CYTHON], cwd=str(src), capture_output=True, text=True,
                             timeout=60)
    assert without.returncode != 0 and "building rtcore needs Cython" in without.stderr, without.stderr
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
                    "--outdir", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (sdist,) = glob.glob(str(tmp_path / "dist" / "rtserver-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        tf.extractall(tmp_path / "unpacked", filter="data")
    pyx = {f"rtcore/{os.path.basename(p)}" for p in glob.glob(os.path.join(ROOT, "rtcore", "*.pyx"))}
    assert pyx and pyx <= names, sorted(pyx - names)
    assert {p[:-4] + ".c" for p in pyx} <= names
    assert {f"rtcore/{os.path.basename(p)}" for p in glob.glob(os.path.join(ROOT, "rtcore", "*.pxd"))} <= names
    # The docs its README links to; not the test files, which setuptools took without the harness
    # and servers they need (packaging audit).
    assert {"docs/protocol.md", "docs/mongo.md", "docs/postgres.md", "docs/scale-out.md"} <= names
    assert not [n for n in names if n.startswith("tests/")], sorted(n for n in names if n.startswith("tests/"))
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    from_sdist = subprocess.run([sys.executable, "-c", _WITHOUT_CYTHON], cwd=str(unpacked), capture_output=True,
                                text=True, timeout=60)
    assert from_sdist.returncode == 0 and from_sdist.stdout.strip() == "rtserver", from_sdist.stderr
    # Without a C compiler: what is missing, said (it ended on "Command [...] returned non-zero").
    no_cc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=str(unpacked),
                           env=dict(os.environ, CC="false"), capture_output=True, text=True, timeout=120)
    assert no_cc.returncode != 0 and "it needs a C compiler (gcc or clang) and Python's headers" in no_cc.stderr, \
        no_cc.stderr[-2000:]
