"""Sessions: what survives a disconnect so that a client can resume without loss.

A session belongs to one subject in one workspace and remembers its subscriptions. When its
connection ends it is suspended for `resume_ttl`; an `auth` with `resume` (same subject and
workspace) within that time takes it back. Suspended sessions are bounded by age and by count:
past the count, the workspace holding the most loses its oldest (one workspace's churn must not
push out every other workspace's sessions). A drained shutdown writes them to the state directory
(`dump`) and the next start reads them back (`restore`), so a restart within `resume_ttl`
still resumes.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import msgspec

from rtserver import channels, ids
from rtserver.atomic_file import replace_file
from rtserver.channels import SubscriptionSpec
from rtserver.history import DECODED_PER_TOKEN

log = logging.getLogger("rtserver.sessions")
_DUMP_VERSION = 1
# What a subscription of a suspended session counts beyond its filter (as held decoded) and its
# channel's name (history.max_suspended_filter_bytes): counted by its filter alone, a session of 100
# unfiltered subscriptions weighed nothing and held ~60 KB (measured), so the bound let a
# client churning connections hold gigabytes (100,000 such sessions).
SUBSCRIPTION_BYTES = 64
# Expired sessions dropped between two turns of the event loop (Sessions.sweep).
EXPIRE_CHUNK = 2048


@dataclass
class Session:
    id: str
    subject: str
    workspace: str
    specs: dict[str, SubscriptionSpec] = field(default_factory=dict)
    suspended_at: float | None = None
    # The workspace position when the connection ended: the replay start when a resume
    # carries no `since` (a client that passes its last seen seq gets an exact replay).
    last_seq: int = 0
    # Its subscriptions' bytes while suspended (Sessions.max_bytes): weigh().
    weight: int = 0
    # (channel, why) of the subscriptions left out when it was restored, told at its resume
    dropped: list[tuple[str, str]] = field(default_factory=list)


def weigh(session: Session) -> int:
    """The bytes `session`'s subscriptions count against history.max_suspended_filter_bytes:
    each its filter as it is held decoded (its JSON and DECODED_PER_TOKEN per `,` `:` `[` of it,
    as the history counts an event: a filter's JSON decodes to 20 times its size and more, and
    counted as its JSON the bound let the suspended sessions hold that many times it), its
    channel's name and SUBSCRIPTION_BYTES."""
    return sum(spec.filter_bytes + DECODED_PER_TOKEN * spec.filter_tokens + len(spec.channel) + SUBSCRIPTION_BYTES
               for spec in session.specs.values())


class Sessions:
    def __init__(self, ttl: float, max_suspended: int, max_bytes: int = 1 << 62):
        self.ttl = ttl
        self.max_suspended = max_suspended
        # The subscriptions of the suspended sessions together, in bytes (weigh()): bounded
        # by count alone, a client churning connections with 128 KiB of filters each held
        # 100,000 sessions' worth of them (gigabytes) for resume_ttl. Past it the workspace whose
        # sessions hold the most bytes loses its oldest (_heaviest: (-bytes, workspace),
        # entries gone stale skipped when met).
        self.max_bytes = max_bytes
        self.bytes = 0
        self._bytes_by_workspace: dict[str, int] = {}
        self._heaviest: list[tuple[int, str]] = []
        # Every suspended session, oldest first (expiry by age), and the same per workspace.
        self._suspended: OrderedDict[str, Session] = OrderedDict()
        self._by_workspace: dict[str, OrderedDict[str, Session]] = {}
        # Workspaces by the number of sessions they hold, and the highest such number: past
        # max_suspended the workspace holding the most loses its oldest, found in O(1) per
        # suspend. (Dropping the node's oldest let one workspace churning ~1,900 connections
        # a second push every other workspace's sessions out of the default 100,000 in ~53 s,
        # within resume_ttl.)
        self._holding: dict[int, set[str]] = {}
        self._most = 0
        self.expired = 0

    def new(self, subject: str, workspace: str) -> Session:
        return Session(id=ids.token_urlsafe(18), subject=subject, workspace=workspace)

    def suspend(self, session: Session, last_seq: int) -> None:
        if session.id in self._suspended:
            self._remove(self._suspended[session.id])
        session.suspended_at = time.monotonic()
        session.last_seq = last_seq
        session.weight = weigh(session)
        self._suspended[session.id] = session
        mine = self._by_workspace.get(session.workspace)
        if mine is None:
            mine = self._by_workspace[session.workspace] = OrderedDict()
        mine[session.id] = session
        self._recount(session.workspace, len(mine) - 1, len(mine))
        self._weigh(session.workspace, session.weight)
        while len(self._suspended) > self.max_suspended:
            largest = next(iter(self._holding[self._most]))
            self._remove(next(iter(self._by_workspace[largest].values())))
            self.expired += 1
        while self.bytes > self.max_bytes:
            heaviest = self._heaviest_workspace()
            self._remove(next(iter(self._by_workspace[heaviest].values())))
            self.expired += 1

    def _weigh(self, workspace: str, delta: int) -> None:
        """`workspace`'s suspended sessions hold `delta` more bytes of filters."""
        if not delta:
            return
        self.bytes += delta
        held = self._bytes_by_workspace.get(workspace, 0) + delta
        if held:
            self._bytes_by_workspace[workspace] = held
            heapq.heappush(self._heaviest, (-held, workspace))
        else:
            del self._bytes_by_workspace[workspace]
        if len(self._heaviest) > 4 * len(self._bytes_by_workspace) + 64:  # mostly stale: rebuild
            self._heaviest = [(-held, wid) for wid, held in self._bytes_by_workspace.items()]
            heapq.heapify(self._heaviest)

    def _heaviest_workspace(self) -> str:
        heap = self._heaviest
        while -heap[0][0] != self._bytes_by_workspace.get(heap[0][1]):
            heapq.heappop(heap)
        return heap[0][1]

    def _remove(self, session: Session) -> None:
        del self._suspended[session.id]
        mine = self._by_workspace[session.workspace]
        del mine[session.id]
        if not mine:
            del self._by_workspace[session.workspace]
        self._recount(session.workspace, len(mine) + 1, len(mine))
        self._weigh(session.workspace, -session.weight)

    def _recount(self, workspace: str, before: int, after: int) -> None:
        """`workspace` went from holding `before` sessions to `after` (one more or one less)."""
        if before:
            bucket = self._holding[before]
            bucket.discard(workspace)
            if not bucket:
                del self._holding[before]
                if self._most == before:
                    self._most = after  # one less: `workspace` holds the new most (or none do)
        if after:
            self._holding.setdefault(after, set()).add(workspace)
            if after > self._most:
                self._most = after

    def take(self, session_id: str, subject: str, workspace: str) -> Session | None:
        """The suspended session `session_id` if it may be resumed by `subject` in `workspace`."""
        self.sweep(EXPIRE_CHUNK)
        session = self._suspended.get(session_id)
        if session is None or session.subject != subject or session.workspace != workspace:
            return None
        at = session.suspended_at
        if at is None or at < time.monotonic() - self.ttl:
            return None  # expired, not swept yet
        self._remove(session)
        session.suspended_at = None
        return session

    def sweep(self, most: int | None = None) -> bool:
        """Drop the sessions suspended for longer than the TTL, oldest first: at most `most` of
        them (None: all); True when expired ones remain. Sessions suspended together (a network
        cut, 100,000 clients) expire together: one pass over all of them held the loop (~0.13 s
        per 100,000), so the periodic sweep takes them EXPIRE_CHUNK at a time with turns of the
        loop in between (Gateway._sweep_once)."""
        horizon = time.monotonic() - self.ttl
        left = most
        while self._suspended:
            oldest = next(iter(self._suspended.values()))
            if oldest.suspended_at is not None and oldest.suspended_at >= horizon:
                break
            if left is not None:
                if left <= 0:
                    return True
                left -= 1
            self._remove(oldest)
            self.expired += 1
        return False

    def __len__(self) -> int:
        return len(self._suspended)

    def dump(self) -> bytes:
        """The suspended sessions, each with its wall-clock expiry (monotonic time does not
        survive a restart), for `restore` in the next process. The same as
        `encode_dump(self.snapshot())`; the gateway encodes in an executor (100,000 sessions:
        ~0.6 s)."""
        return encode_dump(self.snapshot())

    def snapshot(self) -> DumpSnapshot:
        """What `encode_dump` needs, taken on the event loop (a list copy: ~20 ms for 100,000
        sessions); the encoding may then run in another thread."""
        self.sweep()
        return DumpSnapshot(time.monotonic(), time.time(), self.ttl, list(self._suspended.values()))

    def restore(self, data: bytes) -> int:
        """Take back the sessions of `dump` that have not expired; returns how many. A session
        this version cannot read (a channel or filter refused since it was saved) is left out
        on its own: the others come back."""
        try:
            doc = msgspec.json.decode(data)
            if not isinstance(doc, dict) or doc.get("version") != _DUMP_VERSION:
                raise ValueError(f"unknown format {doc.get('version') if isinstance(doc, dict) else doc!r}")
            rows = sorted(doc["sessions"], key=lambda r: r["expiresAt"])
        except (msgspec.DecodeError, ValueError, KeyError, TypeError) as exc:
            log.warning("suspended sessions not restored: unreadable dump", extra={"fields": {"error": str(exc)}})
            return 0
        now_mono, now_wall = time.monotonic(), time.time()
        restored = 0
        unreadable: list[str] = []
        for r in rows:
            try:
                left = float(r["expiresAt"]) - now_wall
                if left <= 0:
                    continue
                specs: dict[str, SubscriptionSpec] = {}
                dropped = []
                for sub in r["subscriptions"]:
                    spec = channels.parse(sub["channel"], sub["filter"])
                    key = channels.subscription_key(spec.channel)
                    if key in specs:
                        # Saved by an earlier version, which kept the two spellings of a public
                        # table (orders, public.orders) as two subscriptions: one now, the later
                        # one as a subscribe would replace it, and the other told, not lost unseen.
                        gone = specs[key].channel
                        dropped.append((gone, f"{gone}: the same table as {spec.channel}, subscribed too before a "
                                              "restart: one subscription now, with the filter of the latter: "
                                              "subscription dropped"))
                    specs[key] = spec
                session = Session(id=r["id"], subject=r["subject"], workspace=r["workspace"], specs=specs,
                                  last_seq=int(r["lastSeq"]), dropped=dropped)
            except (ValueError, KeyError, TypeError, channels.ChannelError, channels.InvalidFilter) as exc:
                unreadable.append(str(exc))
                continue
            self.suspend(session, session.last_seq)
            session.suspended_at = now_mono - (self.ttl - min(left, self.ttl))
            restored += 1
        if unreadable:
            log.warning("suspended sessions not restored: unreadable", extra={"fields": {
                "sessions": len(unreadable), "restored": restored, "error": unreadable[0]}})
        return restored


@dataclass
class DumpSnapshot:
    now_mono: float
    now_wall: float
    ttl: float
    sessions: list[Session]


def encode_dump(snap: DumpSnapshot) -> bytes:
    """`Sessions.dump()` of a snapshot; CPU-bound (run it in an executor for a large one). A
    session taken back (resumed) since the snapshot is left out. Each session is encoded on its
    own, so the thread running this lets the event loop's thread in between (one call over the
    whole document would hold the interpreter lock throughout)."""
    encode = msgspec.json.encode
    rows: list[bytes] = []
    for s in snap.sessions:
        suspended_at = s.suspended_at
        if suspended_at is None:
            continue
        rows.append(encode({
            "id": s.id,
            "subject": s.subject,
            "workspace": s.workspace,
            "lastSeq": s.last_seq,
            "expiresAt": snap.now_wall + suspended_at + snap.ttl - snap.now_mono,
            "subscriptions": [{"channel": spec.channel, "filter": spec.filter} for spec in list(s.specs.values())],
        }))
    return b'{"version":%d,"sessions":[' % _DUMP_VERSION + b",".join(rows) + b"]}"


def write_dump(path: str, data: bytes) -> None:
    """Write `Sessions.dump()` to `path` (0600: session ids; blocking, run it in an executor)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    replace_file(path, data)


def read_dump(path: str) -> bytes | None:
    """The dump at `path`, left in place (`drop_dump` removes it once the gateway is up: a start
    that fails before would otherwise lose the sessions); None when there is none. Blocking."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def drop_dump(path: str) -> None:
    """Remove the dump once restored and served from: a later crash must not bring its
    sessions back a second time. Blocking: run it in an executor."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
