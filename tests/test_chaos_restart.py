"""Randomized chaos across the single-node gateway's crash and restart paths: a PostgreSQL feed
and the publish API together, several filtered clients resuming with `since` after cuts (some
mid-replay), and the gateway killed (SIGKILL or SIGTERM) and restarted on one state directory.

What is checked is what the docs promise across a restart (docs/postgres.md "Delivery
guarantees", docs/protocol.md §7, PROTOCOL.md §5 `seq` and §7):
- seqs strictly increase per client; each delivered change is one that was committed (or
  published) and matches the client's filter;
- between two deliveries with no `history_gap` in between, nothing matching was skipped and
  nothing came twice or out of commit order;
- a `history_gap` comes only after a restart, and what it covers was written before that
  restart (the slot redelivers what the old process had not published, so a row committed
  after the kill is never lost; a publish answered by the new process neither);
- repeats (after a gap) only after a SIGKILL, and within one transaction (docs/postgres.md:
  "only a process killed outright ... publishes that transaction's events again");
- at the end every client holds the last matching change, written after the last restart.

Seeded: the seed is printed; RT_CHAOS_SEED replays one, RT_CHAOS_ITERATIONS (default 3) sets
how many kill/restart rounds to run (raise it by hand for a long run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.harness.http_wire import post_request, read_answer

ITERATIONS = int(os.environ.get("RT_CHAOS_ITERATIONS", "3"))
# ~5 s a round on a loaded 2-core machine, and the final wait: a long run by hand gets its time
pytestmark = [pytest.mark.postgres, pytest.mark.timeout(max(120, 90 + 10 * ITERATIONS))]
BIG_ROWS = 1500  # beyond 64kB of decoded changes: streamed before its commit
CATEGORIES = ("a", "b", "c")


@dataclass
class Change:
    """One row change as the gateway sends it (record: the new row; DELETE: the old row)."""
    ident: tuple
    table: str
    op: str
    record: dict[str, Any]
    txn: int
    t0: float  # before the commit was sent: the change is committed after this


@dataclass
class Publish:
    ident: tuple
    topic: str
    payload: dict[str, Any]
    t0: float
    status: str = "uncertain"  # ok (answered 202), failed (answered otherwise), uncertain
    seq: int | None = None


@dataclass
class Kill:
    sig: int
    at: float  # the signal sent
    done: float = float("inf")  # the process gone: a SIGTERM's drain still delivers before it


@dataclass
class Spec:
    name: str
    channel: str
    filter: dict[str, Any] | None
    match: Callable[[Any], bool]


def _orders(op: str | None = None) -> Callable[[Any], bool]:
    return lambda ch: isinstance(ch, Change) and ch.table == "orders" and (op is None or ch.op in op)


SPECS = [
    Spec("all", "postgres:*", None, lambda ch: isinstance(ch, Change)),
    Spec("orders_a", "postgres:orders", {"predicates": {"category": "a"}},
         lambda ch: _orders()(ch) and ch.record["category"] == "a"),
    Spec("orders_upd_del_big", "postgres:orders",
         {"operations": ["UPDATE", "DELETE"], "predicates": {"amount": {"$gte": 50}}},
         lambda ch: _orders(("UPDATE", "DELETE"))(ch) and ch.record["amount"] >= 50),
    Spec("notes", "postgres:notes", None, lambda ch: isinstance(ch, Change) and ch.table == "notes"),
    Spec("events_all", "events:*", None, lambda p: isinstance(p, Publish)),
    Spec("events_t1_keep", "events:t1", {"predicates": {"keep": True}},
         lambda p: isinstance(p, Publish) and p.topic == "t1" and p.payload["keep"] is True),
]


@dataclass
class World:
    rng: random.Random
    changes: list[Change] = field(default_factory=list)
    publishes: list[Publish] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    chaos: bool = True  # clients cut their sockets while set
    # The gateway process: kills[g] ended process g. A connection belongs to one process, and
    # frames a client reads after a kill may still be the dead one's (its socket's buffer).
    gen: int = 0


class ChaosClient:
    def __init__(self, spec: Spec, gw: Any, world: World, rng: random.Random):
        self.spec, self.gw, self.world, self.rng = spec, gw, world, rng
        self.token = gw.token("w1")
        self.session: str | None = None
        self.last_seq: int | None = None
        self.since_gen = 0  # the process that sent last_seq
        self.asked_gen = 0  # that of the `since` this connection asked with, which a gap answers
        # whether the session holds the subscription: a cut before the `subscribed` reply can
        # leave a session without it, and resuming that one restores nothing
        self.acked = False
        self.log: list[tuple] = []  # ("event", ident, seq, gen) / ("gap", oldest, gen, since_gen, message, since)
        self.problems: list[str] = []
        self.subscribed = asyncio.Event()
        self.connections = 0
        self.state = "new"  # where it is, for a failure's report

    def _ident(self, ev: dict[str, Any]) -> tuple:
        if ev["channel"].startswith("events:"):
            return ("ev", ev["topic"], ev["payload"]["n"])
        rec = ev["record"]
        return (ev["table"], ev["operation"], rec["id"], rec["c"])

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.state = "connecting"
            gen = self.world.gen  # before connecting: a later process listens only after it moved
            try:
                async with websockets.connect(self.gw.ws_url("w1"), max_size=None, open_timeout=5) as ws:
                    self.connections += 1
                    cutter = asyncio.create_task(self._cut_later(ws))
                    try:
                        await self._session(ws, stop, gen)
                    finally:
                        cutter.cancel()
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                self.state = f"disconnected: {exc!r}"
            # Now and then away for a while: across a kill, it then misses what the history lost.
            await asyncio.sleep(self.rng.uniform(0.3, 2.0) if self.rng.random() < 0.25 and self.world.chaos
                                else self.rng.uniform(0.02, 0.2))

    async def _cut_later(self, ws: Any) -> None:
        # Short delays land in the replay that follows a reconnect.
        await asyncio.sleep(self.rng.choice([0.01, 0.05, 0.2]) if self.rng.random() < 0.4
                            else self.rng.uniform(0.3, 3.0))
        if self.world.chaos:
            ws.transport.abort()

    async def _session(self, ws: Any, stop: asyncio.Event, gen: int) -> None:
        spec = self.spec
        sub: dict[str, Any] = {"type": "subscribe", "channel": spec.channel}
        if spec.filter is not None:
            sub["filter"] = spec.filter
        if self.session is None:
            await ws.send(json.dumps({"type": "auth", "token": self.token}))
            ok = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert ok["type"] == "auth_ok", ok
            self.session = ok["sessionId"]
            self.acked = False
            await ws.send(json.dumps(sub))
        else:
            self.asked_gen = self.since_gen
            # Both ways back: the session's own resume, or a fresh session subscribing with since.
            auth: dict[str, Any] = {"type": "auth", "token": self.token}
            if self.rng.random() < 0.6:
                auth.update(resume=self.session, since=self.last_seq)
            await ws.send(json.dumps(auth))
            ok = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert ok["type"] == "auth_ok", ok
            self.session = ok["sessionId"]
            self.state = f"process {gen}: auth_ok {ok}"
            if not ok["resumed"] or not self.acked:
                self.acked = False
                await ws.send(json.dumps({**sub, "since": self.last_seq}))
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            msg = json.loads(raw)
            self.state = f"process {gen}: read {str(msg)[:300]}"
            kind = msg.get("type")
            if kind == "subscribed":
                self.acked = True
                if self.last_seq is None:  # the first subscribe: the position it starts after
                    self.last_seq, self.since_gen = msg["seq"], gen
                    self.subscribed.set()
            elif kind == "event":
                if msg["seq"] <= self.last_seq:
                    self.problems.append(f"seq {msg['seq']} after {self.last_seq}: {msg}")
                self.log.append(("event", self._ident(msg), msg["seq"], gen))
                self.last_seq, self.since_gen = msg["seq"], gen
            elif kind == "error" and msg.get("code") == 4011:
                self.log.append(("gap", msg.get("oldest"), gen, self.asked_gen, msg.get("message"), self.last_seq))
            else:
                self.problems.append(f"unexpected message {msg}")


async def _writer(db: asyncpg.Connection, world: World, stop: asyncio.Event) -> None:
    """Transactions one at a time on one connection: commit order is the order of `changes`."""
    rng = world.rng
    live: dict[int, dict[str, Any]] = {}
    counter = 0
    next_id = 1
    txn = 0
    while not stop.is_set():
        txn += 1
        kind = rng.random()
        pending: list[Change] = []
        t0 = time.monotonic()
        async with db.transaction():
            if kind < 0.05:
                base = next_id
                rows = [(base + i, "big", (base + i) % 100, counter + 1 + i) for i in range(BIG_ROWS)]
                await db.copy_records_to_table("orders", records=rows, columns=["id", "category", "amount", "c"])
                for rid, cat, amount, c in rows:
                    rec = {"id": rid, "category": cat, "amount": amount, "c": c}
                    live[rid] = rec
                    pending.append(Change(("orders", "INSERT", rid, c), "orders", "INSERT", rec, txn, t0))
                next_id += BIG_ROWS
                counter += BIG_ROWS
            else:
                for _ in range(1 if kind < 0.6 else rng.randint(2, 8)):
                    counter += 1
                    op = rng.random()
                    if op < 0.15:
                        await db.execute("INSERT INTO notes VALUES ($1, $2, $3)", next_id, "x" * rng.randint(0, 50), counter)
                        pending.append(Change(("notes", "INSERT", next_id, counter), "notes", "INSERT",
                                              {"id": next_id, "c": counter}, txn, t0))
                        next_id += 1
                    elif op < 0.6 or len(live) < 5:
                        rec = {"id": next_id, "category": rng.choice(CATEGORIES), "amount": rng.randint(0, 99), "c": counter}
                        await db.execute("INSERT INTO orders VALUES ($1, $2, $3, $4)", *rec.values())
                        live[next_id] = rec
                        pending.append(Change(("orders", "INSERT", next_id, counter), "orders", "INSERT", rec, txn, t0))
                        next_id += 1
                    elif op < 0.85:
                        rid = rng.choice(list(live))
                        rec = {**live[rid], "amount": rng.randint(0, 99), "c": counter}
                        if rng.random() < 0.3:
                            rec["category"] = rng.choice(CATEGORIES)
                        await db.execute("UPDATE orders SET category = $2, amount = $3, c = $4 WHERE id = $1",
                                         rid, rec["category"], rec["amount"], counter)
                        live[rid] = rec
                        pending.append(Change(("orders", "UPDATE", rid, counter), "orders", "UPDATE", rec, txn, t0))
                    else:
                        rid = rng.choice(list(live))
                        old = live.pop(rid)
                        await db.execute("DELETE FROM orders WHERE id = $1", rid)
                        pending.append(Change(("orders", "DELETE", rid, old["c"]), "orders", "DELETE", old, txn, t0))
        world.changes.extend(pending)
        await asyncio.sleep(rng.uniform(0.005, 0.05))


async def _publisher(gw: Any, world: World, stop: asyncio.Event) -> None:
    rng = world.rng
    token = gw.token("w1", publish=True)
    n = 0
    writer = None
    reader: asyncio.StreamReader | None = None
    while not stop.is_set():
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
        assert reader is not None
        n += 1
        topic = rng.choice(("t1", "t2"))
        pub = Publish(("ev", topic, n), topic, {"n": n, "keep": rng.random() < 0.5}, time.monotonic())
        world.publishes.append(pub)
        try:
            writer.write(post_request(f"/workspaces/w1/realtime/events/{topic}", token, pub.payload))
            status, _, body = await read_answer(reader, timeout=15)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, IndexError):
            writer.close()
            writer = None  # no answer: published or not (uncertain)
            continue
        if status == 202:
            pub.status, pub.seq = "ok", json.loads(body)["seq"]
        else:
            pub.status = "failed"
        await asyncio.sleep(rng.uniform(0.01, 0.06))
    if writer is not None:
        writer.close()


def _check(client: ChaosClient, world: World, stats: dict[str, int]) -> list[str]:
    spec = client.spec
    pg = spec.channel.startswith("postgres:")
    expected: list[Any] = [ch for ch in (world.changes if pg else world.publishes)
                           if spec.match(ch) and (pg or ch.status != "failed")]
    index = {item.ident: i for i, item in enumerate(expected)}
    problems = list(client.problems)
    prev = -1
    gaps: list[tuple] = []
    for entry in client.log:
        if entry[0] == "gap":
            gaps.append(entry)
            continue
        _, ident, seq, _gen = entry
        if ident not in index:
            problems.append(f"delivered {ident} (seq {seq}), which it should not have been")
            continue
        i = index[ident]
        item = expected[i]
        if not pg and item.status == "ok" and item.seq != seq:
            problems.append(f"{ident} delivered with seq {seq}, its publish answered {item.seq}")
        if gaps:
            since_gen, gap_gen = gaps[0][3], gaps[-1][2]
            kills = world.kills[since_gen:gap_gen]
            if not kills:
                problems.append(f"history_gap with no restart since its since (process {gap_gen}):"
                                f" {gaps[0][4]!r}, oldest {gaps[0][1]}, since {gaps[0][5]}")
            for g in gaps:
                if g[1] is not None and seq < g[1]:
                    problems.append(f"event seq {seq} below the gap's oldest {g[1]}")
            last_kill = max((k.done for k in kills), default=0.0)
            if i <= prev:
                repeated = expected[i:prev + 1]
                stats["repeated"] += len(repeated)
                if not pg:
                    problems.append(f"custom events repeated after a gap: {[r.ident for r in repeated][:5]}")
                elif not any(k.sig == signal.SIGKILL for k in kills):
                    problems.append(f"{len(repeated)} changes repeated after a restart by SIGTERM: {repeated[0].ident}...")
                elif len({r.txn for r in repeated}) > 1:
                    problems.append(f"changes of {len({r.txn for r in repeated})} transactions repeated after a"
                                    f" SIGKILL: {repeated[0].ident}..{repeated[-1].ident}")
            else:
                lost = [x for x in expected[prev + 1:i] if pg or x.status == "ok"]
                stats["lost_behind_gap"] += len(lost)
                stats["lost_written_in_drain"] += sum(1 for x in lost if any(k.at <= x.t0 < k.done for k in kills))
                late = [x for x in lost if x.t0 >= last_kill]
                if late:
                    problems.append(f"{len(late)} written after the restart's kill lost behind a gap: {late[0].ident}")
            gaps = []
        else:
            if i <= prev:
                problems.append(f"{ident} (seq {seq}) repeated or out of order (after {expected[prev].ident})")
            else:
                lost = [x for x in expected[prev + 1:i] if pg or x.status == "ok"]
                if lost:
                    problems.append(f"silent loss of {len(lost)} before {ident}: {lost[0].ident}..{lost[-1].ident}")
        prev = i
    if prev != len(expected) - 1:
        problems.append(f"ended at {prev + 1} of {len(expected)} expected")
    return problems


async def test_chaos_crash_restart_nothing_lost_nothing_repeated(gateway_factory, pg_database):
    seed = int(os.environ.get("RT_CHAOS_SEED", random.randrange(1 << 32)))
    print(f"chaos seed {seed} (RT_CHAOS_SEED={seed} replays it), {ITERATIONS} iterations")
    rng = random.Random(seed)
    world = World(rng)
    db = await asyncpg.connect(pg_database)
    name = pg_database.rsplit("/", 1)[1]
    await db.execute(f"ALTER DATABASE \"{name}\" SET logical_decoding_work_mem = '64kB'")
    await db.close()
    db = await asyncpg.connect(pg_database)  # the setting holds for new sessions
    await db.execute("CREATE TABLE orders (id int PRIMARY KEY, category text, amount int, c bigint)")
    await db.execute("CREATE TABLE notes (id int PRIMARY KEY, body text, c bigint)")
    await db.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
    await db.execute("ALTER TABLE notes REPLICA IDENTITY FULL")
    gw = await gateway_factory(env={
        "RT_POSTGRES_URL": pg_database, "RT_INSTANCE": "chaos",
        # no eviction: every gap must come from a restart
        "RT_HISTORY_EVENTS": "1000000", "RT_HISTORY_BYTES": str(1 << 30),
        "RT_POSTGRES_STREAM_MEMORY": str(64 << 10),  # large transactions spill too
    })
    await gw.wait_ready()
    clients = [ChaosClient(spec, gw, world, random.Random(rng.random())) for spec in SPECS]
    stop_clients, stop_writes = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop_clients)) for c in clients]
    writers: list[asyncio.Task] = []
    try:
        for c in clients:
            await asyncio.wait_for(c.subscribed.wait(), 30)
        writers = [asyncio.create_task(_writer(db, world, stop_writes)),
                   asyncio.create_task(_publisher(gw, world, stop_writes))]
        for _ in range(ITERATIONS):
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            sig = rng.choice((signal.SIGKILL, signal.SIGTERM))
            world.kills.append(Kill(sig, time.monotonic()))
            await gw.stop(sig)
            world.kills[-1].done = time.monotonic()
            world.gen += 1
            await asyncio.sleep(rng.choice((0.0, rng.uniform(0.1, 1.5))))
            await gw.start()
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        world.chaos = False
        stop_writes.set()
        await asyncio.gather(*writers)
        # The last matching change of every client, written after the last restart.
        await db.execute("INSERT INTO orders VALUES (-1, 'a', 10, -1), (-2, 'a', 10, -2)")
        await db.execute("UPDATE orders SET amount = 60, c = -3 WHERE id = -1")
        await db.execute("DELETE FROM orders WHERE id = -2")
        await db.execute("INSERT INTO notes VALUES (-1, 'last', -1)")
        t0 = time.monotonic()
        world.changes += [
            Change(("orders", "INSERT", -1, -1), "orders", "INSERT", {"id": -1, "category": "a", "amount": 10, "c": -1}, -1, t0),
            Change(("orders", "INSERT", -2, -2), "orders", "INSERT", {"id": -2, "category": "a", "amount": 10, "c": -2}, -1, t0),
            Change(("orders", "UPDATE", -1, -3), "orders", "UPDATE", {"id": -1, "category": "a", "amount": 60, "c": -3}, -2, t0),
            Change(("orders", "DELETE", -2, -2), "orders", "DELETE", {"id": -2, "category": "a", "amount": 10, "c": -2}, -3, t0),
            Change(("notes", "INSERT", -1, -1), "notes", "INSERT", {"id": -1, "c": -1}, -4, t0),
        ]
        for n, topic in ((-1, "t2"), (-2, "t1")):
            out = await gw.publish("w1", topic, {"n": n, "keep": True})
            world.publishes.append(Publish(("ev", topic, n), topic, {"n": n, "keep": True}, time.monotonic(), "ok", out["seq"]))
        deadline = time.monotonic() + 60
        for c in clients:
            last = [x for x in (world.changes + world.publishes) if c.spec.match(x)][-1].ident
            while not any(e[0] == "event" and e[1] == last for e in c.log[-50:]):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
    finally:
        stop_writes.set()
        stop_clients.set()
        await asyncio.gather(*writers, *tasks, return_exceptions=True)
        await db.close()
    kills = ", ".join(f"{signal.Signals(k.sig).name}" for k in world.kills)
    print(f"{len(world.changes)} changes, {len(world.publishes)} publishes, kills: {kills}")
    report = {}
    for c in clients:
        stats = {"lost_behind_gap": 0, "lost_written_in_drain": 0, "repeated": 0}
        problems = _check(c, world, stats)
        gaps = sum(1 for e in c.log if e[0] == "gap")
        print(f"  {c.spec.name}: {sum(1 for e in c.log if e[0] == 'event')} events, {gaps} gaps,"
              f" {c.connections} connections, {stats}")
        if problems:
            report[c.spec.name] = [*problems[:10], f"state: {c.state}", f"log tail: {c.log[-3:]}"]
    assert not report, f"seed {seed}: {json.dumps(report, indent=1, default=str)}"

