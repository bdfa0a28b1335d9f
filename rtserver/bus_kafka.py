"""The Kafka event bus: several gateway nodes share one event stream.

One topic (`bus.topic`) carries every workspace event, keyed by workspace id, so each workspace
lives in one partition and is totally ordered there. A record's value is the event's metadata
plus its already-encoded body (msgpack, `BusRecord`), so nodes never re-encode. Its `seq` is the
record's offset + 1: assigned once by Kafka, identical on every node, increasing across restarts
(never change the partition count of a live topic: a workspace would move partitions).

- `KafkaPublisher` writes records (idempotent producer, acks=all): `enqueue` hands one over with
  a future of Kafka's acknowledgement; the publish API uses it (the ingest for its watch and
  options only).
- `KafkaBus` is a gateway node's bus: publishing goes to Kafka only; its consumer reads every
  partition (starting one history window back; committed records only: the ingest writes in
  transactions, `bus_txn.py`), feeds the hub with the Kafka-assigned seq, and tracks lag. `read_back` serves a resume whose `since` is older than the node's memory.
- `RemoteSource` stands in for a change feed on a node: it validates channel names; the feed
  itself is read by the ingest process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from rtcore.event import Event
from rtserver.bus import SHUTTING_DOWN, BusUnavailable, not_published
from rtserver.channels import valid_collection, valid_table_name
from rtserver.config import KAFKA_RECORD_OVERHEAD as RECORD_OVERHEAD  # the record batch's framing
from rtserver.eager import run_now
from rtserver.sources.base import YIELD_EVERY, ChannelUnavailable, NoSuchChannel
from rtserver.tasks import cancel_and_wait

if TYPE_CHECKING:
    from rtserver.config import Config
    from rtserver.hub import Hub
    from rtserver.metrics import Metrics

log = logging.getLogger("rtserver.bus")

GAP = "GAP"  # operation of a control record: the source lost changes (history_gap on every node)
_MAX_CONCURRENT_READ_BACKS = 4
_READ_BACK_ROOM_BYTES = 64 * 1024  # emitted between two waits for the reader (read_back)
_READ_BACK_STALL = 10.0  # seconds without progress before a read-back gives up (history_gap)
# Seconds a read-back waits for its reader holding its place (and its Kafka consumer); a
# reader slower than that waits without them, and the read-back reopens where it stopped.
_READ_BACK_HOLD = 1.0
_PROBE_INTERVAL = 1.0  # seconds between two metadata requests of a publisher's watch
_NO_ANSWER = "no broker answered a metadata request"
TABLES_TTL = 2.0  # seconds a node keeps the catalog's judgement of the configured tables (RemoteSource)


class BusRecord(msgspec.Struct, array_like=True):
    """The value of one events-topic record (the key is the workspace id)."""

    source: str
    entity: str
    operation: str
    record: Any
    old_record: Any
    body: bytes


# msgpack has no integer beyond 64 bits (a numeric or json value of a row, a published number
# may hold one): such an integer travels as its JSON in this extension instead.
_JSON_EXT = 1
_MSGPACK_INT_MIN = -(1 << 63)
_MSGPACK_INT_MAX = (1 << 64) - 1


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _JSON_EXT:
        return msgspec.msgpack.Ext(code, bytes(data))  # as without the hook: nothing of ours
    return msgspec.json.decode(data)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(BusRecord, ext_hook=_ext_hook)


def encode_event(event: Event) -> bytes:
    try:
        return _encoder.encode(
            BusRecord(event.source, event.entity, event.operation, event.record, event.old_record, event.body)
        )
    except OverflowError:
        # Failing here, a row stalled its database's feed at every retry (the ingest), and a
        # publish got 500.
        return _encoder.encode(BusRecord(event.source, event.entity, event.operation, _big_ints_as_json(event.record),
                                         _big_ints_as_json(event.old_record), event.body))


def _big_int_as_json(value: Any) -> Any:
    if type(value) is int and not _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
        return msgspec.msgpack.Ext(_JSON_EXT, str(value).encode())
    return value


def _big_ints_as_json(value: Any) -> Any:
    """A copy of the JSON-ready `value` with each integer beyond msgpack's 64 bits in the JSON
    extension, and nothing else: the whole record as JSON turned its float NaN and ±Infinity
    (which filters compare as numbers) into null on the nodes. Iterative: a published payload
    may nest about as deep as the interpreter's recursion limit."""
    containers: list[dict | list] = []

    def copy(item: Any) -> Any:
        if type(item) is dict:
            item = dict(item)
        elif type(item) is list:
            item = list(item)
        else:
            return _big_int_as_json(item)
        containers.append(item)
        return item

    out = copy(value)
    while containers:
        container = containers.pop()
        if type(container) is dict:
            for k, v in container.items():
                container[k] = copy(v)  # replaces values only: the dict's size does not change
        else:
            for i, v in enumerate(container):
                container[i] = copy(v)
    return out


def gap_record(source: str, reason: str) -> bytes:
    """The value of a GAP record: `source` lost changes, for `reason`."""
    return _encoder.encode(BusRecord(source, "", GAP, None, None, reason.encode()))


def decode_event(workspace: str, value: bytes) -> tuple[BusRecord, Event]:
    r = _decoder.decode(value)
    return r, Event(workspace, r.source, r.entity, r.operation, r.record, r.body, r.old_record)


class ForeignRecord(ValueError):
    """A record of the events topic that is not an event record (written by another producer,
    or damaged): consumers skip it with a log rather than stop."""


def decode_record(key: bytes | None, value: bytes | None) -> tuple[BusRecord, Event]:
    """The event of one events-topic record (the key is its workspace id); ForeignRecord when
    the record is not one."""
    if key is None or value is None:
        raise ForeignRecord("no key or no value")
    try:
        workspace = key.decode()
    except UnicodeDecodeError:
        raise ForeignRecord("key is not UTF-8") from None
    try:
        rec, event = decode_event(workspace, value)
    except msgspec.DecodeError as exc:
        raise ForeignRecord(f"value is not an event record: {exc}") from None
    except RecursionError:
        # Not a DecodeError: it ended the node's consumer for good (and every node's reading
        # past the record, restarts included).
        raise ForeignRecord("value is not an event record: it nests too deeply") from None
    if rec.operation != GAP and not (rec.body[:2] == b'{"' and rec.body[-1:] == b"}"):
        # seq is spliced in before the body's closing brace, after a member: anything else
        # becomes invalid JSON (`{}` became `{,"seq":…}`). An event frame starts `{"type"`.
        raise ForeignRecord("event body is not a JSON object with members")
    return rec, event


def record_fields(topic: str, partition: int, offset: int, key: bytes | None) -> dict[str, Any]:
    """Where a record is, for a log line (the key shown as text when it is, cut short)."""
    shown = key[:100].decode("utf-8", "backslashreplace") if key is not None else None
    return {"topic": topic, "partition": partition, "offset": offset, "workspace": shown}


def partition_for(workspace: str, partitions: int) -> int:
    """The partition of `workspace`: the Java client's and aiokafka's default partitioner."""
    from aiokafka.partitioner import murmur2

    return (murmur2(workspace.encode()) & 0x7FFFFFFF) % partitions


def bootstrap_of(cfg: Config) -> str:
    return cfg.bus.kafka_bootstrap or cfg.audit.kafka_bootstrap


async def client_options(cfg: Config) -> dict[str, Any]:
    """Connection options shared by every Kafka client of the bus (security from [audit])."""
    a = cfg.audit
    options: dict[str, Any] = {"bootstrap_servers": bootstrap_of(cfg), "security_protocol": a.security_protocol}
    if a.sasl_mechanism:
        options.update(sasl_mechanism=a.sasl_mechanism, sasl_plain_username=a.sasl_username,
                       sasl_plain_password=a.sasl_password)
    if a.security_protocol in ("SSL", "SASL_SSL"):
        from rtserver.kafka_tls import ssl_context

        # Loading the CA bundle and the client certificate reads files: not on the event loop.
        options["ssl_context"] = await asyncio.get_running_loop().run_in_executor(
            None, ssl_context, a.ssl_cafile, a.ssl_certfile, a.ssl_keyfile
        )
    return options


async def stop_client(client: Any, what: str, fields: dict[str, Any]) -> None:
    """`client.stop()`, ending however Kafka is. While Kafka is away, an aiokafka consumer's
    stop() raises the cancellation of its own fetch task (waiting to retry): awaited directly,
    that passes for our own cancellation and turns a clean shutdown into a crash."""
    task = asyncio.ensure_future(client.stop())
    await asyncio.wait({task})  # our own cancellation still reaches us here
    if task.cancelled() or task.exception() is not None:
        why = "cancelled inside aiokafka" if task.cancelled() else f"{type(task.exception()).__name__}: {task.exception()}"
        log.info("%s stopped uncleanly (Kafka unreachable?): %s", what, why, extra={"fields": fields})


def _log_late_outcome(fut: asyncio.Future, where: str) -> None:
    """What became of an event its publisher was answered 504 for."""
    if fut.cancelled():
        log.warning("a publish answered 504 was not written (cancelled)", extra={"fields": {"where": where}})
    elif fut.exception() is not None:
        log.warning("a publish answered 504 was not written: %s", fut.exception(), extra={"fields": {"where": where}})
    else:
        log.info("a publish answered 504 was written", extra={"fields": {"where": where, "seq": fut.result().offset + 1}})


def _why(exc: BaseException) -> str:
    """An exception as a log line names it: its type, and its text when it has one (a bare
    TimeoutError read "TimeoutError: ")."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# A publisher's 503 while Kafka is unavailable. Not the cause as the log and /readyz give it:
# that names the brokers' hosts and ports and the SASL user and mechanism (refused
# credentials), the operator's business and not a publisher's of any workspace, as a
# WebSocket upgrade refused then is not told either, nor a client why a database is out of reach.
UNAVAILABLE = "event bus unavailable (Kafka cannot be reached or refuses this node; its log and /readyz say why)"


def _confirmation(ack: asyncio.Future, pub: KafkaPublisher, workspace: str, size: int) -> asyncio.Future[int]:
    """The seq `ack` (a producer's future of a record of `size` bytes) acknowledges, within
    the publisher's timeout; else BusUnavailable (see KafkaBus.submit). Callbacks and one
    timer, not a task per record."""
    from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber

    loop = asyncio.get_running_loop()
    out: asyncio.Future[int] = loop.create_future()
    timeout, topic = pub.timeout, pub.topic

    def settled(f: asyncio.Future) -> None:
        timer.cancel()
        if out.done():
            return  # answered 504 already: _log_late_outcome tells what became of it
        exc = None if f.cancelled() else f.exception()
        if is_too_large(exc):
            _too_large(out, pub, workspace, size, type(exc).__name__)
        elif isinstance(exc, OutOfOrderSequenceNumber):
            # Not this record's doing: Kafka refused an earlier record of the node's producer
            # (a publish of any workspace on its partition), and refuses every record sent with
            # it until the new producer (_renew) takes over.
            out.set_exception(BusUnavailable(503, "event bus refused the event because it refused an earlier record "
                                                  "sent with it (OutOfOrderSequenceNumber: the node starts a new "
                                                  "producer); it was not published, a retry is safe (workspace "
                                                  f"{workspace}, bus topic {topic})"))
        elif f.cancelled() or isinstance(exc, KafkaError):
            why = "cancelled" if exc is None else type(exc).__name__  # its text may name a broker
            out.set_exception(BusUnavailable(503, f"event bus refused the event ({why}); it was not published "
                                                  f"(workspace {workspace}, bus topic {topic})"))
        elif exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(f.result().offset + 1)

    def expired() -> None:
        if out.done():
            return
        where = f"workspace {workspace}, bus topic {topic}"
        ack.add_done_callback(lambda f: _log_late_outcome(f, where))
        out.set_exception(BusUnavailable(
            504, f"Kafka did not acknowledge the event within {timeout:g}s ({where}); "
                 "it is usually written when Kafka is back, so a retry may publish it twice"))

    timer = loop.call_later(timeout, expired)
    ack.add_done_callback(settled)
    return out


def is_too_large(exc: BaseException | None) -> bool:
    """Whether Kafka refused a record (or the batch it was sent in) as too large for the topic."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError)


def _too_large(out: asyncio.Future[int], pub: KafkaPublisher, workspace: str, size: int, error: str) -> None:
    """Answer a record Kafka refused as too large (the topic's max.message.bytes lowered under
    the node: what it read before is checked before sending). Kafka refuses the whole request
    of a partition, so the records sent with the one too large get the same error: the limit
    is read again to tell them apart. The one over it is answered 413 (a retry is refused
    alike), the others 503 (a retry is safe): a 413 had their publishers drop events that fit."""
    where = f"workspace {workspace}, bus topic {pub.topic}"

    def decide(check: asyncio.Future | None = None) -> None:
        timer.cancel()
        if out.done():
            return
        if check is None or check.cancelled() or check.exception() is not None or not check.result():
            out.set_exception(BusUnavailable(503, f"event bus refused the event: Kafka refused the request that "
                                                  f"carried it as too large ({error}) and the topic's "
                                                  f"max.message.bytes could not be read again to tell whether "
                                                  f"this record is the one; it was not published, a retry is safe "
                                                  f"({where})"))
        elif size > pub.max_record:
            out.set_exception(BusUnavailable(413, f"payload too large for the event bus: Kafka refused its record "
                                                  f"of {size} bytes ({error}: the topic's max.message.bytes now "
                                                  f"takes records up to {pub.max_record}); it was not published "
                                                  f"({where})"))
        else:
            out.set_exception(BusUnavailable(503, f"event bus refused the event because Kafka refused the request "
                                                  f"that carried it as too large ({error}: a record sent with it "
                                                  f"over the topic's max.message.bytes, or the records sent "
                                                  f"together over it); this one fits, it was not published, a retry "
                                                  f"is safe ({where})"))

    check = pub.check_limit()
    timer = asyncio.get_running_loop().call_later(pub.timeout, decide)
    check.add_done_callback(decide)


REQUEST_TIMEOUT_MS = 120_000  # the bus producers' aiokafka request timeout (see KafkaPublisher.start)


async def ensure_topic(options: dict[str, Any], topic: str, partitions: int, replication: int,
                       max_message_bytes: int | None = None) -> int:
    """Create `topic` when missing (with max.message.bytes when given); returns its partition
    count."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        # Only describe a listed topic: describing a missing one lets the broker auto-create it
        # with its default partition count.
        if topic in await admin.list_topics():
            existing = await admin.describe_topics([topic])
            found = [t for t in existing if t.get("topic") == topic and t.get("error_code") == 0]
            if found:
                return len(found[0]["partitions"])
        brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
        configs = {"max.message.bytes": str(max_message_bytes)} if max_message_bytes else None
        response = await admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                                       replication_factor=min(replication, brokers),
                                                       topic_configs=configs)])
        if _created(response, topic):
            log.info("created topic %s", topic, extra={"fields": {"topic": topic, "partitions": partitions}})
        for _ in range(50):
            existing = await admin.describe_topics([topic])
            found = [t for t in existing if t.get("topic") == topic and t.get("error_code") == 0 and t["partitions"]]
            if found:
                return len(found[0]["partitions"])
            await asyncio.sleep(0.1)
        raise RuntimeError(f"bus topic {topic}: not visible after creation")
    finally:
        await admin.close()


def _created(response: Any, topic: str) -> bool:
    """Whether a CreateTopics `response` says `topic` was created (False: it existed already,
    another process made it meanwhile). Kafka answers a refusal (an invalid setting, a topic
    policy, no CREATE right) with an error code in the response, which aiokafka returns, not
    raises: taken for a success, the next look at the topic made a broker with auto-creation on
    create it with its own defaults (one partition), nothing said. Raised as its KafkaError."""
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    for name, code, *message in response.topic_errors:  # v1 and later: the broker's message too
        if name != topic or code == 0:
            continue
        if code == TopicAlreadyExistsError.errno:
            return False
        error = for_code(code)
        why = (message[0] if message else None) or error.description
        raise error(f"Kafka refused to create topic {topic}: {error.message}: {why}")
    return True


async def topic_configs(options: dict[str, Any], topic: str, names: tuple[str, ...]) -> dict[str, str]:
    """The settings `names` of `topic` as Kafka states them (its own, or the broker's it
    inherits); a name Kafka does not state is left out."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    found: dict[str, str] = {}
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        for response in await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]):
            for error_code, _message, _type, name, entries in response.resources:
                if error_code == 0 and name == topic:
                    found.update((e[0], e[1]) for e in entries if e[0] in names and e[1] is not None)
    finally:
        await admin.close()
    return found


# What a record batch holds besides one record's value: batch and record framing, the key (a
# workspace id) and the position header.
_BATCH_FRAMING = 1024
# aiokafka's max_batch_size: the bytes of a partition's records sent together, unless the
# topic takes less (KafkaPublisher.apply_limit).
_BATCH_BYTES = 16384
# Seconds between two reads of the topic's max.message.bytes while it is below what the
# publisher read at start (lowered under it): raised again, larger records are taken again.
_LIMIT_RECHECK = 30.0


class KafkaPublisher:
    """Writes events to the topic; `send` returns the seq once Kafka has the record (acks=all).

    `available()` says whether Kafka takes records now. The idempotent producer retries a
    record until Kafka has it, so an outage shows only as records waiting: the publisher counts
    Kafka unavailable when a record has waited `bus.publish_timeout` without any acknowledgement,
    or when the cluster does not answer the metadata request its watch sends every second (an
    idle publisher, such as an ingest whose feeds are quiet, would otherwise not notice)."""

    def __init__(self, cfg: Config, client_id: str):
        self.cfg = cfg
        self.topic = cfg.bus.topic
        self.client_id = client_id
        self.partitions = 0
        self.published = 0
        self.max_record = cfg.bus.max_record_bytes
        self.batch_bytes = _BATCH_BYTES
        self._start_record = self.max_record  # max_record as read at start (apply_limit)
        self._start_batch = _BATCH_BYTES  # batch_bytes as read at start
        self._limit_check: asyncio.Task[bool] | None = None
        self._limit_checked = 0.0  # monotonic time of the last read of the topic's limit
        self._limit_check_refused = False  # the read under way was asked for by a refusal
        # A limit lowered under the process (read again after Kafka refused a record as too
        # large) lowers max_record too. The ingest's is False: a change over it is read again
        # until the operator raises the limit back, rather than skipped (docs/scale-out.md).
        self.follow_limit = True
        self.timeout = cfg.bus.publish_timeout
        self.options: dict[str, Any] = {}
        self._producer = None
        self._watch_task: asyncio.Task | None = None
        self._unreachable = ""  # why the last metadata request failed ("" when it succeeded)
        self._waiting = 0  # records handed to the producer, not yet acknowledged or failed
        self._progress = 0.0  # monotonic time of the last acknowledgement (or of the first wait)
        self._was_available = True
        self._refused = False  # Kafka refused a record: the producer must be renewed (_renew)
        self._regrow = False  # the topic takes larger batches again: renewed too, for throughput
        self._grown = 0  # partition count of the topic once it had more than at start
        self._renewing = asyncio.Lock()
        self._renew_task: asyncio.Task | None = None
        self.closing = False  # close() began: what is handed over now is refused (SHUTTING_DOWN)

    async def start(self) -> None:
        from aiokafka.errors import KafkaError

        self.options = await client_options(self.cfg)
        try:
            self.partitions = await ensure_topic(
                self.options, self.topic, self.cfg.bus.partitions, self.cfg.bus.replication_factor,
                max_message_bytes=self.max_record + RECORD_OVERHEAD,
            )
        except KafkaError as exc:
            # The process's first word with Kafka: the client's own message ("Unable to
            # bootstrap from [...]") names no setting, and reads the same for a refused password
            # or an untrusted certificate as for a broker that is down.
            from aiokafka.errors import KafkaConnectionError

            why = await self._diagnosis(exc) if isinstance(exc, KafkaConnectionError) else str(exc)
            raise RuntimeError(f"event bus: Kafka at {bootstrap_of(self.cfg)} ({self._bootstrap_setting}), topic "
                               f"{self.topic}: {why}") from None
        # A topic created beforehand (auto-creation off, or by a platform team) often has the
        # broker's 1 MiB: a larger record would be refused on every retry and stall the feed
        # behind it. Records the topic cannot take are skipped with history_gap instead.
        configs = await topic_configs(self.options, self.topic, ("max.message.bytes", "cleanup.policy"))
        if "compact" in configs.get("cleanup.policy", ""):
            # Compaction keeps only the last record of each key (a workspace): the events read
            # back by a node starting, or by a resume from before the node's memory, would be
            # gone without a history_gap.
            raise RuntimeError(
                f"event bus: topic {self.topic} has cleanup.policy={configs['cleanup.policy']}: compaction deletes "
                "all but each workspace's last event, which starting nodes and resumes read back; give the topic "
                "cleanup.policy=delete (retention by time or size)")
        limit = int(configs["max.message.bytes"]) if "max.message.bytes" in configs else None
        if limit is not None and limit - _BATCH_FRAMING < self.max_record:
            log.warning("bus topic %s takes records up to %d bytes (max.message.bytes), less than "
                        "bus.max_record_bytes %d: larger changes are skipped with history_gap; raise the "
                        "topic's max.message.bytes to %d to carry them", self.topic, limit, self.max_record,
                        self.max_record + RECORD_OVERHEAD,
                        extra={"fields": {"topic": self.topic, "max_message_bytes": limit,
                                          "max_record_bytes": self.max_record, "client": self.client_id}})
        self.apply_limit(limit)
        self._start_record, self._start_batch = self.max_record, self.batch_bytes
        self._producer = await self.new_producer()
        self._watch_task = asyncio.create_task(self._watch(), name="rtserver-bus-watch")

    async def new_producer(self, **settings: Any) -> Any:
        """A started producer for the topic, idempotent, with `settings` on top (the ingest's
        transactional id: bus_txn)."""
        from aiokafka import AIOKafkaProducer

        if self._limit_check is not None:
            await asyncio.shield(self._limit_check)  # its batches fit what the read finds
        producer = AIOKafkaProducer(
            **self.options,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,  # a retried send is written once, in order
            linger_ms=0,
            # What the settings allow, not max_record, which follows the topic's limit
            # (apply_limit) and is checked before sending: raised again, it exceeded this.
            max_request_size=self.cfg.bus.max_record_bytes + RECORD_OVERHEAD,
            # Kafka refuses a batch over the topic's max.message.bytes whole: records that each
            # fit were refused together when sent together (a topic under 16 KiB).
            max_batch_size=self.batch_bytes,
            # Also how long a batch may wait for a partition leader before aiokafka drops it
            # (40 s by default): Kafka coming back from a longer outage elects leaders first, and
            # a dropped batch is lost (a publish answered 504) or read again by a restarted feed
            # (duplicates). Kafka's own clients give a record 120 s (delivery.timeout.ms).
            request_timeout_ms=REQUEST_TIMEOUT_MS,
            **settings,
        )
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        producer.client.add_topic(self.topic)  # else each metadata request asks for every topic
        return producer

    def apply_limit(self, limit: int | None, records: bool = True) -> None:
        """The topic's max.message.bytes as Kafka states it (None: not stated): a partition's
        records sent together stay under it, and with `records` a record over it, less the
        batch's framing, is refused before it is sent (max_record)."""
        configured = self.cfg.bus.max_record_bytes
        if records:
            self.max_record = configured if limit is None else min(configured, max(0, limit - _BATCH_FRAMING))
        self.batch_bytes = _BATCH_BYTES if limit is None else max(1, min(_BATCH_BYTES, limit))

    def check_limit(self, refused: bool = True) -> asyncio.Task[bool]:
        """The read of the topic's max.message.bytes under way, or a new one: True once read
        (and applied: apply_limit), False when Kafka did not say. The next producer (_renew)
        batches under what it finds. After a refusal (`refused`) a periodic read begun before
        it is not reused: it may predate the lowering that caused the refusal."""
        task = self._limit_check
        if task is None or task.done() or (refused and not self._limit_check_refused):
            self._limit_check = task = asyncio.ensure_future(self._read_limit())
            self._limit_check_refused = refused
        return task

    async def _read_limit(self) -> bool:
        self._limit_checked = time.monotonic()
        try:
            configs = await asyncio.wait_for(topic_configs(self.options, self.topic, ("max.message.bytes",)),
                                             self.timeout)
        except Exception as exc:  # noqa: BLE001 - Kafka's answer or none: the callers say so
            log.warning("bus: could not read the max.message.bytes of topic %s: %s", self.topic, _why(exc),
                        extra={"fields": {"topic": self.topic, "client": self.client_id}})
            return False
        before, batch = self.max_record, self.batch_bytes
        self.apply_limit(int(configs["max.message.bytes"]) if "max.message.bytes" in configs else None,
                         records=self.follow_limit)
        if self.max_record != before:
            lowered = self.max_record < before
            (log.warning if lowered else log.info)(
                "bus topic %s now takes records up to %d bytes (its max.message.bytes less framing), %d before%s",
                self.topic, self.max_record, before, ": larger events are refused 413 before they are sent"
                if lowered else "", extra={"fields": {"topic": self.topic, "max_record_bytes": self.max_record,
                                                      "before": before, "client": self.client_id}})
        if self.batch_bytes > batch and self._producer is not None:
            self._regrow = True  # the next enqueue() starts a producer that batches as much again
        return True

    async def _renew(self) -> None:
        """A new producer after Kafka refused a record. aiokafka's idempotent producer gave the
        refused batch its sequence numbers and never takes them back: every later batch for that
        partition is refused too (OutOfOrderSequenceNumber), for good. The old producer first
        settles what it holds, so the records of one partition stay in order. Also made when
        the topic's limit, lowered, was raised again (_regrow): the producer's batches grow back."""
        async with self._renewing:
            old = self._producer
            if not (self._refused or self._regrow) or old is None:
                return
            if self._refused:
                log.warning("bus: Kafka refused a record; starting a new producer",
                            extra={"fields": {"topic": self.topic, "client": self.client_id}})
            with contextlib.suppress(Exception):
                await old.flush()
            self._producer = await self.new_producer()
            self._refused = self._regrow = False
            await stop_client(old, "bus producer", {"topic": self.topic, "client": self.client_id})

    async def _watch(self) -> None:
        """Ask the cluster for the topic's metadata every second (see the class docstring)."""
        while True:
            producer = self._producer  # _renew may replace it
            assert producer is not None
            client = producer.client
            try:
                # shielded by aiokafka: a timeout here does not cancel the update itself
                ok = await asyncio.wait_for(client.force_metadata_update(), self.timeout)
                if not ok:
                    # A connection the broker had closed fails the request at once, and aiokafka
                    # opens a new one only for the next: a broker that ends SASL sessions
                    # (connections.max.reauth.ms; aiokafka never re-authenticates) did so on
                    # every lifetime, and each time the bus answered publishes 503 for a second.
                    ok = await asyncio.wait_for(client.force_metadata_update(), self.timeout)
                why = "" if ok else _NO_ANSWER
            except TimeoutError:
                why = f"no metadata answer within {self.timeout:g}s"
            if not why:
                available = client.cluster.available_partitions_for_topic(self.topic) or ()
                if len(available) < self.partitions:
                    why = f"{self.partitions - len(available)} of {self.partitions} partitions have no leader"
                self._check_partition_count(len(client.cluster.partitions_for_topic(self.topic) or ()))
            self._unreachable = why
            detail = ""
            if why == _NO_ANSWER and self._was_available:
                # About to warn: is it the credentials or the certificate (revoked, rotated)
                # rather than Kafka down? Only for the log: a publisher's 503 does not say.
                found = await self._diagnosis(why)
                detail = "" if found == why else found
            self._log_transition(detail)
            if ((self.max_record < self._start_record or self.batch_bytes < self._start_batch) and not why
                    and time.monotonic() - self._limit_checked > _LIMIT_RECHECK):
                self.check_limit(refused=False)  # lowered under this process: raised again since?
            await asyncio.sleep(_PROBE_INTERVAL)

    @property
    def _bootstrap_setting(self) -> str:
        return "bus.kafka_bootstrap" if self.cfg.bus.kafka_bootstrap else "audit.kafka_bootstrap"

    async def _diagnosis(self, error: BaseException | str) -> str:
        """What a probe connection finds of `error` (rtserver.kafka_diagnosis), naming the settings."""
        from rtserver.kafka_diagnosis import explain

        return await explain(self.options, error, bootstrap_setting=self._bootstrap_setting,
                             cafile=self.cfg.audit.ssl_cafile, certfile=self.cfg.audit.ssl_certfile)

    def _check_partition_count(self, count: int) -> None:
        """Partitions added to the live topic: this process keeps every workspace where it was
        (enqueue pins the partition, nodes read the first self.partitions), but a process
        started from now on would hash over `count` partitions. Said loudly, once."""
        if count > self.partitions and count != self._grown:
            self._grown = count
            log.error("bus topic %s now has %d partitions, %d when this process started: this process keeps "
                      "workspaces on their partitions, but one started now would move them (their seq would go "
                      "back, nodes would disagree); bring the topic back to %d partitions (re-create it) before "
                      "restarting any rtserver process", self.topic, count, self.partitions, self.partitions,
                      extra={"fields": {"topic": self.topic, "partitions": count, "read": self.partitions,
                                        "client": self.client_id}})

    def available(self) -> bool:
        """False while Kafka does not take records (see the class docstring)."""
        return not self.problem()

    def problem(self) -> str:
        """Why Kafka counts as unavailable, or "" when it takes records."""
        if self._producer is None:
            return f"bus topic {self.topic}: publisher not started"
        if self._unreachable:
            return f"Kafka at {bootstrap_of(self.cfg)} unavailable for topic {self.topic}: {self._unreachable}"
        if self._waiting and time.monotonic() - self._progress > self.timeout:
            return (f"Kafka has acknowledged none of {self._waiting} waiting records of topic {self.topic} "
                    f"for {time.monotonic() - self._progress:.0f}s")
        return ""

    def _log_transition(self, detail: str = "") -> None:
        problem = self.problem()
        if bool(problem) == self._was_available:
            self._was_available = not problem
            if problem:
                log.warning("bus: %s%s", problem, f" ({detail})" if detail else "",
                            extra={"fields": {"topic": self.topic, "client": self.client_id}})
            else:
                log.info("bus: Kafka takes records again", extra={"fields": {"topic": self.topic, "client": self.client_id}})

    def status(self) -> dict[str, Any]:
        problem = self.problem()
        return {"connected": not problem, "waiting": self._waiting, "error": problem,
                "partitions_added": self.partitions_added()}

    def partitions_added(self) -> int:
        """Partitions added to the topic since this process started (see _check_partition_count)."""
        return self._grown - self.partitions if self._grown else 0

    def _settled(self, fut: asyncio.Future) -> None:
        self._waiting -= 1
        self._progress = time.monotonic()
        if not fut.cancelled() and fut.exception() is not None:
            self._refused = True  # the next enqueue() starts a new producer (_renew)
            if is_too_large(fut.exception()):
                self.check_limit()  # lowered under this process: the new producer batches under it

    async def send(self, workspace: str, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> int:
        meta = await (await self.enqueue(workspace, value, headers))
        return meta.offset + 1

    async def enqueue(self, workspace: str, value: bytes,
                      headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future:
        """Hand a record to the producer's batch; the future resolves once Kafka has it. Waits
        while the partition's batch is full (Kafka away), however long."""
        if self.closing:
            raise self.stopped(workspace)
        if self._refused or self._regrow:
            await asyncio.shield(self._renewal())
        producer = self._producer
        if producer is None:
            raise RuntimeError(f"bus topic {self.topic}: publisher not started (workspace {workspace})")
        fut = await send_waiting(producer, self.topic, self.partitions, workspace, value, headers, self.client_id)
        self.published += 1
        if not self._waiting:
            self._progress = time.monotonic()  # an outage counts from the first record waiting
        self._waiting += 1
        fut.add_done_callback(self._settled)
        return fut

    def _renewal(self) -> asyncio.Task:
        """The one renewal under way: shielded by its callers, so a publish given up (its
        timeout) does not leave a producer half made."""
        if self._renew_task is None or self._renew_task.done():
            self._renew_task = asyncio.ensure_future(self._renew())
        return self._renew_task

    async def publish_gap(self, workspace: str, source: str, reason: str) -> int:
        return await self.send(workspace, gap_record(source, reason))

    def stopped(self, workspace: str) -> BusUnavailable:
        """The refusal of a record this publisher cannot send any more: the node stops."""
        return BusUnavailable(503, f"not published: {SHUTTING_DOWN} (workspace {workspace})")

    async def close(self) -> None:
        self.closing = True
        watch, self._watch_task = self._watch_task, None
        await cancel_and_wait(watch, what=f"bus publisher watch of {self.topic}")
        await cancel_and_wait(self._renew_task, quiet=True)  # it may wait for Kafka (flush)
        await cancel_and_wait(self._limit_check, quiet=True)
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()


async def send_waiting(producer: Any, topic: str, partitions: int, workspace: str, value: bytes,
                       headers: list[tuple[str, bytes]] | None, client: str) -> asyncio.Future:
    """`producer.send` of a workspace's record to its partition; waits while the partition's
    batch is full (Kafka away), however long. The future resolves once Kafka has the record."""
    from aiokafka.errors import KafkaTimeoutError

    while True:
        try:
            # The partition of the count read at start, not the producer's current one: a
            # partition added to the live topic would move the workspace where no node reads
            # and its seq would go back (KafkaPublisher._watch says so).
            return await producer.send(topic, value, key=workspace.encode(), headers=headers,
                                       partition=partition_for(workspace, partitions))
        except KafkaTimeoutError:
            # The batch stayed full for aiokafka's request timeout (120 s) and this record was
            # not added. Failing here would make a source read its transaction again and
            # publish twice the records already batched: wait on, as drain() does.
            log.warning("bus: Kafka has not taken the pending batch yet; still waiting",
                        extra={"fields": {"topic": topic, "workspace": workspace, "client": client}})


class KafkaBus:
    """A gateway node's bus (see the module docstring)."""

    def __init__(self, cfg: Config, hub: Hub, metrics: Metrics, node: str):
        self.cfg = cfg
        self.hub = hub
        self.node = node
        self.topic = cfg.bus.topic
        self.max_lag = cfg.bus.max_lag
        self.publisher = KafkaPublisher(cfg, f"rtserver-node-{node}")
        self._fetch_bytes = cfg.bus.max_record_bytes + RECORD_OVERHEAD  # a record as large as the topic takes
        self._consumer = None
        self._task: asyncio.Task | None = None
        self._floor: dict[int, int] = {}  # partition -> first offset this node read (seq floor)
        self._next: dict[int, int] = {}  # partition -> next offset to deliver
        self._tps: list[Any] = []  # the topic's partitions, as aiokafka names them
        self._target: dict[int, int] = {}  # partition -> end offset at start: caught up once reached
        self._caught_up = False
        self._connected = False
        self._last_error = ""
        self._broken = ""  # why this node cannot serve right until it restarts (_out_of_range)
        self._delivered = 0
        self._read_backs = asyncio.Semaphore(_MAX_CONCURRENT_READ_BACKS)
        self._progressed = asyncio.Event()  # set after each batch the consumer delivered (catch_up)
        self._stopping: set[asyncio.Task] = set()
        # A workspace history created on this node starts at its partition's floor, not at the
        # wall clock (seq is a Kafka offset here).
        hub.history_floor = self._history_floor
        hub.retired_floor = self._history_floor
        hub.on_forgotten = self._forgot
        hub.read_position = self.read_position
        self._forgotten: dict[int, int] = {}  # partition -> highest position of a forgotten retired workspace
        metrics.add_gauges(self._gauges, counters=("rt_bus_delivered",))

    # -- EventBus --------------------------------------------------------------------------

    async def publish(self, event: Event) -> int:
        """To Kafka only: this node's consumer delivers it like every other node's (see submit)."""
        seq = await self.submit(event)
        return await seq

    async def submit(self, event: Event) -> asyncio.Future[int]:
        """Hand `event` to the producer; returns once it is in the partition's batch (a later
        submit of the workspace is written after it) with a future of its seq, Kafka's
        acknowledgement. The publish API answers pipelined requests from these futures in
        request order, so the records of one publisher travel together instead of one Kafka
        round trip each.

        Refused with BusUnavailable 400 for an event that cannot be encoded (a payload nesting
        too deeply), 413 for one whose record is larger than the topic takes (as read at start),
        and 503 while Kafka is unavailable, or when the batch stays full
        for bus.publish_timeout. Sent but not acknowledged within bus.publish_timeout, the
        future fails with BusUnavailable 504: the outcome is unknown (the producer writes it
        once Kafka is back, unless the batch outlives the producer's request timeout, 120 s,
        while the partition has no leader), and the publisher is told so rather than kept
        waiting for the outage's length; the outcome is logged when it is known."""
        self._check_available(event.workspace)
        return await self._send(event.workspace, self._record(event))

    async def submit_many(self, events: Sequence[Event],
                          stopped: Callable[[], bool]) -> Sequence[int | asyncio.Future[int]]:
        """submit of each event in order, checked before any is sent: an event that cannot be
        carried refuses the whole batch (BusUnavailable naming it, `index`), and so does a
        first event that cannot be sent. Once some are sent, an event that cannot be sent
        has its future fail (503), and so have the events after it, which are not sent (a
        publisher retrying them keeps their order). `stopped` is not asked: a draining node's
        events reach the other nodes' subscribers."""
        if not events:
            return []
        self._check_available(events[0].workspace)
        values = []
        for i, event in enumerate(events):
            try:
                values.append(self._record(event))
            except BusUnavailable as exc:
                exc.index = i
                raise
        out: list[int | asyncio.Future[int]] = []
        for i, (event, value) in enumerate(zip(events, values, strict=True)):
            try:
                out.append(await self._send(event.workspace, value))
            except BusUnavailable as exc:
                if not out:
                    exc.index = 0
                    raise
                out += not_published(1, str(exc), exc.status)
                out += not_published(len(events) - i - 1, f"not sent: events[{i}] before it could not be sent "
                                                          "(a retry is safe)")
                break
        return out

    def _check_available(self, workspace: str) -> None:
        problem = self.publisher.problem()
        if problem:
            raise BusUnavailable(503, f"{UNAVAILABLE}; the event was not published "
                                      f"(workspace {workspace}, bus topic {self.topic})")

    def _record(self, event: Event) -> bytes:
        """`event`'s bus record; BusUnavailable 400 or 413 when the bus cannot carry it."""
        try:
            value = encode_event(event)
        except RecursionError:
            # The publish API decoded the payload a few calls up the stack; one nesting just
            # under the decoder's limit cannot be encoded down here (it was a 500 and an ERROR
            # traceback): refused as one nesting deeper still is.
            raise BusUnavailable(400, "body is not valid JSON: JSON nests too deeply for the event bus; the "
                                      f"event was not published (workspace {event.workspace})") from None
        max_record = self.publisher.max_record
        if len(value) > max_record:
            # Kafka would refuse it at every retry: a 503 (retry-safe) had its publisher repeat
            # it forever, each refusal also costing a new producer (_renew).
            raise BusUnavailable(413, f"payload too large for the event bus: its record is {len(value)} bytes, the "
                                      f"events topic takes {max_record} (bus.max_record_bytes, or the topic's "
                                      f"max.message.bytes when smaller); the event was not published (workspace "
                                      f"{event.workspace}, bus topic {self.topic})")
        return value

    async def _send(self, workspace: str, value: bytes) -> asyncio.Future[int]:
        from aiokafka.errors import KafkaError

        pub = self.publisher
        try:
            # Usually in the batch at once; otherwise waiting for room (or a new producer).
            # Cancelling send() (buffer full while Kafka is away) drops the record: not sent.
            finished, ack = run_now(pub.enqueue(workspace, value))
            if not finished:
                ack = await asyncio.wait_for(ack, pub.timeout)
        except (TimeoutError, KafkaError) as exc:
            if pub.closing:  # the node stops: its producer closed under the send
                raise pub.stopped(workspace) from exc
            why = (f"Kafka took no record for {pub.timeout:g}s (bus.publish_timeout)" if isinstance(exc, TimeoutError)
                   else type(exc).__name__)  # its text may name a broker
            raise BusUnavailable(503, f"event bus unavailable ({why}); the event was "
                                      f"not published (workspace {workspace}, bus topic {self.topic})") from exc
        return _confirmation(ack, pub, workspace, len(value))

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        task = asyncio.ensure_future(self.publisher.publish_gap(workspace, source, reason))
        task.add_done_callback(_log_failure)

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        await self.publisher.start()
        options = self.publisher.options
        consumer = AIOKafkaConsumer(
            **options,
            client_id=f"rtserver-node-{self.node}",
            group_id=None,  # every node reads every partition
            enable_auto_commit=False,
            auto_offset_reset="none",  # records deleted before they were read: _out_of_range
            # the ingest writes in transactions (bus_txn): records of an aborted one (a fenced
            # ingest's) are never delivered
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=self._fetch_bytes,
        )
        await consumer.start()
        self._consumer = consumer
        tps = self._tps = [TopicPartition(self.topic, p) for p in range(self.publisher.partitions)]
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        h = self.cfg.history
        horizon = int((time.time() - h.seconds) * 1000)
        by_time = await consumer.offsets_for_times({tp: horizon for tp in tps})
        for tp in tps:
            # Read back one history window: by count and by age, whichever is shorter.
            start = max(begin[tp], end[tp] - h.events)
            found = by_time.get(tp)
            start = max(start, found.offset if found is not None else end[tp])
            consumer.seek(tp, start)
            self._floor[tp.partition] = start
            self._next[tp.partition] = start
            self._target[tp.partition] = end[tp]
        self._connected = True
        self._task = asyncio.create_task(self._run(), name="rtserver-bus-consumer")
        self._task.add_done_callback(self._consumer_ended)
        log.info("bus consumer started", extra={"fields": {"topic": self.topic, "partitions": len(tps),
                                                           "read_back": sum(end[t] - self._floor[t.partition] for t in tps)}})

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task, what=f"bus consumer of {self.topic}")
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_client(consumer, "bus consumer", {"topic": self.topic})
        await self.publisher.close()
        for t in list(self._stopping):
            with contextlib.suppress(Exception):
                await t

    # -- the consumer ----------------------------------------------------------------------

    async def _run(self) -> None:
        from aiokafka.errors import KafkaError, OffsetOutOfRangeError

        consumer = self._consumer
        assert consumer is not None
        deliver = self.hub.deliver
        taken = 0
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                self._connected = True
            except asyncio.CancelledError:
                raise
            except OffsetOutOfRangeError as exc:
                positions = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                try:
                    await self._out_of_range(consumer, positions)
                except KafkaError as err:  # Kafka away: the next fetch raises this again
                    log.warning("bus consumer: %s", err, extra={"fields": {"topic": self.topic}})
                    await asyncio.sleep(0.5)
                continue
            except KafkaError as exc:
                self._connected = False
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning("bus consumer: %s", exc, extra={"fields": {"topic": self.topic}})
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                for r in records:
                    self._next[tp.partition] = r.offset + 1
                    try:
                        rec, event = decode_record(r.key, r.value)
                    except ForeignRecord as exc:
                        log.error("bus record skipped: %s", exc,
                                  extra={"fields": record_fields(self.topic, tp.partition, r.offset, r.key)})
                        continue
                    try:
                        self._take(rec, event, r.offset + 1, deliver)
                    except Exception:  # noqa: BLE001 - one record must not stop this node's only consumer
                        log.exception("bus record could not be delivered; skipped",
                                      extra={"fields": record_fields(self.topic, tp.partition, r.offset, r.key)})
                    # A fetch holds up to 2,000 records: delivered in one step, they held the loop
                    # (every subscriber's push of each) and queued all their frames past the
                    # backlog bound. Each waits for room, as the memory bus's events do, and the
                    # clients get a turn every YIELD_EVERY records (sources.base).
                    taken += 1
                    if self.hub.backlogged():
                        await self.hub.room()
                    elif taken % YIELD_EVERY == 0:
                        await asyncio.sleep(0)
            # Past the last record read: a transaction's commit marker takes an offset of its own,
            # and a partition may end with one (the lag and catching up count to the end).
            for tp in self._tps:
                with contextlib.suppress(Exception):
                    self._next[tp.partition] = max(self._next[tp.partition], await consumer.position(tp))
            if batches:
                self._progressed.set()
                self._progressed = asyncio.Event()
            # getmany returns buffered records without suspending: while catching up, let the
            # connections, health checks and upgrades in between batches, and wait while the
            # writes to clients are behind (the topic keeps what is not read yet).
            if self.hub.backlogged():
                await self.hub.room()
            else:
                await asyncio.sleep(0)
            if not self._caught_up and all(self._next[p] >= t for p, t in self._target.items()):
                self._caught_up = True
                log.info("bus consumer caught up", extra={"fields": {"topic": self.topic, "events": self._delivered}})

    async def _out_of_range(self, consumer: Any, positions: dict[Any, int]) -> None:
        """The topic no longer holds the records this node was to read next (retention deleted
        them while it was behind): they are lost to this node. Kafka's consumer would go on from
        the oldest record kept without a word (auto_offset_reset); here every subscriber of the
        partition's workspaces gets history_gap, their histories vouch only for what follows
        (a resume from before the loss gets history_gap too), and reading goes on from there."""
        begin = await consumer.beginning_offsets(list(positions))
        n = len(self._floor)
        for tp, fetched in positions.items():
            first, p = begin[tp], tp.partition
            fields = {"topic": self.topic, "partition": p, "fetch_offset": fetched, "oldest_offset": first}
            if fetched < first:
                reason = (f"records {fetched}..{first - 1} of partition {p} of bus topic {self.topic} were deleted "
                          "(retention) before this node read them")
                # First: where a history created, or brought back from retirement, from now on starts.
                self._floor[p] = max(self._floor[p], first)
                hit = await self.hub.stream_lost(lambda wid, p=p: partition_for(wid, n) == p, first, reason)
                log.error("bus: events lost to this node: %s", reason, extra={"fields": {**fields, "workspaces": hit}})
            else:
                # Fewer records than this node read already: the topic was deleted and created
                # again, or truncated. Its offsets (seq) went back; only a restart of the node
                # (which forgets the old ones) serves its workspaces right again.
                self._broken = (f"bus topic {self.topic} partition {p} ends before offset {fetched} this node read up "
                                "to: the topic was re-created or truncated; restart this node")
                log.error("bus: %s", self._broken, extra={"fields": fields})
            consumer.seek(tp, first)
            self._next[p] = first

    def _consumer_ended(self, task: asyncio.Task) -> None:
        """The consumer loop ends only when the bus closes; otherwise this node gets no events
        any more: not ready (ready() checks the task), and said loudly."""
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._last_error = f"bus consumer stopped: {type(exc).__name__}: {exc}"
            log.error("bus consumer stopped; this node gets no events", exc_info=exc,
                      extra={"fields": {"topic": self.topic}})

    def _take(self, rec: BusRecord, event: Event, seq: int, deliver: Callable[[Event, int], int]) -> None:
        workspace = event.workspace
        if rec.operation == GAP:
            # Held or not: a history created later starts at its partition's floor, which may
            # be before this record (one read at start), and must know of the loss.
            held = self.hub.workspace(workspace)
            if seq > held.history.last_seq:
                self.hub.history_gap(workspace, rec.source, rec.body.decode("utf-8", "replace"), seq)
            return
        ws = self.hub.workspace(workspace)
        if seq <= ws.history.last_seq:
            return  # already read (a workspace created mid-batch sees nothing twice)
        deliver(event, seq)
        self._delivered += 1

    def _history_floor(self, wid: str) -> int | None:
        if not self._floor:
            return None
        # Everything after the partition position this node started from passes through
        # this history, unless an earlier history of the workspace was retired and forgotten.
        p = partition_for(wid, len(self._floor))
        return max(self._floor[p], self._forgotten.get(p, 0))

    def read_position(self, wid: str) -> Callable[[], int]:
        """How far this node has read `wid`'s partition, as the seq of the last record read:
        every event of `wid` up to it was delivered (_run sets the position before it delivers
        a record, without yielding in between). The position a quiet workspace shows in `pong`
        and `subscribed`: another node resumes from it without reading back the records of the
        other workspaces of the partition (it waits until it has read that far: catch_up)."""
        if not self._floor:
            return lambda: 0
        nxt, p = self._next, partition_for(wid, len(self._floor))
        return lambda: nxt[p]

    def _forgot(self, wid: str, position: int) -> None:
        """The hub forgot a retired workspace's position (MAX_RETIRED): what it had seen up to
        `position` a new history cannot vouch for, and which workspace it was no longer shows,
        so every history of that partition created from now on starts there at the lowest."""
        if self._floor:
            p = partition_for(wid, len(self._floor))
            if position > self._forgotten.get(p, 0):
                self._forgotten[p] = position

    # -- health ----------------------------------------------------------------------------

    def lags(self, readable: bool = False) -> dict[int, int]:
        """Records of each partition not delivered yet: up to the high watermark, so records
        held back behind an open transaction (a dead ingest's, until it is aborted) count; with
        `readable`, up to the last stable offset, what this node could read now."""
        consumer = self._consumer
        out = {}
        for p, nxt in self._next.items():
            hw = None
            if consumer is not None:
                from aiokafka import TopicPartition

                tp = TopicPartition(self.topic, p)
                with contextlib.suppress(Exception):
                    hw = consumer.highwater(tp)
                    stable = consumer.last_stable_offset(tp) if readable else None
                    if stable is not None and stable >= 0 and hw is not None:
                        hw = min(hw, stable)
            out[p] = max(hw or 0, self._target.get(p, 0)) - nxt
        return out

    def lag(self, readable: bool = False) -> int:
        return sum(max(0, v) for v in self.lags(readable).values())

    def ready(self) -> bool:
        """Accepting connections: consuming, caught up since start, and not too far behind.
        Behind what it could read: records an open transaction holds back are held back from
        every node alike, and turned them all away at once (the lag still shows them)."""
        return (self._task is not None and not self._task.done() and not self._broken and self._caught_up and self._connected and self.publisher.available()
                and self.lag(readable=True) <= self.max_lag)

    def status(self) -> dict[str, Any]:
        # Kafka's consumer retries quietly through an outage: the publisher's watch says it.
        problem = self.publisher.problem()
        return {
            "kind": "kafka",
            "topic": self.topic,
            "ready": self.ready(),
            "caught_up": self._caught_up,
            "connected": self._connected and not problem,
            "lag": self.lag(),
            "max_lag": self.max_lag,
            "delivered": self._delivered,
            "published": self.publisher.published,
            "last_error": self._broken or problem or self._last_error,
            "partitions_added": self.publisher.partitions_added(),
        }

    def _gauges(self) -> list[tuple[str, str, dict[str, Any], float]]:
        rows: list[tuple[str, str, dict[str, Any], float]] = [
            (
                "rt_bus_consumer_lag",
                "Events-topic records not yet delivered by this node",
                {"topic": self.topic, "partition": p},
                max(0, v),
            )
            for p, v in sorted(self.lags().items())
        ]
        rows.append(("rt_bus_ready", "1 while this node accepts connections (bus lag within bound)", {}, 1 if self.ready() else 0))
        rows.append(("rt_bus_delivered", "Events delivered from the bus since start", {}, self._delivered))
        return rows

    # -- resume from Kafka -----------------------------------------------------------------

    def behind(self, workspace: str, since: int) -> bool:
        """True when a client's `since` (seen on another node, say) is past what this node has
        read of the workspace's partition."""
        if not self._floor:
            return False
        return self._next[partition_for(workspace, len(self._floor))] < since

    async def catch_up(self, workspace: str, since: int, cancelled: Callable[[], bool]) -> None:
        """Wait until this node has delivered the workspace's records up to seq `since`, when
        the topic has them (a `since` the topic never had is not waited for); returns without
        yielding after its last check of behind()."""
        from aiokafka import TopicPartition

        consumer = self._consumer
        if consumer is None or not self.behind(workspace, since):
            return
        tp = TopicPartition(self.topic, partition_for(workspace, len(self._floor)))
        try:
            end = (await consumer.end_offsets([tp]))[tp]
        except Exception as exc:  # noqa: BLE001 - Kafka away: the wait below is bounded by it
            log.warning("bus: end offset unknown: %s", exc, extra={"fields": {"topic": self.topic, "workspace": workspace}})
            end = since
        if end < since:
            return  # a position this topic never had (another deployment's): nothing to wait for
        while self.behind(workspace, since) and not cancelled() and self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):  # now and then: the connection may have closed
                await asyncio.wait_for(self._progressed.wait(), 1.0)

    def can_read_back(self, workspace: str, since: int) -> bool:
        """True when the records after `since` that this node's memory lacks may be in Kafka."""
        return self._consumer is not None and since >= 0

    async def read_back(
        self,
        workspace: str,
        since: int,
        floor: Callable[[], int],
        emit: Callable[[int, Event], None],
        cancelled: Callable[[], bool],
        room: Callable[[], Awaitable[None]] | None = None,
        gap_first: Callable[[int], None] | None = None,
    ) -> tuple[int, int | None, frozenset[str]]:
        """Read `workspace`'s records with seq > `since` from Kafka, in order, calling
        `emit(seq, event)`, until the read position reaches `floor()` (the node's memory holds
        the rest). Returns (the seq read up to, or `since` when nothing could be read; the
        `oldest` seq for a history_gap when the topic no longer holds some of them, else None;
        the sources whose gap records were read: they lost changes after `since`).
        Returns without awaiting after its last check of `floor()`, so the caller can switch
        to the memory history in the same step. `room` is awaited before each fetch and after
        every _READ_BACK_ROOM_BYTES emitted: the reader's connection takes what was emitted
        before more is (a read-back larger than the send buffer, emitted at once, closed a
        client that read at full speed with 1013). `gap_first(oldest)` is called before the
        first record is emitted when the topic no longer holds some of them: history_gap comes
        first (PROTOCOL.md §7)."""
        from aiokafka import TopicPartition

        tp = TopicPartition(self.topic, partition_for(workspace, len(self._floor)))
        key = workspace.encode()
        place = self._read_backs
        await place.acquire()
        held = True
        consumer = None
        try:
            if since >= floor() or cancelled():
                return since, None, frozenset()
            consumer = await self._read_back_consumer(tp, workspace)
            begin = (await consumer.beginning_offsets([tp]))[tp]
            gap = None
            start = since  # offset of the record right after seq `since`
            if start < begin:
                gap, start = begin + 1, begin  # deleted by retention
            if floor() - start > self.cfg.bus.max_replay:
                return since, None, frozenset()  # too far back: the caller reports a history_gap
            consumer.seek(tp, start)
            pos = start
            lost: set[str] = set()
            stalled = time.monotonic()

            async def reader_took() -> bool:
                """Wait for `room`: within _READ_BACK_HOLD with the place and the consumer,
                else without them (a reader that stopped reading held one of the node's few
                places for as long as its connection lived, and every other resume from before
                the memory waited behind it); True when the consumer was renewed at `pos`."""
                nonlocal consumer, held
                assert room is not None
                waiting = asyncio.ensure_future(room())
                try:
                    done, _ = await asyncio.wait({waiting}, timeout=_READ_BACK_HOLD)
                    if done:
                        waiting.result()
                        return False
                    self._stop_in_background(consumer, workspace)
                    consumer = None
                    place.release()
                    held = False
                    await waiting
                finally:
                    waiting.cancel()
                await place.acquire()
                held = True
                if pos >= floor() or cancelled():
                    return True
                consumer = await self._read_back_consumer(tp, workspace)
                consumer.seek(tp, pos)
                return True

            while pos < floor() and not cancelled():
                if room is not None:
                    if await reader_took():
                        stalled = time.monotonic()  # the reader's time, not Kafka's
                    if pos >= floor() or cancelled():
                        break
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=1000)
                records = batch.get(tp, [])
                if not records:
                    # past commit markers only (see _run)
                    pos = max(pos, await consumer.position(tp))
                    if pos >= floor() or cancelled():
                        break
                    if time.monotonic() - stalled > _READ_BACK_STALL:
                        return since, None, frozenset()
                    continue
                stalled = time.monotonic()
                emitted = 0
                for r in records:
                    if r.offset >= floor():
                        # Its seq is past the floor: the memory history holds it, or this
                        # node's consumer, behind this fetch, delivers it once the caller
                        # goes live (sent here too, it came twice, seq going back).
                        pos = floor()
                        break
                    pos = r.offset + 1
                    if r.key != key:
                        continue
                    try:
                        rec, event = decode_record(r.key, r.value)
                    except ForeignRecord as exc:  # the live consumer skipped it too
                        log.error("bus record skipped in a read-back: %s", exc,
                                  extra={"fields": record_fields(self.topic, tp.partition, r.offset, r.key)})
                        continue
                    if rec.operation == GAP:
                        lost.add(rec.source)
                    else:
                        if gap is not None and gap_first is not None:
                            gap_first(gap)
                            gap_first = None
                        emit(pos, event)
                        emitted += len(r.value)
                        if room is not None and emitted >= _READ_BACK_ROOM_BYTES:
                            emitted = 0
                            if await reader_took():
                                stalled = time.monotonic()
                                break  # the rest of this batch is fetched again, from `pos`
            return pos, gap, frozenset(lost)
        finally:
            if consumer is not None:
                # Stopped in the background: awaiting here would let the history move on
                # between our last check of floor() and the caller's switch to memory.
                self._stop_in_background(consumer, workspace)
            if held:
                place.release()

    async def _read_back_consumer(self, tp: Any, workspace: str) -> Any:
        """A started consumer of `tp` for a read-back (stopped by _stop_in_background)."""
        from aiokafka import AIOKafkaConsumer

        # auto_offset_reset none: records deleted between the check of the beginning and the
        # fetch raise (the caller sends history_gap) instead of being skipped in silence.
        consumer = AIOKafkaConsumer(**self.publisher.options, client_id=f"rtserver-readback-{self.node}",
                                    group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100,
                                    auto_offset_reset="none", isolation_level="read_committed",
                                    max_partition_fetch_bytes=self._fetch_bytes)
        try:
            await consumer.start()
        except BaseException:
            self._stop_in_background(consumer, workspace)
            raise
        consumer.assign([tp])
        return consumer

    def _stop_in_background(self, consumer: Any, workspace: str) -> None:
        t = asyncio.ensure_future(stop_client(consumer, "read-back consumer",
                                              {"topic": self.topic, "workspace": workspace}))
        self._stopping.add(t)
        t.add_done_callback(self._stopping.discard)


class RemoteSource:
    """A change feed read by `rtserver ingest`: on a node it only checks channels, as the feed
    would: a PostgreSQL table exists, is a table and is in the configuration; a MongoDB
    collection exists and is a collection (each on a connection of its own, opened at the first
    subscribe)."""

    def __init__(self, kind: str, url: str, schemas: list[str], tables: list[str], database: str = "",
                 allow_unknown_collections: bool = False):
        self.kind = kind
        self.url = url
        self.schemas = schemas
        self.tables = tables
        self.database = database
        self._allow_unknown = allow_unknown_collections
        self._catalog = None
        self._tables: dict[tuple[str, str], Any] | None = None  # Catalog.desired_tables(), kept briefly
        self._tables_at = 0.0
        self._mongo: Any = None  # AsyncMongoClient, made at the first check
        self._collections: Any = None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        if self._catalog is not None:
            await self._catalog.close()
        if self._mongo is not None:
            from rtserver.sources.mongo import close_client

            await close_client(self._mongo, self.database)

    async def check_channel(self, workspace: str, entity: str) -> str:
        if entity == "*":
            return "*"
        if self.kind == "mongo":
            if not valid_collection(entity):
                raise ChannelUnavailable(f"mongo:{entity}: malformed collection name (workspace {workspace})")
            if self._allow_unknown:
                return entity
            if self._collections is None:
                from pymongo import AsyncMongoClient

                from rtserver.sources.mongo import Collections

                self._mongo = AsyncMongoClient(self.url)
                self._collections = Collections(self.database, lambda: self._mongo)
            return await self._collections.check(entity)
        from rtserver.sources.pg_catalog import Catalog, unavailable
        from rtserver.sources.postgres import entity_of

        schema, _, name = entity.rpartition(".")
        schema = schema or "public"
        if not (valid_table_name(schema) and valid_table_name(name)):
            raise ChannelUnavailable(f"postgres:{entity}: malformed table name (workspace {workspace})")
        canonical = entity_of(schema, name)
        if self._catalog is None:
            self._catalog = Catalog(self.url, schemas=self.schemas, tables=self.tables, slot="", publication="")
        unconfigured = self._catalog.unconfigured(schema, name)
        if unconfigured:
            raise ChannelUnavailable(f"postgres:{canonical}: {unconfigured}")
        try:
            # the ingest does not read what is outside the configuration (refused without a
            # lookup, as by the feed: see PostgresSource.check_channel) or is no table
            why = await self._catalog.not_a_table(schema, name)
            if not why:
                unpublishable = await self._unpublishable(schema, name)  # a partition, no replica identity...
                why = unpublishable and f"table is not published: {unpublishable}"
        except Exception as exc:  # noqa: BLE001 - any database failure is the client's 4010
            raise ChannelUnavailable(unavailable(canonical, exc)) from exc
        if why:
            raise NoSuchChannel(f"postgres:{canonical}: {why}")
        return canonical

    async def _unpublishable(self, schema: str, name: str) -> str:
        """Why the ingest leaves schema.name out of its publication ("" when it does not), as
        the catalog judges every configured table: listed at most every TABLES_TTL seconds,
        since a subscribe to such a table (4010, not an invalid message) may come again and
        again."""
        now = time.monotonic()
        if self._tables is None or now - self._tables_at >= TABLES_TTL:
            self._tables = await self._catalog.desired_tables()
            self._tables_at = now
        state = self._tables.get((schema, name))
        return state.why if state is not None else ""

    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "read_by": "rtserver ingest"}


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("bus: publishing a history gap failed", exc_info=task.exception())
