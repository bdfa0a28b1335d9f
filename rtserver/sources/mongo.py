"""The MongoDB change feed of one database: one change stream (`db.watch()`) shared by every
workspace the database serves, normalized in rtcore, handed to the event sink, resumable.

PyMongo's asyncio API (`AsyncMongoClient`) runs the stream: its own getMore and resume logic
handle dropped connections and failovers. This module adds what the driver cannot know:
- the resume token is persisted (a small JSON file under state_dir) only after the events
  before it were published, so a restarted gateway resumes with `resumeAfter` and loses nothing;
- ChangeStreamHistoryLost (the token is older than the oplog): a loud log, ready() False until
  a new stream is open, and then `history_gap` to every workspace's subscribers;
- `invalidate` (the database was dropped) reopens the stream with `startAfter`;
- `check_channel` refuses collections that do not exist (listed, cached briefly);
- a change over 16 MiB comes in fragments ($changeStreamSplitLargeEvent), joined into one.
Change events are read as raw BSON and decoded once, by rtcore.mongo, straight to JSON values.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote

import bson
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.errors import InvalidBSON
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure, PyMongoError

from rtcore.event import Event
from rtserver.atomic_file import replace_file
from rtserver.channels import valid_collection
from rtserver.redact import redact
from rtserver.sources.base import YIELD_EVERY, ChannelUnavailable, EventSink, announce_gap, when_durable
from rtserver.tasks import cancel_and_wait

try:
    from rtcore import mongo as normalizer
except ImportError:  # not built (development checkout): same results, slower; said at start (App)
    from rtcore import mongo_ref as normalizer  # type: ignore[no-redef]

log = logging.getLogger("rtserver.sources.mongo")

DATA_OPERATIONS = ("insert", "update", "replace", "delete")
# Always let these through the $match: they change what the source itself knows.
CONTROL_OPERATIONS = ("drop", "dropDatabase", "rename", "invalidate")
OPERATION_TYPES = {"INSERT": "insert", "UPDATE": "update", "REPLACE": "replace", "DELETE": "delete"}
HISTORY_LOST_CODES = frozenset({286, 280})  # ChangeStreamHistoryLost, ChangeStreamFatalError
INVALID_RESUME_TOKEN = 260
UNSUPPORTED_OPTION_CODES = frozenset({40415, 9})  # unknown $changeStream field (pre-6.0 servers)
# The last stage of the pipeline: a change over 16 MiB (a large document's post- and pre-image
# together) comes in fragments instead of failing every getMore with BSONObjectTooLarge (10334),
# which would stop the feed for good. MongoDB 7.0 and 6.0.9+; older servers refuse it (40324).
SPLIT_STAGE = "$changeStreamSplitLargeEvent"
UNKNOWN_STAGE = 40324  # "Unrecognized pipeline stage name": the only stage that can be new is SPLIT_STAGE
# A change the server cannot send: over 16 MiB without SPLIT_STAGE (BSONObjectTooLarge), or with
# one field too large for a fragment (a document within ~200 bytes of 16 MiB, 7182500). Every
# read from the saved token failed the same way: the feed stopped for good, restarts too.
TOO_LARGE_CODES = frozenset({10334, 7182500})
# What is read of the change the server cannot send, to skip it: its token and where it was.
TOO_LARGE_PROJECTION = {"$project": {"_id": 1, "operationType": 1, "ns": 1, "documentKey": 1}}
# Fragments' top-level fields: wallTime stays a date whatever its value.
FRAGMENT_CODEC = CodecOptions(document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
RAW_CODEC = CodecOptions(document_class=RawBSONDocument)
CLOSE_TIMEOUT = 2.0
FIRST_RETRY = 0.2  # s: the reopen backoff's first step, doubling to retry_max_seconds
LIST_TIMEOUT = 5.0
MAX_DATABASE_NAME = 63  # bytes; mongod: "db name must be at most 63 characters" (InvalidNamespace)
# mongod opens no change stream on these ("$changeStream may not be opened on the internal
# admin database"; on admin only a whole-cluster one), whoever asks.
INTERNAL_DATABASES = frozenset(("admin", "config", "local"))
# Characters no database name may hold (mongod's and the driver's InvalidName). Of a URL's path
# only '.' gets past the driver's own check: it reads `/app.orders` as database `app`,
# collection `orders`, and the feed, which takes the whole path, could never open.
DATABASE_NAME_FORBIDDEN = ("/", "\\", ".", " ", '"', "$", "\0")


def database_for(url: str, workspace: str) -> str:
    """The database a workspace reads: the URL's path, else the workspace id (docs/mongo.md, "Configuration").
    Parsed without pymongo.uri_parser, which resolves mongodb+srv names (blocking DNS)."""
    rest = url.split("://", 1)[-1].split("?", 1)[0]
    hosts_and_path = rest.rsplit("@", 1)[-1]
    name = unquote(hosts_and_path.partition("/")[2]).strip()
    if name:
        return name
    return workspace


def deployment_of(url: str) -> str:
    """The deployment `url` names whatever its user, options and host order: its hosts (lower
    case, the default port written out), or a mongodb+srv URL's name. Parsed as the driver
    does (the hosts end at the first '/', the user info at the last '@' before it), without
    resolving mongodb+srv names (blocking DNS)."""
    from pymongo.uri_parser import split_hosts

    scheme, _, rest = url.partition("://")
    hosts = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if scheme.lower() == "mongodb+srv":
        return "srv:" + hosts.lower()
    return ",".join(sorted(f"{host}:{port}" for host, port in split_hosts(hosts, 27017)))


def feed_digest(url: str, database: str) -> str:
    """12 hex digits naming a feed, a deployment's database: its token file's name and the
    ingest's header. Adding an option to the URL must not make it another feed (a restart would
    open the stream from "now" and lose what changed meanwhile)."""
    return hashlib.sha256(f"{deployment_of(url)}|{database}".encode()).hexdigest()[:12]


# Sockets a database's feed holds open (measured: a gateway reading 100 more databases through
# one URL held 300 more): the change stream's connection, and the driver's server monitor and
# round-trip-time monitor, each client its own (mongo.max_databases).
SOCKETS_PER_DATABASE = 3


def database_problem(url: str, workspace: str) -> str:
    """Why `workspace` can have no database on `url` ("" when it can): a URL that names none
    makes the workspace id the database's name, and a workspace id may be longer than MongoDB
    takes (64 against 63), or be the name of one of MongoDB's internal databases (a workspace
    `admin`, `config` or `local`), which no change stream reads: its feed would fail at every
    attempt, the node not ready for good."""
    name = database_for(url, workspace)
    # The URL's own database is every workspace's: checked at start without one ("").
    of = f" (of workspace {workspace})" if workspace else ""
    if len(name.encode()) > MAX_DATABASE_NAME:
        return (f"MongoDB database {name!r}{of} is longer than MongoDB takes "
                f"({MAX_DATABASE_NAME} bytes): name a database in the MongoDB URL")
    forbidden = next((c for c in DATABASE_NAME_FORBIDDEN if c in name), None)
    if forbidden is not None:
        return (f"MongoDB database {name!r}{of} cannot contain {forbidden!r}: the MongoDB "
                "URL's path names the database only (mongodb://host/app, not app.collection)")
    if name in INTERNAL_DATABASES:
        return (f"MongoDB database {name!r}{of} is internal to MongoDB, which opens no "
                "change stream on it: name another database in the MongoDB URL")
    return ""


class ResumeTokenStore:
    """The last acknowledged resume token in a small JSON file. Writes run in the default
    executor and coalesce: while one is in flight only the newest token waits (a bound of one)."""

    def __init__(self, path: str, legacy: str | None = None):
        self.path = path
        self.legacy_path = legacy  # an earlier version's name of this file, taken over when read
        self._pending: bytes | None = None
        self._written: bytes | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = asyncio.Event()  # set while the last write failed (the writer retries)
        self.unreadable = False  # the file was there, but held no token that could be read

    async def load(self) -> tuple[dict[str, Any] | None, bool]:
        """(token, whether to resume with startAfter: the token is an invalidate event's)."""
        if self._pending:  # saved but not on disk yet (a full disk refuses it): newer than the file
            return bson.decode(self._pending[1:]), self._pending[:1] == b"S"
        read = await asyncio.get_running_loop().run_in_executor(None, self._read)
        if read is None:
            return None, False
        data, token = read
        self._written = data
        return token, data[:1] == b"S"

    def _read(self) -> tuple[bytes, dict[str, Any]] | None:
        """(the stored bytes, the token they hold), or None: no file, or one no token can be
        read from (the token must be BSON too, else the feed would die before its first stream)."""
        self._take_over_legacy()
        try:
            with open(self.path, encoding="utf-8") as fh:
                stored = json.load(fh)
            self._link_legacy()
            data = (b"S" if stored.get("startAfter") else b"R") + base64.b64decode(stored["token"])
            return data, bson.decode(data[1:])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, InvalidBSON) as exc:
            log.error("mongo resume token file unreadable, starting from now",
                      extra={"fields": {"path": self.path, "error": str(exc)}})
            self.unreadable = True
            return None

    def _take_over_legacy(self) -> None:
        """Rename an earlier version's file to this one's name. It is renamed, so one found
        later is newer (an earlier version ran since) and replaces this one's."""
        if self.legacy_path is None or self.legacy_path == self.path or os.path.islink(self.legacy_path):
            return  # a link is this version's own (_link_legacy), not an earlier version's file
        try:
            os.replace(self.legacy_path, self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("mongo resume token file of an earlier version not taken over",
                      extra={"fields": {"path": self.legacy_path, "error": str(exc)}})
            return
        log.info("mongo resume token file of an earlier version renamed to %s", self.path,
                 extra={"fields": {"path": self.path, "file": self.legacy_path}})

    def _link_legacy(self) -> None:
        """Leave under the earlier versions' name a link to this file: one of them started on
        this state directory (a downgrade) found no file there, took it for a first start and
        opened the stream from now, losing the changes made meanwhile without a word. Through
        the link it resumes after this version's token; its own write replaces the link with
        its file, which _take_over_legacy takes back at the next upgrade."""
        if self.legacy_path is None or self.legacy_path == self.path or os.path.lexists(self.legacy_path):
            return
        try:
            os.symlink(os.path.basename(self.path), self.legacy_path)
        except OSError as exc:  # the token itself is safe: only a downgrade would miss it
            log.warning("mongo resume token file not linked under its earlier name",
                        extra={"fields": {"path": self.legacy_path, "error": str(exc)}})

    def save(self, token: Any, start_after: bool = False) -> None:
        """Remember `token` (a dict or RawBSONDocument) and have it written soon."""
        data = (b"S" if start_after else b"R") + (token.raw if isinstance(token, RawBSONDocument) else bson.encode(token))
        if data == self._pending or (self._pending is None and data == self._written):
            return
        self._pending = data
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._writer(), name=f"mongo-token-writer:{self.path}")

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending is not None:
            data, self._pending = self._pending, None
            self._wake.clear()
            try:
                await loop.run_in_executor(None, self._write, data)
                self._written = data
                self._failing.clear()
            except OSError as exc:
                log.error("mongo resume token not saved", extra={"fields": {"path": self.path, "error": str(exc)}})
                if self._pending is None:  # still the newest: pending again at once, as load() reads it
                    self._pending = data
                self._failing.set()
                await asyncio.sleep(1.0)

    def _write(self, data: bytes) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        replace_file(self.path, json.dumps(
            {"version": 1, "token": base64.b64encode(data[1:]).decode(), "startAfter": data[:1] == b"S"}
        ).encode())
        self._link_legacy()

    async def flush(self) -> bool:
        """Wait until the newest token is on disk; False, at once, while writes fail (a full
        or read-only disk: the writer retries for as long as it runs, and a stop must not wait)."""
        while self._task is not None and not self._task.done():
            if self._failing.is_set():
                return False
            failing = asyncio.ensure_future(self._failing.wait())
            try:
                await asyncio.wait((self._task, failing), return_when=asyncio.FIRST_COMPLETED)
            finally:
                failing.cancel()
        return True

    async def close(self) -> None:
        """Stop the writer: a later store on the same file (the feed started again) must not
        have an older token written over its own when the disk comes back."""
        task, self._task = self._task, None
        await cancel_and_wait(task, what=f"resume token writer of {self.path}")


def _joined(fragments: list[RawBSONDocument]) -> RawBSONDocument:
    """The change a split event's fragments make together: their top-level fields (each field is
    in one fragment) without splitEvent; _id the last fragment's token, after which the stream
    resumes with the next change (and stable for the correlation id). Sub-documents stay raw."""
    fields: dict[str, Any] = {}
    for fragment in fragments:
        for key, value in RawBSONDocument(fragment.raw, FRAGMENT_CODEC).items():
            if key != "splitEvent":
                fields[key] = value
    return RawBSONDocument(bson.encode(fields), FRAGMENT_CODEC)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def token_order(token: Any) -> str:
    """A resume token's sort key: its `_data` hex string orders tokens of one deployment."""
    try:
        if isinstance(token, bytes | bytearray):
            token = RawBSONDocument(bytes(token))
        data = token.get("_data") if token is not None else None
    except (InvalidBSON, TypeError):
        data = None
    return data if isinstance(data, str) else ""


def _described(exc: Exception) -> str:
    """An error as logs and /readyz say it. An OperationFailure's text ends with the server's
    whole reply, which the raw codec leaves as undecoded bytes ("full error:
    RawBSONDocument(b'...')"): its message and code instead."""
    if isinstance(exc, OperationFailure) and exc.details:
        with contextlib.suppress(Exception):
            return f"OperationFailure: {exc.details.get('errmsg') or exc} (code {exc.code})"
    return f"{type(exc).__name__}: {exc}"


async def close_client(client: AsyncMongoClient[Any], database: str) -> None:
    """Close `client` within CLOSE_TIMEOUT: close() first ends the server sessions, which waits
    for server selection (30 s by default) when MongoDB is unreachable; a shutdown must not."""
    try:
        await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
    except (TimeoutError, PyMongoError) as exc:
        log.warning("mongo client closed without ending its sessions",
                    extra={"fields": {"database": database, "error": type(exc).__name__}})
        with contextlib.suppress(Exception):
            await client._topology.close()  # stop the driver's monitors all the same


_MIN_RELIST = 0.5  # seconds between two listings of a database's collections for missing names


class Collections:
    """The collections of one database as listCollections shows them (name -> type), listed when
    a subscribe asks and kept `ttl` seconds: what a `mongo:{collection}` channel is checked
    against, by the feed and by a Kafka-bus node (which reads no feed)."""

    def __init__(self, database: str, client: Callable[[], AsyncMongoClient | None], ttl: float = 5.0):
        self.database = database
        self._client = client
        self._ttl = ttl
        self._names: dict[str, str] = {}
        self._at = 0.0
        self._listing: asyncio.Future[dict[str, str]] | None = None  # the listing in flight
        self._forgotten = 0  # forget() calls: a listing begun before one is not kept

    def forget(self) -> None:
        """List again at the next check (a collection was dropped or renamed), not taking the
        listing in flight, which may have been made before."""
        self._at = 0.0
        self._listing = None
        self._forgotten += 1

    async def check(self, entity: str) -> str:
        """`entity` when it is a collection of the database, else ChannelUnavailable saying why."""
        names = await self._listed(refresh_if_missing=entity)
        if entity not in names:
            raise ChannelUnavailable(f"mongo:{entity}: no collection {entity!r} in database {self.database!r}")
        kind = names[entity]
        if kind != "collection":
            # A view or a time-series collection (its writes go to system.buckets.*) is listed
            # beside the collections, but no change stream shows its changes: subscribed, it
            # would wait for ever.
            raise ChannelUnavailable(f"mongo:{entity}: {entity!r} in database {self.database!r} is a {kind}: "
                                     "MongoDB streams the changes of collections only")
        return entity

    async def _listed(self, refresh_if_missing: str) -> dict[str, str]:
        asked = time.monotonic()
        age = asked - self._at
        if age < self._ttl and refresh_if_missing in self._names:
            return self._names
        # A collection created since the last listing should not wait out the TTL: list again
        # when the name is missing, but at most every 0.5 s. Within that, the check waits for
        # the next listing: it was refused (4010 "no collection") for up to 0.5 s after the
        # collection had been created, whenever another subscribe had listed just before.
        if age < _MIN_RELIST:
            await asyncio.sleep(_MIN_RELIST - age)
            if self._at >= asked:  # listed meanwhile, after the question
                return self._names
        client = self._client()
        if client is None:
            raise ChannelUnavailable(f"mongo:{refresh_if_missing}: mongo source for {self.database!r} is not started")
        # Checks made together share one listing, its names or its failure: one after the
        # other, the n-th subscribe waited n listings (n x LIST_TIMEOUT with MongoDB unreachable).
        listing = self._listing
        if listing is None:
            listing = self._listing = asyncio.ensure_future(self._relist(client))
            listing.add_done_callback(_retrieved)  # no "exception never retrieved" if all left
        try:
            return await asyncio.shield(listing)  # a subscribe given up does not end the others'
        except TimeoutError:
            raise ChannelUnavailable(
                f"mongo:{refresh_if_missing}: MongoDB for {self.database!r} did not answer in {LIST_TIMEOUT:g} s"
            ) from None
        except PyMongoError as exc:
            raise ChannelUnavailable(
                f"mongo:{refresh_if_missing}: cannot list collections of {self.database!r}: {type(exc).__name__}"
            ) from exc

    async def _relist(self, client: AsyncMongoClient) -> dict[str, str]:
        forgotten = self._forgotten
        started = time.monotonic()
        try:
            # Bounded: an unreachable server would hold the subscribe for the driver's
            # 30 s server selection.
            names = await asyncio.wait_for(self._list(client), LIST_TIMEOUT)
        finally:
            if forgotten == self._forgotten:
                self._listing = None  # the next check after this one lists again
        if forgotten == self._forgotten:
            self._names = names
            self._at = started  # what it shows was there when it began
        return names

    async def _list(self, client: AsyncMongoClient) -> dict[str, str]:
        # nameOnly, as list_collection_names asks (no lock on each collection), still has the type.
        cursor = await client[self.database].list_collections(nameOnly=True)
        return {info["name"]: info.get("type", "collection") async for info in cursor}


class MongoSource:
    """Change feed of one MongoDB database for the workspaces `workspaces()` returns."""

    kind = "mongo"

    def __init__(
        self,
        url: str,
        *,
        database: str,
        state_dir: str,
        sink: EventSink,
        workspaces: Callable[[], Iterable[str]],
        allow_unknown_collections: bool = False,
        max_await_ms: int = 1000,
        collections_ttl: float = 5.0,
        retry_max_seconds: float = 10.0,
        client_options: dict[str, Any] | None = None,
    ):
        self.url = url
        self.database = database
        self._shown_url = redact(url)  # for log lines: without its credentials
        self._sink = sink
        self._workspaces = workspaces
        self._allow_unknown = allow_unknown_collections
        self._max_await_ms = max_await_ms
        self._await_ms = max_await_ms  # the getMore wait used: within the URL's timeouts (start())
        self._retry_max = retry_max_seconds
        self._client_options = dict(client_options or {})
        self.feed_id = feed_digest(url, database)  # the ingest's headers name the feed by it
        # Earlier versions named the feed by the whole URL, the user info masked as they did:
        # their token file is taken over, their headers still read.
        self.legacy_feed_id = hashlib.sha256(
            f"{re.sub(r'://[^@/]*@', '://***@', url)}|{database}".encode()).hexdigest()[:12]
        safe_db = re.sub(r"[^A-Za-z0-9_.-]", "_", database)

        def token_file(feed: str) -> str:
            return os.path.join(state_dir, f"mongo-resume-{safe_db}-{feed}.json")

        self._tokens = ResumeTokenStore(token_file(self.feed_id), legacy=token_file(self.legacy_feed_id))
        self._state_dir = state_dir
        self._token_prefix = f"mongo-resume-{safe_db}-"  # the token files of this database, any deployment
        self._client: AsyncMongoClient[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._publishing = False
        self._ready = False
        self.positioned = asyncio.Event()  # a token to resume from, or a stream open (Source.positioned)
        # After a change too large to send: read one change a batch, so the next failure is
        # the change right after the saved token (_skip_too_large).
        self._one_by_one = False
        self._operations: frozenset[str] = frozenset(DATA_OPERATIONS)
        self._reopen = asyncio.Event()
        self._token: Any = None  # resume from here (resumeAfter), or...
        # Token saves wait for the sink's records to be durable (_durably); a stop or a cleared
        # store ends the generation those saves belong to.
        self._generation = 0
        self._start_after: Any = None  # ...after an invalidate (startAfter)
        self._with_pre_images = True
        self._split_events = True  # False on a server without SPLIT_STAGE
        self._collections = Collections(database, lambda: self._client, collections_ttl)
        self._events = 0  # changes published
        self._published = 0  # events published (a change is one per workspace it feeds)
        self._publishing_event = 0  # index of the event being published within its change
        self._history_lost = 0
        self._skipped = 0  # changes that could not be converted (_unconvertible)
        self._gap_reason = ""  # history lost: the history_gap to announce once a new stream is open
        self._last_error = ""
        self._last_event_at = 0.0
        self._streams_opened = 0
        # Reads that worked (a change handled, an empty batch): a failure after one starts the
        # backoff over, one with none since the last failure (a record refused each time) grows it.
        self._progress = 0
        self._progress_at_failure = 0

    # ---- Source protocol ---------------------------------------------------------------

    async def start(self) -> None:
        self._client = AsyncMongoClient(self.url, **self._client_options)
        self._await_ms = self._getmore_wait(self._client)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mongo-source:{self.database}")

    async def stop(self) -> None:
        self._stopping = True
        task = self._task
        # After the stop, saves still due would write over a token seeded meanwhile (a later
        # acquisition's seed_token): what they had to say, Kafka's headers say too.
        self._generation += 1
        if task is not None and not task.done():
            if self._publishing:
                # Let the change in hand finish so its token is saved with it.
                self._reopen.set()
                await asyncio.wait({task}, timeout=5.0)
            task.cancel()
            # Bounded: the cancelled stream ends its cursor on the server first, and over a dead
            # link (no reset) that waited for as long as the link stayed dead: a stop (SIGTERM, a
            # lost lease) hung. Left to end on its own after CLOSE_TIMEOUT; the client's close
            # below ends its connections.
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
            if task.done() and not task.cancelled():
                task.result()  # what the stream raised, as when it was awaited
        if not await self._tokens.flush():
            log.error("mongo source stopped with its newest resume token not saved: the changes since the "
                      "last saved one are published again after a restart",
                      extra={"fields": {**self._log_fields(), "path": self._tokens.path}})
        await self._tokens.close()
        if self._client is not None:
            await self._close_client(self._client)
        self._ready = False

    def _getmore_wait(self, client: AsyncMongoClient[Any]) -> int:
        """max_await_ms, within the URL's timeouts (timeoutMS, socketTimeoutMS): a getMore
        waiting longer would time out whenever no change comes, and the stream be reopened,
        on a new connection, about every second (with timeoutMS, reported as a failure each time)."""
        limits = [t for t in (client.options.timeout, client.options.pool_options.socket_timeout) if t]
        if not limits:
            return self._max_await_ms
        wait = max(1, min(self._max_await_ms, int(min(limits) * 1000) // 2))  # half: room for the round trip
        if wait < self._max_await_ms:
            log.info("mongo change stream waits %d ms per getMore, within the URL's timeouts", wait,
                     extra={"fields": {**self._log_fields(), "max_await_ms": wait}})
        return wait

    async def _close_client(self, client: AsyncMongoClient[Any]) -> None:
        await close_client(client, self.database)

    @property
    def publishing_event(self) -> int:
        """1-based index, within its change, of the event being handed to the sink: the same
        each time the change is read after the same token, however often the feed started over."""
        return self._publishing_event

    @property
    def published_token(self) -> bytes | None:
        """Raw BSON of the token after which the stream yields the change now being published
        (the last acknowledged one): with a count, it names each event across processes."""
        token = self._token
        if token is None:
            return None
        return token.raw if isinstance(token, RawBSONDocument) else bson.encode(token)

    async def seed_token(self, token: bytes) -> bool:
        """Before start(): resume after `token` (raw BSON, e.g. what Kafka already has) unless
        the stored token is as new. True when the store now holds `token`."""
        stored, _start_after = await self._tokens.load()
        if stored is not None and token_order(stored) >= token_order(token):
            return False
        self._tokens.save(RawBSONDocument(token))
        await self._tokens.flush()
        return True

    def ready(self) -> bool:
        return self._ready and self._server_known()

    def _server_known(self) -> bool:
        # The driver resumes a stream itself after a network error, waiting for a server for up
        # to serverSelectionTimeoutMS inside try_next before the source sees anything: its
        # topology (marked Unknown on the error, then by its monitor) tells the truth sooner.
        client = self._client
        return client is not None and client.topology_description.has_readable_server(client.read_preference)

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "url": redact(self.url),
            "database": self.database,
            "ready": self.ready(),
            "events": self._events,
            "streams_opened": self._streams_opened,
            "history_lost": self._history_lost,
            "skipped_changes": self._skipped,
            "last_event_age_s": round(time.monotonic() - self._last_event_at, 3) if self._last_event_at else None,
            "resumable": self._token is not None or self._start_after is not None,
            "operations": sorted(self._operations),
            "split_large_events": self._split_events,
            "last_error": self._last_error,
        }

    async def check_channel(self, workspace: str, entity: str) -> str:
        if entity == "*":
            return entity
        if not valid_collection(entity):
            raise ChannelUnavailable(f"mongo:{entity}: not a valid collection name")
        if self._allow_unknown:
            return entity
        return await self._collections.check(entity)

    # ---- what the subscriptions need --------------------------------------------------

    def set_operations(self, operations: Iterable[str]) -> None:
        """Narrow the stream's $match to these operations (INSERT, UPDATE, REPLACE, DELETE);
        the stream reopens from its last token, so nothing in between is lost."""
        wanted = frozenset(OPERATION_TYPES[o] for o in operations if o in OPERATION_TYPES) or frozenset(DATA_OPERATIONS)
        if wanted != self._operations:
            self._operations = wanted
            self._reopen.set()

    # ---- the stream -----------------------------------------------------------------

    def _pipeline(self) -> list[dict[str, Any]]:
        types = sorted(self._operations) + list(CONTROL_OPERATIONS)
        pipeline: list[dict[str, Any]] = [{"$match": {"operationType": {"$in": types}}}]
        if self._split_events:
            pipeline.append({SPLIT_STAGE: {}})  # must be the last stage
        return pipeline

    async def _run(self) -> None:
        token, start_after = await self._tokens.load()
        if start_after:
            self._start_after = token
        else:
            self._token = token
        if token is not None:
            self.positioned.set()  # the stream will resume from it, however late it opens
        if self._tokens.unreadable:
            # Where the last run got to is not known: its last changes may never be read. Told
            # as a lost history is, once the stream from now is open (_stream); it was silent.
            self._gap_reason = (f"MongoDB resume token of database {self.database!r} unreadable: changes made "
                                "before this start may be missing")
        elif token is None and (others := await asyncio.get_running_loop().run_in_executor(None, self._other_tokens)):
            # The file is named by the URL's hosts: a host added to the seed list (or localhost
            # written as 127.0.0.1) starts a new one, and the changes made while the gateway was
            # stopped were skipped without a word. Whether the other file is this deployment's
            # cannot be told: said, and told to the subscribers as a possible loss.
            log.warning("mongo source has no resume token for this deployment but the state directory holds one of "
                        "database %r under another (the URL's hosts changed?): starting from now; changes made "
                        "while the gateway was stopped may be missing", self.database,
                        extra={"fields": {**self._log_fields(), "files": others}})
            self._gap_reason = (f"MongoDB database {self.database!r} is read through hosts other than at the last stop "
                                "(its resume token is kept per deployment): changes made meanwhile may be missing")
        if token is not None:
            log.info("mongo source resuming", extra={"fields": self._log_fields()})
        delay = FIRST_RETRY
        while not self._stopping:
            try:
                await self._stream()
                delay = FIRST_RETRY
            except OperationFailure as exc:
                if exc.code == INVALID_RESUME_TOKEN and self._token is not None:
                    # e.g. the token of an invalidate event: only startAfter can pass it.
                    self._start_after, self._token = self._token, None
                    continue
                if exc.code in HISTORY_LOST_CODES | {INVALID_RESUME_TOKEN} and (
                    self._token is not None or self._start_after is not None
                ):
                    await self._history_lost_at(exc)
                    continue
                if exc.code in UNSUPPORTED_OPTION_CODES and self._with_pre_images and "fullDocumentBeforeChange" in str(exc):
                    log.warning("mongo server has no pre-images (MongoDB < 6.0): oldDocument disabled",
                                extra={"fields": self._log_fields()})
                    self._with_pre_images = False
                    continue
                if exc.code in TOO_LARGE_CODES and not self._one_by_one:
                    log.warning("mongo change too large to send; reading one change at a time to find it",
                                extra={"fields": {**self._log_fields(), "error": _described(exc)}})
                    self._one_by_one = True
                    continue
                if exc.code in TOO_LARGE_CODES:
                    try:
                        if await self._skip_too_large(exc):
                            continue
                    except PyMongoError as failure:  # reading it failed otherwise: retried as any failure
                        exc = failure  # noqa: PLW2901
                    delay = await self._failed(exc, delay)
                    continue
                if self._split_events and (exc.code == UNKNOWN_STAGE or SPLIT_STAGE in str(exc)):
                    log.warning("mongo server cannot split large change events (MongoDB < 7.0 / 6.0.9): "
                                "a change over 16 MiB will stop the feed", extra={"fields": self._log_fields()})
                    self._split_events = False
                    continue
                delay = await self._failed(exc, delay)
            except PyMongoError as exc:
                delay = await self._failed(exc, delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. the bus refusing a record: keep the feed alive
                log.exception("mongo source failed; reopening from the saved token",
                              extra={"fields": self._log_fields()})
                delay = await self._failed(exc, delay)

    def _log_fields(self) -> dict[str, Any]:
        """The source as its log lines name it: the database and its server's URL (redacted).
        The database alone did not tell two workspaces' databases of one name on two servers
        apart ("mongo change stream failed" for both), as the postgres source's lines say."""
        return {"source": "mongo", "database": self.database, "url": self._shown_url}

    async def _failed(self, exc: Exception, delay: float) -> float:
        if self._progress != self._progress_at_failure:
            delay = FIRST_RETRY  # the stream worked since the last failure: a new outage
            self._progress_at_failure = self._progress
        self._ready = False
        self._last_error = _described(exc)
        log.warning("mongo change stream failed, retrying",
                    extra={"fields": {**self._log_fields(), "error": self._last_error, "retry_in_s": delay}})
        await asyncio.sleep(delay)
        return min(delay * 2, self._retry_max)

    async def _history_lost_at(self, exc: OperationFailure) -> None:
        self._ready = False
        self._history_lost += 1
        self._last_error = f"ChangeStreamHistoryLost: {exc}"
        reason = f"MongoDB change stream history lost for database {self.database!r}; changes may be missing"
        log.error("MONGO CHANGE STREAM HISTORY LOST: the saved resume token is older than the oplog; "
                  "changes since were lost, restarting from now",
                  extra={"fields": {**self._log_fields(), "error": str(exc)}})
        self._token = None
        self._start_after = None
        self._generation += 1  # saves of older tokens still due: that history is lost
        # Told once the stream from "now" is open (_stream): the gap then covers every change
        # before it, also those made while it could not open yet. The lost token stays in the
        # file until then, so a restart meanwhile meets the loss again and reports it.
        self._gap_reason = reason

    async def _stream(self) -> None:
        assert self._client is not None
        db = self._client.get_database(self.database, codec_options=RAW_CODEC)
        options: dict[str, Any] = {"full_document": "updateLookup", "max_await_time_ms": self._await_ms}
        if self._with_pre_images:
            options["full_document_before_change"] = "whenAvailable"
        options.update(self._resume_options())
        if self._one_by_one:
            options["batch_size"] = 1
        self._reopen.clear()
        stream = await db.watch(self._pipeline(), **options)
        try:
            self._streams_opened += 1
            if self._gap_reason:
                # Before the new position is saved: a restart must not pass the loss untold.
                reason, self._gap_reason = self._gap_reason, ""
                await announce_gap(self._sink, list(self._workspaces()), "mongo", reason)
            # A stream opened from "now" already has a position (the first, empty batch's
            # postBatchResumeToken): keep it, so changes made while this process is down, even
            # before its first change, are read after a restart or by a standby.
            self._acknowledge(stream.resume_token)
            self.positioned.set()
            self._ready = True
            self._last_error = ""
            log.info("mongo change stream open", extra={"fields": {**self._log_fields(),
                     "resumed": "resume_after" in options or "start_after" in options}})
            fragments: list[RawBSONDocument] = []  # of the change being read, when it is split
            while not self._stopping and not self._reopen.is_set():
                change = await stream.try_next()
                if change is None:
                    if not stream.alive:
                        return
                    if self._one_by_one and not fragments:
                        # Caught up: the change too large to send was not among those read (it
                        # was a passing failure). Back to full batches.
                        self._one_by_one = False
                        self._reopen.set()
                    if not fragments:  # never a token inside a change: a restart reads it whole
                        self._acknowledge(stream.resume_token)
                    self._progress += 1
                    continue
                split = change.get("splitEvent")
                if split is not None:
                    if split.get("fragment") == 1:
                        fragments = []
                    fragments.append(change)
                    if split.get("fragment") != split.get("of"):
                        continue
                    try:
                        change = _joined(fragments)
                    except Exception as exc:  # noqa: BLE001 - as in _handle: the same bytes fail every time
                        await self._unconvertible(fragments[-1], exc, list(self._workspaces()))
                        fragments = []
                        self._acknowledge(stream.resume_token)
                        continue
                    fragments = []
                if not await self._handle(change):
                    return
                self._acknowledge(stream.resume_token)
                self._progress += 1
        finally:
            self._ready = False
            with contextlib.suppress(PyMongoError):
                await stream.close()

    def _other_tokens(self) -> list[str]:
        """Token files of this database kept for other deployments (another host list)."""
        own = {os.path.basename(self._tokens.path), os.path.basename(self._tokens.legacy_path or "")}
        try:
            names = os.listdir(self._state_dir)
        except OSError:
            return []
        # The rest of the name a digest: not the file of a database whose name goes on (app-eu).
        return sorted(n for n in names if n.startswith(self._token_prefix) and n.endswith(".json") and n not in own
                      and re.fullmatch(r"[0-9a-f]+", n[len(self._token_prefix):-len(".json")]))

    def _resume_options(self) -> dict[str, Any]:
        if self._start_after is not None:
            return {"start_after": self._start_after}
        if self._token is not None:
            return {"resume_after": self._token}
        return {}

    async def _skip_too_large(self, exc: OperationFailure) -> bool:
        """Read the change after the saved token without its documents (the one the server
        cannot send: reading one change a batch, the failure was that one), skip it as an
        unconvertible change is (history_gap), and go on after it; False when there was none."""
        assert self._client is not None
        db = self._client.get_database(self.database, codec_options=RAW_CODEC)
        pipeline = [stage for stage in self._pipeline() if SPLIT_STAGE not in stage] + [TOO_LARGE_PROJECTION]
        async with await db.watch(pipeline, batch_size=1, max_await_time_ms=self._await_ms,
                                  **self._resume_options()) as stream:
            change = None
            for _ in range(3):  # the change is there already: its batch is the first
                change = await stream.try_next()
                if change is not None:
                    break
            if change is None:
                return False  # not there after all: retried with backoff, one change at a time still
            await self._unconvertible(change, exc, list(self._workspaces()))
            self._acknowledge(stream.resume_token)
        self._one_by_one = False
        return True

    def _acknowledge(self, token: Any) -> None:
        if token is None:
            return
        self._token = token
        self._start_after = None
        self._durably(self._tokens.save, token)

    def _durably(self, save: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """`save(...)` once everything handed to the sink so far is durable: at once for a sink
        that has it when publish() returns; for the ingest's, once the Kafka transaction carrying
        it committed (the feed goes on meanwhile: group commit; a failed transaction makes the
        ingest start its feeds over from the saved token, so the next change is read meanwhile
        from the token in memory only)."""
        generation = self._generation

        def durable() -> None:
            if generation == self._generation:
                save(*args, **kwargs)

        when_durable(self._sink, durable)

    async def _handle(self, change: RawBSONDocument) -> bool:
        """Publish one change; False when the stream must be reopened (invalidate)."""
        workspaces = list(self._workspaces())
        try:
            events, decoded = self._convert(change, workspaces)
        except Exception as exc:  # noqa: BLE001 - one change must not stop the feed behind it
            await self._unconvertible(change, exc, workspaces)
            return True
        if events is not None:
            await self._publish(events)
            return True
        op = decoded.get("operationType")
        ns = decoded.get("ns") or {}
        if op == "invalidate":
            log.warning("mongo change stream invalidated, reopening after it",
                        extra={"fields": self._log_fields()})
            self._start_after = change["_id"]
            self._token = None
            self._durably(self._tokens.save, change["_id"], start_after=True)
            self._collections.forget()
            return False
        # drop, dropDatabase, rename: other collections stream on; refresh the known names.
        log.info("mongo collection change", extra={"fields": {**self._log_fields(), "operation": op,
                                                              "collection": ns.get("coll")}})
        self._collections.forget()
        return True

    @staticmethod
    def _convert(change: RawBSONDocument, workspaces: list[str]) -> tuple[list[Event] | None, dict[str, Any]]:
        """(its events, _) for a data change; (None, the decoded change) for a control event
        (invalidate, drop, rename), which _handle acts on."""
        # The fast path reads the raw BSON once (record + body JSON in one pass); it declines
        # non-data changes and unusual shapes, which take the decoded path.
        events = normalizer.normalize_raw(change.raw, workspaces)
        if events:
            return events, {}
        decoded = normalizer.decode_raw(change.raw)
        if decoded.get("operationType") in DATA_OPERATIONS:
            return normalizer.normalize_decoded(decoded, workspaces), {}
        return None, decoded

    async def _unconvertible(self, change: RawBSONDocument, exc: Exception, workspaces: list[str]) -> None:
        """A change no retry could convert (the same bytes fail the same way): skipped, loudly,
        and the workspaces told that their history has a hole (history_gap)."""
        self._skipped += 1
        where = self.database
        with contextlib.suppress(Exception):  # the change may be malformed where ns would be
            ns = change.get("ns") or {}
            where = f"{ns.get('db', self.database)}.{ns.get('coll', '?')}"
        error = _described(exc)
        self._last_error = f"skipped a change of {where}: {error}"
        log.error("mongo change could not be converted; skipped",
                  extra={"fields": {**self._log_fields(), "namespace": where, "error": error}})
        reason = f"a MongoDB change in {where} could not be converted ({error}); it was skipped"
        await announce_gap(self._sink, workspaces, "mongo", reason)

    async def _publish(self, events: list[Event]) -> None:
        self._publishing = True
        try:
            for i, event in enumerate(events, 1):
                self._publishing_event = i
                await self._sink.publish(event)
                self._published += 1
                if self._published % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a turn for the clients: a batch does not suspend by itself
            # recorded before the token is saved: the ingest's sink says when (_durably)
            drain = getattr(self._sink, "drain", None)
            if drain is not None and not hasattr(self._sink, "after_durable"):
                await drain()
        finally:
            self._publishing = False
        self._events += 1
        self._last_event_at = time.monotonic()
