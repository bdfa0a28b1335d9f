"""Workspace history: the one cursor (`seq`) for every source, and the ring of recent events.

Every event of a workspace is appended here exactly once, before fan-out. Appending assigns
`seq` from a hybrid logical clock (max(last + 1, wall-clock microseconds)) so positions keep
increasing across restarts, and stores the already-encoded frame, so a replay costs a write,
not an encode. The ring is bounded by count, age and bytes.

`floor` is the highest position this history cannot vouch for: the last evicted event, or,
for a fresh history, the clock at creation (anything before it happened before this process
knew the workspace). A reader at position `since < floor` may have missed events: a gap, on
the channels whose events were evicted after `since` (gap_for), or on all of them when the
floor is not an eviction's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

from rtcore.engine import event_frame, json_tokens
from rtcore.event import Event


def now_us() -> int:
    return time.time_ns() // 1000


# Bytes of Python objects per JSON value separator or array of an event's body (measured 33-65
# for arrays, numbers and strings, ~95 for small objects, per `,` `:` `[`), and those of the
# entry, the Event and its frame's header.
DECODED_PER_TOKEN = 64
ENTRY_BYTES = 256


def retained_size(frame: bytes, body: bytes) -> int:
    """What a retained event holds, for the history's byte bounds: its frame, its JSON body, and
    its record or payload decoded (kept for filtered replays), estimated from the body's JSON:
    20-40 times the JSON for nested arrays and small objects, so that counting the JSON alone
    let a history hold that many times its bound."""
    return len(frame) + len(body) + DECODED_PER_TOKEN * json_tokens(body) + ENTRY_BYTES


class HistoryEntry:
    __slots__ = ("seq", "at", "frame", "event", "size")

    def __init__(self, seq: int, at: float, frame: bytes, event: Event):
        self.seq = seq
        self.at = at
        self.frame = frame
        self.event = event
        self.size = retained_size(frame, event.body)  # what it counts against the byte bounds


@dataclass
class Replay:
    gap: bool  # some event after `since` may be missing (on some channel: gap_for says which)
    oldest: int  # the first position the history can replay from
    entries: list[HistoryEntry]
    lost: frozenset[str] = frozenset()  # sources that reported lost changes after `since`
    # A channel's gap (History.gap_for) when `gap` holds; None: every channel's.
    scoped: Callable[[str, str], bool] | None = None

    def gap_for(self, source: str, entity: str) -> bool:
        """Whether an event of channel (source, entity) (entity "*": any of the source's) after
        `since` may be missing."""
        return self.gap and (self.scoped is None or self.scoped(source, entity))


# Channels whose latest evicted event a history remembers; past it, the channel evicted the
# longest ago is forgotten and its position counts for every channel (a gap for all readers
# from before it, as when nothing was remembered per channel).
MAX_EVICTED_CHANNELS = 1024


class NodeBudget:
    """The retained bytes of every history of the node together, against `history.node_bytes`
    (each history adds and subtracts its own; the hub evicts when `bytes` passes `limit`).

    `levels` files each history holding events under its size's bit length (level l: from
    2**(l-1) up to 2**l bytes), kept as histories grow and shrink: the hub's trim takes the
    largest histories from the top levels without visiting the others (a node fed by a shared
    database holds a million workspaces, and a pass over all of them at each trim held the
    loop over a second)."""

    __slots__ = ("limit", "bytes", "evicted", "levels")

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self.evicted = 0  # events evicted for the node bound, in all
        # A dict per level, not a set: a trim walks a level in the order its histories joined,
        # near their order in memory (a set's hash order made that walk twice as slow).
        self.levels: dict[int, dict[History, None]] = {}

    def place(self, history: History) -> None:
        """File `history` under its current size's level (out of every level when empty)."""
        level = history.bytes.bit_length()
        old = history.level
        if level == old:
            return
        levels = self.levels
        if old:
            members = levels[old]
            del members[history]
            if not members:
                del levels[old]
        if level:
            members = levels.get(level)
            if members is None:
                members = levels[level] = {}
            members[history] = None
        history.level = level


class History:
    def __init__(self, workspace: str, *, max_events: int, max_seconds: float, max_bytes: int,
                 budget: NodeBudget | None = None):
        self.workspace = workspace
        self.max_events = max_events  # 0 keeps none: every event is evicted as it is appended
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.budget = budget if budget is not None else NodeBudget(1 << 62)
        self._entries: deque[HistoryEntry] = deque()
        self._bytes = 0
        self.level = 0  # where the budget files it (NodeBudget.place): its bytes' bit length
        self.last_seq = 0
        # `floor` (a property) is the highest of these: `_unscoped`, the positions it cannot
        # vouch for on any channel (before it existed, a loss of the stream), and the last
        # evicted event of each channel (source, entity) and of each source, so that a reader of
        # a channel whose own events were all kept gets no history_gap for others' evictions.
        self._floor = self._unscoped = now_us()
        self._evicted: dict[tuple[str, str], int] = {}  # by recency: the least recent first
        self._evicted_sources: dict[str, int] = {}
        # Source kind -> the position of its latest reported loss (a replication slot lost, a
        # change that could not be converted, ...): a reader from before it may have missed
        # that source's changes, though every retained event is still here.
        self.losses: dict[str, int] = {}
        # How far the node has delivered the stream this workspace shares with others (None:
        # its own events only). On a Kafka node seq is an offset of the workspace's partition:
        # every event of it up to the node's read position was delivered, whoever else's records
        # moved that position on (KafkaBus.read_position).
        self.reached: Callable[[], int] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def floor(self) -> int:
        """The highest position this history cannot vouch for (module docstring)."""
        return self._floor

    @floor.setter
    def floor(self, position: int) -> None:
        """This history cannot vouch for any event up to `position`, of any channel."""
        self._floor = self._unscoped = position
        self._evicted.clear()
        self._evicted_sources.clear()

    def gap_for(self, since: int, source: str, entity: str) -> bool:
        """Whether an event of channel (source, entity) (entity "*": any of the source's) after
        `since` may be missing from this history."""
        if since >= self._floor:
            return False
        if since < self._unscoped:
            return True
        if entity == "*":
            return since < self._evicted_sources.get(source, 0)
        return since < self._evicted.get((source, entity), 0)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def position(self) -> int:
        """The stream position this history has reached: its last event, or its floor when
        nothing came after it (a session suspended here, a subscription or pong answered here,
        resumes from it); on a Kafka node, at least how far the node has read the workspace's
        partition: else a quiet workspace kept the position where the node started, and a client
        moving to another node asked `since` it (a long read-back, or a history_gap, for nothing)."""
        position = max(self.last_seq, self._floor)
        if self.reached is not None:
            return max(position, self.reached())
        return position

    def next_seq(self) -> int:
        seq = max(self.last_seq + 1, self._floor + 1, now_us())
        self.last_seq = seq
        return seq

    def append(self, event: Event, seq: int | None = None) -> HistoryEntry:
        """Record `event`; `seq` is given when it was assigned upstream (Kafka bus)."""
        if seq is None:
            seq = self.next_seq()
        elif seq <= self.last_seq:
            raise ValueError(f"workspace {self.workspace}: seq {seq} not after {self.last_seq}")
        else:
            self.last_seq = seq
        entry = HistoryEntry(seq, time.monotonic(), event_frame(event.body, seq), event)
        self._entries.append(entry)
        size = entry.size
        self._bytes += size
        self.budget.bytes += size
        self._evict(entry.at)
        if self._bytes.bit_length() != self.level:  # inline: the budget's work only when the level changes
            self.budget.place(self)
        return entry

    def lost(self, source: str, seq: int | None = None) -> None:
        """Record that `source` lost changes now, at a position of its own (`seq` when assigned
        upstream: the Kafka offset of the bus's gap record). A reader whose `since` is before
        it gets `source` in `Replay.lost`."""
        if seq is None:
            seq = self.next_seq()
        elif seq > self.last_seq:
            self.last_seq = seq
        if seq > self.losses.get(source, 0):
            self.losses[source] = seq

    def _evict(self, now: float) -> None:
        entries = self._entries
        horizon = now - self.max_seconds
        while entries and (
            len(entries) > self.max_events or self._bytes > self.max_bytes or entries[0].at < horizon
        ):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        old = self._entries.popleft()
        size = old.size
        self._bytes -= size
        self.budget.bytes -= size
        seq = self._floor = old.seq
        event = old.event
        key = (event.source, event.entity)
        evicted = self._evicted
        if evicted.pop(key, None) is None and len(evicted) >= MAX_EVICTED_CHANNELS:
            # Forgotten: its position now counts for every channel (the least recent is lowest).
            forgotten = evicted.pop(next(iter(evicted)))
            if forgotten > self._unscoped:
                self._unscoped = forgotten
        evicted[key] = seq
        self._evicted_sources[event.source] = seq

    def evict_oldest(self) -> None:
        """Drop the oldest retained event (for the node bound): a reader from before it now
        gets history_gap, as after any eviction. The trim that calls it files the history
        under its new level when it is done (NodeBudget.place), not at each event: it reads
        the levels meanwhile."""
        self._drop_oldest()
        self.budget.evicted += 1

    def oldest_at(self) -> float | None:
        """When the oldest retained event was appended (monotonic), None when empty."""
        return self._entries[0].at if self._entries else None

    def expire(self) -> None:
        """Drop entries past the age limit (called periodically, so idle workspaces shrink)."""
        self._evict(time.monotonic())
        if self._bytes.bit_length() != self.level:
            self.budget.place(self)

    def oldest(self) -> int:
        return self._entries[0].seq if self._entries else self.position + 1

    def since(self, since: int) -> Replay:
        """The retained entries after `since`, whether some may be missing before them, and
        which sources reported a loss after it."""
        self.expire()
        gap = since < self._floor
        scoped = (lambda source, entity: self.gap_for(since, source, entity)) if gap else None
        lost = frozenset(src for src, at in self.losses.items() if since < at) if self.losses else frozenset()
        entries = self._entries
        if not entries or entries[-1].seq <= since:
            return Replay(gap, self.oldest(), [], lost, scoped)
        if entries[0].seq > since:
            return Replay(gap, self.oldest(), list(entries), lost, scoped)
        # Binary search on the deque's seq order (an index walks the deque's blocks from the
        # nearer end: a few thousand steps at most, ~20 times).
        lo, hi = 0, len(entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if entries[mid].seq <= since:
                lo = mid + 1
            else:
                hi = mid
        # The tail read from the right end, in one pass: indexing each entry walked the blocks
        # again for every one (quadratic: a replay from the start of a 300,000-event history
        # held the loop ~0.4 s, and a paced replay does this at each of its pieces).
        tail = list(islice(reversed(entries), len(entries) - lo))
        tail.reverse()
        return Replay(gap, self.oldest(), tail, lost, scoped)

    def __iter__(self) -> Iterator[HistoryEntry]:
        return iter(self._entries)
