"""The publish benchmark runs (so it does not rot) and measures accepted requests."""

from __future__ import annotations

from benchmarks import publish_bench


async def test_publish_bench_measures_accepted_requests():
    # measure() raises unless every warm-up request was accepted (202 and in the history).
    us = await publish_bench.measure(rounds=2, reads=5)
    assert len(us) == 2 and all(u > 0 for u in us)


async def test_publish_bench_measures_accepted_batches():
    us = await publish_bench.measure(rounds=2, reads=5, batch=10)
    assert len(us) == 2 and all(u > 0 for u in us)
