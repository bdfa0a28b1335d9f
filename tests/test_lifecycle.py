"""Process lifecycle: zero-config start with dev tokens, config errors, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from tests.harness.fixtures_gateway import free_port
from tests.harness.wsclient import ws_connect


def _run(args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "rtserver", *args], capture_output=True, text=True, env=base,
                          cwd=cwd, timeout=60)


def test_version():
    out = _run(["--version"])
    assert out.returncode == 0 and out.stdout.startswith("rtserver ")


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'eighty'\n")
    for args, env in (
        (["serve", "--config", str(bad)], {}),
        (["serve", "--config", str(tmp_path / "missing.toml")], {}),
        (["serve"], {"RT_PORT": "99999"}),
        (["serve"], {"RT_MAX_SUBSCRIPTIONS": "many"}),
        (["serve"], {"RT_INSTANCE": "Bad-Name"}),
        (["serve"], {"RT_TLS_CERT": "/x.pem"}),
        (["serve"], {"RT_MONGO_URL": "mongodb://rt:secret@db:port/app"}),
        (["serve"], {"RT_AUTH_CHANNEL_CLAIM": "rt.channels"}),
    ):
        out = _run(args, env, cwd=str(tmp_path))
        assert out.returncode == 2, (args, env, out.stdout, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "configuration error" in lines[0], out.stderr
        assert "secret" not in out.stderr
    ws = tmp_path / "ws.toml"
    ws.write_text("[workspaces.acme]\nmongo_url = 'mongodb://db:99999/app'\n")
    out = _run(["serve", "--config", str(ws)], cwd=str(tmp_path))
    assert out.returncode == 2 and "[workspaces.acme] mongo_url: not a valid MongoDB URL" in out.stderr, out.stderr


def test_unknown_config_setting_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nprot = 1\n")
    out = _run(["serve", "--config", str(cfg)], cwd=str(tmp_path))
    assert out.returncode == 2 and "server.prot" in out.stderr


async def test_zero_config_serve_and_dev_token(tmp_path):
    """`rtserver serve` with no configuration; `rtserver token` in the same directory agrees."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env["RT_PORT"] = str(port)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "rtserver", "serve", cwd=str(tmp_path), env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        class _GW:
            def ws_url(self, ws: str) -> str:
                return f"ws://127.0.0.1:{port}/workspaces/{ws}/realtime/connect"

        deadline = time.monotonic() + 15
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "gateway did not start"
                await asyncio.sleep(0.1)
        token = _run(["token", "--workspace", "demo", "--publish"], cwd=str(tmp_path)).stdout.strip()
        assert token.count(".") == 2
        async with ws_connect(_GW(), "demo", token=token) as c:
            await c.subscribe("events:hello")
        assert (tmp_path / ".rtserver" / "dev-secret").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0
    assert b"dev mode" in out


async def test_sigterm_drains_with_1001_and_exits_0(gateway):
    async with ws_connect(gateway, "w1", token=gateway.token("w1")) as a, ws_connect(
        gateway, "w1", token=gateway.token("w1", sub="b")
    ) as b:
        await a.subscribe("events:x")
        await b.subscribe("events:x")
        t0 = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        assert await a.expect_close(10) == (1001, "going_away")
        assert await b.expect_close(10) == (1001, "going_away")
        code = await asyncio.wait_for(gateway.proc.wait(), 12)
        assert code == 0 and time.monotonic() - t0 < 10
