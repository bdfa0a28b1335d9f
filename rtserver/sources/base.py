"""The small protocol every change feed implements, so adding a source never touches the server.

A source reads its feed, normalizes each change into an `rtcore.event.Event` and hands it to
its `EventSink` (the event bus) with `await sink.publish(event)`. Before it acknowledges a
change's position upstream (LSN, resume token) it awaits `sink.drain()`, which returns once
every event published so far is recorded (in the workspace history, or in Kafka), so a crash
loses nothing; or, with a sink that has `after_durable(callback)` (the ingest's: Kafka
transactions), it acknowledges in the callback, without waiting (`when_durable`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from rtcore.event import Event

log = logging.getLogger("rtserver.sources")

# Events a source publishes between two turns of the event loop. A source handing over a batch
# (a PostgreSQL transaction of up to 10,000 changes, a MongoDB getMore of up to 16 MiB), each
# change for every workspace it feeds, does not suspend by itself (the memory bus records in
# place): 10,000 changes x 100 workspaces held every client ~2 s.
YIELD_EVERY = 512
# Workspaces told of a loss (history_gap) between two turns of the event loop: a shared feed
# tells every workspace it feeds (200,000: ~0.25 s), for each change it had to skip.
GAP_CHUNK = 2048


async def announce_gap(sink: EventSink, workspaces: Iterable[str], source: str, reason: str) -> None:
    """sink.history_gap(workspace, source, reason) for each of `workspaces`, with a turn of the
    event loop between every GAP_CHUNK of them."""
    for i, workspace in enumerate(workspaces):
        if i and i % GAP_CHUNK == 0:
            await asyncio.sleep(0)
        sink.history_gap(workspace, source, reason)


class EventSink(Protocol):
    async def publish(self, event: Event) -> int:
        """Record and fan out `event`; returns its seq."""
        ...

    def history_gap(self, workspace: str, source: str, reason: str) -> None:
        """Tell the workspace's subscribers of `source` that changes may have been lost."""
        ...

    async def drain(self) -> None:
        """Wait until every event published so far is recorded (a Kafka bus batches its
        sends; the memory bus records in `publish` already). Sources call it before they
        acknowledge an upstream position."""
        ...


def when_durable(sink: Any, then: Callable[[], None]) -> None:
    """`then()` once every event handed to `sink` so far is recorded: at once for a sink that
    records in publish(), through its after_durable for one that says later."""
    after = getattr(sink, "after_durable", None)
    if after is None:
        then()
    else:
        after(then)


class ChannelUnavailable(Exception):
    """A channel cannot be subscribed: unknown table, collection, malformed name (4010)."""


class NoSuchChannel(ChannelUnavailable):
    """A channel a database lookup found no table for (4010). It counts as an invalid message
    (limits.max_invalid_per_minute): each costs a catalog query on the connection that genuine
    subscribes share, which a client could otherwise repeat at will (a bounds audit)."""


# Seconds a subscribe waits for a feed to take its first position (a new MongoDB change
# stream opened, a new PostgreSQL slot made) before it is refused with 4010.
POSITION_WAIT = 5.0


async def await_position(positioned: asyncio.Event, channel: str, workspace: str, feed: str) -> None:
    """Return once `positioned` is set, the feed reading every change made from then on; else
    ChannelUnavailable after POSITION_WAIT. A subscription answered `subscribed` earlier (the
    first grant of a workspace starting its feed) missed the changes made before the feed's
    first position, and no history_gap said so."""
    if positioned.is_set():
        return
    try:
        await asyncio.wait_for(positioned.wait(), POSITION_WAIT)
    except TimeoutError:
        raise ChannelUnavailable(
            f"{channel}: the change feed of {feed} has not started reading yet (its server not reached or "
            f"refusing it: see /readyz), so changes made now could be missed; subscribe again later "
            f"(workspace {workspace})") from None


class Source(Protocol):
    """A change feed of one workspace (or of several workspaces sharing one database)."""

    kind: str  # "postgres" | "mongo"

    async def start(self) -> None:
        """Connect and begin streaming in the background; returns quickly."""
        ...

    async def stop(self) -> None:
        """Stop streaming, acknowledge what has been published, close connections."""
        ...

    async def check_channel(self, workspace: str, entity: str) -> str:
        """Validate `entity` (a table/collection name) for a subscribe; return its canonical
        name or raise ChannelUnavailable with a message for the client."""
        ...

    def ready(self) -> bool:
        """True while the feed is connected and streaming."""
        ...

    # Set once every change made from then on will be read: a position saved by an earlier
    # run, or the first one the feed took. A subscribe waits for it (await_position).
    positioned: asyncio.Event

    def status(self) -> dict[str, Any]:
        """Health details for /readyz and /metrics (lag, position, last error)."""
        ...


async def stop_all(sources: Iterable[Source], timeout: float | None = None) -> None:
    """Stop `sources` together, waiting at most `timeout` seconds (None: until they all have).
    One after the other, a few whose server stopped answering (each client's close waits for
    it up to its own timeout, and a stop may not end at once when cancelled) held a shutdown
    past its deadline. A stop that fails or overruns is logged with the source it is about."""
    stops = {asyncio.ensure_future(src.stop()): src for src in sources}
    if not stops:
        return
    done, late = await asyncio.wait(stops, timeout=timeout)
    for task in done:
        if task.exception() is not None:
            log.error("source did not stop cleanly", exc_info=task.exception(), extra={"fields": _named(stops[task])})
    for task in late:
        task.cancel()  # left to end on its own: nothing waits for it any more
        log.error("source did not stop within the shutdown timeout",
                  extra={"fields": {**_named(stops[task]), "timeout_s": round(timeout or 0, 3)}})


def _named(src: Source) -> dict[str, Any]:
    """A source as a log line names it: its kind, and its MongoDB database or PostgreSQL slot."""
    return {"source": src.kind, "feed": getattr(src, "database", None) or getattr(src, "slot", None)}
