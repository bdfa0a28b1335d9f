"""The demo page in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by
playwright-core from npm) loads /demo from a gateway started with --demo, subscribes, shows a
published event, loses its connection (a TCP proxy cuts it while the gateway and its history
live on), and shows the events published meanwhile once it has resumed. The screenshot lands
in test-artifacts/demo-page.png."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil

import pytest

from tests.harness.fixtures_gateway import SECRET

ROOT = pathlib.Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("RT_CHROMIUM", "/usr/bin/chromium")


# Past the browser run's own 120 s (a gateway start before it): that one says what the page did.
@pytest.mark.timeout(180)
async def test_demo_page_receives_events_and_resumes_after_network_loss(gateway_factory):
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "playwright-core").is_dir() or not os.path.exists(CHROMIUM):
        pytest.fail("node, chromium and clients/js/node_modules are needed: run scripts/test.d/js.sh")
    gw = await gateway_factory(args=["--demo"])
    status, body = await gw.get("/demo/rtclient.js")
    assert status == 200 and body == (JS / "src" / "index.js").read_bytes()
    screenshot = ARTIFACTS / "demo-page.png"
    screenshot.unlink(missing_ok=True)
    env = {**os.environ, "RT_TEST_GATEWAY": gw.url, "RT_TEST_SECRET": SECRET, "RT_ARTIFACTS": str(ARTIFACTS),
           "RT_CHROMIUM": CHROMIUM}
    proc = await asyncio.create_subprocess_exec(
        node, "test/demo.browser.js", cwd=JS, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        pytest.fail(f"browser test timed out:\n{out.decode(errors='replace')}")
    text = out.decode(errors="replace")
    print(text)
    assert proc.returncode == 0, f"browser run failed:\n{text}\n--- gateway log ---\n{gw.logs()[-4000:]}"
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    # newest first: the live event after the resume, the three published offline, the first
    assert result["shown"] == result["expected"] and len(result["shown"]) == 5
    assert result["resumed"] == "true" and result["gaps"] == 0
    # headerAuth needs Node.js: in a browser a terminal error at once, not retries for good
    assert result["headerAuth"] == {"outcome": {"codeName": "websocket_unavailable", "terminal": True}, "retried": False}
    # postgres:orders, then postgres:public.orders: one subscription, one entry (there were two,
    # the stale one's unsubscribe button doing nothing)
    assert result["listed"] == ["events:demo", "postgres:orders"]
    # ?token= is read into its field, then taken out of the address bar (it stayed in the
    # browser's history); the other parameters stay
    assert result["tokenFilled"] and "token" not in result["address"], result["address"]
    assert result["address"].endswith("/demo/?workspace=w1"), result["address"]
    assert screenshot.stat().st_size > 1000
