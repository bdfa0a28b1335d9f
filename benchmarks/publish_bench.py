"""Cost of one publish request in process: HTTP parsing, routing, token check (cached),
payload decode, event encode, history entry, the answer.

A publisher's pipelined requests (20 per read, one token, no subscribers) are fed to the
gateway's front protocol over a transport that records nothing, so the figure is the Python
path without system calls. Run: `python -m benchmarks.publish_bench [--rounds 7]`; prints
µs per request, median and best of the rounds. `--batch N`: the same events, N to a request
of the batch endpoint (docs/protocol.md §8); prints µs per event.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import jwt

from benchmarks.fanout import wire
from rtserver import config, http
from rtserver.app import Gateway

SECRET = "publish-bench-secret-0123456789abcdef"
PER_READ = 20


class NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default


def _batch_body(events: int) -> bytes:
    items = b",".join(b'{"topic":"bench","payload":%s}' % wire.payload(i % 100) for i in range(events))
    return b'{"events":[%s]}' % items


async def measure(rounds: int, reads: int, batch: int = 0) -> list[float]:
    """µs per event over `rounds` rounds of `reads` reads of 20 events; with `batch`, the 20
    events of a read are requests of `batch` events each (20 a multiple of it)."""
    with tempfile.TemporaryDirectory() as state:
        cfg = config.load(environ={"RT_AUTH_HS256_SECRET": SECRET, "RT_STATE_DIR": state})
        gw = Gateway(cfg)
        token = jwt.encode({"sub": "svc", "workspaces": ["w1"], "realtime_publish": True, "exp": 4102444800},
                           SECRET, algorithm="HS256")
        proto = http.FrontProtocol(gw)
        proto.connection_made(NullTransport())
        # The fan-out harness's publisher requests (benchmarks/fanout/wire.py).
        auth = {"Authorization": f"Bearer {token}"}
        if batch:
            head = wire.http_post_head("127.0.0.1", 1234, "/workspaces/w1/realtime/events", auth)
            data = b"".join(wire.http_post(head, _batch_body(batch)) for _ in range(PER_READ // batch))
        else:
            head = wire.http_post_head("127.0.0.1", 1234, "/workspaces/w1/realtime/events/bench", auth)
            data = b"".join(wire.http_post(head, wire.payload(i % 100)) for i in range(PER_READ))
        for _ in range(50):  # token verified and cached, caches warm
            proto.data_received(data)
        accepted = len(gw.hub.workspace("w1").history)
        if accepted != 50 * PER_READ:  # a bench of error answers would measure the wrong path
            raise RuntimeError(f"{accepted} of {50 * PER_READ} warm-up events were accepted")
        out = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reads):
                proto.data_received(data)
            out.append((time.perf_counter() - t0) / (reads * PER_READ) * 1e6)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reads", type=int, default=2000, help="reads of 20 events per round")
    ap.add_argument("--batch", type=int, default=0, choices=(0, 1, 2, 4, 5, 10, 20),
                    help="events per request of the batch endpoint (0: one request per event)")
    args = ap.parse_args()
    us = asyncio.run(measure(args.rounds, args.reads, args.batch))
    what = f"publish, batches of {args.batch}, per event" if args.batch else "publish request"
    print(f"{what} in process: median {statistics.median(us):.2f} us, best {min(us):.2f} us "
          f"({args.rounds} rounds of {args.reads * PER_READ} events)")


if __name__ == "__main__":
    main()
