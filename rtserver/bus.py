"""The event bus between sources and fan-out.

Sources (and the publish API) hand every event to the bus; the bus gets it to the hub of every
gateway node. `MemoryBus` is the single-process bus: it delivers in place, so `publish` returns
once the event is in the workspace history. A Kafka bus (several nodes) implements the same
interface, assigning `seq` once at ingest so every node agrees on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rtcore.event import Event
from rtserver.hub import Hub
from rtserver.sources.base import YIELD_EVERY

if TYPE_CHECKING:
    from rtserver.config import Config
    from rtserver.metrics import Metrics


# A draining gateway's refusal of a publish: its subscribers are closed (1001) and its history
# ends with the process, so an event accepted now would reach no one.
SHUTTING_DOWN = "the gateway is shutting down; publish to another node, or again once it has restarted"


class BusUnavailable(Exception):
    """The bus could not take an event: `status` 503 when it was not sent (a retry is safe),
    504 when it was sent but not confirmed in time (it may still be delivered, once), 400 when
    the event itself cannot be carried, 413 when it is too large for the bus (neither sent; a
    retry fails alike)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.index: int | None = None  # the event of a batch refused (submit_many)


class EventBus(Protocol):
    async def publish(self, event: Event) -> int:
        """Deliver `event`; returns its seq once it is recorded (safe to acknowledge upstream).
        Raises BusUnavailable when the bus cannot take it now."""
        ...

    async def submit(self, event: Event) -> int | asyncio.Future[int]:
        """`publish` in two steps, for the publish API's pipelined requests: returns once
        `event`'s place among this process's events is fixed (a later submit comes after it):
        its seq when it is already recorded, or a future of it (BusUnavailable for its
        exception). Raises BusUnavailable when the bus cannot take it now."""
        ...

    async def submit_many(self, events: Sequence[Event],
                          stopped: Callable[[], bool]) -> Sequence[int | asyncio.Future[int]]:
        """`submit` of each event, in order, for a batch of the publish API: raises
        BusUnavailable (its `index` naming the event) before sending any when one cannot be
        carried, or none could be sent. Once some are sent, each event's seq or a future of
        it, failed (BusUnavailable) for an event that was not published: one that could not
        be sent and the events after it, or those left when `stopped()` turned true (the
        gateway draining) while the batch was under way, or the whole batch refused (503) when
        it turned true before the first event was published."""
        ...

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        ...

    async def start(self) -> None:
        ...

    async def close(self) -> None:
        ...

    def ready(self) -> bool:
        """False while this node must refuse new connections (e.g. too far behind the bus)."""
        ...

    def status(self) -> dict[str, Any]:
        ...


def not_published(count: int, message: str, status: int = 503) -> list[asyncio.Future[int]]:
    """Futures failed with BusUnavailable, for the events of a batch that were not published."""
    loop = asyncio.get_running_loop()
    out: list[asyncio.Future[int]] = []
    for _ in range(count):
        failed: asyncio.Future[int] = loop.create_future()
        failed.set_exception(BusUnavailable(status, message))
        out.append(failed)
    return out


def create_bus(cfg: Config, hub: Hub, metrics: Metrics, node: str) -> EventBus:
    """The bus of `bus.kind`: memory (single process) or kafka (a gateway node)."""
    if cfg.bus.kind == "kafka":
        from rtserver.bus_kafka import KafkaBus

        return KafkaBus(cfg, hub, metrics, node)
    return MemoryBus(hub)


class MemoryBus:
    def __init__(self, hub: Hub):
        self.hub = hub

    async def publish(self, event: Event) -> int:
        hub = self.hub
        if hub.backlogged():
            await hub.room(event.workspace)
        return hub.deliver(event)

    submit = publish  # recorded once it returns

    async def submit_many(self, events: Sequence[Event],
                          stopped: Callable[[], bool]) -> Sequence[int | asyncio.Future[int]]:
        hub = self.hub
        seqs: list[int | asyncio.Future[int]] = []
        for i, event in enumerate(events):
            # Paced as single events are: a batch does not push the backlog past its bound.
            if hub.backlogged():
                await hub.room(event.workspace)
            elif i and i % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # other clients get a turn (sources.base.YIELD_EVERY)
            if stopped():
                # Draining: the subscribers are closed and the history ends with the process.
                if not seqs:  # nothing published: refused whole, as a single publish is then
                    raise BusUnavailable(503, SHUTTING_DOWN)
                seqs += not_published(len(events) - i, "not published: the gateway is shutting down")
                break
            seqs.append(hub.deliver(event))
        return seqs

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        self.hub.history_gap(workspace, source, reason)

    async def drain(self) -> None:
        return None  # publish() has already recorded the event

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"kind": "memory"}
