"""The ingest's writes to the events topic, in Kafka transactions that fence a previous holder.

Every `rtserver ingest` of one topic writes under the same transactional id. The holder of the
lease starts its producer when it takes the lease, and Kafka then aborts the previous holder's
open transaction and refuses every later write of it (ProducerFenced). So an ingest cut off from
Kafka alone, which lost the lease while it still read its feeds, cannot land the records it had
buffered after the new holder's: they would be duplicates, out of order. Gateway nodes read the
topic with isolation_level=read_committed and never see an aborted record.

One transaction is open at a time and carries every record handed over while the one before it
committed (group commit): a record costs no round trip of its own. A record's future resolves
once its transaction committed, and `after()` runs a callback once everything handed over before
it did, in order: a feed records its position (and acknowledges it upstream) there.

Any failed transaction (fenced, aborted by Kafka after its timeout, a record refused) fails
every record not yet committed and calls `on_failed`: the ingest then gives up the lease and
joins again, so its feeds start over from what Kafka has committed, and a new producer is made
only by a holder the group has just confirmed (a producer renewed in place by a fenced ingest
would fence the real holder in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from rtserver.bus_kafka import KafkaPublisher, gap_record, send_waiting
from rtserver.tasks import cancel_and_wait

log = logging.getLogger("rtserver.bus")

# After a commit, Kafka writes the transaction's markers; a transaction that adds a partition
# before they are written is answered CONCURRENT_TRANSACTIONS and aiokafka retries after 20 ms.
# Waiting this long first (gathering records meanwhile) makes a commit cycle ~3 ms instead of
# ~25 ms (measured on the test broker: 26.6 ms back to back, 2.4 ms with 3 ms between).
_BETWEEN_TRANSACTIONS = 0.003
# Kafka aborts a transaction left open this long (its holder was killed, and no successor
# fenced it), within its 10 s check interval: until then, nodes reading committed records do not
# get past it in its partitions, custom events included. Short, as a transaction lasts
# milliseconds; a Kafka outage longer than this aborts the one in hand, and the ingest reads
# those changes again (exactly once: an aborted record is never read).
TRANSACTION_TIMEOUT_MS = 15_000
# How long closing a writer waits for Kafka to end the transaction it leaves open.
_CLOSE_ABORT_TIMEOUT = 5.0


class WriterFailed(RuntimeError):
    """A transaction of the ingest's writer failed: its records are not in Kafka."""


class _Batch:
    __slots__ = ("records", "callbacks", "results")

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, list[tuple[str, bytes]] | None, asyncio.Future]] = []
        self.callbacks: list[Callable[[], None]] = []
        self.results: list[Any] = []  # aiokafka's RecordMetadata of each record, once committed


class TransactionalWriter:
    """Writes an ingest's records to `publisher`'s topic in transactions (module docstring)."""

    def __init__(self, publisher: KafkaPublisher, transactional_id: str,
                 on_failed: Callable[[BaseException], None]):
        self.publisher = publisher
        self.topic = publisher.topic
        self.transactional_id = transactional_id
        self._on_failed = on_failed
        self._producer: Any = None
        self._pending = _Batch()  # handed over, waiting for the next transaction
        self._committing: _Batch | None = None  # in the transaction under way
        self._task: asyncio.Task | None = None
        self._failed: BaseException | None = None
        self._last_end = 0.0  # loop time the last transaction ended
        self._waiting_since = 0.0  # monotonic time the oldest uncommitted record was handed over
        self.committed = 0  # transactions committed

    @property
    def partitions(self) -> int:
        return self.publisher.partitions

    @property
    def max_record(self) -> int:
        return self.publisher.max_record

    async def start(self) -> None:
        """Start the producer under the shared transactional id: from here on, the previous
        holder's producer is fenced and its open transaction aborted."""
        self._producer = await self.publisher.new_producer(transactional_id=self.transactional_id,
                                                           transaction_timeout_ms=TRANSACTION_TIMEOUT_MS)

    # -- handing records over ----------------------------------------------------------------

    async def enqueue(self, workspace: str, value: bytes,
                      headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future:
        """Hand a record over; the future resolves (aiokafka's RecordMetadata) once the
        transaction carrying it committed, or fails with WriterFailed."""
        self._check(workspace)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieved)  # a feed stopped before its drain leaves some unawaited
        if not self._pending.records and self._committing is None:
            self._waiting_since = time.monotonic()
        self._pending.records.append((workspace, value, headers, fut))
        self._kick()
        return fut

    async def send(self, workspace: str, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> int:
        meta = await (await self.enqueue(workspace, value, headers))
        return meta.offset + 1

    async def publish_gap(self, workspace: str, source: str, reason: str) -> int:
        return await self.send(workspace, gap_record(source, reason))

    def after(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every record handed over so far is committed (at once when
        none waits); never when the writer fails first."""
        if self._failed is not None:
            return
        if self._pending.records:
            self._pending.callbacks.append(callback)
        elif self._committing is not None:
            self._committing.callbacks.append(callback)
        else:
            callback()

    def _check(self, workspace: str) -> None:
        if self._failed is not None:
            raise WriterFailed(f"bus topic {self.topic}: the ingest's Kafka transaction failed "
                               f"(workspace {workspace}): {self._failed}") from self._failed
        if self._producer is None:
            raise WriterFailed(f"bus topic {self.topic}: transactional writer not started (workspace {workspace})")

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="rtserver-bus-transactions")

    # -- the transactions --------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending.records:
                wait = self._last_end + _BETWEEN_TRANSACTIONS - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                batch, self._pending = self._pending, _Batch()
                self._committing = batch
                await self._commit(batch)
                self._committing = None
                self._last_end = loop.time()
                for (*_, fut), meta in zip(batch.records, batch.results, strict=True):
                    if not fut.done():
                        fut.set_result(meta)
                for callback in batch.callbacks:
                    callback()
                if self._pending.records:
                    self._waiting_since = time.monotonic()
        except asyncio.CancelledError:
            self._fail(WriterFailed(f"bus topic {self.topic}: writer closed"), report=False)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure fails the writer (module docstring)
            self._fail(exc, report=True)

    async def _commit(self, batch: _Batch) -> None:
        producer = self._producer
        await producer.begin_transaction()
        client = self.publisher.client_id
        sends: list[asyncio.Future] = []
        for workspace, value, headers, _fut in batch.records:
            send = await send_waiting(producer, self.topic, self.partitions, workspace, value, headers, client)
            # A later send that raises (the producer fenced meanwhile) leaves the ones before it
            # failed, with nothing to await them: once the writer was dropped, the garbage
            # collector logged each as an error ("Future exception was never retrieved").
            send.add_done_callback(_retrieved)
            sends.append(send)
        results = await asyncio.gather(*sends, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await producer.commit_transaction()
        self.committed += 1
        self.publisher.published += len(results)
        batch.results = results

    def _fail(self, exc: BaseException, report: bool) -> None:
        if self._failed is not None:
            return
        self._failed = exc
        failure = WriterFailed(f"bus topic {self.topic}: the ingest's Kafka transaction failed: "
                               f"{type(exc).__name__}: {exc}")
        for batch in (self._committing, self._pending):
            if batch is None:
                continue
            for *_, fut in batch.records:
                if not fut.done():
                    fut.set_exception(failure)
            batch.callbacks.clear()
        self._committing = None
        self._pending = _Batch()
        if report:
            self._on_failed(exc)

    # -- state -------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Records handed over and not committed yet."""
        return len(self._pending.records) + (len(self._committing.records) if self._committing else 0)

    def problem(self) -> str:
        """Why records wait, when the oldest has waited longer than bus.publish_timeout."""
        if self._failed is not None:
            return f"the ingest's Kafka transaction failed: {type(self._failed).__name__}: {self._failed}"
        waiting = self.waiting
        if waiting and time.monotonic() - self._waiting_since > self.publisher.timeout:
            return (f"Kafka has committed none of {waiting} waiting records of topic {self.topic} "
                    f"for {time.monotonic() - self._waiting_since:.0f}s")
        return ""

    async def close(self) -> None:
        """Stop: records not committed yet fail (their feeds did not acknowledge them)."""
        task, self._task = self._task, None
        await cancel_and_wait(task, quiet=True)
        self._fail(WriterFailed(f"bus topic {self.topic}: writer closed"), report=False)
        producer, self._producer = self._producer, None
        if producer is not None:
            await _end_transaction(producer, self.topic)
            batches = _failed_futures(producer)
            with contextlib.suppress(Exception):
                await producer.stop()
            for fut in [*batches, *_failed_futures(producer)]:
                _retrieved(fut)


async def _end_transaction(producer: Any, topic: str) -> None:
    """End the transaction a closed writer leaves open (its task cancelled between a send and
    the commit): aborted, or the commit already under way awaited. Left open, it keeps every
    later record of its partitions (custom events too) from read_committed readers until the
    next holder starts its producer or Kafka aborts it after TRANSACTION_TIMEOUT_MS. Bounded:
    with Kafka away, Kafka's timeout ends it."""
    manager = getattr(producer, "_txn_manager", None)
    if manager is None or manager.is_fatal_error():
        return
    try:
        if manager.needs_transaction_commit() is not None:  # a commit (or abort) under way
            waiter = asyncio.shield(manager.wait_for_transaction_end())
        elif manager.is_in_transaction() or manager.state.name == "ABORTABLE_ERROR":
            waiter = producer.abort_transaction()
        else:
            return
        await asyncio.wait_for(waiter, _CLOSE_ABORT_TIMEOUT)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - Kafka away, fenced: its timeout or the next holder ends it
        log.warning("bus: the closed writer's open transaction was not ended; Kafka aborts it after its timeout",
                    extra={"fields": {"topic": topic, "error": f"{type(exc).__name__}: {exc}"}})


def _retrieved(fut: asyncio.Future) -> None:
    if fut.done() and not fut.cancelled():
        fut.exception()


def _failed_futures(producer: Any) -> list[asyncio.Future]:
    """Futures on which aiokafka leaves a failed (fenced) producer's errors with nothing to await
    them once its sender stopped: the transaction's outcome and each batch's drain waiter. The
    garbage collector would log each as never retrieved (and doing so inside a compile() upsets
    CPython 3.11's parser)."""
    out = []
    manager = getattr(producer, "_txn_manager", None)
    outcome = manager.wait_for_transaction_end() if manager is not None else None
    if outcome is not None:  # None: it never began one
        out.append(outcome)
    accumulator = getattr(producer, "_message_accumulator", None)
    for batches in [*getattr(accumulator, "_batches", {}).values(), getattr(accumulator, "_pending_batches", ())]:
        for batch in batches:
            out.extend(f for f in (getattr(batch, "_drain_waiter", None), getattr(batch, "future", None)) if f is not None)
    return out
