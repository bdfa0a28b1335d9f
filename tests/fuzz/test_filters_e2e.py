"""Random filters from real WebSocket clients and random published payloads (seeded, so the
same every run): each subscribe is answered `subscribed` or error 4000 with the connection
open, each client gets exactly the events the pure-Python reference matcher says, and the
gateway stays up. Set RT_FUZZ_ASAN_PRELOAD (the LD_PRELOAD of libasan/libubsan) and
RT_FUZZ_PYTHONPATH (a tree with rtcore built with -fsanitize=address,undefined, then this
one) to run the
gateway under the sanitizers."""

from __future__ import annotations

import contextlib
import json
import os
import random

from rtcore import predicate_ref
from rtcore.errors import FilterError
from tests.harness.wsclient import ws_connect

SEED = int(os.environ.get("RT_FUZZ_SEED", "20261202"))
CLIENTS = 12
EVENTS = 60

_SCALARS = [0, 1, -1, 2, 1.5, -0.0, 1e300, True, False, None, "", "a", "b", "é", "\u2028", 2**63, -2**63 - 1,
            2**70, 7 + (2**61 - 1), 9007199254740993]
_FIELDS = ["a", "b", "a.b", "a.0", "a.0.b", "n.x", "é", "0", "b.1"]
_OPS = ["$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$exists", "$not", "$regex"]


def _value(r: random.Random, depth: int = 0):
    c = r.random()
    if depth < 3 and c < 0.15:
        return [_value(r, depth + 1) for _ in range(r.randrange(0, 3))]
    if depth < 3 and c < 0.25:
        return {r.choice(["a", "b", "x"]): _value(r, depth + 1) for _ in range(r.randrange(0, 3))}
    return r.choice(_SCALARS)


def _ops(r: random.Random, depth: int) -> dict:
    out = {}
    for op in r.sample(_OPS, r.randrange(1, 3)):
        if op in ("$in", "$nin"):
            out[op] = [_value(r, 2) for _ in range(r.randrange(0, 4))]
        elif op == "$exists":
            out[op] = r.choice([True, False, 1])
        elif op == "$not":
            out[op] = _ops(r, depth + 1) if depth < 2 else {}
        else:
            out[op] = _value(r, 2)
    return out


def _predicates(r: random.Random, depth: int = 0) -> dict:
    out: dict = {}
    for _ in range(r.randrange(0, 3)):
        if depth < 2 and r.random() < 0.2:
            out[r.choice(["$and", "$or"])] = [_predicates(r, depth + 1) for _ in range(r.randrange(1, 3))]
        elif r.random() < 0.5:
            out[r.choice(_FIELDS)] = _ops(r, depth)
        else:
            out[r.choice(_FIELDS)] = _value(r, 1)
    return out


def _payload(r: random.Random) -> dict:
    rec: dict = {}
    for f in r.sample(["a", "b", "n", "é", "0"], r.randrange(0, 5)):
        c = r.random()
        if c < 0.3:
            rec[f] = {"b": _value(r, 1), "x": _value(r, 1)}
        elif c < 0.5:
            rec[f] = [{"b": _value(r, 2)} if r.random() < 0.5 else _value(r, 2) for _ in range(r.randrange(0, 3))]
        else:
            rec[f] = _value(r)
    return rec


def _gateway_env() -> dict[str, str]:
    preload, path = os.environ.get("RT_FUZZ_ASAN_PRELOAD"), os.environ.get("RT_FUZZ_PYTHONPATH")
    if not (preload and path):
        return {}
    return {"LD_PRELOAD": preload, "ASAN_OPTIONS": "detect_leaks=0", "PYTHONPATH": path}


async def test_random_filters_deliver_what_the_reference_matches(gateway_factory):
    r = random.Random(SEED)
    gw = await gateway_factory(env=_gateway_env())
    token = gw.token("w1")
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for i in range(CLIENTS):
            c = await stack.enter_async_context(ws_connect(gw, "w1", token=token))
            for attempt in range(20):
                predicates = _predicates(r)
                try:
                    matcher = predicate_ref.compile_predicates(json.loads(json.dumps(predicates)))
                except FilterError:
                    matcher = None
                await c.send({"type": "subscribe", "channel": "events:t", "id": f"{i}-{attempt}",
                              "filter": {"predicates": predicates}})
                reply = await c.recv()
                if matcher is None:
                    assert reply["type"] == "error" and reply["code"] == 4000, (predicates, reply)
                    continue
                assert reply["type"] == "subscribed", (predicates, reply)
                clients.append((c, matcher, predicates))
                break
        payloads = [_payload(r) for _ in range(EVENTS)]
        for p in payloads:
            await gw.publish("w1", "t", p)
        for c, matcher, predicates in clients:
            want = [p for p in payloads if matcher.matches(json.loads(json.dumps(p)))]
            got = [(await c.recv_event())["payload"] for _ in want]
            await c.send({"type": "ping", "id": "last"})
            assert (await c.recv())["type"] == "pong", predicates  # nothing more was delivered
            assert got == json.loads(json.dumps(want)), predicates
    assert gw.proc.returncode is None
    assert "AddressSanitizer" not in gw.logs() and "runtime error" not in gw.logs()
