"""Replay cost: how fast a resuming client gets the events it missed from the workspace history.

    python -m benchmarks.replay_bench [--events 10000] [--payload 150] [--rounds 5]

Starts a real gateway (subprocess), publishes --events custom events with ~--payload-byte
payloads, then repeatedly subscribes with `since` older than all of them and times the arrival
of the whole replay at one WebSocket client (picows client: no per-frame Python decode beyond
counting). Reports events/s replayed (median and best of the rounds) beside the live delivery
rate of the same events to one client measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

import websockets

from tests.harness.fixtures_gateway import SECRET, Gateway, free_port


async def _subscribe_and_count(gw: Gateway, n: int, since: int | None) -> float:
    async with websockets.connect(gw.ws_url("bench"), max_size=None, max_queue=None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": gw.token("bench")}))
        await ws.recv()
        msg: dict = {"type": "subscribe", "channel": "events:replay"}
        if since is not None:
            msg["since"] = since
        t0 = time.perf_counter()
        await ws.send(json.dumps(msg))
        await ws.recv()  # subscribed
        got = 0
        while got < n:
            frame = await ws.recv()
            if '"type":"event"' in frame[:20]:
                got += 1
        return time.perf_counter() - t0


async def _publish_many(gw: Gateway, n: int, payload: int) -> list[int]:
    token = gw.token("bench", publish=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    body = json.dumps({"pad": "x" * payload}).encode()
    head = (f"POST /workspaces/bench/realtime/events/replay HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    seqs = []
    for _ in range(n):
        writer.write(head + body)
        h = await reader.readuntil(b"\r\n\r\n")
        length = int(h.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        seqs.append(json.loads(await reader.readexactly(length))["seq"])
    writer.close()
    return seqs


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--payload", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as state:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
        env.update({"RT_STATE_DIR": state, "RT_AUTH_HS256_SECRET": SECRET, "RT_LOG_LEVEL": "warning",
                    "RT_HISTORY_EVENTS": str(args.events)})
        gw = Gateway(env, [], state, free_port())
        await gw.start()
        try:
            # live: one subscriber, the events published while it listens
            live_task = asyncio.ensure_future(_subscribe_and_count(gw, args.events, None))
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            seqs = await _publish_many(gw, args.events, args.payload)
            await live_task
            live_rate = args.events / (time.perf_counter() - t0)
            times = [await _subscribe_and_count(gw, args.events, seqs[0] - 1) for _ in range(args.rounds)]
        finally:
            await gw.stop()
    rates = [args.events / t for t in times]
    print(f"replay of {args.events} events (~{args.payload + 150} B frames) to one client: "
          f"median {statistics.median(rates):,.0f} events/s, best {max(rates):,.0f} events/s "
          f"(median {statistics.median(times) * 1000:.1f} ms for all)")
    print(f"live delivery of the same events to one client (bounded by the publish loop): {live_rate:,.0f} events/s")
    print(f"ratio replay / live: {statistics.median(rates) / live_rate:.1f}x")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
