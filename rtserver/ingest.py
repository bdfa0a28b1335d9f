"""`rtserver ingest`: reads the change feeds and publishes normalized events to the Kafka bus.

The same Source classes as the single process, with a sink that writes to the events topic in
Kafka transactions (`bus_txn.py`), so a source acknowledges its upstream position (LSN, resume
token) only for committed events. Several ingest processes may run: a Kafka lease (`lease.py`)
lets exactly one read the feeds; a standby takes over when it dies, and its transactional
producer fences the old holder's (an ingest cut off from Kafka alone lands nothing after it).

No loss, no duplicate at a takeover (PostgreSQL): every record carries a header with the
source's position when it was published (the last fully published commit LSN, how many
events followed it, the commit LSN of the transaction of those events, and which change of it
the event is). The new holder reads the topic's tail, writes that position into the slot's
position file (so transactions already published are skipped) and, if the slot delivers that
same transaction again, drops its events that the dead holder had already published, workspace
by workspace (SourceSink._pg_in_kafka; an earlier version's headers partition by partition).

MongoDB likewise: the header `rt-mongo` = "database|resume token|n" names the n-th event
published after the last acknowledged resume token (base64 BSON), and `rt-mongo-feed` the feed
(a digest of deployment and database: databases of one name on two deployments are two feeds). The new holder, which may
run on another machine with its own state_dir, seeds the source's token store with the newest
such token (unless its own is as new) and drops the events of the next change already in Kafka,
workspace by workspace (the record's key: a change is one event per workspace).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from rtcore.event import Event
from rtserver.atomic_file import ensure_state_dir
from rtserver.bus_kafka import (
    KafkaPublisher,
    bootstrap_of,
    decode_event,
    encode_event,
    is_too_large,
    partition_for,
    stop_client,
)
from rtserver.bus_txn import TransactionalWriter, WriterFailed
from rtserver.config import Config
from rtserver.http import for_method, http_response, json_error
from rtserver.lease import Lease
from rtserver.metrics import SOURCE_COUNTS, Row, family_lines, source_rows
from rtserver.redact import redact
from rtserver.signals import until_signalled
from rtserver.sources.base import stop_all
from rtserver.tasks import cancel_and_wait

log = logging.getLogger("rtserver.ingest")
T = TypeVar("T")

POSITION_HEADER = "rt-pos"
MONGO_HEADER = "rt-mongo"
# The feed of an rt-mongo header (MongoSource.feed_id: deployment and database); earlier
# versions wrote none, and databases of one name on two deployments were one feed to them.
MONGO_FEED_HEADER = "rt-mongo-feed"
# rt-pos's feed: PostgresSource.position_name (slot-digest), or an earlier version's bare slot
_POSITION_KEY = re.compile(r"[a-z0-9_]+(-[0-9a-f]{12})?")
# A transaction's correlation id when none was set (PostgresSource._flush): its commit LSN.
_DEFAULT_CORRELATION = re.compile(r"pg-[0-9]+-([0-9A-F]{1,8}/[0-9A-F]{1,8})")
# The rows of the ingest's /metrics that count since start (typed counter).
_INGEST_COUNTS = frozenset({"rt_ingest_published_total", "rt_ingest_writer_failures_total"}) | SOURCE_COUNTS
_SCAN_SECONDS = 600  # a takeover looks this far back for the dead holder's last positions
_SCAN_RECORDS = 200_000  # ... and at most this many records per partition
_json = msgspec.json.Encoder()
_REJOIN_FIRST_DELAY = 0.5  # seconds out of the lease group after a failed transaction, doubling
_REJOIN_MAX_DELAY = 30.0
_MAX_IN_FLIGHT = 10_000  # records awaiting Kafka's acknowledgement per source (bounded)
# Connections the health port (bus.ingest_port) serves at once; a further one is answered 503 and
# closed at once. Each waits up to _HEALTH_READ_TIMEOUT for its request: without a bound, idle
# connections took as many descriptors as they were, those the feeds and Kafka need.
_MAX_HEALTH_CONNECTIONS = 64
_HEALTH_READ_TIMEOUT = 5.0
# What Kafka has of a PostgreSQL feed (_published_positions): (commit LSN, commit LSN of the next
# transaction (-1: not said), {partition: its events of that transaction}, {workspace: its
# highest change of that transaction}: empty when the headers are an earlier version's).
PgDone = tuple[int, int, dict[int, int], dict[str, int]]


class _Correlated(msgspec.Struct):
    """The member of an event body that says its transaction (_earlier_tx_lsn)."""

    correlationId: str | None = None  # noqa: N815 - the wire name


class SourceSink:
    """The EventSink of one source: Kafka, with the position header and takeover dedup."""

    def __init__(self, writer: TransactionalWriter, kind: str, done: dict[str, PgDone],
                 mongo_done: dict[str, tuple[bytes, dict[str, int]]] | None = None):
        self.writer = writer
        self.kind = kind
        self.source: Any = None
        # What Kafka already has (_published_positions): slot -> PgDone, database -> (resume
        # token, {workspace: its event of the change after it, numbered by the dead holder}).
        self.done = done
        self.mongo_done = mongo_done or {}
        self.skipped = 0
        self.oversized = 0  # records over bus.max_record_bytes, skipped (_oversized)
        self._count = 0  # the source's number of the event in hand within its transaction (change)
        self._gaps: set[asyncio.Task] = set()
        # after_durable callbacks waiting for gap records first, in order, and their task
        self._deferred: deque[tuple[set[asyncio.Task], Callable[[], None]]] = deque()
        self._deferring: asyncio.Task | None = None
        # Records handed to the producer and not yet acknowledged by Kafka: the source calls
        # drain() before it acknowledges its upstream position, so batching costs no safety.
        self._in_flight: list[asyncio.Future] = []
        self._failed: BaseException | None = None  # why records were not written (drain)

    async def publish(self, event: Event) -> int:
        self._failed = None  # the source started over after a failed drain
        headers = None
        src = self.source
        if self.kind == "postgres" and src is not None:
            # The source records a transaction's commit LSN only after all its events are
            # published: (that LSN, n-th event of the transaction after it, commit LSN of that
            # transaction) names each event across processes. The transaction's own LSN says
            # whether the slot delivers the same one again: a slot acknowledged past it (a
            # clean stop does that) delivers the next transaction, which also follows the
            # published LSN. The source numbers the events (the same on every reading), and
            # the changes (the same whatever workspaces this ingest feeds them to).
            lsn, tx, change = src.published_lsn, src.publishing_lsn, src.publishing_change
            self._count = src.publishing_event
            # an earlier version's header names the bare slot; its position is the feed's when
            # the feed took the file of that name over (_write_positions wrote it there)
            legacy = src.legacy_position and src.slot in self.done
            done = self.done.get(src.slot if legacy else src.position_name)
            if done is not None and done[0] == lsn and done[1] in (-1, tx) and self._pg_in_kafka(event, change, done):
                self.skipped += 1
                return 0
            headers = [(POSITION_HEADER, f"{src.position_name}|{lsn}|{self._count}|{tx}|{change}".encode())]
        elif self.kind == "mongo" and src is not None:
            # The token is the one acknowledged before the change in hand (a change fans out
            # to one event per workspace, numbered by the source); a fresh stream has none
            # until its first batch.
            token = src.published_token
            self._count = src.publishing_event
            done = self.mongo_done.get(src.database)
            # A change is one event per workspace: its event for this one is in Kafka when a
            # record of the workspace names the token. The n-th event counts over the workspaces
            # the dead holder fed; a standby feeding others (RT_BUS_WORKSPACES changed) numbers
            # them otherwise, and compared by partition published changes twice, or not at all.
            if token is not None and done is not None and done[0] == token and event.workspace in done[1]:
                self.skipped += 1
                return 0
            if token is not None:
                headers = [(MONGO_HEADER, f"{src.database}|{base64.b64encode(token).decode()}|{self._count}".encode()),
                           (MONGO_FEED_HEADER, src.feed_id.encode())]
        value = encode_event(event)
        if len(value) > self.writer.max_record:
            self._oversized(event, len(value))
            return 0
        self._in_flight.append(await self.writer.enqueue(event.workspace, value, headers))
        if len(self._in_flight) >= _MAX_IN_FLIGHT:
            await self.drain()
        return 0  # the seq (offset + 1) is known once Kafka answers; sources do not need it

    def after_durable(self, callback: Callable[[], None]) -> None:
        """`callback()` once Kafka has committed every record published so far, and the gap
        records announced so far (as drain() waits for both): the source records its position
        there without waiting (TransactionalWriter.after). In order; never when a gap record
        was given up (the writer failed: the ingest starts its feeds over)."""
        if not self._gaps and not self._deferred:
            self.writer.after(callback)
            return
        self._deferred.append((set(self._gaps), callback))
        if self._deferring is None or self._deferring.done():
            self._deferring = asyncio.ensure_future(self._after_gaps())

    async def _after_gaps(self) -> None:
        while self._deferred:
            gaps, callback = self._deferred[0]
            if gaps:
                await asyncio.wait(gaps)
                if any(not t.cancelled() and t.exception() is not None for t in gaps):
                    self._deferred.clear()
                    return
            self._deferred.popleft()
            self.writer.after(callback)

    def _in_kafka(self, event: Event, counts: dict[int, int]) -> bool:
        """Whether the dead holder's n-th event after the position (n = self._count) is in Kafka.
        Its events went to the partitions of their workspaces, each partition led by its own
        broker: it may have died with a later event written to one partition and an earlier one
        not to another. Within one partition the idempotent producer writes in order, so the
        n-th is there when that partition holds the n-th or a later one."""
        return self._count <= counts.get(partition_for(event.workspace, self.writer.partitions), 0)

    def _pg_in_kafka(self, event: Event, change: int, done: PgDone) -> bool:
        """Whether the dead holder published `event`, the one of the `change`-th change of the
        transaction for its workspace. Headers of this version say each record's change: the
        workspace's events are in order in its partition, so it is there when the workspace's
        records hold that change or a later one. The n-th event counts over the workspaces the
        dead holder fed: an ingest feeding others (RT_BUS_WORKSPACES changed between the two)
        numbers them otherwise, and took a change not published for one published (lost), or
        the other way round (twice). An earlier version's headers: by partition (_in_kafka)."""
        if done[3]:
            return change <= done[3].get(event.workspace, 0)
        return self._in_kafka(event, done[2])

    def _oversized(self, event: Event, size: int) -> None:
        """A record the topic would refuse on every retry: skipped, loudly, and the workspace's
        subscribers told (history_gap) instead of the feed stalling behind it."""
        self.oversized += 1
        limit = self.writer.max_record
        where = f"{event.source}:{event.entity}"
        log.error("change too large for the events topic; skipped",
                  extra={"fields": {"workspace": event.workspace, "channel": where, "bytes": size,
                                    "max_record_bytes": limit}})
        self.history_gap(event.workspace, event.source,
                         f"a change of {where} ({size} bytes) exceeded the events topic's record limit ({limit} bytes: "
                         "bus.max_record_bytes, or the topic's max.message.bytes when smaller) and was skipped")

    async def drain(self) -> None:
        """Wait until Kafka has every record published so far (acks=all); raises on failure.

        A source that fails or is stopped part-way drains again before it records how far it
        got (PostgresSource._record_part): that drain must not pass for records that were not
        confirmed. So a cancelled drain leaves its records counted (asyncio.wait does not
        cancel them), and after a failure every drain raises until the source publishes again
        (having started over from its last recorded position).

        It also waits for the gap records announced so far: a skipped change (too large, not
        convertible) has no record of its own, and acknowledging it upstream before its gap
        record is in Kafka would lose the loss itself with a stopped ingest."""
        gaps = set(self._gaps)
        if gaps:
            await asyncio.wait(gaps)  # retried until Kafka has them; a cancellation leaves them be
            for task in gaps:  # given up only when the writer failed
                if not task.cancelled() and task.exception() is not None:
                    self._failed = task.exception()
        in_flight = self._in_flight
        if in_flight:
            await asyncio.wait(in_flight)
            self._in_flight = []
            for fut in in_flight:
                if fut.cancelled():
                    self._failed = RuntimeError(f"bus topic {self.writer.topic}: a record's send was cancelled")
                    break
                if fut.exception() is not None:
                    self._failed = fut.exception()
                    break
        if self._failed is not None:
            raise self._failed

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        task = asyncio.ensure_future(self._publish_gap(workspace, source, reason))
        self._gaps.add(task)
        task.add_done_callback(self._gaps.discard)

    async def _publish_gap(self, workspace: str, source: str, reason: str) -> None:
        """The gap record is how every node learns that changes were lost: retried until
        Kafka has it (the feed itself goes on meanwhile), unless the writer failed: the
        ingest then starts its feeds over, and this one is announced again."""
        await _retry(lambda: self.writer.publish_gap(workspace, source, reason),
                     "history_gap record not published yet; retrying", logging.WARNING,
                     {"workspace": workspace, "source": source}, first=0.5, most=10.0, give_up=WriterFailed)


async def _retry(call: Callable[[], Awaitable[T]], message: str, level: int, fields: dict[str, Any],
                 first: float, most: float, give_up: type[Exception] | None = None) -> T:
    """`call()` until it returns, the delay doubling from `first` to `most` seconds between
    attempts (the broker may be away for a while); each failure logged with `fields`. A
    `give_up` exception is raised at once."""
    delay = first
    while True:
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the broker or the network raise
            if give_up is not None and isinstance(exc, give_up):
                raise
            log.log(level, message, extra={"fields": {**fields, "error": f"{type(exc).__name__}: {exc}",
                                                      "retry_in_s": delay}})
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)


# Seconds between a standby's probes of the feeds it would take over (source_probe).
PROBE_INTERVAL = 30.0
# Seconds the transactional producer may take to start (find the transaction coordinator,
# fence the previous holder's producer) before the attempt counts as failed and is retried.
WRITER_START_TIMEOUT = 20.0
# Why an ingest with nothing to read does not start (said by `rtserver check-config --ingest` too).
NO_FEEDS = "no feeds to read: set postgres.url/mongo.url with bus.workspaces, or [workspaces.*] sections naming sources"


def plan_sources(cfg: Config) -> list[dict[str, Any]]:
    """The feeds to read: one per PostgreSQL URL and per MongoDB database, each with the
    workspaces it feeds ([workspaces.*] sections, and bus.workspaces for the default URLs)."""
    from rtserver.sources.mongo import database_for

    feeds: dict[tuple[str, ...], dict[str, Any]] = {}

    def add(kind: str, url: str, database: str, wid: str, schemas: list[str], tables: list[str]) -> None:
        key = (kind, url, database)
        feed = feeds.setdefault(key, {"kind": kind, "url": url, "database": database, "schemas": schemas,
                                      "tables": tables, "workspaces": []})
        if wid not in feed["workspaces"]:
            feed["workspaces"].append(wid)

    defaults = [w for w in cfg.bus.workspaces if w not in cfg.workspaces]
    for wid in list(cfg.workspaces) + defaults:
        ws = cfg.sources_for(wid)
        if ws.postgres_url:
            add("postgres", ws.postgres_url, "", wid, ws.postgres_schemas, ws.postgres_tables)
        if ws.mongo_url:
            add("mongo", ws.mongo_url, database_for(ws.mongo_url, wid), wid, [], [])
    return list(feeds.values())


class Ingest:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.node = cfg.server.node or socket.gethostname()
        self.state_dir = os.path.abspath(cfg.server.state_dir)
        ensure_state_dir(self.state_dir)  # its feeds' positions: a start, not the first takeover, says it is unusable
        self.publisher = KafkaPublisher(cfg, f"rtserver-ingest-{self.node}")
        self.publisher.follow_limit = False  # a change over a lowered limit is read again (_writer_failed)
        self.plan = plan_sources(cfg)
        self.lease: Lease | None = None
        self.sources: list[tuple[Any, SourceSink]] = []
        self.failed: dict[int, str] = {}  # id(source) -> why it did not start (reported in /readyz)
        # The feeds' writer while this process holds the lease (bus_txn: made at each
        # acquisition, so a fenced writer is never renewed in place).
        self.writer: TransactionalWriter | None = None
        self.writer_failures = 0
        self.writer_problem = ""  # why the last attempt to start the writer failed, while it has not started
        self._failure_streak = 0  # failed writers in a row, none of which committed anything
        self._rejoin: asyncio.Task | None = None
        # A standby's last probe of each feed it would take over: plan index -> why it failed ("": reached)
        self.probes: dict[int, str] = {}
        self._probing: asyncio.Task | None = None
        self._server: asyncio.AbstractServer | None = None
        self._lock = asyncio.Lock()
        self._health_connections = 0  # served by the health port now (_MAX_HEALTH_CONNECTIONS)

    async def start(self) -> None:
        if self.cfg.bus.ingest_port:
            # Bound before joining the lease group: an ingest that joined and then died on a
            # port in use took the lease from the active one (a rebalance), twice (join, expiry).
            host, port = self.cfg.server.host, self.cfg.bus.ingest_port
            try:
                self._server = await asyncio.start_server(self._http, host, port, start_serving=False)
            except OSError as exc:
                raise RuntimeError(self.cfg.explain(
                    f"cannot listen on {host}:{port} (bus.ingest_port): {exc.strerror or exc}")) from None
        if not self.plan:
            # Refused, not warned of: an ingest with nothing to read would still join the lease
            # group, and could win the lease when the active one died, while a standby that has
            # the feeds waited and nothing streamed. Before Kafka is reached: the publisher's
            # start made the events topic, with this configuration's partition count for good.
            raise RuntimeError(NO_FEEDS)
        await self.publisher.start()
        self.lease = Lease(
            self.publisher.options,
            f"{self.cfg.bus.topic}.lease",
            f"{self.cfg.bus.topic}.ingest",
            session_timeout=self.cfg.bus.lease_timeout,
            on_acquired=self._acquired,
            on_lost=self._lost,
            client_id=f"rtserver-ingest-{self.node}",
        )
        # Said before joining: the lease may be acquired at once, and its line came first.
        log.info("ingest started; joining the lease group (the holder reads the feeds, the others stand by)",
                 extra={"fields": {"topic": self.cfg.bus.topic, "bootstrap": bootstrap_of(self.cfg),
                                   "feeds": len(self.plan), "node": self.node}})
        await self.lease.start()
        self._probing = asyncio.create_task(self._probe_feeds(), name="rtserver-ingest-probe")
        if self._server is not None:
            await self._server.start_serving()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await cancel_and_wait(self._probing, quiet=True)
        await cancel_and_wait(self._rejoin, quiet=True)
        if self.lease is not None:
            await self.lease.close()  # stops the sources first (they acknowledge what is published)
        await self.publisher.close()

    async def _probe_feeds(self) -> None:
        """While standing by, reach each feed's database as the feed would, every PROBE_INTERVAL:
        a standby that could not (a wrong URL, a database it may not reach) said it was ready,
        and when it took over held the lease reading nothing. Its /readyz says so now, and a
        failing feed is logged when it starts failing."""
        from rtserver.source_probe import probe

        while True:
            if self.lease is not None and not self.lease.held:
                found = await asyncio.gather(*(probe(feed) for feed in self.plan))
                if self.lease.held:  # taken over meanwhile (the first probe runs as the lease is joined)
                    continue
                for i, (feed, error) in enumerate(zip(self.plan, found, strict=True)):
                    if bool(error) == bool(self.probes.get(i)):
                        continue  # said when it changed
                    fields = {"kind": feed["kind"], "url": redact(feed["url"]), "database": feed["database"]}
                    if error:
                        log.warning("ingest standby: a feed it would take over cannot be reached",
                                    extra={"fields": {**fields, "error": error}})
                    else:
                        log.info("ingest standby: the feed can be reached again", extra={"fields": fields})
                self.probes = dict(enumerate(found))
            else:
                self.probes = {}  # the active ingest's feeds say it themselves
            await asyncio.sleep(PROBE_INTERVAL)

    # -- the lease ---------------------------------------------------------------------------

    async def _acquired(self) -> None:
        async with self._lock:
            # First the writer: starting it fences the previous holder's, and Kafka aborts that
            # one's open transaction, so the tail read next is all it will ever have written.
            writer = TransactionalWriter(self.publisher, f"{self.cfg.bus.topic}.ingest", self._writer_failed)
            await _retry(lambda: self._start_writer(writer),
                         "ingest takeover: starting the transactional producer failed; retrying",
                         logging.ERROR, {"topic": self.cfg.bus.topic}, first=1.0, most=30.0)
            self.writer = writer
            done, mongo_done = await self._takeover_positions()
            for feed in self.plan:
                sink = SourceSink(writer, feed["kind"], done)
                src = self._make_source(feed, sink)
                sink.source = src
                seed = self._mongo_position(feed, src, mongo_done) if feed["kind"] == "mongo" else None
                if seed is not None:
                    sink.mongo_done = {feed["database"]: seed}
                self.sources.append((src, sink))
                try:
                    if seed is not None and await src.seed_token(seed[0]):
                        log.info("mongo database %s resumes after the token Kafka has", feed["database"],
                                 extra={"fields": {"database": feed["database"], "already_published": seed[1]}})
                    await src.start()
                except Exception as exc:  # noqa: BLE001 - one feed must not keep the others from starting
                    self.failed[id(src)] = f"{type(exc).__name__}: {exc}"
                    log.error("ingest feed did not start", exc_info=True, extra={"fields": {
                        "kind": feed["kind"], "database": feed["database"], "url": redact(feed["url"])}})
            log.info("ingest active: reading feeds", extra={"fields": {
                "feeds": len(self.sources), "failed": len(self.failed), "resumed_slots": len(done),
                "resumed_databases": len(mongo_done)}})

    async def _start_writer(self, writer: TransactionalWriter) -> None:
        """writer.start(), bounded: it waits for Kafka's transaction coordinator, which a cluster
        that cannot make its transaction log never has. The ingest held the lease, read nothing
        and said nothing, /readyz and /metrics showing no error, and no standby could take over."""
        try:
            await asyncio.wait_for(writer.start(), WRITER_START_TIMEOUT)
        except TimeoutError:
            self.writer_problem = (
                f"no transaction coordinator answered within {WRITER_START_TIMEOUT:g} s: Kafka may be unable to make "
                "its transaction log (__transaction_state needs transaction.state.log.replication.factor brokers, 3 "
                "by default, and transaction.state.log.min.isr of them in sync: a cluster of fewer brokers must "
                "lower both, docs/scale-out.md)")
            raise TimeoutError(self.writer_problem) from None
        except Exception as exc:
            self.writer_problem = f"starting the transactional producer failed: {type(exc).__name__}: {exc}"
            raise
        self.writer_problem = ""

    def _mongo_position(self, feed: dict[str, Any], src: Any,
                        mongo_done: dict[tuple[str, str], tuple[bytes, dict[str, int]]]
                        ) -> tuple[bytes, dict[str, int]] | None:
        """What Kafka has of a MongoDB feed: its headers name the database and the feed
        (MONGO_FEED_HEADER: a digest of deployment and database; of URL and database in earlier
        versions, whose headers are read too). The only feed of its database name
        takes the newest header of that name whatever feed it names: an earlier version's (no
        feed named), or its own under a URL written otherwise before (an option added: a fresh
        stream would lose what changed meanwhile). Of databases named alike on two deployments,
        each takes its own only: the other's token is a point of another history."""
        from rtserver.sources.mongo import token_order

        alone = sum(f["kind"] == "mongo" and f["database"] == feed["database"] for f in self.plan) == 1
        if not alone:
            mine = (mongo_done.get((feed["database"], feed_id)) for feed_id in (src.feed_id, src.legacy_feed_id))
            return max((pos for pos in mine if pos is not None), key=lambda pos: token_order(pos[0]), default=None)
        named = [pos for (database, _), pos in mongo_done.items() if database == feed["database"]]
        return max(named, key=lambda pos: token_order(pos[0]), default=None)

    async def _takeover_positions(self) -> tuple[dict[str, PgDone],
                                                 dict[tuple[str, str], tuple[bytes, dict[str, int]]]]:
        """What the topic already has of each feed, before any feed starts (a feed started without
        it would publish again what the previous active ingest did): retried while Kafka is away."""
        async def scan() -> tuple[dict[str, PgDone],
                                  dict[tuple[str, str], tuple[bytes, dict[str, int]]]]:
            done, mongo_done = await self._published_positions()
            await self._write_positions(done)
            return done, mongo_done

        return await _retry(scan, "ingest takeover: reading the topic's tail failed; retrying", logging.ERROR,
                            {"topic": self.cfg.bus.topic}, first=1.0, most=30.0)

    async def _lost(self) -> None:
        async with self._lock:
            sources, self.sources = self.sources, []
            self.failed.clear()
            await stop_all(src for src, _ in sources)
            writer, self.writer = self.writer, None
            if writer is not None:
                await writer.close()

    def _writer_failed(self, exc: BaseException) -> None:
        """A transaction failed (bus_txn): fenced by a newer holder, aborted by Kafka after an
        outage longer than its timeout, or a record refused. Its records are not in Kafka; the
        lease is given up and joined again, so the feeds start over from what Kafka has, under
        a writer made by a holder the group has just confirmed."""
        self.writer_failures += 1
        writer = self.writer
        # Failing again before anything committed (a record Kafka refuses each time): wait
        # longer each time, out of the group (a standby may fare better meanwhile).
        self._failure_streak = 1 if writer is None or writer.committed else self._failure_streak + 1
        delay = min(_REJOIN_MAX_DELAY, _REJOIN_FIRST_DELAY * 2 ** (self._failure_streak - 1))
        fenced = type(exc).__name__ == "ProducerFenced"
        if is_too_large(exc):
            # The topic's limit lowered: the next writer's batches of records that each fit
            # stay under it (Kafka refuses an oversized batch whole, each record of it).
            self.publisher.check_limit()
        log.error("ingest: a Kafka transaction failed; giving up the lease and joining again",
                  extra={"fields": {"topic": self.cfg.bus.topic, "error": f"{type(exc).__name__}: {exc}",
                                    "fenced": fenced, "rejoin_in_s": delay}})
        if self._rejoin is None or self._rejoin.done():
            self._rejoin = asyncio.create_task(self._rejoin_lease(delay), name="rtserver-ingest-rejoin")

    async def _rejoin_lease(self, delay: float) -> None:
        lease = self.lease
        if lease is None:
            return
        await lease.close()
        await asyncio.sleep(delay)
        await _retry(lease.rejoin, "ingest: joining the lease again failed; retrying", logging.ERROR,
                     {"topic": self.cfg.bus.topic}, first=1.0, most=30.0)

    def _make_source(self, feed: dict[str, Any], sink: SourceSink) -> Any:
        targets = tuple(feed["workspaces"])
        if feed["kind"] == "postgres":
            from rtserver.sources.postgres import PostgresSource

            return PostgresSource(feed["url"], schemas=feed["schemas"], tables=feed["tables"],
                                  instance=self.cfg.server.instance, state_dir=self.state_dir, sink=sink,
                                  workspaces=lambda: targets,
                                  stream_memory_bytes=self.cfg.postgres.stream_memory,
                                  receive_timeout=self.cfg.postgres.receive_timeout,
                                  other_urls=[f["url"] for f in self.plan if f["kind"] == "postgres"])
        from rtserver.sources.mongo import MongoSource

        return MongoSource(feed["url"], database=feed["database"], state_dir=self.state_dir, sink=sink,
                           workspaces=lambda: targets, allow_unknown_collections=self.cfg.mongo.allow_unknown_collections)

    async def _published_positions(self) -> tuple[dict[str, PgDone],
                                                  dict[tuple[str, str], tuple[bytes, dict[str, int]]]]:
        """The newest position of each PostgreSQL and MongoDB feed in the topic's recent
        tail (_SCAN_SECONDS; a MongoDB feed with no header there is looked for further back, up
        to _SCAN_RECORDS per partition), with what Kafka holds of the transaction (change) after
        it. The newest commit LSN (resume token: the greatest token order) in any header is
        complete in Kafka (the source drained it before moving on); the events of the next
        transaction are counted per partition (SourceSink._in_kafka) and its changes per
        workspace (SourceSink._pg_in_kafka); the workspaces that have their event of the next
        change are listed (SourceSink.publish)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.cfg.bus.topic
        consumer = AIOKafkaConsumer(**self.publisher.options, group_id=None, enable_auto_commit=False,
                                    isolation_level="read_committed",  # as the nodes read it
                                    client_id=f"rtserver-ingest-scan-{self.node}")
        await consumer.start()
        best: dict[tuple[str, int], tuple[int, int, int]] = {}  # (slot, partition) -> (LSN, tx LSN, n)
        changes: dict[tuple[str, str], tuple[int, int, int]] = {}  # (slot, workspace) -> (LSN, tx LSN, change)
        # ((database, feed id: "" in an earlier version's headers), workspace) -> (order, n, token)
        newest: dict[tuple[tuple[str, str], str], tuple[str, int, bytes]] = {}
        try:
            tps = [TopicPartition(topic, p) for p in range(self.publisher.partitions)]
            consumer.assign(tps)
            begin = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            by_time = await consumer.offsets_for_times({tp: int((time.time() - _SCAN_SECONDS) * 1000) for tp in tps})
            window = {}
            for tp in tps:
                found = by_time.get(tp)
                window[tp] = max(begin[tp], end[tp] - _SCAN_RECORDS, found.offset if found is not None else end[tp])
            await _scan_headers(consumer, {tp: (window[tp], end[tp]) for tp in tps}, best, newest, changes)
            mongo = [feed for feed in self.plan if feed["kind"] == "mongo"]
            wanted = Counter(feed["database"] for feed in mongo)
            found_feeds = Counter(database for database, _feed_id in {feed for feed, _workspace in newest})
            # The partitions of the MongoDB feeds with no header in the window (of a database
            # name with fewer feeds found than planned): their last change is older. Their token
            # is in Kafka only (this holder may run on another machine, or hold a stale token of
            # an earlier stint), so look further back there, to the record bound. PostgreSQL
            # needs no more: its slot kept what was acknowledged before the window.
            older = {partition_for(wid, len(tps)) for feed in mongo
                     if found_feeds[feed["database"]] < wanted[feed["database"]] for wid in feed["workspaces"]}
            if older:
                await _scan_headers(consumer, {tp: (max(begin[tp], end[tp] - _SCAN_RECORDS),
                                                    window[tp] if tp.partition in older else 0) for tp in tps},
                                    None, newest)
        finally:
            await stop_client(consumer, "ingest takeover scan", {"topic": topic})
        done: dict[str, PgDone] = {}
        for (slot, partition), (lsn, tx, count) in best.items():
            top = done.get(slot)
            if top is None or (lsn, tx) > top[:2]:
                done[slot] = (lsn, tx, {partition: count}, {})
            elif (lsn, tx) == top[:2]:
                top[2][partition] = count
        for (slot, workspace), (lsn, tx, change) in changes.items():
            top = done.get(slot)
            if top is not None and (lsn, tx) == top[:2]:
                top[3][workspace] = change
        for slot in [key for key in done if "-" not in key]:
            # An earlier version's header (the bare slot): superseded by this version's of the
            # feed when those are as new (the ingest after it wrote them: a rolling upgrade).
            if any(key.rsplit("-", 1)[0] == slot != key and pos[:2] >= done[slot][:2] for key, pos in done.items()):
                del done[slot]
        mongo_done: dict[tuple[str, str], tuple[bytes, dict[str, int]]] = {}
        orders: dict[tuple[str, str], str] = {}
        for (feed, workspace), (order, count, token) in newest.items():
            if feed not in orders or order > orders[feed]:
                orders[feed] = order
                mongo_done[feed] = (token, {workspace: count})
            elif order == orders[feed]:
                mongo_done[feed][1][workspace] = count
        return done, mongo_done

    async def _write_positions(self, done: dict[str, PgDone]) -> None:
        """Let each feed's position file say what Kafka already has (skip those transactions).
        A header names the feed as its file does (PostgresSource.position_name); an earlier
        version's names the slot alone, whose file the source takes over only when no other
        feed may share it (PostgresSource._open_position)."""
        from rtserver.sources.pg_state import PositionFile

        for feed, (lsn, _tx, counts, _changes) in done.items():
            pf = await PositionFile.open(os.path.join(self.state_dir, f"postgres-{feed}.pos"))
            try:
                if (pf.commit_lsn, pf.complete) != (lsn, True):
                    pf.record(lsn, -1)
                    log.info("postgres feed %s resumes after the published commit LSN %d", feed, lsn,
                             extra={"fields": {"feed": feed, "lsn": lsn, "already_published": counts}})
            finally:
                await pf.close()

    # -- health ------------------------------------------------------------------------------

    def status(self) -> tuple[bool, dict[str, Any]]:
        held = bool(self.lease and self.lease.held)
        feeds = {}
        for src, sink in self.sources:
            st = src.status()
            feeds[_feed_name(src, st, feeds)] = {
                "ready": src.ready(), "takeover_skipped": sink.skipped, "oversized_skipped": sink.oversized,
                **({"start_error": self.failed[id(src)]} if id(src) in self.failed else {}), **{k: v for k, v in st.items() if k != "ready"}}
        bus = self.publisher.status()
        writer = self.writer
        if writer is not None:
            bus["waiting"] += writer.waiting
            if writer.problem() and not bus["error"]:
                bus.update(connected=False, error=writer.problem())
        elif held and self.writer_problem and not bus["error"]:
            bus["error"] = self.writer_problem
        bus["writer_failures"] = self.writer_failures
        # An active ingest cut off from Kafka only waits (its feeds hold their position), and a
        # standby could not take over: neither is ready.
        # Out of the lease group after a failed transaction (_rejoin_lease): no standby either.
        rejoining = self._rejoin is not None and not self._rejoin.done()
        unreachable = {} if held else {i: error for i, error in self.probes.items() if error}
        for i, error in unreachable.items():
            feed = self.plan[i]
            name = f"{feed['kind']}:{redact(feed['url'])}" + (f" {feed['database']}" if feed["kind"] == "mongo" else "")
            feeds[name] = {"ready": False, "probe_error": error}
        ready = bus["connected"] and not rejoining and not unreachable and (
            not held or (bool(self.sources) and all(s.ready() for s, _ in self.sources)))
        role = "active" if held else "rejoining" if rejoining else "standby"
        return ready, {"ready": ready, "role": role, "feeds": feeds,
                       "published": self.publisher.published, "bus": {"topic": self.cfg.bus.topic, **bus}}

    def _source_rows(self) -> list[Row]:
        """The rt_source_* rows of the feeds this ingest reads (none while it stands by)."""
        return source_rows((src.kind, _shown_url(src), src.database if src.kind == "mongo" else "", src)
                           for src, _ in self.sources)

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._health_connections >= _MAX_HEALTH_CONNECTIONS:
            writer.write(json_error(503, f"the health port serves {_MAX_HEALTH_CONNECTIONS} connections at once; "
                                         "try again", keep_alive=False))
            writer.close()
            return
        self._health_connections += 1
        try:
            await self._answer_health(reader, writer)
        finally:
            self._health_connections -= 1

    async def _answer_health(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEALTH_READ_TIMEOUT)
            method, _, rest = head.partition(b" ")
            # The path without its query: a probe or a scrape with params (`/readyz?verbose=1`)
            # asks for the same endpoint, as the gateway reads it.
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0].decode("latin-1")
            ready, details = self.status()
            ctype = "application/json"
            allow = None
            if path in ("/healthz", "/readyz", "/metrics") and method not in (b"GET", b"HEAD"):
                # As the gateway answers: these endpoints take GET and HEAD (a POST was answered
                # as a GET).
                status, body, allow = 405, b'{"error":"method not allowed"}', "GET, HEAD"
            elif path == "/healthz":
                status, body = 200, b'{"status":"ok"}'
            elif path == "/readyz":
                status, body = (200 if ready else 503), _json.encode(details)
            elif path == "/metrics":
                # The text format with HELP/TYPE and its content type, as the gateway's: Prometheus
                # 3 refuses a scrape that has none (without a fallback_scrape_protocol).
                rows: list[Row] = [
                    ("rt_ingest_active", "1 while this ingest holds the lease (reads the feeds)", {},
                     1 if details["role"] == "active" else 0),
                    ("rt_ingest_published_total", "Events published to the bus topic", {}, details["published"]),
                    ("rt_ingest_bus_connected", "1 while Kafka takes the ingest's records", {},
                     1 if details["bus"]["connected"] else 0),
                    ("rt_ingest_writer_failures_total",
                     "Kafka transactions that failed (fenced, aborted, a record refused): each made the ingest rejoin the lease",
                     {}, details["bus"]["writer_failures"]),
                ]
                # The feeds' series, as a gateway shows its sources': with a Kafka bus the slot's
                # lag and WAL status (docs/postgres.md: alert on them) are the ingest's to show.
                lines = family_lines(rows + self._source_rows(), _INGEST_COUNTS)
                status, body, ctype = 200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4"
            else:
                status, body = 404, b'{"error":"no such endpoint"}'
            writer.write(for_method(method, http_response(status, body, ctype, keep_alive=False, allow=allow)))
            # Bounded too: a peer that does not read its answer would hold its place for good.
            await asyncio.wait_for(writer.drain(), _HEALTH_READ_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except TimeoutError:
            writer.transport.abort()  # what it did not read is dropped with its socket
        finally:
            writer.close()


async def _scan_headers(consumer: Any, ranges: dict[Any, tuple[int, int]],
                        best: dict[tuple[str, int], tuple[int, int, int]] | None,
                        newest: dict[tuple[tuple[str, str], str], tuple[str, int, bytes]],
                        changes: dict[tuple[str, str], tuple[int, int, int]] | None = None) -> None:
    """Read the position headers of the records in `ranges` (partition -> [start, stop)) into
    `best` (rt-pos; None: not read) and `newest` (rt-mongo), keeping the greatest per feed and
    partition (rt-pos) or workspace (rt-mongo: the record's key), and into `changes` the greatest (LSN, transaction LSN, change) an rt-pos header
    of this version names per feed and workspace (the record's key) (Ingest._published_positions)."""
    from rtserver.sources.mongo import token_order

    todo = {}
    for tp, (start, stop) in ranges.items():
        if start < stop:
            consumer.seek(tp, start)
            consumer.resume(tp)
            todo[tp] = stop
        else:
            consumer.pause(tp)
    quiet_since = time.monotonic()
    while todo and time.monotonic() - quiet_since < 10:
        batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
        if batches:
            quiet_since = time.monotonic()
        for tp, records in batches.items():
            for r in records:
                for name, value in r.headers or ():
                    if name == POSITION_HEADER and best is not None:
                        try:  # feed|LSN|n|transaction LSN (older ingests: without it, see _earlier_tx_lsn)
                            # ... and |change since this version (earlier ones read the 4th only)
                            slot, lsn, count, *tx = _text(name, value).split("|")
                            pos = (int(lsn), int(tx[0]) if tx else _earlier_tx_lsn(r.value), int(count))
                            change = int(tx[1]) if len(tx) > 1 else None
                            if not _POSITION_KEY.fullmatch(slot):  # it names a file
                                raise ValueError(slot)
                        except ValueError:  # not ours to trust: skip, do not fail the takeover
                            log.warning("malformed %s header at %s offset %d", POSITION_HEADER, tp, r.offset)
                            continue
                        if pos > best.get((slot, tp.partition), (-1, -1, -1)):
                            best[slot, tp.partition] = pos
                        if change is not None and changes is not None and r.key is not None:
                            where = (slot, r.key.decode(errors="replace"))
                            if (*pos[:2], change) > changes.get(where, (-1, -1, -1)):
                                changes[where] = (*pos[:2], change)
                    elif name == MONGO_HEADER:
                        try:
                            database, token_b64, count = _text(name, value).rsplit("|", 2)
                            feed = (database, _header(r.headers, MONGO_FEED_HEADER))
                            token = base64.b64decode(token_b64, validate=True)
                            mpos = (token_order(token), int(count), token)
                        except ValueError:  # not ours to trust: skip, do not fail the takeover
                            log.warning("malformed %s header at %s offset %d", MONGO_HEADER, tp, r.offset)
                            continue
                        where = (feed, r.key.decode(errors="replace") if r.key is not None else "")
                        if mpos[:2] > newest.get(where, ("", -1, b""))[:2]:
                            newest[where] = mpos
        for tp in list(todo):
            # the position, not the last record: a transaction's commit marker ends the tail
            if await consumer.position(tp) >= todo[tp]:
                todo.pop(tp)
                consumer.pause(tp)


def _earlier_tx_lsn(value: bytes | None) -> int:
    """The commit LSN of the transaction of a record whose rt-pos header is an earlier
    version's (`slot|LSN|n`, no transaction LSN), from its event's default correlation id
    (`pg-<xid>-<commit LSN>`); -1 when the event has none (set by the application). Without it
    a clean handover from that version (its last transaction acknowledged to the slot) made
    the new holder take its first transaction, which follows the same LSN, for the one the
    header named, and drop its first events as already published."""
    from rtcore.pgoutput_ref import parse_lsn

    try:
        body = decode_event("", value or b"")[0].body
        correlation = msgspec.json.decode(body, type=_Correlated).correlationId
    except (msgspec.DecodeError, RecursionError):  # not an event of ours: nothing to go by
        return -1
    found = _DEFAULT_CORRELATION.fullmatch(correlation or "")
    return parse_lsn(found.group(1)) if found else -1


def _text(name: str, value: bytes | None, errors: str = "strict") -> str:
    """A position header's value as text. Kafka allows a header with no value (null), which
    the ingest never writes: ValueError, as for any value not ours to trust."""
    if value is None:
        raise ValueError(f"header {name} has no value")
    return value.decode(errors=errors)


def _header(headers: Any, name: str) -> str:
    """The value of header `name` of a record ("" when it has none; ValueError when it is
    there with no value, see _text)."""
    return next((_text(name, value, errors="replace") for key, value in headers or () if key == name), "")


def _shown_url(src: Any) -> str:
    """A feed's URL as logs, /readyz and /metrics show it (redacted)."""
    return redact(src.dsn if src.kind == "postgres" else src.url)


def _feed_name(src: Any, status: dict[str, Any], named: dict[str, Any]) -> str:
    """The feed's /readyz key: its slot (postgres) or database (mongo); a postgres feed that has
    not reached its database yet has no slot name, so its URL (redacted) names it, and a name
    taken already (a database of the same name on another server) gets the URL too."""
    url = _shown_url(src)
    name = f"{src.kind}:{status.get('slot') or status.get('database') or url}"
    return f"{name}@{url}" if name in named else name


async def run(cfg: Config) -> int:
    """Run the ingest role until SIGTERM/SIGINT."""
    ingest = Ingest(cfg)

    async def stop() -> None:
        log.info("ingest stopping")
        try:
            await asyncio.wait_for(ingest.close(), cfg.server.shutdown_timeout)
        except TimeoutError:
            # Kafka away (docs/scale-out.md): what it had not taken was not acknowledged to the
            # feeds either, and comes again. An error with a traceback paged operators for it.
            log.warning("ingest stopped before Kafka took its last records (server.shutdown_timeout %g s): "
                        "the feeds read them again at the next start", cfg.server.shutdown_timeout,
                        extra={"fields": {"shutdown_timeout": cfg.server.shutdown_timeout}})
        except Exception:
            log.exception("ingest did not close cleanly")

    return await until_signalled(ingest.start, stop, cfg.server.shutdown_timeout + 5, "rtserver ingest")
