"""A Kafka lease: exactly one holder among several `rtserver ingest` processes.

Every candidate joins one consumer group on a one-partition lease topic; the group coordinator
assigns that partition to exactly one live member. A member that dies stops heartbeating and is
expelled after the session timeout, and the partition (the lease) moves to a standby. A holder
that loses the partition in a rebalance stops its work before it rejoins, so the new holder
starts only after the old one let go (or was declared dead).

The lease stays with its holder through a rebalance that a member joining causes (a standby
started or restarted): `_assignor` gives the partition to the member that says it held it. The
consumer's default assignor gave it to the member whose id sorts first (the client id, which
names the host), so starting a standby could move every feed to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from rtserver.tasks import cancel_and_wait

log = logging.getLogger("rtserver.lease")


class Lease:
    def __init__(
        self,
        options: dict[str, Any],
        topic: str,
        group: str,
        *,
        session_timeout: float,
        on_acquired: Callable[[], Awaitable[None]],
        on_lost: Callable[[], Awaitable[None]],
        client_id: str = "rtserver-lease",
    ):
        self.options = options
        self.topic = topic
        self.group = group
        self.session_timeout_ms = int(session_timeout * 1000)  # at least 6 s, the brokers' minimum (config)
        self.client_id = client_id
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self.held = False
        self.acquisitions = 0
        # Assigned the lease in the last assignment this member received, and still in the
        # group: said in its join metadata, so the next assignment leaves the lease here.
        self.claim = False
        self._consumer = None
        self._task: asyncio.Task | None = None
        self._work: asyncio.Task | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.abc import ConsumerRebalanceListener
        from aiokafka.errors import KafkaError

        from rtserver.bus_kafka import ensure_topic

        try:
            await ensure_topic(self.options, self.topic, 1, 3)
        except KafkaError as exc:  # a creation Kafka refused (no CREATE right, a topic policy): one line at start
            raise RuntimeError(f"ingest lease topic {self.topic}: {exc}") from None
        lease = self

        class _Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await lease._release()

            async def on_partitions_assigned(self, assigned: Any) -> None:
                if any(tp.topic == lease.topic for tp in assigned):
                    lease._acquire()

        from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

        self._consumer = AIOKafkaConsumer(
            **self.options,
            client_id=self.client_id,
            group_id=self.group,
            enable_auto_commit=False,
            # roundrobin too: a group with members of an earlier version (which know no other)
            # agrees on it during a rolling upgrade
            partition_assignment_strategy=(_assignor(self), RoundRobinPartitionAssignor),
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.session_timeout_ms // 6),
            rebalance_timeout_ms=self.session_timeout_ms * 2,
        )
        self._consumer.subscribe([self.topic], listener=_Listener())
        await self._consumer.start()
        self._task = asyncio.create_task(self._poll(), name="rtserver-lease")

    async def _poll(self) -> None:
        # Polling keeps the membership alive (max.poll.interval); the topic carries no records.
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                await consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the membership loop alive
                log.warning("lease poll: %s", exc, extra={"fields": {"topic": self.topic, "group": self.group}})
                await asyncio.sleep(0.5)

    def _acquire(self) -> None:
        if self.held:
            return
        self.held = True
        self.acquisitions += 1
        log.info("lease acquired", extra={"fields": {"topic": self.topic, "group": self.group}})
        self._work = asyncio.create_task(self._on_acquired(), name="rtserver-lease-acquired")
        self._work.add_done_callback(_log_failure)

    async def _release(self) -> None:
        if not self.held:
            return
        self.held = False
        work, self._work = self._work, None
        await cancel_and_wait(work, quiet=True)  # _log_failure reported a failure
        log.info("lease released", extra={"fields": {"topic": self.topic, "group": self.group}})
        await self._on_lost()

    async def rejoin(self) -> None:
        """Leave the group and join it again: the lease goes to whichever member the coordinator
        picks (this one again when it is alone), through a rebalance that first takes it from
        every member."""
        await self.close()
        await self.start()

    async def close(self) -> None:
        self.claim = False  # leaving the group: the next assignment hands the lease on
        task, self._task = self._task, None
        await cancel_and_wait(task, what=f"lease of {self.group}")
        await self._release()
        from rtserver.bus_kafka import stop_client

        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # leaves the group: a standby takes over at once
            await stop_client(consumer, "lease consumer", {"topic": self.topic, "group": self.group})


def _assignor(lease: Lease) -> Any:
    """The group's assignor for `lease` (module docstring): the lease partition goes to the
    member claiming it in its join metadata (the first by member id if several do: one was
    expelled unawares, and fencing settles it), else to the first member by id, as before.
    Every partition of the lease topic goes to that one member: a lease topic created
    beforehand with several partitions spread them over members, each of which took the lease."""
    from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

    class LeaseAssignor(AbstractPartitionAssignor):
        name = "rtserver-lease"
        version = 0

        @classmethod
        def metadata(cls, topics: Any) -> Any:
            return ConsumerProtocolMemberMetadata(cls.version, sorted(topics), _HELD if lease.claim else b"")

        @classmethod
        def assign(cls, cluster: Any, members: Any) -> dict[str, Any]:
            claimed = sorted(member for member, meta in members.items() if meta.user_data == _HELD)
            holder = claimed[0] if claimed else min(members)
            partitions = sorted(cluster.partitions_for_topic(lease.topic) or ())  # none yet: a later rebalance
            return {member: ConsumerProtocolMemberAssignment(
                        cls.version, [(lease.topic, partitions)] if member == holder and partitions else [], b"")
                    for member in members}

        @classmethod
        def on_assignment(cls, assignment: Any) -> None:
            lease.claim = any(tp.topic == lease.topic for tp in assignment.partitions())

    return LeaseAssignor


_HELD = b"held"  # a member's join metadata: it holds the lease


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("starting the leased work failed", exc_info=task.exception())
