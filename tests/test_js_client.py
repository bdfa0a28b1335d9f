"""The JavaScript client (clients/js) against a real gateway: runs its node:test suite, and
checks that the demo page's copy of the client (rtserver/static/rtclient.js) is current."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil

import pytest

from tests.harness.fixtures_gateway import SECRET

ROOT = pathlib.Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"


def require_node() -> str:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "ws").is_dir():
        pytest.fail("node and clients/js/node_modules are needed: run scripts/test.d/js.sh")
    return node


def test_demo_copy_of_the_client_is_current():
    src = (JS / "src" / "index.js").read_bytes()
    copy = (ROOT / "rtserver" / "static" / "rtclient.js").read_bytes()
    assert copy == src, "rtserver/static/rtclient.js is stale: run `npm run sync-demo` in clients/js"


async def test_js_client_suite_against_the_gateway(gateway_factory):
    node = require_node()
    gw = await gateway_factory(env={"RT_HISTORY_EVENTS": "500"})
    env = {**os.environ, "RT_TEST_GATEWAY": gw.url, "RT_TEST_SECRET": SECRET}
    proc = await asyncio.create_subprocess_exec(
        node, "--test", "--test-reporter=spec", "test/client.test.js",
        cwd=JS, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 180)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        pytest.fail(f"node --test timed out:\n{out.decode(errors='replace')}")
    text = out.decode(errors="replace")
    print(text)
    assert proc.returncode == 0, f"node --test failed:\n{text}\n--- gateway log ---\n{gw.logs()[-4000:]}"
    assert "ℹ fail 0" in text and "ℹ pass 0" not in text, text
