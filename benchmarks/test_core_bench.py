"""Benchmarks of the compiled core against its references (issue 3). Not part of the test
suite; run `python -m pytest benchmarks/test_core_bench.py -p no:cacheprovider`. The table of
figures and ratios is printed at the end by benchmarks/conftest.py."""

from __future__ import annotations

import gc
import itertools
import random
import tracemalloc

import pytest

from rtcore import frames, index, index_ref, messages, predicate, predicate_ref

N_SUBS = 100_000
TABLES = [f"t{i}" for i in range(10)]
ATTRS = [f"a{i}" for i in range(5)]
N_VALUES = 1000


def _value(rng: random.Random, attr: str):
    # Half the attributes carry strings, half integers, as real rows do.
    n = rng.randrange(N_VALUES)
    return f"v{n}" if attr in ("a0", "a2") else n


def _subscriptions(seed: int = 1) -> list[tuple]:
    """(key, source, entity, operations, predicates): 80% equality on one of 5 attributes with
    1000 distinct values, 15% equality + range, 5% $or / $in; spread over 10 tables."""
    rng = random.Random(seed)
    subs = []
    for key in range(N_SUBS):
        attr = rng.choice(ATTRS)
        roll = rng.random()
        if roll < 0.80:
            pred = {attr: _value(rng, attr)}
        elif roll < 0.95:
            pred = {attr: _value(rng, attr), "price": {"$gte": rng.randrange(100)}}
        elif roll < 0.975:
            other = rng.choice(ATTRS)
            pred = {"$or": [{attr: _value(rng, attr)}, {other: _value(rng, other)}]}
        else:
            pred = {attr: {"$in": [_value(rng, attr) for _ in range(3)]}}
        ops = None if rng.random() < 0.7 else frozenset({"INSERT", "UPDATE"})
        subs.append((key, "postgres", rng.choice(TABLES), ops, pred))
    return subs


def _events(n: int, seed: int = 2) -> list[tuple]:
    rng = random.Random(seed)
    events = []
    for _ in range(n):
        record = {a: _value(rng, a) for a in ATTRS}
        record.update(price=rng.randrange(100), name="widget", id=rng.randrange(10**6))
        events.append(("postgres", rng.choice(TABLES), "UPDATE", record))
    return events


@pytest.fixture(scope="module")
def subs():
    return _subscriptions()


@pytest.fixture(scope="module")
def events():
    return _events(2000)


def _build(cls, subs):
    ix = cls()
    for key, source, entity, ops, pred in subs:
        ix.add(key, source, entity, ops, pred)
    return ix


@pytest.fixture(scope="module")
def compiled_index(subs):
    return _build(index.SubscriptionIndex, subs)


def _median(benchmark) -> float:
    return benchmark.stats.stats.median


def test_index_match_compiled(benchmark, compiled_index, events, core_results):
    matched = [len(compiled_index.match(*e)) for e in events]
    core_results["matches_per_event"] = sum(matched) / len(matched)
    it = itertools.cycle(events)
    match = compiled_index.match
    benchmark(lambda: match(*next(it)))
    core_results["index_compiled"] = _median(benchmark)


def test_index_match_reference_index(benchmark, subs, events, compiled_index, core_results):
    ix = _build(index_ref.SubscriptionIndex, subs)
    for e in events[:200]:  # same answers as the compiled index on these events
        assert sorted(ix.match(*e)) == sorted(compiled_index.match(*e))
    it = itertools.cycle(events)
    benchmark(lambda: ix.match(*next(it)))
    core_results["index_ref"] = _median(benchmark)


def test_index_match_linear_scan(benchmark, subs, events, compiled_index, core_results):
    scan = _build(index_ref.LinearScan, subs)
    for e in events[:3]:
        assert sorted(scan.match(*e)) == sorted(compiled_index.match(*e))
    it = itertools.cycle(events)
    benchmark.pedantic(lambda: scan.match(*next(it)), rounds=7, iterations=1)
    core_results["index_scan"] = _median(benchmark)


def _predicate_cases() -> list[tuple[dict, dict]]:
    rng = random.Random(3)
    filters = [
        {"category": "electronics"},
        {"category": "electronics", "price": {"$gte": 100}},
        {"price": {"$gt": 10, "$lt": 500}, "stock": {"$ne": 0}},
        {"$or": [{"category": "books"}, {"price": {"$lt": 20}}]},
        {"category": {"$in": ["books", "toys", "electronics", "garden"]}},
        {"dims.unit": "cm", "dims.w": {"$lte": 50}},
        {"tags": "sale"},
        {"variants.qty": {"$gt": 2}},
        {"discount": {"$exists": False}},
        {"price": {"$not": {"$gt": 300}}, "active": True},
    ]
    cases = []
    for _ in range(200):
        record = {
            "id": rng.randrange(10**6),
            "category": rng.choice(["books", "toys", "electronics", "garden"]),
            "price": round(rng.uniform(1, 600), 2),
            "stock": rng.randrange(5),
            "active": rng.random() < 0.5,
            "tags": rng.sample(["sale", "new", "eco", "hot"], 2),
            "dims": {"w": rng.randrange(100), "h": 2.5, "unit": rng.choice(["cm", "in"])},
            "variants": [{"sku": "A", "qty": rng.randrange(4)}, {"sku": "B", "qty": rng.randrange(4)}],
        }
        cases.append((rng.choice(filters), record))
    return cases


def _predicate_bench(benchmark, module, core_results, name):
    cases = [(module.compile_predicates(f), r) for f, r in _predicate_cases()]
    # Timed only if it answers as the other does (the index benchmarks check theirs too).
    other = predicate_ref if module is predicate else predicate
    assert [m.matches(r) for m, r in cases] == [other.compile_predicates(f).matches(r) for f, r in _predicate_cases()]

    def run():
        for matcher, record in cases:
            matcher.matches(record)

    benchmark(run)
    core_results[name] = _median(benchmark) / len(cases)


def test_predicate_compiled(benchmark, core_results):
    _predicate_bench(benchmark, predicate, core_results, "predicate_compiled")


def test_predicate_reference(benchmark, core_results):
    _predicate_bench(benchmark, predicate_ref, core_results, "predicate_ref")


def _event_body() -> messages.CustomEventBody:
    return messages.CustomEventBody(
        channel="events:orders",
        operation="PUBLISH",
        topic="orders",
        payload={"orderId": "ORD-001", "total": 198.95, "items": 3},
        timestamp="2024-01-15T10:00:00.000Z",
        correlationId="corr-abc-123",
    )


def test_encode_event_to_frame(benchmark, core_results):
    body = _event_body()
    size = len(messages.encode(body))
    assert 180 <= size <= 220, size
    encode, event_frame = messages.encode, frames.event_frame
    benchmark(lambda: event_frame(encode(body), 1235))
    core_results["encode"] = _median(benchmark)
    core_results["encode_body_bytes"] = size


def test_encode_parts(benchmark, core_results):
    body = _event_body()
    encoded = messages.encode(body)
    encode, event_frame = messages.encode, frames.event_frame
    benchmark(lambda: encode(body))
    core_results["encode_msgspec"] = _median(benchmark)
    import timeit

    n = 200_000
    core_results["encode_frame"] = min(timeit.repeat(lambda: event_frame(encoded, 1235), number=n, repeat=5)) / n


def _memory_per_sub(cls, subs) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ix = _build(cls, subs)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(ix) == len(subs)
    return (after - before) / len(subs)


def test_memory_per_subscription(subs, core_results):
    core_results["memory_compiled"] = _memory_per_sub(index.SubscriptionIndex, subs)
    core_results["memory_ref"] = _memory_per_sub(index_ref.SubscriptionIndex, subs)
