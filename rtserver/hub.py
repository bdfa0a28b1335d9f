"""Fan-out: workspaces, their subscription index and history, and the coalesced writes.

`Hub.deliver(event)` is the hot path: append to the workspace history (assigns seq, encodes the
frame once), match the index, and push the same bytes to every matching connection. Pushing
only appends to the connection's pending frames (its outbox); all pending frames of a
connection leave in one transport write when the loop runs the flush scheduled for this
iteration (no added waiting).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from rtcore.engine import (
    Outbox,
    SubKey,
    SubscriptionIndex,
    compile_predicates,
    event_frame,
    flush_all,
    push_all,
)
from rtcore.event import WHOLE_ENTITY_OPERATIONS, Event
from rtserver.channels import SubscriptionSpec
from rtserver.history import History, NodeBudget
from rtserver.metrics import Metrics

if TYPE_CHECKING:
    from rtserver.config import Config
    from rtserver.connection import Connection

log = logging.getLogger("rtserver.hub")
T = TypeVar("T")

LEAVE = b',"transition":"leave"'
ENTER = b',"transition":"enter"'


class Subscription(SubKey):
    """One channel subscription of one connection; the key the index returns (a SubKey: the
    fan-out loop reaches the connection's outbox through it without a Python attribute)."""

    __slots__ = ("conn", "spec", "start", "end", "_matcher", "__weakref__")

    def __init__(self, conn: Connection, spec: SubscriptionSpec):
        super().__init__(conn.out)
        self.conn = conn
        self.spec = spec
        # Every event after this position that it shows has reached the connection (live, or
        # by its replay), so another subscription's replay skips it: the workspace position
        # when it took effect, lowered to where its own replay began (Connection._replayed).
        self.start = 0
        # The workspace position when a subscribe to its channel replaced it (None: in
        # effect): it delivered nothing after, so the replacement's replay skips only what it
        # shows up to there.
        self.end: int | None = None
        self._matcher = None

    def view(self, event: Event) -> bytes | None:
        """How a replay shows `event` to this subscription, as the live path (Hub.deliver, with
        the index) does: None (not sent), b"" (plain), or the transition suffix (ENTER, LEAVE)."""
        if not self.in_scope(event):
            return None
        if event.operation in WHOLE_ENTITY_OPERATIONS:
            return b""
        now = self._matches_record(event.record)
        if not self.spec.transitions or event.operation != "UPDATE" or event.old_record is None:
            return b"" if now else None
        before = self._matches_record(event.old_record)
        if now:
            return b"" if before else ENTER
        return LEAVE if before else None

    def in_scope(self, event: Event) -> bool:
        """`event` is on this subscription's channel and of an operation it takes (predicates
        aside)."""
        spec = self.spec
        if event.source != spec.source:
            return False
        if spec.entity != "*" and event.entity != spec.entity:
            return False
        return spec.operations is None or event.operation in spec.operations

    def _matches_record(self, record: Any) -> bool:
        if self.spec.predicates is None:
            return True
        if self._matcher is None:
            self._matcher = compile_predicates(self.spec.predicates)
        return self._matcher.matches(record)


def replay_view(subs: list[Subscription], event: Event) -> bytes | None:
    """How a replayed event reaches a connection with these subscriptions: once, with the live
    path's precedence (_one_frame_per_connection): None (not sent), b"" (plain), or the
    transition suffix for event_frame."""
    shown = None
    for sub in subs:
        view = sub.view(event)
        if view is ENTER:
            return ENTER
        if view is not None and (shown is None or view == b""):
            shown = view
    return shown


def _by_scope(subs: Iterable[Subscription]) -> dict[tuple[str, str], list[Subscription]]:
    scope: dict[tuple[str, str], list[Subscription]] = {}
    for sub in subs:
        scope.setdefault((sub.spec.source, sub.spec.entity), []).append(sub)
    return scope


def _in_scope(scope: dict[tuple[str, str], list[Subscription]], event: Event) -> list[Subscription] | None:
    """The subscriptions of `scope` on `event`'s entity or its source's `*` (None: none)."""
    exact = scope.get((event.source, event.entity))
    wild = scope.get((event.source, "*"))
    if exact is None:
        return wild
    return exact if wild is None else exact + wild


def replay_viewer(
    subs: list[Subscription], delivered: Iterable[Subscription] = ()
) -> Callable[[Event, int], bytes | None]:
    """replay_view for `subs` over many events (`view(event, seq)`): each event is shown only
    the subscriptions of its source and entity (or the source's `*`), found by key. A resumed
    session's 100 subscriptions on other entities made a 10,000-event replay try each on each
    event: 118 ms for no frame at all (measured); by key, ~3 ms.

    `delivered`: the connection's other subscriptions, and the one a subscribe replaced. An
    event one of them shows after its `start` (and up to its `end`) has reached the connection
    already, and is not replayed: an event reaches a connection once, whatever number of its
    subscriptions match (a `subscribe` to `events:orders` with `since` beside a live
    `events:*` sent the events both show twice, and those published during a paced replay
    after later ones)."""
    scope = _by_scope(subs)
    others = _by_scope(delivered)

    def view(event: Event, seq: int) -> bytes | None:
        mine = _in_scope(scope, event)
        if mine is None:
            return None
        if others:
            seen = _in_scope(others, event)
            if seen is not None and any(
                o.start < seq and (o.end is None or seq <= o.end) and o.view(event) is not None for o in seen
            ):
                return None
        return replay_view(mine, event)

    return view


def _whole_entity_subscribers(ws: Workspace, event: Event) -> list[Subscription]:
    """A subscription per connection of `ws` whose channel and operations take `event` (a
    TRUNCATE), whatever their predicates: the index evaluates predicates on the record, and a
    TRUNCATE has none, so a filtered view of a table would never learn it was emptied. Such
    events are rare: a scan of the workspace's subscriptions is cheap enough. Only indexed
    subscriptions count, as for index.match: one taken out of the index while its replay reads
    the bus back gets the event from that replay, not twice."""
    index = ws.index
    found = []
    for conn in ws.connections:
        for sub in conn.subscriptions.values():
            if sub in index and sub.in_scope(event):
                found.append(sub)
                break
    return found


def _one_frame_per_connection(
    subs: list[Subscription], enter: list[Subscription], leave: list[Subscription]
) -> tuple[list[Subscription], list[Subscription], list[Subscription]]:
    """An event reaches a connection once, whatever number of its subscriptions match. When
    they disagree, the connection's view is the union of its filters: the row is in it if any
    subscription matches the new row, so `enter` wins over a plain frame, and either over
    `leave` (the row is still in the view through another subscription)."""
    entering = {s.conn for s in enter}
    plain = [s for s in subs if s.conn not in entering] if entering else subs
    shown = entering.union(s.conn for s in plain)
    return plain, enter, [s for s in leave if s.conn not in shown]


class Workspace:
    def __init__(self, wid: str, cfg: Config, budget: NodeBudget | None = None):
        self.id = wid
        h = cfg.history
        self.history = History(wid, max_events=h.events, max_seconds=h.seconds, max_bytes=h.bytes, budget=budget)
        self.index = SubscriptionIndex()
        self.connections: set[Connection] = set()
        self.idle_since: float | None = None  # monotonic; set by Hub.sweep
        self.lane = Lane()  # its connections waiting for their write (Hub.flush)


class Lane:
    """Outboxes with frames to write, in the order they got their first: one lane per
    workspace, and one for the node's other frames (replies, replays). Hub.flush takes turns
    between lanes, so a workspace with 10,000 connections to write does not hold another
    workspace's single write behind all of its own (9,840 writes and ~0.26 s before the lane
    per workspace, measured at saturation). A connection may be listed in two lanes at once
    (a reply and an event); its frames are in one outbox, so they leave in order either way."""

    __slots__ = ("dirty", "written", "ready", "queued")

    def __init__(self) -> None:
        self.dirty: list[Outbox] = []
        # Event frames this lane queued and not yet written (Hub._queued, per lane): which
        # workspace fills the write queue (Hub.room).
        self.queued = 0
        self.written = 0  # those before this offset were written (no copy of the rest per chunk)
        self.ready = False  # in Hub._ready

    def waiting(self) -> int:
        return len(self.dirty) - self.written

    def take(self, most: int) -> list[Outbox]:
        """The next `most` outboxes (or all the rest), marked written."""
        dirty = self.dirty
        start = self.written
        end = start + most
        if end < len(dirty):
            batch = dirty[start:end]
            if end >= 4096 and end * 2 >= len(dirty):
                del dirty[:end]  # drop what was written, in O(1) amortised per connection
                end = 0
            self.written = end
            return batch
        self.dirty = []
        self.written = 0
        return dirty[start:] if start else dirty


# Retired workspaces whose position is remembered (see Hub.sweep); beyond it the oldest
# are forgotten, and such a workspace starts again as after a restart (a reader from before
# gets history_gap).
MAX_RETIRED = 1_000_000
# Items (workspaces, connections) a periodic sweep visits between two turns of the event loop.
SWEEP_CHUNK = 2048
# Workspaces with rt_history_events/rt_history_bytes series: those retaining the most bytes.
HISTORY_SERIES_MAX = 100


async def in_turns(items: list[T]) -> AsyncIterator[T]:
    """Each of `items`, with a turn of the event loop between every SWEEP_CHUNK of them: a
    periodic pass over everything the node holds must not hold the clients meanwhile."""
    for start in range(0, len(items), SWEEP_CHUNK):
        if start:
            await asyncio.sleep(0)
        for item in items[start:start + SWEEP_CHUNK]:
            yield item


class Hub:
    def __init__(self, cfg: Config, metrics: Metrics):
        self.cfg = cfg
        self.metrics = metrics
        self.workspaces: dict[str, Workspace] = {}
        # history.node_bytes: what the histories of all workspaces retain together.
        self.history_budget = NodeBudget(cfg.history.node_bytes)
        # Authenticated connections per subject, all workspaces together (limits.max_connections_per_subject).
        self.subjects: dict[str, int] = {}
        # Lanes with outboxes to write, in the order of their turns (flush), and the lane of
        # frames queued outside an event's fan-out (replies, replays: schedule).
        self._ready: deque[Lane] = deque()
        self._replies = Lane()
        self._flush_scheduled = False
        self._chunk = cfg.limits.flush_chunk
        self._min_backlog = cfg.limits.fanout_backlog
        self._backlog_per_connection = cfg.limits.fanout_backlog_per_connection
        # The open connections of this node (the gateway sets it): the backlog bound grows
        # with them, so that each may collect about as many frames per write at 10,000
        # connections as at 1,000.
        self.open_connections: Callable[[], int] = lambda: 0
        # Event frames queued on connections and not yet written (frames of a connection closed
        # before its write stay counted until every waiting connection has been written: then 0).
        self._queued = 0
        metrics.add_gauges(lambda: [
            ("rt_write_backlog", "Connections waiting for their write (see limits.flush_chunk)", {}, self.waiting()),
            ("rt_write_queue_frames", "Event frames queued and not yet written (see limits.fanout_backlog)", {},
             self._queued),
            ("rt_write_queue_bound", "Queued frames beyond which publishers wait (limits.fanout_backlog*)", {},
             self.backlog_bound()),
        ])
        self._drained: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called with the id of each workspace this node learns of (the gateway persists them,
        # so that after a restart the change feeds record into their histories from the start).
        self.on_new_workspace: Callable[[str], None] | None = None
        # Where a new workspace's history starts vouching for positions (None: the wall clock,
        # as for the hybrid logical clock). The Kafka bus sets it: there seq is a topic offset.
        self.history_floor: Callable[[str], int | None] | None = None
        # Where a workspace back from retirement starts vouching at the earliest (the Kafka bus:
        # after events its partition lost while it was retired, KafkaBus._out_of_range).
        self.retired_floor: Callable[[str], int | None] | None = None
        # Called with a retired workspace and its position when MAX_RETIRED drops them: the
        # Kafka bus then starts later histories of that partition no lower (a workspace's new
        # history must not vouch for what its old one saw and forgot).
        self.on_forgotten: Callable[[str, int], None] | None = None
        # How far this node has delivered the stream a workspace shares with others, as a
        # function of it (History.reached; the Kafka bus: its partition's read position).
        self.read_position: Callable[[str], Callable[[], int]] | None = None
        # Whether every event of a workspace reaches deliver() even while the workspace is not
        # in memory (no change feed fans out to "every known workspace"): only such a
        # workspace may be retired when idle (the gateway sets it; default: never).
        self.retirable: Callable[[str], bool] = lambda wid: False
        # Retired workspaces: id -> the position their history vouched for up to (last_seq,
        # or floor when later): where it starts again when the workspace comes back.
        self._retired: OrderedDict[str, int] = OrderedDict()
        # The authenticated connections and live subscriptions of every workspace together,
        # counted as they come and go (joined/left, add/remove), and the workspaces retaining
        # the most history bytes as of the last sweep: a scrape of /metrics walked every
        # workspace in memory (1.4 s at a million, a node fed by a shared database keeps each
        # one it knows), with the loop standing still.
        self.connection_count = 0
        self.subscription_count = 0
        self._history_top: list[Workspace] = []
        metrics.add_gauges(self._gauges, counters=("rt_history_node_evicted",))

    def workspace(self, wid: str) -> Workspace:
        ws = self.workspaces.get(wid)
        if ws is None:
            ws = self.workspaces[wid] = Workspace(wid, self.cfg, self.history_budget)
            if self.read_position is not None:
                ws.history.reached = self.read_position(wid)
            position = self._retired.pop(wid, None)
            if position is not None:
                if self.retired_floor is not None:
                    position = max(position, self.retired_floor(wid) or 0)
                # Back from retirement: every event since went through deliver(), which brings
                # the workspace back first, so nothing after `position` was missed.
                ws.history.floor = ws.history.last_seq = position
                return ws
            if self.history_floor is not None:
                floor = self.history_floor(wid)
                if floor is not None:
                    ws.history.floor = floor
            if self.on_new_workspace is not None:
                self.on_new_workspace(wid)
        return ws

    async def sweep(self, grace: float) -> int:
        """The periodic pass over every workspace in memory: expire old history entries
        (History.expire) and retire those idle for `grace` seconds (_retire_if_idle); returns
        the highest position a workspace in memory has handed out. The pass gives the loop a
        turn every SWEEP_CHUNK workspaces (in_turns): a node fed by a shared database keeps
        every known workspace in memory (a million ids), and one pass over 100,000 took
        ~0.1 s, every second. A workspace is checked and retired in one step, so what changes
        in between (a connection arriving) is seen."""
        now = time.monotonic()
        high = 0
        top: list[tuple[int, int, Workspace]] = []  # (bytes, n-th visited, workspace): a min-heap
        seen = 0
        async for ws in in_turns(list(self.workspaces.values())):
            if self.workspaces.get(ws.id) is ws:
                if ws.history.position > high:
                    high = ws.history.position
                ws.history.expire()
                self._retire_if_idle(ws, grace, now)
                if len(ws.history):
                    seen += 1
                    entry = (ws.history.bytes, seen, ws)
                    if len(top) < HISTORY_SERIES_MAX:
                        heapq.heappush(top, entry)
                    elif entry[0] > top[0][0]:
                        heapq.heapreplace(top, entry)
        self._history_top = [ws for _, _, ws in top]
        return high

    def highest_position(self) -> int:
        """The highest position handed out: of the workspaces in memory and those retired. A
        history's position, not its last event: one with no event yet shows its floor (the
        seq reservation's base, maybe ahead of the clock) in `subscribed` and `pong`, and the
        next run must start above it."""
        high = max((ws.history.position for ws in self.workspaces.values()), default=0)
        return max(high, max(self._retired.values(), default=0))

    def _retire_if_idle(self, ws: Workspace, grace: float, now: float) -> None:
        """Drop the in-memory state of a workspace idle for `grace` seconds: no connection, no
        subscription, no retained event, and `retirable`. Only the position its history
        vouched for is kept (MAX_RETIRED of them), so a reader resuming from it later gets
        exactly what a workspace kept in memory would give: no history_gap when nothing was
        missed. Called by the sweep, never on the event path."""
        if ws.connections or len(ws.index) or len(ws.history):
            ws.idle_since = None
            return
        if ws.idle_since is None:
            ws.idle_since = now
            return
        if now - ws.idle_since < grace or not self.retirable(ws.id):
            return
        del self.workspaces[ws.id]
        self._retired[ws.id] = ws.history.position
        while len(self._retired) > MAX_RETIRED:
            wid, position = self._retired.popitem(last=False)
            if self.on_forgotten is not None:
                self.on_forgotten(wid, position)

    # ---- the hot path ------------------------------------------------------------------

    def deliver(self, event: Event, seq: int | None = None) -> int:
        """Record `event` in its workspace history and push its frame to every subscriber."""
        ws = self.workspace(event.workspace)
        entry = ws.history.append(event, seq)
        if self.history_budget.bytes > self.history_budget.limit:
            self.trim_histories()
        self.metrics.events_in[event.source] += 1
        index = ws.index
        if index.has_transitions and event.old_record is not None and event.operation == "UPDATE":
            subs, enter, leave = index.match_transitions(
                event.source, event.entity, event.operation, event.record, event.old_record
            )
            if enter or leave:
                subs, enter, leave = _one_frame_per_connection(subs, enter, leave)
            if enter:
                self._push_all(enter, event_frame(event.body, entry.seq, ENTER), ws.lane)
            if leave:
                self._push_all(leave, event_frame(event.body, entry.seq, LEAVE), ws.lane)
        elif event.operation in WHOLE_ENTITY_OPERATIONS:
            subs = _whole_entity_subscribers(ws, event)
        else:
            subs = index.match(event.source, event.entity, event.operation, event.record)
        if subs:
            self._push_all(subs, entry.frame, ws.lane)
        return entry.seq

    def _push_all(self, subs: Iterable[Subscription], frame: bytes, lane: Lane) -> None:
        # One compiled loop (rtcore/fanout.pyx) queues the frame on each subscription's outbox
        # and collects newly pending outboxes in the lane: no method call per delivery.

        if type(subs) is not list:
            subs = list(subs)
        dirty = lane.dirty
        before = len(dirty)
        n = push_all(subs, frame, dirty)
        self.metrics.deliveries += n
        self._queued += n
        if len(dirty) != before:
            self._pending(lane)
        if lane.ready:
            # Counted in the lane's share only while it takes turns: flush resets the count when
            # its turn ends. Frames that all joined outboxes another lane lists (a reply queued
            # first) leave with that lane's write, and counted here for good they made a quiet
            # workspace look like the one filling the queue (Hub.room held its publishes).
            lane.queued += n

    def _pending(self, lane: Lane) -> None:
        """`lane` has outboxes to write: give it a turn, and have a flush come."""
        if not lane.ready:
            lane.ready = True
            self._ready.append(lane)
        if not self._flush_scheduled:
            self._schedule_flush()

    def waiting(self) -> int:
        """Connections waiting for their write."""
        return sum(lane.waiting() for lane in self._ready)

    def backlog_bound(self) -> int:
        """limits.fanout_backlog, or limits.fanout_backlog_per_connection frames per open
        connection when that is more."""
        return max(self._min_backlog, self._backlog_per_connection * self.open_connections())

    def backlogged(self) -> bool:
        """More event frames wait for their write than backlog_bound()."""
        # Every publish asks; below the fixed bound the answer needs no connection count.
        queued = self._queued
        return queued > self._min_backlog and queued > self.backlog_bound()

    async def room(self, workspace: str | None = None) -> None:
        """Wait until the write backlog is within its bound: publishers (the publish API, the
        change feeds, the Kafka consumer) slow down instead of frames piling up in memory.

        The bound counts frames, not connections: while the queue is short of it, events keep
        joining the frames of connections not yet written, so under load each write carries
        more frames (the fewer writes, the more deliveries per second); the bound caps the
        memory and the delay this queue may add.

        With `workspace`, an event of a workspace holding less than an equal share of the
        queued frames (among the workspaces waiting for writes) does not wait: the workspace
        filling the queue is the one held back, not every other one with it (before, a quiet
        workspace's publish waited 15-22 ms in the median behind one publishing at full rate
        to 10,000 connections). The bound may then be passed by what the others queue, up to
        twice the bound: beyond, every publisher waits."""
        lane = None
        if workspace is not None:
            ws = self.workspaces.get(workspace)
            if ws is None:
                return  # not held here: nothing of it is queued
            lane = ws.lane
        if not self._holds_back(lane):
            return
        self.metrics.publisher_waits += 1
        while self._holds_back(lane):
            if self._drained is None:
                self._drained = asyncio.Event()
            await self._drained.wait()

    def _holds_back(self, lane: Lane | None) -> bool:
        if not self.backlogged():
            return False
        queued = self._queued
        # Past twice the bound, every workspace waits: a flood spread over many workspaces (a
        # token granting `*`, a shared feed) found the workspace it published to next under its
        # share each time (its last turn of writes had emptied it), and was never held.
        return lane is None or lane.queued * max(1, len(self._ready)) >= queued or queued > 2 * self.backlog_bound()

    def schedule(self, out: Outbox) -> None:
        """Called for a connection's outbox that just got its first pending frame (a reply,
        a replay: outside an event's fan-out)."""
        self._replies.dirty.append(out)
        self._pending(self._replies)

    def _schedule_flush(self) -> None:
        """Flush once, later in this loop iteration: every frame queued until then shares it."""
        self._flush_scheduled = True
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write each waiting connection's pending frames in one transport write (the same as
        calling Connection.flush on each, without a Python call per connection).

        At most `limits.flush_chunk` connections per loop iteration, shared between the lanes
        waiting (workspaces, replies) in turns: between chunks the loop reads what arrived
        meanwhile (publishes, client messages), so a large fan-out does not hold the loop for
        its whole length, and an event that arrives while earlier frames are still being
        written joins them in the same write to every connection not yet reached (coalescing
        under load, with no added waiting). Order per connection holds: its frames are all in
        its outbox, whichever lane lists it."""

        self._flush_scheduled = False
        ready = self._ready
        budget = self._chunk
        lanes = len(ready)
        share = max(1, budget // lanes) if lanes else 0
        writes = frames = 0
        # Each lane waiting at the start gets its share in turn; what the shares leave goes to
        # the lanes in turn after them (a single lane gets all of it).
        turn = 0
        while ready and budget > 0:
            lane = ready.popleft()
            batch = lane.take(min(share, budget) if turn < lanes else budget)
            turn += 1
            budget -= len(batch)
            w, f = flush_all(batch)
            writes += w
            frames += f
            if lane.waiting():
                ready.append(lane)
                # Approximate: a connection's write takes its frames of every lane.
                lane.queued = max(0, lane.queued - f)
            else:
                lane.ready = False
                lane.queued = 0
        m = self.metrics
        m.writes += writes
        m.frames_out += frames
        # frames_out includes control frames, which were never counted in _queued.
        if ready:
            self._queued = max(0, self._queued - frames)
            self._schedule_flush()
        else:
            self._queued = 0
        if self._drained is not None and self._queued <= self.backlog_bound():
            self._drained.set()
            self._drained = None

    # ---- subscriptions -----------------------------------------------------------------

    def add(self, ws: Workspace, sub: Subscription) -> None:
        """Index `sub`; raises rtcore FilterError (and changes nothing) for a bad filter."""
        spec = sub.spec
        index = ws.index
        before = len(index)
        index.add(sub, spec.source, spec.entity, spec.operations, spec.predicates, spec.transitions)
        self.subscription_count += len(index) - before

    def remove(self, ws: Workspace, sub: Subscription) -> None:
        index = ws.index
        before = len(index)
        index.remove(sub)
        self.subscription_count += len(index) - before

    def joined(self, ws: Workspace, conn: Connection) -> None:
        """`conn` is authenticated in `ws` (rt_connections)."""
        before = len(ws.connections)
        ws.connections.add(conn)
        self.connection_count += len(ws.connections) - before

    def left(self, ws: Workspace, conn: Connection) -> None:
        before = len(ws.connections)
        ws.connections.discard(conn)
        self.connection_count += len(ws.connections) - before

    def history_gap(self, workspace: str, source: str, reason: str, seq: int | None = None) -> None:
        """A source lost changes: tell every subscriber of that source in the workspace, and
        record the loss in its history (at `seq` when assigned upstream), so a session or a
        `since` from before it gets history_gap later too."""
        ws = self.workspaces.get(workspace)
        if ws is None:
            if workspace not in self._retired:
                return  # never held here: its history will start after this loss anyway
            ws = self.workspace(workspace)  # retired: its kept position predates the loss
        ws.history.lost(source, seq)
        self._tell_gap(ws, f"{source} changes may have been lost: {reason}", ws.history.oldest(), source)

    def _tell_gap(self, ws: Workspace, message: str, oldest: int, source: str | None = None) -> None:
        """history_gap (4011) to every subscription of `ws` (of `source` only, when given),
        except those held out of the index while their replay is under way (a paced replay, a
        read-back from the bus, a wait for the bus): the replay finds the loss in the history
        when it goes on and tells it then (told here too, the client heard of it twice)."""
        index = ws.index
        for conn in list(ws.connections):
            for sub in list(conn.subscriptions.values()):
                if (source is None or sub.spec.source == source) and sub in index:
                    conn.send_error(4011, message, channel=sub.spec.channel, oldest=oldest)
                    self.metrics.history_gaps += 1

    async def stream_lost(self, covers: Callable[[str], bool], upto: int, reason: str) -> int:
        """The events up to position `upto` of the workspaces `covers` names were lost before
        this node read them (the Kafka bus: deleted by retention while the node was behind).
        Their subscribers get history_gap now, and their histories vouch only for what follows,
        so a reader from before the loss gets history_gap later too (histories created or
        brought back from retirement meanwhile start after it: history_floor, retired_floor).
        A pass over every workspace held, a turn of the loop between chunks (in_turns).
        Returns how many workspaces held here were hit."""
        hit = 0
        async for ws in in_turns(list(self.workspaces.values())):
            if self.workspaces.get(ws.id) is not ws or not covers(ws.id):
                continue
            hit += 1
            if ws.history.floor < upto:
                ws.history.floor = upto
            self._tell_gap(ws, f"events may have been lost: {reason}", upto + 1)
        return hit

    def trim_histories(self) -> None:
        """history.node_bytes passed: evict the oldest retained events of the workspaces
        retaining the most bytes (each step takes the oldest event of the largest history; ties:
        the older event), until 7/8 of the bound remain. Taking the node's oldest events
        instead let one busy workspace evict a quiet one's only events within a fraction of a
        second (4 MiB bound: 1,758 publishes of 1 KB, 0.22 s), so the quiet workspace's readers
        got history_gap though it published three events; now a workspace is evicted only
        while it holds as much as every larger one (max-min fair shares of the bound), and the
        bound stays exact. Each eviction moves its history's floor as any eviction does, so a
        reader from before it gets history_gap. The margin makes a trim rare (once per 1/8 of
        the bound appended).

        The heap holds only the histories that may be the largest: those of the budget's top
        levels (NodeBudget.levels, a level l holding from 2**(l-1) up to 2**l bytes), a
        level taken in as soon as the heap's largest holds less than 2**l, so that whatever
        stays out holds less than it. Building the heap from every workspace held the loop
        over a second at each trim on a node fed by a shared database (a million workspaces
        in memory): a trim now visits about the histories it evicts from, and those within a
        factor 2 of them."""
        budget = self.history_budget
        target = budget.limit - budget.limit // 8
        levels = budget.levels
        pending = sorted(levels, reverse=True)
        taken = 0
        evicted: set[History] = set()
        heap: list[tuple[int, float, str, int, History]] = []
        i = 0
        while budget.bytes > target:
            while i < len(pending) and (not heap or -heap[0][0] < 1 << pending[i]):
                members = levels[pending[i]]
                i += 1
                entries = [(-h.bytes, h.oldest_at(), h.workspace, taken + n, h) for n, h in enumerate(members)]
                taken += len(entries)
                if len(entries) >= len(heap):
                    heap.extend(entries)
                    heapq.heapify(heap)
                else:
                    for entry in entries:
                        heapq.heappush(heap, entry)
            if not heap:
                break
            history = heap[0][4]
            history.evict_oldest()
            evicted.add(history)
            at = history.oldest_at()
            if at is None:
                heapq.heappop(heap)
            else:
                _, _, wid, n, _ = heap[0]
                heapq.heapreplace(heap, (-history.bytes, at, wid, n, history))
        # Filed again by their new sizes only now: the levels were read meanwhile.
        for history in evicted:
            budget.place(history)

    def _gauges(self) -> list[tuple[str, str, dict[str, Any], float]]:
        rows: list[tuple[str, str, dict[str, Any], float]] = []
        if len(self.workspaces) <= SWEEP_CHUNK:
            holding = [ws for ws in self.workspaces.values() if len(ws.history)]
        else:
            # Those the last sweep found retaining the most (within a second), with their
            # current figures: a walk of every workspace is the sweep's, in turns.
            holding = [ws for ws in self._history_top if self.workspaces.get(ws.id) is ws and len(ws.history)]
        # Series for the workspaces retaining the most, not one per workspace: 100,000 of them
        # made each scrape a 0.3-1 s stall of the loop (and a label set no Prometheus wants).
        if len(holding) > HISTORY_SERIES_MAX:
            holding = heapq.nlargest(HISTORY_SERIES_MAX, holding, key=lambda ws: ws.history.bytes)
        for ws in holding:
            rows.append(("rt_history_events", f"Events retained for replay (the {HISTORY_SERIES_MAX} workspaces "
                         "retaining the most bytes)", {"workspace": ws.id}, len(ws.history)))
            rows.append(("rt_history_bytes", f"Bytes retained for replay (the {HISTORY_SERIES_MAX} workspaces "
                         "retaining the most)", {"workspace": ws.id}, ws.history.bytes))
        rows.append(("rt_connections", "Open authenticated connections", {}, self.connection_count))
        rows.append(("rt_subscriptions", "Active subscriptions", {}, self.subscription_count))
        rows.append(("rt_workspaces", "Workspaces in memory on this node", {}, len(self.workspaces)))
        rows.append(("rt_workspaces_retired", "Idle workspaces whose memory was given back (their position is kept)",
                     {}, len(self._retired)))
        budget = self.history_budget
        rows.append(("rt_history_node_bytes", "Bytes retained for replay by all workspaces (bound: history.node_bytes)",
                     {}, budget.bytes))
        rows.append(("rt_history_node_evicted", "Events evicted to keep within history.node_bytes", {}, budget.evicted))
        return rows

