"""The JavaScript client (clients/js) against a real gateway: runs its node:test suite, and
checks that the demo page's copy of the client (rtserver/static/rtclient.js) is current."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import shutil

import pytest

from rtcore.messages import CustomEventBody, MongoEventBody, PostgresEventBody
from rtserver.channels import _FILTER_KEYS
from tests.harness.fixtures_gateway import SECRET, free_port

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


def _members(dts: str, interface: str) -> set[str]:
    """The member names of `export interface <interface> { ... }` in a .d.ts (one level deep)."""
    body = re.search(r"export interface " + interface + r" \{\n(.*?)\n\}", dts, re.S)
    assert body is not None, interface
    return set(re.findall(r"^  (\w+)\??:", body.group(1), re.M))


def test_typescript_types_cover_the_protocol_and_the_options():
    dts = (JS / "index.d.ts").read_text()
    # Filter: exactly the fields the gateway accepts (anything else is error 4000).
    assert _members(dts, "Filter") == set(_FILTER_KEYS)
    # RealtimeEvent: every field an event frame can carry.
    frame_fields = {"type", "seq", "transition"}
    for body in (PostgresEventBody, MongoEventBody, CustomEventBody):
        frame_fields |= set(body.__struct_fields__)
    assert frame_fields <= _members(dts, "RealtimeEvent")
    assert 'transition?: "enter" | "leave"' in dts and "transitions?: boolean" in dts
    # ConnectOptions: every option the client reads.
    src = (JS / "src" / "index.js").read_text()
    assert set(re.findall(r"options\.(\w+)", src)) == _members(dts, "ConnectOptions")


# Ten gateway starts (up to 20 s each) and the suite's own 180 s: the run's 120 s per test cut
# it short on a loaded machine (it takes ~110 s on an idle one), with none of node's output.
@pytest.mark.timeout(420)
async def test_js_client_suite_against_the_gateway(gateway_factory):
    node = require_node()
    gw = await gateway_factory(env={"RT_HISTORY_EVENTS": "500"})
    wide = await gateway_factory()  # the default history (10000 events), for the dedupe test
    skewed = await gateway_factory(clock_offset=-400)  # for the clock skew test
    full = await gateway_factory(env={"RT_MAX_NODE_CONNECTIONS": "1"})  # answers a second upgrade with 503
    hasty = await gateway_factory(env={"RT_AUTH_TIMEOUT": "0.2"})  # for the auth timeout test
    quota = await gateway_factory(env={"RT_MAX_CONNECTIONS": "1"})  # closes a second connection with 4008
    no_idp = await gateway_factory(env={"RT_AUTH_JWKS_URL": f"http://127.0.0.1:{free_port()}/certs"})  # 1011
    idle = await gateway_factory(env={"RT_IDLE_TIMEOUT": "0.5"})  # closes a silent connection with 1001
    small = await gateway_factory(env={"RT_SEND_BUFFER_BYTES": "262144"})  # closes a slow reader with 1013
    perms = await gateway_factory(env={"RT_AUTH_CHANNEL_PERMISSIONS": "true"})  # tokens grant channels
    env = {**os.environ, "RT_TEST_GATEWAY": gw.url, "RT_TEST_GATEWAY_WIDE": wide.url, "RT_TEST_SECRET": SECRET,
           "RT_TEST_GATEWAY_SKEWED": skewed.url, "RT_TEST_SKEWED_OFFSET": str(skewed.clock_offset),
           "RT_TEST_GATEWAY_ONE_CONNECTION": full.url, "RT_TEST_GATEWAY_HASTY": hasty.url,
           "RT_TEST_GATEWAY_QUOTA": quota.url, "RT_TEST_GATEWAY_NO_IDP": no_idp.url, "RT_TEST_GATEWAY_IDLE": idle.url,
           "RT_TEST_GATEWAY_SMALL_BUFFER": small.url, "RT_TEST_GATEWAY_CHANNEL_PERMISSIONS": perms.url}
    await _run_node_suite(node, env, None, timeout=300, gateway=gw)


async def _run_node_suite(node: str, env: dict[str, str], pattern: str | None, timeout: float = 120,
                          gateway=None) -> str:
    """Runs the node:test suite (its tests whose names match `pattern`; all with None), which
    must pass with at least one test run; its output. A failure shows `gateway`'s log too."""
    only = [f"--test-name-pattern={pattern}"] if pattern is not None else []
    proc = await asyncio.create_subprocess_exec(
        # --test-force-exit: a test that times out leaves its clients reconnecting, which kept
        # node alive to this function's timeout, so the tests after it were not reported.
        node, "--test", "--test-force-exit", "--test-reporter=spec", *only, "test/client.test.js",
        cwd=JS, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    # Read as it comes: communicate() cancelled by a timeout threw away what it had read, and
    # a CI run that timed out showed none of node's output (which test hung was unknown).
    chunks: list[bytes] = []

    async def pump() -> None:
        while data := await proc.stdout.read(65536):
            chunks.append(data)

    try:
        await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), timeout)
    except TimeoutError:
        proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pump(), 5)
        await proc.wait()
        pytest.fail(f"node --test timed out:\n{b''.join(chunks).decode(errors='replace')}")
    text = b"".join(chunks).decode(errors="replace")
    print(text)
    log = f"\n--- gateway log ---\n{gateway.logs()[-4000:]}" if gateway is not None else ""
    assert proc.returncode == 0 and "ℹ fail 0" in text and "ℹ pass 0" not in text, f"node --test failed:\n{text}{log}"
    return text


@pytest.mark.postgres
async def test_js_client_postgres_tests_against_a_gateway_with_a_database(gateway_factory, pg_database):
    # The suite's "postgres: ..." tests, which need a gateway streaming a database's changes
    # (they write through psql, to the tables made here before the gateway starts).
    import asyncpg

    node = require_node()
    db = await asyncpg.connect(pg_database)
    try:
        await db.execute("CREATE TABLE orders (id int PRIMARY KEY, big boolean); CREATE TABLE marks (id int PRIMARY KEY)")
    finally:
        await db.close()
    gw = await gateway_factory(env={"RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "jsclient"})
    await gw.wait_ready()
    env = {**os.environ, "RT_TEST_GATEWAY": gw.url, "RT_TEST_SECRET": SECRET, "RT_TEST_PG_DSN": pg_database}
    await _run_node_suite(node, env, "^postgres: ")
