"""Audit trail of connection events (docs/audit.md): Kafka when configured, else the log.

`emit()` runs on the gateway's hot path, so it only builds the record and appends it to a
bounded in-memory queue. A background task hands the queue to an idempotent aiokafka
producer. When Kafka is slow or down, the oldest queued records spill to an on-disk spool
(`audit_spool.Spool`, written on a dedicated thread) and are delivered from there, oldest
first, once Kafka is back. The logical order is always

    in flight  ->  spool (oldest segment first)  ->  spill buffer  ->  memory queue

so records reach each topic partition in the order they were emitted. Records are lost only
when the spool's byte bound is reached (or the disk cannot keep up); every loss is counted in
`status()["lost"]` and logged. Delivery is at-least-once; every record carries a unique `id`
consumers dedupe on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from rtcore.timefmt import iso_ms, now_ms
from rtserver import ids, logs
from rtserver.audit_spool import Spool, accepted_before

EVENTS = ("auth-granted", "auth-denied", "session-suspended", "session-resumed")
_EVENT_SET = frozenset(EVENTS)

log = logging.getLogger("rtserver.audit")
# Operational messages (Kafka down, records lost) go to a child logger so a handler that
# ships the "rtserver.audit" record lines can tell them apart.
ops_log = logging.getLogger("rtserver.audit.kafka")

_encoder = msgspec.json.Encoder(enc_hook=str)
_decoder = msgspec.json.Decoder()

# (event, workspaceId, JSON value): the unit every queue below holds.
Entry = tuple[str, str, bytes]


class Audit:
    """Base class: builds records; subclasses decide where they go."""

    backend = "none"

    def __init__(self, node: str):
        self.node = node
        self.emitted = 0
        self.delivered = 0
        self.lost = 0

    async def start(self) -> None:
        """Start background delivery (no-op for backends without any)."""

    async def close(self) -> None:
        """Flush what can be flushed; keep the rest for the next start."""

    def emit(
        self,
        event: str,
        *,
        workspace_id: str,
        subject: str | None = None,
        session_id: str | None = None,
        code: int | None = None,
        reason: str | None = None,
        remote_addr: str | None = None,
        **extra: Any,
    ) -> None:
        """Record one connection event. Never blocks, never raises.

        `extra` adds fields (e.g. `refresh=True`, `cause="slow-reader"`); it cannot override
        the documented ones.
        """
        try:
            if event not in _EVENT_SET:
                raise ValueError(f"unknown audit event {event!r}")
            record: dict[str, Any] = {
                "id": ids.uuid4(),
                "event": event,
                "workspaceId": workspace_id,
                "subject": subject,
                "sessionId": session_id,
                "code": code,
                "reason": reason,
                "remoteAddr": remote_addr,
                "node": self.node,
                "timestamp": iso_ms(now_ms()),
            }
            for key, value in extra.items():
                record.setdefault(key, value)
            value = _encoder.encode(record)
            self.emitted += 1
            self._submit((event, workspace_id, value), record)
        except Exception:
            self.lost += 1
            ops_log.exception(
                "audit record dropped: could not be built or queued",
                extra={"fields": {"event": event, "workspace": workspace_id}},
            )

    def _submit(self, entry: Entry, record: dict[str, Any]) -> None:
        """Send `entry` on its way; `record` is its value before encoding."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """Backlog (records not yet delivered), lost count and connection state, for /readyz and /metrics."""
        return {
            "backend": self.backend,
            "connected": True,
            "backlog": 0,
            "queued": 0,
            "spooled": 0,
            "spool_bytes": 0,
            "emitted": self.emitted,
            # counted where written, not emitted - lost: a record refused before it was counted
            # emitted (an unknown event) made that go down
            "delivered": self.delivered,
            "lost": self.lost,
        }


class LogAudit(Audit):
    """Zero-config backend: one JSON line per record on the `rtserver.audit` logger."""

    backend = "log"

    def _submit(self, entry: Entry, record: dict[str, Any]) -> None:
        # The record's members become members of the log line (see rtserver.logs): with the
        # writer logs.setup() installs, the line is made from the record's JSON at hand.
        writer = logs.direct_writer(log, logging.INFO)
        if writer is not None and logs.LINE_KEYS.isdisjoint(record):
            line = logs.json_line(record["timestamp"], "info", log.name, f"audit {entry[0]}", entry[2])
            if not writer.put(line):
                # stderr's reader is behind and the writer's bounded queue is full: the line is
                # dropped, and with it the record. Counted delivered, the trail looked whole
                # (rt_audit_lost 0) with thousands of records missing from it.
                self.lost += 1
                return
        else:
            log.info(f"audit {record['event']}", extra={"fields": record})
        self.delivered += 1


class KafkaAudit(Audit):
    """Delivers records to `<topic_prefix><event>` topics, key = workspace id, through a spool."""

    backend = "kafka"

    def __init__(
        self,
        *,
        node: str,
        bootstrap: str,
        spool_dir: str,
        topic_prefix: str = "console.realtime.",
        queue_size: int = 10000,
        spool_max_bytes: int = 256 * 1024 * 1024,
        security_protocol: str = "PLAINTEXT",
        sasl_mechanism: str = "",
        sasl_username: str = "",
        sasl_password: str = "",
        ssl_cafile: str = "",
        ssl_certfile: str = "",
        ssl_keyfile: str = "",
        close_timeout: float = 5.0,
        chunk_size: int = 500,
        request_timeout_ms: int = 30000,
    ):
        super().__init__(node)
        self.bootstrap = bootstrap
        self.topic_prefix = topic_prefix
        self.queue_size = queue_size
        self.close_timeout = close_timeout
        self.chunk_size = max(1, chunk_size)
        self._security = {
            "security_protocol": security_protocol,
            "sasl_mechanism": sasl_mechanism,
            "sasl_username": sasl_username,
            "sasl_password": sasl_password,
            "ssl_cafile": ssl_cafile,
            "ssl_certfile": ssl_certfile,
            "ssl_keyfile": ssl_keyfile,
        }
        self._request_timeout_ms = request_timeout_ms
        self._ssl_context = None
        self._spool = Spool(spool_dir, spool_max_bytes)
        # One thread for all spool I/O: keeps disk work off the event loop and in order.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rt-audit-spool")

        self._memory: collections.deque[Entry] = collections.deque()
        self._spill: list[Entry] = []  # moved out of memory, not yet on disk
        # A burst larger than the queue arrives within one loop iteration, before the spool
        # writer runs: this much may wait for the disk before records are counted lost.
        self._spill_cap = max(queue_size, 10000)
        self._flush_task: asyncio.Task | None = None
        self._pending: collections.deque[Entry] = collections.deque()  # taken from spool or memory
        self._pending_seg: int | None = None  # spool segment `_pending` came from (None: memory)
        self._inflight: list[Entry] = []  # handed to the producer, awaiting acks
        self._inflight_futs: list[asyncio.Future] = []
        self._wakeup = asyncio.Event()
        self._producer = None
        self._sender: asyncio.Task | None = None
        self._connected: bool | None = None  # None: no delivery attempted yet
        self._started = False
        self._closed = False
        self._close_task: asyncio.Task | None = None
        self._hurry = asyncio.Event()

    # -- public API ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._spool.open)
        if self._security["security_protocol"] in ("SSL", "SASL_SSL"):
            from rtserver.kafka_tls import ssl_context

            sec = self._security
            # Loading the CA bundle and the client certificate reads files: not on the event loop.
            self._ssl_context = await loop.run_in_executor(
                None, ssl_context, sec["ssl_cafile"], sec["ssl_certfile"], sec["ssl_keyfile"]
            )
        self._started = True
        if self._spool.records:
            ops_log.info(
                "audit spool holds %d records from a previous run; delivering them first",
                self._spool.records,
                extra={"fields": {"spool": self._spool.directory, "records": self._spool.records}},
            )
        if self._spill:
            self._kick_flush()
        self._sender = loop.create_task(self._run(), name="rtserver-audit-sender")

    async def close(self) -> None:
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        try:
            await asyncio.shield(self._close_task)
        except asyncio.CancelledError:
            # The caller stopped waiting (a shutdown deadline): skip the rest of the draining,
            # but finish writing the spool before letting the cancellation through.
            self._hurry.set()
            await asyncio.gather(self._close_task, return_exceptions=True)
            raise

    async def _close(self) -> None:
        if not self._started:
            self._closed = True
            self._io.shutdown(wait=False)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_timeout
        # Drain while Kafka takes records, or has a producer started that may (a first batch
        # not acknowledged yet); when it is unreachable, go straight to the spool.
        while (
            self._backlog()
            and loop.time() < deadline
            and (self._connected or self._producer is not None)
            and not self._sender.done()
            and not self._hurry.is_set()
        ):
            await asyncio.sleep(0.05)

        self._sender.cancel()
        await asyncio.gather(self._sender, return_exceptions=True)
        if self._producer is not None:
            timeout = 0.2 if self._hurry.is_set() else max(0.5, deadline - loop.time())
            await self._stop_producer(self._producer, timeout)
            self._producer = None
        self._settle_inflight()
        self._closed = True  # from here on, emit() counts records as lost

        head = [e[2] for e in self._inflight] + [e[2] for e in self._pending]
        tail = [e[2] for e in self._memory]
        self._inflight, self._inflight_futs = [], []
        self._pending.clear()
        self._memory.clear()
        if self._flush_task is not None:
            await asyncio.gather(self._flush_task, return_exceptions=True)
        try:
            kept, error, dropped = await loop.run_in_executor(self._io, self._put_back, self._pending_seg, head, tail)
            self._pending_seg = None
            if kept < len(head) + len(tail) or dropped:
                why = f"spool write failed at shutdown: {error}" if error else "spool full at shutdown"
                self._lose(len(head) + len(tail) - kept + dropped, why)
            if kept:
                ops_log.warning(
                    "audit: %d records not delivered to Kafka before shutdown; kept in the spool (%d records)",
                    kept,
                    self._spool.records,
                    extra={"fields": {"spool": self._spool.directory, "records": self._spool.records}},
                )
        finally:
            self._connected = False
            self._io.shutdown(wait=False)  # idle by now: the last job was awaited above

    def status(self) -> dict[str, Any]:
        queued = len(self._memory) + len(self._spill) + len(self._inflight) + len(self._pending)
        spooled = self._spool.records
        if self._pending_seg is not None:
            # That segment's records are counted in `_pending`/`_inflight` already.
            spooled -= self._spool.segment_records(self._pending_seg)
        return {
            "backend": self.backend,
            "connected": bool(self._connected),
            "backlog": queued + spooled,
            "queued": queued,
            "spooled": spooled,
            "spool_bytes": self._spool.bytes,
            "emitted": self.emitted,
            "delivered": self.delivered,
            "lost": self.lost,
        }

    # -- emit side (event loop, synchronous) -----------------------------------------------------

    def _submit(self, entry: Entry, record: dict[str, Any]) -> None:
        if self._closed:
            self._lose(1, "audit closed")
            log.warning(entry[2].decode())  # keep the record visible somewhere
            return
        self._memory.append(entry)
        if len(self._memory) > self.queue_size:
            self._spill_now()
        self._wakeup.set()

    def _spill_now(self) -> None:
        """Move the older half of the memory queue to the spill buffer (one disk write per burst)."""
        n = len(self._memory) - self.queue_size // 2 if len(self._memory) > self.queue_size else len(self._memory)
        if n <= 0:
            return
        if len(self._spill) + n > self._spill_cap:
            # The disk is not keeping up: memory stays bounded, the overflow is lost.
            for _ in range(n):
                self._memory.popleft()
            self._lose(n, "spool writes not keeping up")
            return
        self._spill.extend(self._memory.popleft() for _ in range(n))
        if self._started:  # before start() the spool is not open yet; start() flushes
            self._kick_flush()

    def _kick_flush(self) -> asyncio.Task:
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_spill())
        return self._flush_task

    async def _flush_spill(self) -> None:
        # The only writer of appends; never cancelled (callers await it through shield), so a
        # batch is removed from `_spill` exactly when it is on disk.
        loop = asyncio.get_running_loop()
        while self._spill:
            batch = self._spill[:]
            try:
                accepted = await loop.run_in_executor(self._io, self._spool.append, [e[2] for e in batch])
            except OSError as exc:
                accepted = accepted_before(exc)
                ops_log.error(
                    "audit spool write failed: %s",
                    exc,
                    extra={"fields": {"spool": self._spool.directory}},
                )
            del self._spill[: len(batch)]
            if accepted < len(batch):
                self._lose(len(batch) - accepted, "spool full")

    def _lose(self, n: int, why: str) -> None:
        self.lost += n
        ops_log.error(
            "audit: %d records lost (%s); %d lost in total",
            n,
            why,
            self.lost,
            extra={"fields": {"lost": n, "lost_total": self.lost, "reason": why, "spool": self._spool.directory}},
        )

    # -- delivery (background task) --------------------------------------------------------------

    def _backlog(self) -> int:
        return self.status()["backlog"]

    async def _run(self) -> None:
        while True:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not stop the audit trail for good: log, pause, carry on.
                ops_log.exception("audit sender failed; retrying", extra={"fields": {"bootstrap": self.bootstrap}})
                await asyncio.sleep(1.0)

    async def _run_once(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._inflight:
                if not self._pending:
                    await self._refill()
                n = min(self.chunk_size, len(self._pending))
                self._inflight = [self._pending.popleft() for _ in range(n)]
                self._inflight_futs = []
            await self._deliver_inflight()
            if not self._pending and self._pending_seg is not None:
                await loop.run_in_executor(self._io, self._spool.delete, self._pending_seg)
                self._pending_seg = None

    async def _refill(self) -> None:
        """Fill `_pending` from the oldest source: the spool (after flushing the spill), else memory."""
        loop = asyncio.get_running_loop()
        while True:
            if self._spill or self._flush_task is not None and not self._flush_task.done():
                await asyncio.shield(self._kick_flush())
            if self._spool.records:
                got = await loop.run_in_executor(self._io, self._spool.read_oldest)
                if got is not None:
                    sid, lines = got
                    gone = self._spool.segment_records(sid) - len(lines)
                    if gone > 0:
                        # Removed or cut short by hand (freeing disk space): lost, not retried.
                        self._lose(gone, f"spool segment {sid} removed or truncated outside the gateway")
                    entries = self._decode(sid, lines)
                    if entries:
                        self._pending = collections.deque(entries)
                        self._pending_seg = sid
                        return
                    await loop.run_in_executor(self._io, self._spool.delete, sid)
                    continue
            if self._memory:
                n = min(len(self._memory), self.chunk_size)
                self._pending = collections.deque(self._memory.popleft() for _ in range(n))
                self._pending_seg = None
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    def _decode(self, sid: int, lines: list[bytes]) -> list[Entry]:
        entries: list[Entry] = []
        for line in lines:
            try:
                record = _decoder.decode(line)
                event, workspace = record["event"], record["workspaceId"]
                if event not in _EVENT_SET or not isinstance(workspace, str):
                    raise ValueError("not an audit record")
            except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                self._lose(1, f"unreadable line in spool segment {sid}: {exc}")
                continue
            except RecursionError:
                # A line nesting past the decoder's stack (damaged, edited by hand) is no
                # DecodeError: let through, it failed the same segment every second for good.
                self._lose(1, f"unreadable line in spool segment {sid}: it nests too deeply")
                continue
            entries.append((event, workspace, line))
        return entries

    async def _deliver_inflight(self) -> None:
        backoff = 0.2
        while self._inflight:
            producer = await self._ensure_producer()
            futs: list[asyncio.Future] = []
            self._inflight_futs = futs
            error: BaseException | None = None
            topic = ""  # the topic of the failure: a missing one stalls the whole trail (order)
            try:
                for event, workspace, value in self._inflight:
                    topic = self.topic_prefix + event
                    futs.append(await producer.send(topic, value, key=workspace.encode()))
            except Exception as exc:  # metadata or buffer timeout while Kafka is unreachable
                error = exc
            while futs:
                # An idempotent producer retries a batch until Kafka takes it, with the same
                # sequence numbers, so waiting (rather than re-sending) keeps it exactly-once.
                _, waiting = await asyncio.wait(futs, timeout=5.0)
                if not waiting:
                    break
                if self._connected is not False:  # the warning is logged now: the credentials?
                    await self._disconnected(self._explain(f"{len(waiting)} records waiting for acks"))
            if error is None:
                for (event, _, _), fut in zip(self._inflight, futs, strict=False):
                    if not fut.cancelled() and fut.exception() is not None:
                        error, topic = fut.exception(), self.topic_prefix + event
                        break
            self._settle_inflight()
            if not self._inflight:
                self._set_connected(True)
                return
            self._set_connected(False, f"topic {topic}: {type(error).__name__}: {error}" if error else "send failed")
            # A fresh producer (new producer id) clears any sequence state the failure left behind.
            await self._stop_producer(producer, 2.0)
            if self._producer is producer:
                self._producer = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _settle_inflight(self) -> None:
        """Drop acknowledged records from `_inflight`; the rest (failed or never sent) stay, in order."""
        futs = self._inflight_futs
        keep: list[Entry] = []
        for i, entry in enumerate(self._inflight):
            fut = futs[i] if i < len(futs) else None
            if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                self.delivered += 1
            else:
                keep.append(entry)
        self._inflight = keep
        self._inflight_futs = []

    async def _ensure_producer(self):
        from aiokafka import AIOKafkaProducer

        backoff = 0.2
        while self._producer is None:
            producer = AIOKafkaProducer(**self._producer_options())
            try:
                await producer.start()
            except Exception as exc:
                await self._stop_producer(producer, 2.0)
                if self._connected is not False:  # the warning is logged now: say why
                    await self._disconnected(self._explain(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            # Not `connected` yet: Kafka answering is not records delivered (a topic missing on
            # a cluster without auto-creation fails every send); _deliver_inflight says so.
            self._producer = producer
        return self._producer

    async def _explain(self, exc: Exception | str) -> str:
        """Why the producer could not start, or records wait for acks, naming the setting (a
        refused password, an untrusted certificate): aiokafka's own "Unable to bootstrap" reads
        like Kafka down, and a password revoked while the producer runs shows as acks not
        coming (the broker refuses it once the session it holds ends)."""
        from aiokafka.errors import KafkaConnectionError

        from rtserver.kafka_diagnosis import explain

        if isinstance(exc, Exception) and not isinstance(exc, KafkaConnectionError):
            return f"{type(exc).__name__}: {exc}"
        return await explain(self._producer_options(), exc, bootstrap_setting="audit.kafka_bootstrap",
                             cafile=self._security["ssl_cafile"], certfile=self._security["ssl_certfile"])

    def _producer_options(self) -> dict[str, Any]:
        sec = self._security
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": f"rtserver-audit-{self.node}",
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": "gzip",  # in the standard library; lz4/zstd need extra packages
            "linger_ms": 5,
            "request_timeout_ms": self._request_timeout_ms,
            "security_protocol": sec["security_protocol"],
        }
        if self._ssl_context is not None:
            options["ssl_context"] = self._ssl_context
        if sec["sasl_mechanism"]:
            options["sasl_mechanism"] = sec["sasl_mechanism"]
            options["sasl_plain_username"] = sec["sasl_username"]
            options["sasl_plain_password"] = sec["sasl_password"]
        return options

    @staticmethod
    async def _stop_producer(producer, timeout: float) -> None:
        task = asyncio.ensure_future(producer.stop())
        _, waiting = await asyncio.wait({task}, timeout=timeout)
        if waiting:
            # Kafka unreachable: aiokafka's stop() waits until every buffered batch is sent or
            # its sender task ends. End that task (the records are still ours, in `_inflight`,
            # and count as undelivered); failing the batches instead trips aiokafka 0.14.
            sender_task = getattr(getattr(producer, "_sender", None), "sender_task", None)
            if sender_task is not None:
                sender_task.cancel()
            _, waiting = await asyncio.wait({task}, timeout=2.0)
            if waiting:
                task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def _set_connected(self, connected: bool, why: str = "") -> None:
        if connected and not self._connected:
            ops_log.info("audit: Kafka at %s reachable", self.bootstrap, extra={"fields": {"bootstrap": self.bootstrap}})
        elif not connected and self._connected is not False:
            self._warn_undelivered(why)
        self._connected = connected

    async def _disconnected(self, why: Awaitable[str]) -> None:
        """Kafka stopped taking records: `connected` is false from now on (/readyz, /metrics),
        and the warning follows once `why` is known. Finding out can take a probe of the
        bootstrap servers of up to kafka_diagnosis.PROBE_SECONDS: the flag waited for it, and
        said Kafka was there for 5-14 s of an outage."""
        self._connected = False
        self._warn_undelivered(await why)

    def _warn_undelivered(self, why: str) -> None:
        ops_log.warning(
            "audit: cannot deliver to Kafka at %s (%s); records are queued and spooled",
            self.bootstrap,
            why,
            extra={"fields": {"bootstrap": self.bootstrap, "backlog": self._backlog()}},
        )

    def _put_back(self, pending_seg: int | None, head: list[bytes],
                  tail: list[bytes]) -> tuple[int, OSError | None, int]:
        """At shutdown (spool thread): undelivered head in front, memory at the end, then sync
        and unlock. Returns how many of `head` and `tail` the spool keeps, the error of a write
        the disk refused (what was written before it is kept all the same), and how many
        spooled records were dropped to make room for `head`."""
        kept = dropped = 0
        try:
            if pending_seg is not None:
                # `head` is that segment's undelivered remainder, and it is the oldest segment.
                # Rewritten atomically: if that fails, the whole segment is still there.
                kept = len(head)
                self._spool.replace(pending_seg, head)
            else:
                # The oldest records of the outage (in flight when Kafka went) go in front: with
                # the spool full they were the ones lost, and the trail kept a hole at its start
                # while newer records stayed. The newest spooled ones make room instead.
                dropped = self._spool.drop_newest(sum(len(line) + 1 for line in head))
                kept = self._spool.prepend(head)
            kept += self._spool.append(tail)
        except OSError as exc:
            return kept + accepted_before(exc), exc, dropped
        finally:
            try:
                self._spool.close()
            except OSError as exc:  # the sync: what was written may not be on disk
                ops_log.error("audit spool not synced at shutdown: %s", exc, extra={"fields": {"spool": self._spool.directory}})
        return kept, None, dropped


def create_audit(cfg, node: str) -> Audit:
    """KafkaAudit when `audit.kafka_bootstrap` is set, else LogAudit."""
    a = cfg.audit
    node = node or socket.gethostname()
    if not a.kafka_bootstrap:
        return LogAudit(node)
    spool_dir = a.spool_dir or os.path.join(cfg.server.state_dir, "audit-spool")
    return KafkaAudit(
        node=node,
        bootstrap=a.kafka_bootstrap,
        spool_dir=spool_dir,
        topic_prefix=a.topic_prefix,
        queue_size=a.queue_size,
        spool_max_bytes=a.spool_max_bytes,
        security_protocol=a.security_protocol,
        sasl_mechanism=a.sasl_mechanism,
        sasl_username=a.sasl_username,
        sasl_password=a.sasl_password,
        ssl_cafile=a.ssl_cafile,
        ssl_certfile=a.ssl_certfile,
        ssl_keyfile=a.ssl_keyfile,
    )
