"""The event bus between sources and fan-out.

Sources (and the publish API) hand every event to the bus; the bus gets it to the hub of every
gateway node. `MemoryBus` is the single-process bus: it delivers in place, so `publish` returns
once the event is in the workspace history. A Kafka bus (several nodes) implements the same
interface, assigning `seq` once at ingest so every node agrees on it.
"""

from __future__ import annotations

from typing import Protocol

from rtcore.event import Event
from rtserver.hub import Hub


class EventBus(Protocol):
    async def publish(self, event: Event) -> int:
        """Deliver `event`; returns its seq once it is recorded (safe to acknowledge upstream)."""
        ...

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        ...

    async def start(self) -> None:
        ...

    async def close(self) -> None:
        ...


class MemoryBus:
    def __init__(self, hub: Hub):
        self.hub = hub

    async def publish(self, event: Event) -> int:
        return self.hub.deliver(event)

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        self.hub.history_gap(workspace, source, reason)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
