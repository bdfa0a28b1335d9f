"""Filters whose `$in` values all share one Python hash (integers n + k·(2**61 − 1), which the
wire's "integers of any size" allows) must not make subscribing, or matching, cost in
proportion to every such value other clients subscribed before: the gateway's loop serves
every tenant."""

from __future__ import annotations

import contextlib
import time

from tests.harness.wsclient import ws_connect

MODULUS = 2**61 - 1  # CPython's hash of an int is the int modulo this prime


def _colliding(first: int, count: int = 1000) -> list[int]:
    return [7 + (first + j + 1) * MODULUS for j in range(count)]


async def test_colliding_in_values_do_not_make_each_subscribe_slower(gateway):
    """50 subscriptions of 1000 colliding values each, over 10 connections of one subject (5 per
    connection keep under limits.max_filter_bytes), on one channel and field: the last ones are
    answered as fast as the first. Each took longer by every earlier filter's thousand values
    (the index probed all the keys of that hash: 0.03 s for the first, 0.2 s for the 50th,
    growing without bound, the gateway's loop blocked meanwhile)."""
    token = gateway.token("w1")
    async with contextlib.AsyncExitStack() as stack:
        bystander = await stack.enter_async_context(ws_connect(gateway, "w1", token=token))
        await bystander.subscribe("events:orders")
        attackers = [await stack.enter_async_context(ws_connect(gateway, "w1", token=token)) for _ in range(10)]
        timings = []
        for n in range(50):
            started = time.monotonic()
            reply = await attackers[n // 5].subscribe(
                "events:orders", {"predicates": {"price": {"$in": _colliding(n * 1000)}}}, id=f"s{n}")
            timings.append(time.monotonic() - started)
            assert reply["type"] == "subscribed"
        first, last = sum(timings[:5]) / 5, sum(timings[-5:]) / 5
        assert last < 2.5 * first + 0.02, [round(t, 3) for t in timings]
        started = time.monotonic()
        await bystander.send({"type": "ping", "id": "p"})
        await bystander.recv_type("pong")
        assert time.monotonic() - started < 0.25
        # and an event still reaches the bystander, matching stays cheap
        started = time.monotonic()
        await gateway.publish("w1", "orders", {"price": 7})
        await bystander.recv_event(timeout=10)
        assert time.monotonic() - started < 0.5


def test_integers_beyond_64_bits_still_compare_as_numbers():
    """Their keys changed, not their meaning: equal to the float or decimal of the same value,
    in `$eq`, `$in`, `$ne` and `$nin`, indexed or not, compiled or reference."""
    from decimal import Decimal

    from rtcore import index, index_ref, predicate, predicate_ref

    cases = [
        ({"p": 2**70}, {"p": 2.0**70}, True),
        ({"p": 2**70}, {"p": Decimal(2**70)}, True),
        ({"p": {"$in": [2**64, 1]}}, {"p": [3, 18446744073709551616]}, True),
        ({"p": {"$nin": [int(1e300)]}}, {"p": 1e300}, False),
        ({"p": {"$ne": 2**63}}, {"p": 2**63 - 1}, True),
        ({"p": -(2**63)}, {"p": -(2.0**63)}, True),
        ({"p": 7 + (2**61 - 1)}, {"p": 7}, False),
        ({"p": {"a": [2**80]}}, {"p": {"a": [2.0**80]}}, True),
    ]
    for predicates, record, expected in cases:
        for mod in (predicate, predicate_ref):
            assert mod.compile_predicates(predicates).matches(record) is expected, (mod.__name__, predicates, record)
        for ix in (index.SubscriptionIndex(), index_ref.SubscriptionIndex()):
            ix.add("k", "events", "t", None, predicates)
            assert (ix.match("events", "t", "INSERT", record) == ["k"]) is expected, (type(ix), predicates, record)
