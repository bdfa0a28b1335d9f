"""The gateway process: wires configuration, auth, audit, sources, bus and hub to the listener,
and owns the lifecycle (start, periodic sweeps, drain on SIGTERM)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

import msgspec
from picows import WSUpgradeRequest

from rtcore.engine import reference_modules
from rtcore.event import Event
from rtcore.messages import UNREADABLE_JSON, unreadable_json
from rtcore.timefmt import iso_ms, now_ms
from rtserver import http, publish
from rtserver.atomic_file import ensure_state_dir
from rtserver.audit import create_audit
from rtserver.auth import Authenticator, AuthError, load_or_create_dev_secret
from rtserver.bus import SHUTTING_DOWN, BusUnavailable, create_bus
from rtserver.channels import TOPIC_RE
from rtserver.config import WORKSPACE_ID_RE, Config, WorkspaceSources
from rtserver.config_check import serve_warnings, server_tls_context
from rtserver.connection import Connection
from rtserver.eager import run_now
from rtserver.fd_limit import connection_share, open_files_limit, socket_share
from rtserver.file_lock import lock_exclusive
from rtserver.gc_policy import FreezeSurvivors
from rtserver.history import now_us
from rtserver.hub import Hub, in_turns
from rtserver.known_workspaces import KnownWorkspaces
from rtserver.metrics import SOURCE_COUNTS, Metrics, source_rows
from rtserver.publish import CORRELATION_MAX, correlation_problem, custom_event
from rtserver.redact import redact
from rtserver.seq_reservation import SeqReservation, reservation_path
from rtserver.sessions import EXPIRE_CHUNK, Sessions, drop_dump, encode_dump, read_dump, write_dump
from rtserver.signals import until_signalled
from rtserver.sources.base import YIELD_EVERY, Source, stop_all
from rtserver.sources.mongo import SOCKETS_PER_DATABASE, database_for, database_problem, deployment_of

log = logging.getLogger("rtserver.app")
# Workspaces whose generated correlation ids are counted at once (Gateway._new_correlation).
_CORRELATION_WORKSPACES = 65536

_json = msgspec.json.Encoder()
_SWEEP_INTERVAL = 1.0
_PREFETCH_WAIT = 1.0  # seconds the start waits for the JWKS prefetch before it listens anyway


class Gateway:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.node = cfg.server.node or socket.gethostname()
        self.state_dir = os.path.abspath(cfg.server.state_dir)
        ensure_state_dir(self.state_dir)
        try:
            dev_secret = load_or_create_dev_secret(self.state_dir) if cfg.dev_mode else None
        except OSError as exc:
            raise RuntimeError(f"state directory {self.state_dir} (server.state_dir): {exc.strerror or exc}") from None
        self.metrics = Metrics()
        # The sockets of the workspace databases a default MongoDB URL naming none may open on
        # demand (mongo.max_databases) are kept out of the clients' share of the open files.
        # True when mongo.url names no database and this process reads each workspace's own (not
        # on a Kafka node: its ingest reads the feeds). Read once: a URL is parsed to know.
        self._reads_workspace_databases = (bool(cfg.mongo.url) and cfg.bus.kind != "kafka"
                                           and _mongo_database(cfg.mongo.url) is None)
        kept = SOCKETS_PER_DATABASE * cfg.mongo.max_databases if self._reads_workspace_databases else 0
        self.max_node_connections = connection_share(cfg.limits.max_node_connections, kept)
        # HTTP connections open and not WebSockets (http.FrontProtocol), and the bound of them
        # and the WebSockets together.
        self.http_sockets = 0
        # WebSockets closed, out of gw.connections, whose socket still has bytes to write
        # (Connection._disconnect): up to limits.idle_timeout each.
        self.closing_sockets = 0
        self.max_client_sockets = socket_share(self.max_node_connections, kept)
        # Bytes of pipelined HTTP requests queued on all connections, and those paused for them.
        self.pipelined = http.PipelinedBytes(cfg.limits.pipelined_publish_bytes)
        self.hub = Hub(cfg, self.metrics)
        self.hub.open_connections = lambda: len(self.connections)
        self.sessions = Sessions(cfg.history.resume_ttl, cfg.history.max_suspended_sessions,
                                 cfg.history.max_suspended_filter_bytes)
        self.dev_secret = dev_secret
        self.auth = Authenticator(cfg, dev_secret=self.dev_secret)
        self.audit = create_audit(cfg, self.node)
        self.bus = create_bus(cfg, self.hub, self.metrics, self.node)
        self.connections: set[Connection] = set()
        self.draining = False
        self._sources: dict[tuple[Any, ...], Source] = {}
        self._workspace_databases = 0  # sources of workspace databases read through mongo.url naming none
        self._mongo_cap_logged = False
        self._shared_database_logged: set[str] = set()  # workspaces why_no_source logged (_read_by_section)
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None
        self._gc_policy: FreezeSurvivors | None = None
        self._stopped = asyncio.Event()
        self.port = 0
        # The peer, workspace and bearer token of the upgrade being handed to picows
        # (http.FrontProtocol._upgrade).
        self.upgrading_remote = self.upgrading_workspace = ""
        self.upgrading_token: str | None = None
        self.static: dict[str, tuple[str, bytes]] = {}
        # Generated correlation ids, per workspace: (random prefix, counter); see _new_correlation.
        self._correlations: dict[str, tuple[str, Iterator[int]]] = {}
        self._known = KnownWorkspaces(os.path.join(self.state_dir, "workspaces"))
        # The sessions suspended by a drained shutdown, for the next start (sessions.py).
        self._sessions_path = os.path.join(self.state_dir, "sessions.json")
        # Memory bus: seq is a clock reading, kept increasing across restarts by a reservation
        # (seq_reservation.py); a Kafka node's seq is the topic offset.
        self._seq = SeqReservation(reservation_path(self.state_dir)) if cfg.bus.kind == "memory" else None
        self.metrics.add_gauges(self._gauges, counters=_COUNTS)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        # Before anything connects anywhere: a certificate that cannot be loaded stops the
        # start at once, not after the sources, the bus and the audit trail have started.
        ctx = server_tls_context(cfg)
        for message, fields in serve_warnings(cfg, self.state_dir):
            log.warning(message, extra={"fields": fields})
        loop = asyncio.get_running_loop()
        self.metrics.watch_gc()
        if cfg.server.demo:
            self.static = await loop.run_in_executor(None, load_static)
        self.hub.retirable = self._retirable
        if self._seq is not None:
            # Before any history exists: every one starts above what earlier runs handed out.
            base = await self._seq.start(now_us())
            self.hub.history_floor = lambda _wid: max(now_us(), base)
        for wid in await loop.run_in_executor(None, self._known.load):
            # Only the workspaces a shared feed records into need a history from the start;
            # any other starts as after a restart when it is next used.
            if not self._retirable(wid):
                self.hub.workspace(wid)
        dump = await loop.run_in_executor(None, read_dump, self._sessions_path)
        if dump is not None:
            restored = self.sessions.restore(dump)
            log.info("suspended sessions restored", extra={"fields": {"sessions": restored}})
        self.hub.on_new_workspace = self._remember
        prefetch = self.auth.prefetch()
        if prefetch is not None:
            # Awaited to the end, an identity provider slow to answer (or whose packets are
            # dropped) held the port closed up to the fetch timeout (10 s) at every start, and
            # /healthz and the HS256 services with it. One that answers at once has its keys
            # loaded before the first client comes.
            await asyncio.wait({prefetch}, timeout=_PREFETCH_WAIT)
        await self.audit.start()
        await self.bus.start()
        for src in self._boot_sources():
            await src.start()
        try:
            self._server = await loop.create_server(
                lambda: http.FrontProtocol(self),
                host=cfg.server.host,
                port=cfg.server.port,
                ssl=ctx,
                # A connection that never finishes its TLS handshake reaches no protocol, and so
                # no count of the client sockets, until this passes (asyncio's default: 60 s).
                ssl_handshake_timeout=cfg.limits.request_timeout if ctx else None,
                backlog=4096,
                reuse_address=True,
                start_serving=False,  # bound: from here on the start succeeds
            )
        except OSError as exc:
            # Said here, where it is known to be the listener: other start-up steps fail with
            # OSErrors of their own (a state file), which the CLI reports by their file name.
            raise RuntimeError(f"cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror or exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        if dump is not None:
            # Removed only once the port is ours, before a client can resume one: a start that
            # failed before (the port in use, a broker down) left them for the next one.
            await loop.run_in_executor(None, drop_dump, self._sessions_path)
        await self._server.start_serving()
        self._sweeper = asyncio.ensure_future(self._sweep())
        if cfg.server.gc_freeze:
            self._gc_policy = FreezeSurvivors()
            self._gc_policy.start()
        reference = reference_modules()
        if reference:  # the engine says its own at import; the decoders fell back without a word
            log.warning("rtcore modules not built, using their pure-Python references (same answers, slower)",
                        extra={"fields": {"modules": reference}})
        log.info(
            "listening",
            extra={
                "fields": {
                    "host": cfg.server.host,
                    "port": self.port,
                    "tls": bool(ctx),
                    "node": self.node,
                    "compiled_core": not reference,
                    **({"reference_modules": reference} if reference else {}),
                    "open_files_limit": open_files_limit(),
                    "max_node_connections": self.max_node_connections,
                }
            },
        )

    async def shutdown(self) -> None:
        """Stop accepting and the sources, close every client with 1001, flush, stop the audit."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        deadline = time.monotonic() + self.cfg.server.shutdown_timeout
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # The feeds stop before the subscribers are closed: a change taken after the 1001s went
        # to a history that ends with the process, for no one, and was acknowledged to its
        # source (a PostgreSQL slot, a MongoDB resume token), so the restarted gateway did not
        # have it either. Stopped first, it stays in the source for the next start; what was
        # taken before reaches the subscribers with the rest of what is queued for them.
        stopped = list(self._sources.values())
        await stop_all(stopped, max(0.5, (deadline - time.monotonic()) / 2))
        # The transports, taken before close(): a closed connection leaves gw.connections at
        # once, while its transport still writes what it had queued and the close frame.
        transports = [c._raw for c in list(self.connections) if c._raw is not None]
        for conn in list(self.connections):
            conn.close(1001, cause="shutdown")
        # Saved before anything that could hang (a broker that stopped answering): the
        # sessions just suspended resume after the restart.
        await self._save_sessions()
        # Let the queued frames and the close frames drain, within the shutdown timeout; a
        # client that reads nothing is cut off then.
        while any(t.get_write_buffer_size() for t in transports) and time.monotonic() < deadline - 2:
            await asyncio.sleep(0.05)
        for t in transports:
            if t.get_write_buffer_size():
                t.abort()
        # a source a subscribe made while the others stopped
        await stop_all([src for src in self._sources.values() if src not in stopped],
                       max(0.5, deadline - time.monotonic() - 1))
        try:
            await asyncio.wait_for(self.bus.close(), max(0.5, deadline - time.monotonic() - 1))
        except Exception:
            log.exception("event bus did not close cleanly")
        await self._known.flush()
        if self._seq is not None:
            try:
                # The bus is closed: no position is handed out any more.
                await self._seq.close(max(now_us(), self.hub.highest_position()))
            except OSError:
                log.exception("seq reservation not replaced at the stop", extra={"fields": {"path": self._seq.path}})
        try:
            await asyncio.wait_for(self.audit.close(), max(0.5, deadline - time.monotonic()))
        except Exception:
            log.exception("audit did not close cleanly")
        await self.auth.close()
        self.metrics.unwatch_gc()
        if self._gc_policy is not None:
            self._gc_policy.stop()
        self._stopped.set()

    async def _save_sessions(self) -> None:
        if not len(self.sessions):
            return
        try:
            # Encoding 100,000 sessions takes ~0.6 s: in the executor, from a snapshot.
            snap, path = self.sessions.snapshot(), self._sessions_path
            await asyncio.get_running_loop().run_in_executor(None, lambda: write_dump(path, encode_dump(snap)))
        except Exception:  # noqa: BLE001 - not only OSError: the rest of the stop must run
            # A session that could not be encoded (a subject no UTF-8 carries) ended the stop
            # here: the audit not flushed, the seq reservation not closed (logs audit).
            log.exception("suspended sessions not saved", extra={"fields": {"path": self._sessions_path}})

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            await self._sweep_once()

    async def _sweep_once(self) -> None:
        # A function of its own: a loop variable of _sweep would hold the last connection
        # visited (and all it references) until the next sweep.
        idle = self.cfg.limits.idle_timeout
        now = time.monotonic()
        async for conn in in_turns(list(self.connections)):
            conn.check_idle(now, idle)
        while self.sessions.sweep(EXPIRE_CHUNK):
            await asyncio.sleep(0)
        high = await self.hub.sweep(self.cfg.history.resume_ttl)
        if self._seq is not None:
            self._seq.renew(max(now_us(), high))

    # ---- sources ---------------------------------------------------------------------------

    def _boot_sources(self) -> list[Source]:
        """Sources to start with the process: every configured PostgreSQL database, and MongoDB
        databases named in configured URLs (a URL without a database serves each workspace's
        own database, started when that workspace is first seen)."""
        cfg = self.cfg
        started: list[Source] = []
        if cfg.bus.kind == "kafka":
            return started  # a gateway node: `rtserver ingest` reads the feeds
        wanted: list[tuple[str | None, str]] = [(w, k) for w in cfg.workspaces for k in ("postgres", "mongo")]
        if cfg.postgres.url:
            wanted.append((None, "postgres"))
        if cfg.mongo.url and _mongo_database(cfg.mongo.url):
            wanted.append((None, "mongo"))
        for wid, kind in wanted:
            src = self.source(wid, kind, start=False)
            if src is not None and src not in started:
                started.append(src)
        return started

    def source(self, workspace: str | None, kind: str, start: bool = True) -> Source | None:
        """The source of `kind` feeding `workspace` (None: the default database), created on
        first use; None when the workspace has no such source configured."""
        cfg = self.cfg
        key = self._source_key(workspace, kind)
        if key is None or kind == "mongo" and database_problem(key[1], key[2]) or self._not_ingested(workspace):
            return None  # why_no_source says why
        src = self._sources.get(key)
        if src is not None:
            return src
        if kind == "mongo" and self._read_by_section(workspace, key):
            return None  # why_no_source says why
        capped = kind == "mongo" and self._workspace_database(workspace, key)
        if capped and self._over_mongo_databases(workspace, key):
            if not self._mongo_cap_logged:
                self._mongo_cap_logged = True  # once: every further workspace would log it again
                log.warning("mongo.max_databases reached: workspaces beyond it get 4010 on their mongo channels",
                            extra={"fields": {"workspace": workspace, "max_databases": cfg.mongo.max_databases}})
            return None  # why_no_source says why
        url = key[1]
        ws_sources = self._configured(workspace)
        if cfg.bus.kind == "kafka":
            from rtserver.bus_kafka import RemoteSource

            src = self._sources[key] = RemoteSource(
                kind, url, ws_sources.postgres_schemas, ws_sources.postgres_tables,
                database=key[2] if kind == "mongo" else "",
                allow_unknown_collections=cfg.mongo.allow_unknown_collections,
            )
            return src
        targets = self._targets(kind, key)
        if kind == "postgres":
            from rtserver.sources.postgres import PostgresSource

            src = PostgresSource(
                url,
                schemas=ws_sources.postgres_schemas,
                tables=ws_sources.postgres_tables,
                instance=cfg.server.instance,
                state_dir=self.state_dir,
                sink=self.bus,
                workspaces=targets,
                stream_memory_bytes=cfg.postgres.stream_memory,
                receive_timeout=cfg.postgres.receive_timeout,
                other_urls=cfg.postgres_urls(),
            )
        else:
            from rtserver.sources.mongo import MongoSource

            src = MongoSource(
                url,
                database=key[2],
                state_dir=self.state_dir,
                sink=self.bus,
                workspaces=targets,
                allow_unknown_collections=cfg.mongo.allow_unknown_collections,
            )
        self._sources[key] = src
        if capped:
            self._workspace_databases += 1
        if start and not self.draining:
            task = asyncio.ensure_future(src.start())
            task.add_done_callback(_log_failure)
        return src

    def _not_ingested(self, workspace: str | None) -> bool:
        """True on a Kafka node for a workspace the ingest does not feed from the default
        databases, as far as this node's settings tell: bus.workspaces lists those it feeds (the
        ingest reads it); a node given an empty list cannot tell, and takes every workspace."""
        cfg = self.cfg
        return (cfg.bus.kind == "kafka" and workspace is not None and workspace not in cfg.workspaces
                and bool(cfg.bus.workspaces) and workspace not in cfg.bus.workspaces)

    def why_no_source(self, workspace: str, kind: str) -> str:
        """Why source(workspace, kind) is None, for the client's 4010."""
        if self._source_key(workspace, kind) is not None and self._not_ingested(workspace):
            return (f"{kind} changes of workspace {workspace} are not fed to the event stream: the ingest feeds the "
                    "default database to the workspaces bus.workspaces (RT_BUS_WORKSPACES) lists, and this one is "
                    "not among them")
        url = self.cfg.sources_for(workspace).mongo_url if kind == "mongo" else ""
        problem = url and database_problem(url, workspace)
        if problem:
            return problem
        key = self._source_key(workspace, kind) if url else None
        if key is not None and (section := self._read_by_section(workspace, key)):
            # The section is named in the log only: it is another workspace's id, and a client of
            # this one was told it, and that it reads this one's database (tenant-isolation audit).
            if workspace not in self._shared_database_logged:  # at most one per section's database
                self._shared_database_logged.add(workspace)
                log.warning("mongo: the database of a workspace is read for a [workspaces.*] section through another "
                            "URL: its mongo channels get 4010", extra={"fields": {
                                "workspace": workspace, "database": key[2], "section": f"[workspaces.{section}]"}})
            return (f"mongo: the database of workspace {workspace} ({key[2]!r}) is read for another workspace's "
                    "[workspaces.*] section through another URL, and one database is one feed: name this workspace "
                    "in a section of its own")
        if key is not None and self._over_mongo_databases(workspace, key):
            return (f"mongo: the database of workspace {workspace} is not read: this gateway reads "
                    f"{self.cfg.mongo.max_databases} workspace databases at most (mongo.max_databases, "
                    f"RT_MONGO_MAX_DATABASES), all in use")
        return f"{kind} is not configured for workspace {workspace}"

    def _workspace_database(self, workspace: str | None, key: tuple[Any, ...]) -> bool:
        """True when `key` is a workspace's own database read through mongo.url naming none:
        any workspace a token grants may add one, so these are bounded (mongo.max_databases);
        those of [workspaces.*] sections are the configuration's."""
        return (self._reads_workspace_databases and workspace is not None and workspace not in self.cfg.workspaces
                and key[1] == self.cfg.mongo.url)

    def _read_by_section(self, workspace: str | None, key: tuple[Any, ...]) -> str | None:
        """The [workspaces.*] section reading, through another URL, the database that `key`
        (a workspace's own, through mongo.url naming none) names: two feeds would share one
        resume token file (config._check_shared_mongo)."""
        if not self._workspace_database(workspace, key):
            return None
        deployment = deployment_of(key[1])
        for section, sources in self.cfg.workspaces.items():
            url = sources.mongo_url
            if url and url != key[1] and database_for(url, section) == key[2] and deployment_of(url) == deployment:
                return section
        return None

    def _over_mongo_databases(self, workspace: str | None, key: tuple[Any, ...]) -> bool:
        """True when `key`, a workspace's own database not read yet, would pass
        mongo.max_databases: source() refuses it, and why_no_source says so."""
        return (key not in self._sources and self._workspace_database(workspace, key)
                and self._workspace_databases >= self.cfg.mongo.max_databases)

    def _targets(self, kind: str, key: tuple[Any, ...]):
        """The workspaces a source feeds: every [workspaces.*] section naming its database (two
        sections may name one: one source, fed to both, as the ingest's plan_sources does), and
        every known workspace using the default when it is the default's."""
        cfg = self.cfg
        hub = self.hub
        own = tuple(w for w in cfg.workspaces if self._source_key(w, kind) == key)
        if key[1] != (cfg.postgres.url if kind == "postgres" else cfg.mongo.url):
            return lambda: own
        if kind == "mongo" and not _mongo_database(key[1]):
            database = key[2]  # the default URL leaves the database to each workspace: this one's
            return lambda: (*own, database) if database in hub.workspaces and database not in own else own
        return lambda: [*own, *(w for w in hub.workspaces if w not in cfg.workspaces)]

    def _configured(self, workspace: str | None) -> WorkspaceSources:
        """The sources configured for `workspace` (None: the default database's)."""
        return self.cfg.sources_for(workspace if workspace is not None else "\0default")

    def _source_key(self, workspace: str | None, kind: str) -> tuple[Any, ...] | None:
        """The key of `workspace`'s `kind` source (None: the default database's): (kind, URL),
        and for MongoDB its database; None when it has none configured (or, with the default
        URL naming no database, no workspace to name it)."""
        sources = self._configured(workspace)
        if kind == "postgres":
            return ("postgres", sources.postgres_url) if sources.postgres_url else None
        if kind != "mongo" or not sources.mongo_url:
            return None
        database = _mongo_database(sources.mongo_url) or workspace
        return None if database is None else ("mongo", sources.mongo_url, database)

    def _retirable(self, workspace: str) -> bool:
        """True when every event of `workspace` reaches Hub.deliver whether or not the workspace
        is in memory: on a Kafka node (the consumer delivers each record), or when no default
        change feed serves it (those fan out only to the workspaces in memory). Its own
        [workspaces.W] feeds and the publish API always name it."""
        cfg = self.cfg
        if cfg.bus.kind == "kafka" or workspace in cfg.workspaces:
            return True
        return not cfg.postgres.url and not cfg.mongo.url

    def _remember(self, workspace: str) -> None:
        """Keep `workspace` in the known-workspaces file when a default change feed records into
        it (start() brings only those back). Any other was remembered too, for nothing: a
        publisher whose token grants `*` grew the file and its set in memory by one id per
        workspace it named, for the life of the node and of its state directory."""
        if not self._retirable(workspace):
            self._known.add(workspace)

    def ensure_workspace_sources(self, workspace: str) -> None:
        for kind in ("postgres", "mongo"):
            self.source(workspace, kind)

    # ---- HTTP ------------------------------------------------------------------------------

    def upgrade_refusal(self) -> tuple[int, str] | None:
        """Why this node takes no WebSocket connection now (status, message), or None. Asked by
        the HTTP front just before it hands a valid upgrade to picows."""
        if self.draining:
            return 503, "the gateway is shutting down; connect to another node, or again once it has restarted"
        if len(self.connections) >= self.max_node_connections:
            # Before the open-files limit: past it the gateway's own sockets would fail too.
            self.metrics.connections_refused += 1
            return 503, f"this node holds its limit of {self.max_node_connections} connections; try another node"
        if not self.bus.ready():
            return 503, "this node is behind the event stream or cut off from it; try another node"
        return None

    def ws_listener_factory(self, request: WSUpgradeRequest) -> Any:
        """The listener of an upgrade the HTTP front has checked (path, handshake,
        upgrade_refusal), called by picows as it reads the rebuilt request: the workspace and
        the token are those the front read from its path and its Authorization field."""
        # The workspace's state (history, sources, the persisted list of known workspaces) is
        # created when a token grants it (Connection._authenticate), not here: an anonymous
        # upgrade must not make the gateway open change streams or remember ids it was sent.
        return Connection(self, self.upgrading_workspace, self.upgrading_token, self.upgrading_remote)

    def new_ws_protocol(self, log_fields: dict[str, Any]):
        return http.new_ws_protocol(self, log_fields)

    def serves(self, path: str) -> bool:
        """Whether `path` is one of http_get's endpoints, without computing its answer (a
        method it does not take is a 405, not a 404; a POST of /metrics rendered the metrics
        of every workspace only to learn that)."""
        if path in ("/healthz", "/readyz", "/metrics"):
            return True
        name = self._demo_file(path)
        if name is not None:
            return name in self.static
        return http.parse_connect_path(path) is not None

    def _demo_file(self, path: str) -> str | None:
        """The static file a /demo path names; None when it is no /demo path or the demo is off."""
        if self.cfg.server.demo and (path == "/demo" or path.startswith("/demo/")):
            return path[len("/demo"):].lstrip("/") or "index.html"
        return None

    def http_get(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}'
        if path == "/readyz":
            ready, details = self.readiness()
            return (200 if ready else 503), "application/json", _json.encode(details)
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", self.metrics.render()
        name = self._demo_file(path)
        if name is not None:
            found = self.static.get(name)
            if found is None:
                return 404, "application/json", _err(f"no such file: /demo/{name}")
            return 200, found[0], found[1]
        if http.parse_connect_path(path) is not None:
            return 426, "application/json", b'{"error":"WebSocket upgrade required"}'
        return 404, "application/json", _json.encode({"error": f"no such endpoint: {path}"})

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        sources = {}
        ready = not self.draining
        for key, src in self._sources.items():
            ok = src.ready()
            ready = ready and ok
            # One entry per source: postgres by its (redacted) URL, mongo by its database, and
            # by URL too when two servers hold databases of the same name.
            name = f"{key[0]}:{redact(key[1])}" if key[0] == "postgres" else f"mongo:{key[2]}"
            if name in sources:
                name = f"{name}@{redact(key[1])}"
            sources[name] = {"ready": ok, **src.status()}
        audit = self.audit.status()
        bus = self.bus.status()
        ready = ready and self.bus.ready()
        auth = self.auth.readiness()
        ready = ready and auth["ready"]
        return ready, {"ready": ready, "draining": self.draining, "sources": sources, "audit": audit, "bus": bus,
                       "auth": auth}

    async def publish_http(
        self, workspace: str, topic: str | None, headers: Mapping[str, str], body: bytes, remote: str
    ) -> tuple[int, bytes] | asyncio.Future[tuple[int, bytes]]:
        """The publish API's answer (status, body), or a future of it while the bus confirms
        the event (Kafka): the protocol goes on with the connection's next requests meanwhile
        and answers in request order. `topic` None: a batch of events (its body names their
        topics)."""
        if topic is None:
            out = await self._publish_batch(workspace, headers, body, remote)
        else:
            out = await self._publish(workspace, topic, headers, body, remote)
        if type(out) is tuple:
            self.metrics.publish_requests[out[0]] += 1
        else:
            out.add_done_callback(self._count_publish)
        return out

    def _count_publish(self, answer: asyncio.Future[tuple[int, bytes]]) -> None:
        self.metrics.publish_requests[answer.result()[0]] += 1

    def _publish_closed(self, workspace: str) -> tuple[int, bytes] | None:
        """The refusal of any publish to `workspace` before its token is read."""
        if self.draining:
            # Every subscriber has been closed with 1001 and the history ends with the process:
            # an event accepted now would reach no one. Refused, as a WebSocket upgrade is.
            return 503, _err(SHUTTING_DOWN)
        if not WORKSPACE_ID_RE.match(workspace):
            return 404, _err(f"workspace id {workspace!r} must be 1-64 of [A-Za-z0-9_-]")
        return None

    async def _publisher_refused(self, workspace: str, headers: Mapping[str, str],
                                 remote: str) -> tuple[int, bytes] | None:
        """The refusal of a publisher's token (missing, invalid, no publish permission),
        audited as a WebSocket's is (`auth-denied` with `publish: true`): forged or guessed
        tokens sent to the publish API left no trail (auth audit)."""
        token = http.bearer(headers)
        if token is None:
            return self._publish_denied(workspace, remote, 401, 4002, "missing Authorization: Bearer token")
        # A publisher's token is verified once (Authenticator.known): a signature check per
        # event would be most of the publish path's cost.
        identity = self.auth.known(token, workspace)
        if identity is None:
            try:
                identity = await self.auth.authenticate(token, workspace)
            except AuthError as exc:
                status = {4003: 403, 1011: 503}.get(exc.code, 401)
                return self._publish_denied(workspace, remote, status, exc.code, f"{exc.name}: {exc}", exc.subject,
                                            audited=f"{exc.name}: {exc.audited}")
        if not self.auth.may_publish(identity):
            return self._publish_denied(workspace, remote, 403, 4003,
                                        f"token does not grant publishing to workspace {workspace}: "
                                        f"it needs {self.auth.publish_requirement()}", identity.subject)
        return None

    def _publish_denied(self, workspace: str, remote: str, status: int, code: int, reason: str,
                        subject: str | None = None, audited: str | None = None) -> tuple[int, bytes]:
        """`reason` answers the publisher; `audited` (default: the same) is the audit record's."""
        self.audit.emit("auth-denied", workspace_id=workspace, subject=subject, code=code,
                        reason=reason if audited is None else audited, remote_addr=remote, publish=True)
        return status, _err(reason)

    def _header_correlation(self, headers: Mapping[str, str]) -> str | None | tuple[int, bytes]:
        """The request's X-Correlation-ID (None when absent), or its refusal."""
        corr = _header_text(headers.get("x-correlation-id", "")).strip()
        if not corr:
            return None
        if correlation_problem(corr):
            return 400, _err(f"X-Correlation-ID must be 1-{CORRELATION_MAX} printable characters")
        return corr

    def _new_correlation(self, workspace: str) -> str:
        """A correlation id for an event of `workspace` published without one. Unique without
        a uuid4 per event: a random prefix and a counter, both the workspace's. One counter for
        the node told a subscriber, from the ids of its own workspace's events, how many events
        the other workspaces had published in between (a tenant-isolation audit). Past
        _CORRELATION_WORKSPACES the oldest workspace's is forgotten: its next id has a new
        prefix, so none repeats."""
        entry = self._correlations.get(workspace)
        if entry is None:
            entry = self._correlations[workspace] = (secrets.token_hex(8), itertools.count(1))
            if len(self._correlations) > _CORRELATION_WORKSPACES:
                del self._correlations[next(iter(self._correlations))]
        return f"{entry[0]}-{next(entry[1]):x}"

    async def _publish(
        self, workspace: str, topic: str, headers: Mapping[str, str], body: bytes, remote: str
    ) -> tuple[int, bytes] | asyncio.Future[tuple[int, bytes]]:
        closed = self._publish_closed(workspace)
        if closed is not None:
            return closed
        if not TOPIC_RE.match(topic):
            # A batch posted with a trailing slash lands here: say where batches go.
            batch = "" if topic else f" (a batch of events goes to /workspaces/{workspace}/realtime/events)"
            return 400, _err(f"topic {topic!r} must be 1-128 of [A-Za-z0-9_.:-]{batch}")
        # Inline, the publisher's token known (the common case): this path is the publish
        # API's cost per event.
        token = http.bearer(headers)
        identity = None if token is None else self.auth.known(token, workspace)
        if identity is None or not self.auth.may_publish(identity):
            refused = await self._publisher_refused(workspace, headers, remote)
            if refused is not None:
                return refused
        if not body:
            return 400, _err("body must be a JSON value")
        try:
            payload = msgspec.json.decode(body)
        except (msgspec.DecodeError, *UNREADABLE_JSON) as exc:
            return 400, _err(f"body is not valid JSON: {unreadable_json(exc, body)}")
        corr = None if "x-correlation-id" not in headers else self._header_correlation(headers)
        if corr is None:
            corr = self._new_correlation(workspace)
        elif type(corr) is tuple:
            return corr
        try:
            event = custom_event(workspace, topic, payload, corr, iso_ms(now_ms()))
        except RecursionError as exc:
            # The payload nests one level inside the event, encoded a few calls deeper than it
            # was decoded: a body at the decoder's very limit decoded but could not be encoded
            # (it was a 500, the connection closed, an ERROR traceback). Refused as one nesting
            # deeper still is.
            return 400, _err(f"body is not valid JSON: {unreadable_json(exc)}")
        try:
            seq = await self.bus.submit(event)
        except BusUnavailable as exc:
            return publish.refused(exc, workspace, topic, corr)
        if type(seq) is int:
            return 202, _json.encode({"seq": seq, "correlationId": corr})
        answer: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        seq.add_done_callback(lambda f: answer.set_result(publish.outcome(f, workspace, topic, corr)))
        return answer

    async def _publish_batch(
        self, workspace: str, headers: Mapping[str, str], body: bytes, remote: str
    ) -> tuple[int, bytes] | asyncio.Future[tuple[int, bytes]]:
        """A batch's events are checked all before any is published: a 400 (or a bus's
        refusal of one) publishes none of them."""
        closed = self._publish_closed(workspace)
        if closed is not None:
            return closed
        refused = await self._publisher_refused(workspace, headers, remote)
        if refused is not None:
            return refused
        none = "no event of the batch was published"
        try:
            batch = publish.batch_decoder.decode(body)
        except msgspec.ValidationError as exc:
            return 400, _err(f"body is not a batch of events ({exc}): it must be {publish.BATCH_SHAPE}; {none}")
        except (msgspec.DecodeError, *UNREADABLE_JSON) as exc:
            if not body:
                return 400, _err(f"body is empty: it must be {publish.BATCH_SHAPE}; {none}")
            return 400, _err(f"body is not valid JSON: {unreadable_json(exc, body)}; {none}")
        shared = self._header_correlation(headers)
        if type(shared) is tuple:
            return shared
        timestamp = iso_ms(now_ms())
        events: list[Event] = []
        corrs: list[str] = []
        for i, item in enumerate(batch.events):
            if i and i % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # other clients get a turn (sources.base.YIELD_EVERY)
            topic = item.topic
            if not TOPIC_RE.match(topic):
                return 400, _err(f"events[{i}].topic {topic!r} must be 1-128 of [A-Za-z0-9_.:-]; {none}")
            corr = item.correlationId
            if corr is None:
                corr = shared or self._new_correlation(workspace)
            elif correlation_problem(corr):
                return 400, _err(f"events[{i}].correlationId must be 1-{CORRELATION_MAX} printable characters; {none}")
            try:
                events.append(custom_event(workspace, topic, item.payload, corr, timestamp))
            except RecursionError as exc:
                return 400, _err(f"events[{i}].payload is not valid JSON: {unreadable_json(exc)}; {none}")
            corrs.append(corr)
        # Once the first event may be published the batch runs to its end, the publisher gone
        # or not: a disconnect cancelling it in a wait for room left it published in part.
        finished, out = run_now(self._submit_batch(events, corrs))
        return out if finished else await asyncio.shield(out)

    async def _submit_batch(
        self, events: list[Event], corrs: list[str]
    ) -> tuple[int, bytes] | asyncio.Future[tuple[int, bytes]]:
        try:
            seqs = await self.bus.submit_many(events, lambda: self.draining)
        except BusUnavailable as exc:
            where = "" if exc.index is None else f"events[{exc.index}]: "
            return exc.status, _err(f"{where}{exc}; no event of the batch was published")
        if all(type(s) is int for s in seqs):
            return publish.batch_answer(seqs, corrs)
        return publish.batch_outcome(seqs, events, corrs)

    def _gauges(self) -> list[tuple[str, str, dict[str, Any], float]]:
        rows: list[tuple[str, str, dict[str, Any], float]] = [
            ("rt_suspended_sessions", "Sessions waiting to be resumed", {}, len(self.sessions)),
            ("rt_http_connections", "HTTP connections open that are not WebSockets (keep-alive, requests under way); "
             "with rt_connections and rt_closing_connections at most limits.max_node_connections + 512", {},
             self.http_sockets),
            ("rt_closing_connections", "WebSockets closed whose socket is held until the peer has read what was "
             "queued for it (at most limits.idle_timeout)", {}, self.closing_sockets),
            ("rt_pipelined_publish_bytes", "Bytes of pipelined HTTP requests (bodies and heads) queued behind "
             "requests that wait, all connections together (limits.pipelined_publish_bytes, give or take one "
             "read a connection)", {}, self.pipelined.held),
            ("rt_pipelined_publish_paused_connections", "HTTP connections not read because "
             "rt_pipelined_publish_bytes is over limits.pipelined_publish_bytes (read again under half of it)", {},
             len(self.pipelined.waiting)),
            ("rt_gc_frozen_objects",
             "Objects moved out of garbage-collector passes by server.gc_freeze, counted when frozen "
             "(those freed since are not subtracted)", {}, self._gc_policy.frozen if self._gc_policy else 0),
        ]
        audit = self.audit.status()
        for key, help_ in _AUDIT_NUMBERS.items():  # every number of status(), as docs/audit.md says
            value = audit.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((f"rt_audit_{key}", help_, {}, value))
        if "connected" in audit:
            rows.append(("rt_audit_connected", "1 while audit records reach Kafka", {}, 1 if audit["connected"] else 0))
        rows += source_rows((key[0], redact(key[1]), str(key[2]) if key[0] == "mongo" else "", src)
                            for key, src in self._sources.items())
        return rows


_AUDIT_NUMBERS = {
    "backlog": "Audit records not yet delivered (memory, in flight and spool)",
    "queued": "Audit records of the backlog in memory",
    "spooled": "Audit records of the backlog in the on-disk spool",
    "spool_bytes": "Bytes of the audit spool",
    "emitted": "Audit records emitted since start",
    "delivered": "Audit records delivered since start (Kafka acknowledged, or logged)",
    "lost": "Audit records lost since start (spool full, disk failing)",
}

# The rows of _gauges that count since start: the audit's records, and what the sources'
# status() counts; typed counter in /metrics.
_AUDIT_COUNTS = ("emitted", "delivered", "lost")
_COUNTS = frozenset(f"rt_audit_{k}" for k in _AUDIT_COUNTS) | SOURCE_COUNTS

_STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".map": "application/json"}


def load_static() -> dict[str, tuple[str, bytes]]:
    """The demo page's files (rtserver/static), read once at start-up, off the event loop."""
    files: dict[str, tuple[str, bytes]] = {}
    if not os.path.isdir(_STATIC_DIR):
        return files
    for name in os.listdir(_STATIC_DIR):
        ext = os.path.splitext(name)[1]
        if ext in _STATIC_TYPES:
            with open(os.path.join(_STATIC_DIR, name), "rb") as fh:
                files[name] = (_STATIC_TYPES[ext], fh.read())
    return files


def _header_text(value: str) -> str:
    """A header value read as Latin-1 (HTTP's bytes), as UTF-8 when its bytes are UTF-8: curl
    sends `é` as UTF-8, which Latin-1 made `Ã©`, an id the publisher would look for in vain;
    Python's http.client sends Latin-1, never valid UTF-8 for such a character."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return value


_err = publish.error_body


def _mongo_database(url: str) -> str | None:
    """The database a MongoDB URL names, or None when each workspace uses its own."""
    return database_for(url, "") or None


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("source failed to start", exc_info=task.exception())


def hold_state_dir(state_dir: str) -> IO[bytes]:
    """Lock `state_dir` for this `rtserver serve` (held until the process ends). Two gateways
    sharing one would silently overwrite each other's saved sessions and known workspaces, and
    hand out seqs from one reservation; without Kafka nothing else would stop the second."""
    try:
        fh = lock_exclusive(os.path.join(state_dir, ".serve.lock"))
    except OSError as exc:
        raise RuntimeError(f"state directory {state_dir} (server.state_dir): {exc.strerror or exc}") from None
    if fh is None:
        raise RuntimeError(
            f"state directory {state_dir} (server.state_dir): in use by another rtserver serve "
            "(give each node its own state_dir)"
        )
    return fh


async def serve(cfg: Config) -> int:
    """Run the gateway until SIGTERM/SIGINT/SIGHUP (see rtserver.signals); the exit code."""
    gw = Gateway(cfg)
    lock = hold_state_dir(gw.state_dir)
    try:
        async def stop() -> None:
            log.info("draining", extra={"fields": {"connections": len(gw.connections)}})
            await gw.shutdown()
            log.info("stopped")

        # shutdown() keeps within server.shutdown_timeout; past a little more, something hangs.
        return await until_signalled(gw.start, stop, cfg.server.shutdown_timeout + 5, "rtserver")
    finally:
        lock.close()
