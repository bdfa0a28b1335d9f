"""The test server's oplog and change streams: every write appends an entry with a counter;
a change-stream cursor renders entries after its position into change events, with resume
tokens, updateLookup (read at render time, like a real server), pre-images, `$match`, and
`invalidate` when its collection is dropped. Truncation makes old tokens unresumable (286)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bson
from bson.timestamp import Timestamp

from .store import CommandError, matches

INVALIDATE_SUFFIX = "01"
FRAGMENT_MARK = "F"  # a fragment's token: the event's, then F and the fragment's index (4 hex digits)
MAX_USER_BSON = 16 * 1024 * 1024  # BSONObjMaxUserSize: no change event (or fragment) may exceed it
MAX_BATCH_BYTES = 16 * 1024 * 1024  # a reply's batch stops there (the first event always goes)
SPLIT_STAGE = "$changeStreamSplitLargeEvent"


@dataclass
class Entry:
    counter: int
    op: str  # insert | update | replace | delete | drop | dropDatabase | rename
    db: str
    coll: str
    ts: Timestamp
    wall: datetime
    document_key: dict[str, Any] | None = None
    full_document: dict[str, Any] | None = None
    update_description: dict[str, Any] | None = None
    pre_image: dict[str, Any] | None = None
    lsid: dict[str, Any] | None = None
    txn_number: int | None = None
    to_coll: str | None = None  # rename: the collection's new name (same database)


def token(counter: int, invalidate: bool = False, fragment: int | None = None) -> dict[str, str]:
    """A resume token; `fragment` (0-based) names one fragment of a split event, as MongoDB's
    tokens carry a fragment number: resuming after it yields the fragments after it."""
    suffix = INVALIDATE_SUFFIX if invalidate else ""
    if fragment is not None:
        suffix = f"{FRAGMENT_MARK}{fragment:04X}"
    return {"_data": f"{counter:016X}" + suffix}


def parse_token(value: Any) -> tuple[int, bool, int | None]:
    """(counter, whether it is an invalidate event's, the fragment index or None)."""
    data = value.get("_data") if isinstance(value, dict) else None
    if not isinstance(data, str) or len(data) < 16:
        raise CommandError(260, "InvalidResumeToken", f"malformed resume token: {value!r}")
    try:
        fragment = int(data[17:], 16) if data[16:17] == FRAGMENT_MARK else None
        return int(data[:16], 16), data[16:] == INVALIDATE_SUFFIX, fragment
    except ValueError:
        raise CommandError(260, "InvalidResumeToken", f"malformed resume token: {value!r}") from None


class Oplog:
    """Bounded: beyond `max_entries` the oldest entries are truncated, as a capped oplog is."""

    def __init__(self, max_entries: int = 100_000):
        self.entries: deque[Entry] = deque()
        self.max_entries = max_entries
        self.head = 0  # counter of the newest entry
        self.floor = 0  # newest counter truncated away: tokens below it are lost
        self._changed = asyncio.Event()

    def append(self, op: str, db: str, coll: str, **fields: Any) -> Entry:
        self.head += 1
        now = datetime.now(UTC)
        entry = Entry(self.head, op, db, coll, Timestamp(int(now.timestamp()), self.head), now, **fields)
        self.entries.append(entry)
        while len(self.entries) > self.max_entries:
            self.floor = self.entries.popleft().counter
        self._changed.set()
        self._changed = asyncio.Event()
        return entry

    def truncate(self, keep_last: int = 0) -> None:
        """Drop all but the newest `keep_last` entries (history lost for older tokens)."""
        while len(self.entries) > keep_last:
            self.floor = self.entries.popleft().counter
        if not self.entries:
            self.floor = self.head

    def after(self, counter: int) -> list[Entry]:
        if not self.entries or counter >= self.head:
            return []
        first = self.entries[0].counter
        start = max(0, counter + 1 - first)
        return list(itertools.islice(self.entries, start, None))

    async def wait_beyond(self, counter: int, timeout: float) -> None:
        if self.head > counter:
            return
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    def operation_time(self) -> Timestamp:
        return Timestamp(int(datetime.now(UTC).timestamp()), self.head)


@dataclass
class ChangeStream:
    cursor_id: int
    db: str
    coll: str | None  # None: a database-level stream
    position: int
    match: dict[str, Any] | None
    full_document: str
    before_change: str
    batch_size: int
    split: bool = False  # the pipeline ends with $changeStreamSplitLargeEvent
    projection: frozenset[str] | None = None  # the fields an inclusion $project keeps
    skip_fragments: tuple[int, int] | None = None  # (counter, n): resumed after n fragments of that event
    pending: list[dict[str, Any]] = field(default_factory=list)
    invalidated: bool = False

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}" if self.coll else f"{self.db}.$cmd.aggregate"


def open_stream(
    oplog: Oplog, cursor_id: int, db: str, coll: str | None, spec: dict[str, Any], rest: list[dict[str, Any]], batch_size: int,
    split_supported: bool = True,
) -> ChangeStream:
    """A change stream cursor from a `$changeStream` stage and the stages after it."""
    allowed = {"fullDocument", "fullDocumentBeforeChange", "resumeAfter", "startAfter", "startAtOperationTime",
               "showExpandedEvents", "allChangesForCluster"}
    unknown = set(spec) - allowed
    if unknown:
        raise CommandError(40415, "Location40415", f"BSON field '$changeStream.{sorted(unknown)[0]}' is an unknown field.")
    # As mongod refuses it (document_source_change_stream.cpp): no stream on the internal
    # databases, and on admin only a whole-cluster one.
    if db in ("local", "config") or (db == "admin" and not spec.get("allChangesForCluster")):
        raise CommandError(73, "InvalidNamespace", f"$changeStream may not be opened on the internal {db} database")
    match: dict[str, Any] | None = None
    split = False
    projection: frozenset[str] | None = None
    for i, stage in enumerate(rest):
        if list(stage) == [SPLIT_STAGE]:
            if not split_supported:
                raise CommandError(40324, "Location40324", f"Unrecognized pipeline stage name: '{SPLIT_STAGE}'")
            if i != len(rest) - 1:
                raise CommandError(7182801, "Location7182801", f"{SPLIT_STAGE} can only appear as the last stage")
            split = True
            continue
        if list(stage) == ["$project"]:
            # Inclusion of top-level fields only; as mongod, the resume token (_id) must stay
            # (it would fail the event with 280 ChangeStreamFatalError: refused here at once).
            fields = stage["$project"]
            if not all(v in (1, True) for v in fields.values()) or any("." in k for k in fields) or fields.get("_id", 1) \
                    not in (1, True):
                raise CommandError(20, "IllegalOperation", "test server: $project in a change stream keeps top-level "
                                                           "fields (name: 1), _id included")
            projection = frozenset(fields) | {"_id"}
            continue
        if list(stage) != ["$match"]:
            raise CommandError(20, "IllegalOperation",
                               f"test server: only $match and $project may follow $changeStream, got {list(stage)}")
        match = {"$and": [match, stage["$match"]]} if match else stage["$match"]
    full_document = spec.get("fullDocument", "default")
    before = spec.get("fullDocumentBeforeChange", "off")
    if full_document not in ("default", "updateLookup", "whenAvailable", "required"):
        raise CommandError(2, "BadValue", f"unknown fullDocument mode {full_document!r}")
    if before not in ("off", "whenAvailable", "required"):
        raise CommandError(2, "BadValue", f"unknown fullDocumentBeforeChange mode {before!r}")
    resume = spec.get("resumeAfter")
    start_after = spec.get("startAfter")
    if resume is not None and start_after is not None:
        raise CommandError(50865, "Location50865", "Do not specify both 'resumeAfter' and 'startAfter'")
    position = oplog.head
    skip_fragments = None
    if resume is not None or start_after is not None:
        counter, is_invalidate, fragment = parse_token(resume if resume is not None else start_after)
        if is_invalidate and resume is not None:
            raise CommandError(260, "InvalidResumeToken", "Cannot resume after an invalidate event; use startAfter")
        if counter < oplog.floor:
            raise CommandError(286, "ChangeStreamHistoryLost",
                               "Resume of change stream was not possible, as the resume point may no longer be in the oplog.")
        position = counter
        if fragment is not None:  # after a fragment: the event's later fragments come first
            position, skip_fragments = counter - 1, (counter, fragment + 1)
    elif (at := spec.get("startAtOperationTime")) is not None:
        if at.inc <= oplog.floor:
            raise CommandError(286, "ChangeStreamHistoryLost", "startAtOperationTime is older than the oplog")
        position = at.inc - 1
    return ChangeStream(cursor_id, db, coll, position, match, full_document, before, batch_size, split=split,
                        skip_fragments=skip_fragments, projection=projection)


def _render(stream: ChangeStream, entry: Entry, lookup: Callable[[str, str, dict[str, Any]], dict[str, Any] | None]) -> list[dict[str, Any]]:
    if entry.db != stream.db or (stream.coll is not None and entry.op != "dropDatabase" and entry.coll != stream.coll):
        return []
    base = {"clusterTime": entry.ts, "wallTime": entry.wall}
    if entry.op == "dropDatabase":
        if stream.coll is not None:
            return []  # the collection's own drop entry already invalidated it
        return [
            {"_id": token(entry.counter), "operationType": "dropDatabase", **base, "ns": {"db": entry.db}},
            {"_id": token(entry.counter, True), "operationType": "invalidate", **base},
        ]
    ns = {"db": entry.db, "coll": entry.coll}
    if entry.op == "rename":  # as mongod: the stream of the renamed collection ends with it
        rename = {"_id": token(entry.counter), "operationType": "rename", **base, "ns": ns,
                  "to": {"db": entry.db, "coll": entry.to_coll}}
        if stream.coll is None:
            return [rename]
        return [rename, {"_id": token(entry.counter, True), "operationType": "invalidate", **base}]
    if entry.op == "drop":
        drop = {"_id": token(entry.counter), "operationType": "drop", **base, "ns": ns}
        if stream.coll is None:
            return [drop]
        return [drop, {"_id": token(entry.counter, True), "operationType": "invalidate", **base}]
    event: dict[str, Any] = {"_id": token(entry.counter), "operationType": entry.op, **base}
    if entry.op in ("insert", "replace"):
        event["fullDocument"] = entry.full_document
    elif entry.op == "update" and stream.full_document != "default":
        event["fullDocument"] = lookup(entry.db, entry.coll, entry.document_key or {})
    event["ns"] = ns
    event["documentKey"] = entry.document_key
    if entry.op == "update":
        event["updateDescription"] = entry.update_description
    if stream.before_change != "off" and entry.op in ("update", "replace", "delete"):
        if entry.pre_image is None and stream.before_change == "required":
            raise CommandError(387, "NoMatchingDocument", f"pre-image not available for {entry.db}.{entry.coll}")
        event["fullDocumentBeforeChange"] = entry.pre_image
    if entry.lsid is not None:
        event["lsid"] = entry.lsid
        event["txnNumber"] = entry.txn_number
    return [event]


def next_batch(
    oplog: Oplog, stream: ChangeStream, lookup: Callable[[str, str, dict[str, Any]], dict[str, Any] | None], limit: int
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Events after the stream's position (at most `limit`) and the postBatchResumeToken."""
    if stream.position < oplog.floor:
        raise CommandError(286, "ChangeStreamHistoryLost", "the change stream's position is no longer in the oplog",
                           labels=[])
    batch: list[dict[str, Any]] = []
    size = 0

    def add(event: dict[str, Any]) -> None:
        # As mongod: at most `limit` events and about 16 MiB per reply, the rest waits.
        nonlocal size
        event_size = len(bson.encode(event))
        if stream.pending or len(batch) >= limit or (batch and size + event_size > MAX_BATCH_BYTES):
            stream.pending.append(event)
        else:
            batch.append(event)
            size += event_size

    waiting, stream.pending = stream.pending, []
    for event in waiting:
        add(event)
    if not stream.invalidated:
        for entry in oplog.after(stream.position):
            if stream.pending or len(batch) >= limit:
                break
            stream.position = entry.counter
            for event in _render(stream, entry, lookup):
                if event["operationType"] == "invalidate":
                    stream.invalidated = True
                elif stream.match is not None and not matches(event, stream.match):
                    continue
                if stream.projection is not None:  # before the split stage, as the pipeline's order says
                    event = {k: v for k, v in event.items() if k in stream.projection}
                for piece in _fit(stream, entry.counter, event):
                    add(piece)
            if stream.invalidated:
                break
    pbrt = batch[-1]["_id"] if batch and (stream.pending or stream.invalidated) else token(stream.position)
    return batch, pbrt


def _fit(stream: ChangeStream, counter: int, event: dict[str, Any]) -> list[dict[str, Any]]:
    """The event as the server sends it: whole when within 16 MiB; else BSONObjectTooLarge (10334,
    which kills the cursor), or, after $changeStreamSplitLargeEvent, fragments as mongod's
    splitChangeEvent builds them: the fields other than _id sorted by (size, name), packed
    greedily, each fragment with a token of its own and splitEvent {fragment, of}."""
    skip = stream.skip_fragments[1] if stream.skip_fragments and stream.skip_fragments[0] == counter else 0
    encoded = bson.encode(event)
    if len(encoded) <= MAX_USER_BSON:
        return [] if skip else [event]
    if not stream.split:
        raise CommandError(10334, "BSONObjectTooLarge",
                           f"BSONObj size: {len(encoded)} (0x{len(encoded):X}) is invalid. Size must be between 0 and "
                           f"16793600(16MB) First element: _id: {event['_id']!r}")
    fields = sorted(((len(bson.encode({k: v})) - 5, k) for k, v in event.items() if k != "_id"))
    fragments: list[dict[str, Any]] = []
    i = 0
    while i < len(fields):
        fragment: dict[str, Any] = {"_id": token(counter, fragment=len(fragments)),
                                    "splitEvent": {"fragment": len(fragments) + 1, "of": 0}}
        fragment_size = len(bson.encode(fragment))
        while True:
            field_size, name = fields[i]
            fragment[name] = event[name]
            fragment_size += field_size
            i += 1
            if i == len(fields) or fragment_size + fields[i][0] > MAX_USER_BSON:
                break
        if fragment_size > MAX_USER_BSON:
            raise CommandError(7182500, "Location7182500", f"Splitting change event failed: fragment size {fragment_size} "
                                                           f"is greater than maximum allowed fragment size {MAX_USER_BSON}")
        fragments.append(fragment)
    for fragment in fragments:
        fragment["splitEvent"]["of"] = len(fragments)
    return fragments[skip:]
