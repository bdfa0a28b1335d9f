"""What the caches and the memory layout do to the cost of a match and of queueing its frame.

10,000 subscriptions in 100 groups, each with a filter of its own (`{"g": G, "u": {"$ne": I}}`,
as fanout's filtered-10k), every event matching 100 of them. Timed with the subscriptions
(index entries, keys, outboxes) allocated one after the other, and with other objects
allocated between them, as in a gateway where each subscription comes with its connection's
objects; each with warm caches, and with the caches evicted before every event, as a fan-out's
writes evict them in the gateway (see benchmarks/README-fanout.md, "Where the open target
stands").

    python -m benchmarks.index_locality
"""

from __future__ import annotations

import random
import statistics
import time

from rtcore.engine import Outbox, SubKey, SubscriptionIndex, flush_all, push_all

CLIENTS = 10_000
GROUPS = 100
EVENTS = 2_000
EVICT_BYTES = 32 << 20


class Sub(SubKey):
    __slots__ = ("__weakref__",)


def build(spread: int) -> tuple[SubscriptionIndex, list]:
    index = SubscriptionIndex()
    keep: list = []
    for i in range(CLIENTS):
        if spread:
            keep.append([bytearray(200) for _ in range(spread)])
        out = Outbox()
        out.write = len  # any callable: flush_all "writes" the joined frames to it
        index.add(Sub(out), "events", "bench", None, {"g": i % GROUPS, "u": {"$ne": i}}, False)
        if spread:
            keep.append([bytearray(200) for _ in range(spread)])
    return index, keep


def measure(spread: int, evict: bool = False) -> tuple[float, float]:
    """Median µs per event of index.match and of push_all, over rounds of EVENTS events; with
    `evict`, 32 MiB copied before each event (the caches then hold the copy's data, as they
    hold a fan-out's writes in the gateway)."""
    index, _keep = build(spread)
    rng = random.Random(1)
    events = EVENTS // 8 if evict else EVENTS  # a copy of EVICT_BYTES takes a few ms each
    records = [{"g": rng.randrange(GROUPS), "u": -1, "pad": "x" * 150} for _ in range(events)]
    frame = b"x" * 290
    src, dst = bytearray(EVICT_BYTES), bytearray(EVICT_BYTES)
    match_us, push_us = [], []
    for _ in range(5):
        tm = tp = 0
        for record in records:
            if evict:
                dst[:] = src
            t0 = time.perf_counter_ns()
            subs = index.match("events", "bench", "PUBLISH", record)
            t1 = time.perf_counter_ns()
            dirty: list = []
            push_all(subs, frame, dirty)
            tp += time.perf_counter_ns() - t1
            tm += t1 - t0
            flush_all(dirty)
        match_us.append(tm / events / 1000)
        push_us.append(tp / events / 1000)
    return statistics.median(match_us), statistics.median(push_us)


def main() -> None:
    rows = [
        ("allocated one after the other, warm", measure(0)),
        ("other objects allocated in between, warm", measure(10)),
        ("allocated one after the other, evicted", measure(0, evict=True)),
        ("other objects allocated in between, evicted", measure(10, evict=True)),
    ]
    print(f"{'layout, caches':<46} {'match µs':>9} {'push µs':>9}")
    for name, (match, push) in rows:
        print(f"{name:<46} {match:9.2f} {push:9.2f}")


if __name__ == "__main__":
    import argparse

    # No options: --help says what it does instead of starting it.
    argparse.ArgumentParser(prog="python -m benchmarks.index_locality", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
