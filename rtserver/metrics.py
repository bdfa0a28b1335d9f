"""Process metrics and their Prometheus text rendering for GET /metrics.

Counters are plain attributes incremented on the hot path (no locks: one event loop); labelled
counters are small dicts. Gauges that other components own are read through callbacks at scrape
time, so nothing is computed unless someone asks.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any


class Metrics:
    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_refused = 0  # answered 503: the node at limits.max_node_connections or its socket share
        # Labelled counters start with the series they always show: one that vanished when
        # another label value was counted, or appeared at its first count, lost that count
        # from Prometheus's increase() and rate().
        self.events_in: Counter[str] = Counter(dict.fromkeys(("events", "mongo", "postgres"), 0))  # by source kind
        self.deliveries = 0  # event frames queued for connections (counted per frame)
        self.frames_out = 0  # all frames written, events and control
        self.writes = 0  # transport writes (coalesced)
        self.drops_slow_reader = 0  # connections closed with 1013
        self.auth_failures: Counter[int] = Counter({4002: 0})  # by close/error code
        self.messages_in = 0
        self.invalid_messages = 0
        self.publish_requests: Counter[int] = Counter({202: 0})  # by HTTP status
        self.history_gaps = 0
        self.replayed = 0
        self.publisher_waits = 0  # publishes that waited for the write backlog (Hub.room)
        # Providers of rows read at scrape time, each with the names of its rows that only grow
        # (typed counter, so rate() and increase() mean what they say); the rest are gauges.
        self._gauges: list[tuple[Callable[[], list[tuple[str, str, dict[str, Any], float]]], frozenset[str]]] = []
        # Garbage-collector passes by generation and the time the loop stood still in them: a
        # collection holds every connection's frames back, so it shows in the latency tail.
        self.gc_collections = [0, 0, 0]
        self.gc_seconds = [0.0, 0.0, 0.0]
        self._gc_started = 0.0

    def watch_gc(self) -> None:
        """Count collections and their pauses (rt_gc_*); idempotent."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            gen = info["generation"]
            self.gc_collections[gen] += 1
            self.gc_seconds[gen] += time.perf_counter() - self._gc_started

    def add_gauges(self, fn: Callable[[], list[tuple[str, str, dict[str, Any], float]]],
                   counters: Iterable[str] = ()) -> None:
        """Register a callback giving (name, help, labels, value) rows at scrape time; the rows
        named in `counters` count since start (typed counter), the others are gauges."""
        self._gauges.append((fn, frozenset(counters)))

    def render(self) -> bytes:
        lines: list[str] = []

        def counter(name: str, help_: str, rows: list[tuple[dict[str, Any], float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} counter")
            for labels, value in rows:
                lines.append(f"{name}{_labels(labels)} {value}")

        counter("rt_connections_total", "WebSocket connections accepted", [({}, self.connections_total)])
        counter("rt_connections_refused_total", "Connections answered 503 because the node is full: WebSocket upgrades "
                "past limits.max_node_connections, and any connection past the client sockets it holds (that and 512)",
                [({}, self.connections_refused)])
        counter(
            "rt_events_in_total",
            "Events received from sources",
            [({"source": k}, v) for k, v in sorted(self.events_in.items())],
        )
        counter("rt_deliveries_total", "Event frames queued for connections (each frame a delivery; a connection closed before writing them counts them too)", [({}, self.deliveries)])
        counter("rt_frames_out_total", "All frames written to connections", [({}, self.frames_out)])
        counter("rt_writes_total", "Transport writes (several frames coalesce into one)", [({}, self.writes)])
        counter("rt_publisher_waits_total", "Publishes held until the write backlog was within bound (rt_write_queue_bound: limits.fanout_backlog, or fanout_backlog_per_connection per open connection when that is more)",
                [({}, self.publisher_waits)])
        counter("rt_drops_total", "Connections closed because they read too slowly (1013)", [({"reason": "slow_reader"}, self.drops_slow_reader)])
        counter(
            "rt_auth_failures_total",
            "Refused authentications by code",
            [({"code": k}, v) for k, v in sorted(self.auth_failures.items())],
        )
        counter("rt_messages_in_total", "Client messages received", [({}, self.messages_in)])
        counter("rt_invalid_messages_total", "Client messages refused with 4000", [({}, self.invalid_messages)])
        counter(
            "rt_publish_requests_total",
            "Publish API requests by HTTP status",
            [({"status": k}, v) for k, v in sorted(self.publish_requests.items())],
        )
        counter("rt_history_gaps_total", "history_gap errors sent", [({}, self.history_gaps)])
        counter("rt_replayed_total", "Events replayed from history", [({}, self.replayed)])
        counter("rt_gc_collections_total", "Garbage-collector passes by generation",
                [({"generation": g}, n) for g, n in enumerate(self.gc_collections)])
        counter("rt_gc_pause_seconds_total", "Time the event loop spent in garbage-collector passes",
                [({"generation": g}, round(s, 6)) for g, s in enumerate(self.gc_seconds)])

        for fn, counters in self._gauges:
            lines.extend(family_lines(fn(), counters))
        lines.append("")
        return "\n".join(lines).encode()


Row = tuple[str, str, dict[str, Any], float]  # name, help, labels, value

# What the sources' status() counts since start (PostgreSQL and MongoDB): typed counter.
SOURCE_COUNTS = frozenset(f"rt_source_{k}" for k in (
    "events", "transactions", "duplicates_dropped", "slot_recreations", "streamed_transactions",
    "streamed_aborted", "streamed_subtransactions_aborted", "streams_opened", "history_lost", "skipped_changes"))


def family_lines(rows: Iterable[Row], counters: frozenset[str] = frozenset()) -> list[str]:
    """`rows` in the text format, the rows named in `counters` typed counter, the others gauge.
    The format wants each family's samples together: providers interleave them (per source:
    ready, then its counts), so they are grouped here, in first-seen order."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for name, help_, labels, value in rows:
        family = families.get(name)
        if family is None:
            family = families[name] = (help_, "counter" if name in counters else "gauge", [])
        family[2].append(f"{name}{_labels(labels)} {value}")
    lines: list[str] = []
    for name, (help_, kind, samples) in families.items():
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)
    return lines


# The HELP line of each number a source's status() gives (README's Metrics table says the same).
SOURCE_HELP = {
    "events": "Changes the source turned into events",
    "transactions": "PostgreSQL transactions read",
    "duplicates_dropped": "PostgreSQL changes read again after a reconnect and dropped",
    "slot_recreations": "Replication slots re-created after PostgreSQL invalidated them",
    "proto_version": "pgoutput protocol version in use (0 before the first connection)",
    "lag_bytes": "WAL the slot holds that the gateway has not confirmed",
    "safe_wal_size": "Bytes of WAL before PostgreSQL invalidates the slot",
    "streamed_transactions": "Large transactions PostgreSQL streamed before their commit",
    "streamed_aborted": "Streamed transactions that were rolled back",
    "streamed_subtransactions_aborted": "Subtransactions of streamed transactions rolled back",
    "streamed_open": "Streamed transactions not yet committed",
    "streamed_memory_bytes": "Changes of open streamed transactions held in memory",
    "streamed_spill_files": "Files the changes of open streamed transactions spilled to",
    "streamed_spill_bytes": "Bytes of those files",
    "queued_frames": "Replication messages read and not yet handled",
    "queued_bytes": "Bytes of replication messages read and not yet handled",
    "streams_opened": "MongoDB change streams opened (reopens included)",
    "history_lost": "MongoDB resume tokens the oplog no longer held (clients got history_gap)",
    "skipped_changes": "MongoDB changes that could not be turned into events",
    "last_event_age_s": "Seconds since the MongoDB source's last event",
}


def source_rows(sources: Iterable[tuple[str, str, str, Any]]) -> list[Row]:
    """The rt_source_* rows of (kind, redacted URL, MongoDB database or "", source) entries: its
    readiness and every number of its status(), as the gateway's and the ingest's /metrics show
    them. A PostgreSQL source is labelled by its URL; a MongoDB one by its database, and its
    URL too when two servers have a database of that name (else each sample came twice)."""
    sources = list(sources)
    mongo_names = Counter(database for kind, _, database, _ in sources if kind == "mongo")
    rows: list[Row] = []
    for kind, url, database, src in sources:
        labels = {"source": kind, "database": database if kind == "mongo" else url}
        if kind == "mongo" and mongo_names[database] > 1:
            labels["url"] = url
        rows.append(("rt_source_ready", "1 while the source streams", labels, 1 if src.ready() else 0))
        for name, value in src.status().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((f"rt_source_{name}", SOURCE_HELP.get(name, f"Source {name}"), labels, value))
            elif name == "wal_status" and value:
                # PostgreSQL slot health: reserved | extended | unreserved | lost
                rows.append(("rt_source_wal_status", "Replication slot WAL status", {**labels, "wal_status": value}, 1))
    return rows


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
