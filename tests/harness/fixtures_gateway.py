"""The gateway under test: `rtserver serve` as a real subprocess on a free loopback port.

`gateway_factory` starts one with a fresh state directory and a known HS256 secret, waits for
/healthz, and stops it (SIGTERM, then SIGKILL) at the end of the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

import jwt
import pytest

from tests.harness.ports import free_port

SECRET = "test-secret-0123456789abcdef0123456789"
# Holds a sitecustomize.py that shifts a gateway's wall clock (gateway_factory's clock_offset).
CLOCK_OFFSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clock_offset")


class Gateway:
    def __init__(self, env: dict[str, str], args: list[str], state_dir: str, port: int, cafile: str | None = None,
                 clock_offset: float = 0.0, host: str = "127.0.0.1"):
        self.env = env
        self.host = host
        self.netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.clock_offset = clock_offset  # its wall clock's, and the token issuer's (token())
        self.args = args
        self.state_dir = state_dir
        self.port = port
        self.url = f"http://{self.netloc}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = os.path.join(state_dir, "gateway.log")
        self.returncode: int | None = None
        self.cafile = cafile
        if cafile:
            self.url = f"https://localhost:{port}"

    def ws_url(self, workspace: str) -> str:
        return f"ws://{self.netloc}/workspaces/{workspace}/realtime/connect"

    def token(self, workspace: str | list[str] = "w1", sub: str = "user-1", publish: bool = False,
              ttl: float = 3600, secret: str | None = None, **claims) -> str:
        now = int(time.time() + self.clock_offset)
        workspaces = [workspace] if isinstance(workspace, str) else workspace
        payload = {"sub": sub, "iat": now, "exp": now + ttl, "workspaces": workspaces}
        if publish:
            payload["realtime_publish"] = True
        payload.update(claims)
        return jwt.encode(payload, secret or self.env.get("RT_AUTH_HS256_SECRET", SECRET), algorithm="HS256")

    async def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rtserver", "serve", "--host", self.host, "--port", str(self.port), *self.args,
            env=self.env, stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                status = await asyncio.to_thread(_get_status, f"{self.url}/healthz", self.cafile)
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        # Stopped here: the fixture stops only the gateways that started, so one that never
        # answered kept running (and its port and CPU) after the test.
        await self.stop(signal.SIGKILL)
        raise RuntimeError(f"gateway did not become healthy:\n{self.logs()}")

    async def wait_ready(self, timeout: float = 30) -> None:
        """Wait until /readyz says every source streams."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.get("/readyz")
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready: {body!r}\n{self.logs()}")
            await asyncio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        proc = self.proc
        if proc is None:
            return self.returncode or 0
        if proc.returncode is None:
            proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.returncode = proc.returncode
        self.proc = None
        return self.returncode

    async def restart(self, sig: int = signal.SIGTERM) -> None:
        await self.stop(sig)
        await self.start()

    async def audit_records(self, event: str, count: int = 1, timeout: float = 5) -> list[dict]:
        """The audit records `event` the gateway has logged (no Kafka configured: the log
        backend), once there are at least `count` (written by a thread: poll)."""
        deadline = time.monotonic() + timeout
        while True:
            found = []
            with open(self.log_path, "rb") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("logger") == "rtserver.audit" and rec.get("event") == event:
                        found.append(rec)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.05)

    def logs(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-20000:]
        except OSError:
            return ""

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return await self.request("GET", path, None, headers)

    async def post(self, path: str, body: bytes | None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return await self.request("POST", path, body, headers)

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return await asyncio.to_thread(_request, method, self.url + path, body, headers or {})

    async def publish(self, workspace: str, topic: str, payload: object, token: str | None = None,
                      correlation_id: str | None = None) -> dict:
        import json

        headers = {"Authorization": f"Bearer {token or self.token(workspace, publish=True)}",
                   "Content-Type": "application/json"}
        if correlation_id:
            headers["X-Correlation-ID"] = correlation_id
        status, body = await self.post(f"/workspaces/{workspace}/realtime/events/{topic}",
                                       json.dumps(payload).encode(), headers)
        assert status == 202, (status, body)
        return json.loads(body)


def _get_status(url: str, cafile: str | None = None) -> int:
    ctx = ssl.create_default_context(cafile=cafile) if cafile else None
    with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
        return r.status


def _request(method: str, url: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# Function-scoped services a gateway (or an ingest process) reads. Fixtures are torn down in
# the reverse order of their setup, and a test asking for gateway_factory before them had them
# torn down first, under a gateway still running: a database dropped under its live replication
# slot (CI failed so), a MongoDB server gone while the gateway's shutdown waited for it.
SERVICES = ("pg_database", "mongo_server")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Sets the services up before every other function-scoped fixture: torn down last."""
    for item in items:
        names = getattr(item, "fixturenames", None)
        info = getattr(item, "_fixtureinfo", None)  # pytest's own: each name's fixture, and its scope
        if not names or info is None or not any(n in SERVICES for n in names):
            continue
        rest = [n for n in names if n not in SERVICES]
        defs = info.name2fixturedefs
        first = next((i for i, n in enumerate(rest) if not defs.get(n) or defs[n][-1].scope == "function"),
                     len(rest))
        names[:] = rest[:first] + [n for n in names if n in SERVICES] + rest[first:]


_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Keeps the report of the test's call, for gateway_factory's teardown."""
    rep = yield
    if rep.when == "call":
        item.stash[_CALL_REPORT] = rep
    return rep


def failed_call(request: pytest.FixtureRequest) -> bool:
    """Whether the test of this fixture failed (in a fixture's teardown)."""
    rep = request.node.stash.get(_CALL_REPORT, None)
    return rep is not None and rep.failed


@pytest.fixture
async def gateway_factory(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    started: list[Gateway] = []
    tmpdirs: list[tempfile.TemporaryDirectory] = []

    async def make(env: dict[str, str] | None = None, args: list[str] | None = None,
                   state_dir: str | None = None, wait_tls: str | None = None, clock_offset: float = 0.0,
                   host: str = "127.0.0.1") -> Gateway:
        """`clock_offset`: the gateway's wall clock runs that many seconds off (the clients'
        stays right: as if theirs were off the other way); tokens from Gateway.token follow it."""
        if state_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="rtgw-")
            tmpdirs.append(tmp)
            state_dir = tmp.name
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
        full_env.update({"RT_STATE_DIR": state_dir, "RT_AUTH_HS256_SECRET": SECRET, "RT_LOG_LEVEL": "info"})
        full_env.update(env or {})
        if clock_offset:
            full_env["TEST_GATEWAY_CLOCK_OFFSET"] = str(clock_offset)
            full_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (CLOCK_OFFSET_DIR, full_env.get("PYTHONPATH")) if p)
        gw = Gateway(full_env, list(args or []), state_dir, free_port(), cafile=wait_tls, clock_offset=clock_offset,
                     host=host)
        await gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.stop()
    if failed_call(request):
        # The logs live in the state directories removed below: without them, a failure seen
        # once (a close 1011 in CI) left nothing to find its cause in.
        for gw in started:
            print(f"--- gateway on port {gw.port}: the end of its log ---\n{gw.logs()}", file=sys.stderr)
    for tmp in tmpdirs:
        tmp.cleanup()


@pytest.fixture
async def gateway(gateway_factory) -> Gateway:
    return await gateway_factory()
