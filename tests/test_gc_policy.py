"""Garbage-collector behaviour the gateway relies on: survivors of full passes are frozen
(rtserver.gc_policy), a finished connection's front protocol is freed without the cyclic
collector, and /metrics reports collections and pauses."""

from __future__ import annotations

import asyncio
import gc
import weakref

from rtserver import config, http
from rtserver.gc_policy import FreezeSurvivors
from rtserver.metrics import Metrics
from tests.harness.wsclient import ws_connect
from tests.test_http_pipelining import RecordingTransport, make_gateway, publish_request


class Survivor:
    """A tracked object (instances of Python classes are)."""


async def test_survivors_of_a_full_pass_are_frozen_and_stop_unfreezes():
    policy = FreezeSurvivors()
    try:
        policy.start()
        frozen_at_start = gc.get_freeze_count()
        assert frozen_at_start > 0 and policy.freezes == 1
        keep = [Survivor() for _ in range(1000)]
        gc.collect(1)  # a young pass: nothing is frozen after it
        await asyncio.sleep(0)
        assert policy.freezes == 1 and gc.get_freeze_count() <= frozen_at_start
        gc.collect(2)
        await asyncio.sleep(0)  # the freeze runs on the loop right after the pass
        assert policy.freezes == 2
        assert gc.get_freeze_count() >= frozen_at_start + len(keep)
    finally:
        policy.stop()
    assert gc.get_freeze_count() == 0 and policy._on_gc not in gc.callbacks


async def test_a_finished_connection_needs_no_cyclic_collection(tmp_path):
    """The httptools parser holds bound methods of its protocol; the protocol drops it (and
    its transport) when the connection ends, so reference counting frees all three."""
    gw = make_gateway(tmp_path)
    gc.disable()
    try:
        proto = http.FrontProtocol(gw)
        transport = RecordingTransport()
        proto.connection_made(transport)
        proto.data_received(publish_request(0))
        assert b"HTTP/1.1 202" in transport.data
        gone = weakref.ref(proto)
        proto.connection_lost(None)
        del proto
        assert gone() is None
    finally:
        gc.enable()


async def test_gc_collections_and_pauses_are_counted():
    m = Metrics()
    m.watch_gc()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        m.unwatch_gc()
    gc.collect(2)  # not counted once unwatched
    assert m.gc_collections[0] >= 1 and m.gc_collections[2] == 1
    assert m.gc_seconds[2] > 0
    text = m.render().decode()
    assert 'rt_gc_collections_total{generation="2"} 1' in text
    assert 'rt_gc_pause_seconds_total{generation="2"}' in text


async def test_the_gateway_freezes_by_default_and_not_when_told(gateway_factory):
    """rt_gc_frozen_objects: the start-up objects at least with the policy, none without."""
    for env, expect_frozen in (({}, True), ({"RT_GC_FREEZE": "false"}, False)):
        gw = await gateway_factory(env=env)
        async with ws_connect(gw, "w1", token=gw.token("w1")) as c:
            await c.subscribe("events:x")
            _, body = await gw.get("/metrics")
        frozen = [ln for ln in body.decode().splitlines() if ln.startswith("rt_gc_frozen_objects ")]
        assert frozen, body
        value = float(frozen[0].split()[1])
        assert (value > 1000) if expect_frozen else (value == 0), (env, value)


def test_the_setting():
    assert config.load(environ={}).server.gc_freeze is True
    assert config.load(environ={"RT_GC_FREEZE": "false"}).server.gc_freeze is False
