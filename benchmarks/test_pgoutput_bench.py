"""pgoutput decode throughput: compiled decoder vs the pure-Python reference on one stream
captured from a real PostgreSQL (a 100k-row INSERT of a 5-column table). Not part of the test
suite; run: python -m pytest benchmarks/test_pgoutput_bench.py -p no:cacheprovider --benchmark-only
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from rtcore import pgoutput, pgoutput_ref
from rtserver.sources.pg_stream import ReplicationStream
from tests.harness.pgcluster import PgCluster

ROWS = 100_000


async def _capture(dsn: str) -> list[bytes]:
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "CREATE TABLE products (id int PRIMARY KEY, name text, price numeric(10,2), at timestamptz, ok bool)"
    )
    await conn.execute("CREATE PUBLICATION bench FOR TABLE products")
    await conn.execute("SELECT pg_create_logical_replication_slot('bench', 'pgoutput')")
    await conn.execute(
        f"INSERT INTO products SELECT g, 'product ' || g, g % 1000 + 0.99, now(), g % 2 = 0 FROM generate_series(1, {ROWS}) g"
    )
    await conn.close()
    stream = ReplicationStream(dsn, "bench", "bench")
    await stream.connect(0)
    frames: list[bytes] = []
    done = asyncio.Event()

    def on_frame(f: bytes) -> None:
        frames.append(f)
        if f[:1] == b"w" and f[25:26] == b"C":
            done.set()

    stream.add_reader(lambda: stream.read_available(on_frame))
    await asyncio.wait_for(done.wait(), 60)
    await stream.close()
    return frames


@pytest.fixture(scope="module")
def stream_frames():
    with PgCluster() as cluster:
        yield asyncio.run(_capture(cluster.dsn))


def _decode_all(mod, frames):
    dec = mod.Decoder()
    rows = 0
    for f in frames:
        m = dec.decode_copy(f)
        if m.kind == "w" and m.message.kind == "I":
            rows += 1
    assert rows == ROWS
    return rows


@pytest.mark.parametrize("mod", [pgoutput, pgoutput_ref], ids=["cython", "python"])
def test_decode_100k_rows(benchmark, stream_frames, mod):
    rows = benchmark.pedantic(_decode_all, args=(mod, stream_frames), rounds=7 if mod is pgoutput else 3,
                              iterations=1)
    benchmark.extra_info["rows_per_s_best"] = round(rows / benchmark.stats.stats.min)
    benchmark.extra_info["rows_per_s_median"] = round(rows / benchmark.stats.stats.median)
