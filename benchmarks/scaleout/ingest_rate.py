"""Ingest throughput: PostgreSQL rows through `rtserver ingest` -> Kafka -> one gateway node ->
one WebSocket subscriber, against throwaway PostgreSQL and Kafka servers (the test harness).

    python -m benchmarks.scaleout.ingest_rate [--rows 3000]

Prints rows/s for one transaction of --rows inserts, and for --rows/5 single-row transactions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import asyncpg
import jwt
import websockets

from tests.harness.fixtures_gateway import SECRET, free_port
from tests.harness.kafka import KafkaBroker, ensure_jars
from tests.harness.pgcluster import PgCluster


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


async def _wait(url: str, ok, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status, body = await asyncio.to_thread(_get, url)
        if ok(status, body):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


async def main(rows: int) -> None:
    pg = PgCluster()
    pg.init()
    pg.start()
    broker = KafkaBroker(ensure_jars())
    broker.start()
    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="rt-ingest-rate-")
    try:
        admin = await asyncpg.connect(pg.dsn)
        await admin.execute("CREATE DATABASE bench")
        await admin.close()
        dsn = pg.dsn_for("bench")
        db = await asyncpg.connect(dsn)
        await db.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
        env.update({"RT_BUS": "kafka", "RT_BUS_KAFKA_BOOTSTRAP": broker.bootstrap, "RT_POSTGRES_URL": dsn,
                    "RT_BUS_WORKSPACES": "w1", "RT_AUTH_HS256_SECRET": SECRET, "RT_LOG_LEVEL": "warning"})
        hport, port = free_port(), free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "rtserver", "ingest", "--health-port", str(hport)],
                                      env={**env, "RT_STATE_DIR": os.path.join(tmp, "ingest")}))
        procs.append(subprocess.Popen([sys.executable, "-m", "rtserver", "serve", "--port", str(port)],
                                      env={**env, "RT_STATE_DIR": os.path.join(tmp, "node")}))
        await _wait(f"http://127.0.0.1:{hport}/readyz", lambda s, b: b.get("role") == "active" and b.get("ready"))
        await _wait(f"http://127.0.0.1:{port}/readyz", lambda s, b: s == 200)
        token = jwt.encode({"sub": "bench", "workspaces": ["w1"], "exp": int(time.time()) + 3600}, SECRET, "HS256")
        async with websockets.connect(f"ws://127.0.0.1:{port}/workspaces/w1/realtime/connect", max_size=None) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token}))
            await ws.recv()
            await ws.send(json.dumps({"type": "subscribe", "channel": "postgres:t"}))
            await ws.recv()

            async def receive(n: int) -> float:
                for _ in range(n):
                    await asyncio.wait_for(ws.recv(), 60)
                return time.monotonic()

            t0 = time.monotonic()
            await db.execute(f"INSERT INTO t SELECT g, 'x' FROM generate_series(1, {rows}) g")
            t1 = await receive(rows)
            print(f"one transaction of {rows} rows: {rows / (t1 - t0):.0f} rows/s end to end")
            n = rows // 5
            recv = asyncio.create_task(receive(n))
            t0 = time.monotonic()
            for i in range(n):
                await db.execute("INSERT INTO t VALUES ($1, 'y')", rows + 1 + i)
            t1 = await recv
            print(f"{n} single-row transactions: {n / (t1 - t0):.0f} rows/s end to end")
        await db.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(15)
        broker.destroy()
        pg.destroy()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=3000)
    asyncio.run(main(ap.parse_args().rows))
