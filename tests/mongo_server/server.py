"""The test server itself: accepts PyMongo connections, answers the handshake (legacy OP_QUERY
isMaster with OP_REPLY, then OP_MSG hello as a replica-set primary), and serves the commands the
gateway's change feed and its tests use. `MongoTestServer` runs on the caller's event loop;
`ThreadedMongoTestServer` runs it on a thread of its own so sync code and subprocesses can use it."""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from bson.int64 import Int64

from . import wire
from .oplog import ChangeStream, Oplog, next_batch, open_stream, token
from .store import (
    Collection,
    CommandError,
    apply_update,
    id_key,
    is_operator_update,
    matches,
    same_bson,
    upsert_base,
)

log = logging.getLogger("tests.mongo_server")

MAX_WIRE_VERSION = 21  # MongoDB 7.0
SERVER_VERSION = "7.0.99-rttest"
RESUMABLE_CODES = {6, 7, 43, 63, 89, 91, 133, 150, 189, 234, 262, 9001, 10107, 11600, 11602, 13388, 13435, 13436}
RETRYABLE_WRITE_CODES = {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
NO_FAILPOINT = {"hello", "ismaster", "configurefailpoint", "endsessions"}
MAX_RETRY_RECORDS = 10_000
MAX_DB_NAME = 63  # bytes: mongod refuses longer database names with InvalidNamespace (73)
DEFAULT_AWAIT_MS = 1000


class _CloseConnection(Exception):
    """Failpoint: drop the connection instead of replying."""


@dataclass
class FailPoint:
    times: int | None = 0  # None: alwaysOn
    commands: set[str] = field(default_factory=set)
    data: dict[str, Any] = field(default_factory=dict)

    def take(self, command: str) -> dict[str, Any] | None:
        if command not in self.commands or self.times == 0:
            return None
        if self.times is not None:
            self.times -= 1
        return self.data


@dataclass
class _Txn:
    writes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    committed: bool = False


class MongoTestServer:
    """A MongoDB test double: in-memory, one replica-set primary, change streams included."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, replica_set: str = "rs0", oplog_size: int = 100_000,
                 split_large_events: bool = True):
        self.host = host
        # $changeStreamSplitLargeEvent exists from MongoDB 7.0 (and 6.0.9); False: an older server.
        self.split_large_events = split_large_events
        self.port = port
        self.replica_set = replica_set
        self.oplog = Oplog(oplog_size)
        self.dbs: dict[str, dict[str, Collection]] = {}
        self.cursors: dict[int, ChangeStream] = {}
        self.fail_point = FailPoint()
        self.commands_seen: list[str] = []  # names, for tests that check the driver's behaviour
        self._retry_records: OrderedDict[tuple[bytes, int], dict[str, Any]] = OrderedDict()
        self._txns: dict[tuple[bytes, int], _Txn] = {}
        self._ids = itertools.count(1)
        self._cursor_ids = itertools.count(7_000_000_001)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._election_id = ObjectId("7fffffff0000000000000001")

    # ---- lifecycle and control ----------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_connections()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"mongodb://{self.address}/?directConnection=true"

    @property
    def replica_set_url(self) -> str:
        return f"mongodb://{self.address}/?replicaSet={self.replica_set}"

    def drop_connections(self) -> int:
        """Close every client connection at once (the driver sees a network error)."""
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        return len(writers)

    def truncate_oplog(self, keep_last: int = 0) -> None:
        self.oplog.truncate(keep_last)

    def enable_pre_images(self, db: str, coll: str, enabled: bool = True) -> None:
        self._collection(db, coll, create=True).pre_images = enabled

    def documents(self, db: str, coll: str) -> list[dict[str, Any]]:
        c = self.dbs.get(db, {}).get(coll)
        return [copy.deepcopy(d) for d in c.docs.values()] if c else []

    # ---- connection loop ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        connection_id = next(self._ids)
        try:
            while True:
                request = await wire.read_request(reader)
                if request is None:
                    break
                try:
                    reply = await self._dispatch(request, connection_id)
                except _CloseConnection:
                    break
                if request.more_to_come:
                    continue
                writer.write(wire.build_reply(request, next(self._ids), reply))
                await writer.drain()
        except (wire.ProtocolError, ConnectionError) as exc:
            log.debug("mongo test server: connection %s closed: %s", connection_id, exc)
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _dispatch(self, request: wire.Request, connection_id: int) -> dict[str, Any]:
        cmd = request.command
        name = next(iter(cmd), "")
        lname = name.lower()
        self.commands_seen.append(name)
        action = None if lname in NO_FAILPOINT else self.fail_point.take(name)
        if action is not None:
            if action.get("blockConnection"):
                await asyncio.sleep(action.get("blockTimeMS", 0) / 1000)
            if action.get("closeConnection") and not action.get("rtAfterExecute"):
                raise _CloseConnection
            if "errorCode" in action:
                return self._failpoint_error(name, cmd, action)
        try:
            db = cmd.get("$db", "")
            if isinstance(db, str) and len(db.encode()) > MAX_DB_NAME:
                # mongod refuses any command on such a database (NamespaceString's check)
                raise CommandError(73, "InvalidNamespace",
                                   f"db name must be at most {MAX_DB_NAME} characters, found: {len(db.encode())}")
            reply = await self._command(lname, cmd, connection_id)
        except CommandError as exc:
            reply = exc.reply()
        if action is not None and action.get("closeConnection"):
            raise _CloseConnection  # rtAfterExecute: the command ran, its reply is lost
        reply.setdefault("operationTime", self.oplog.operation_time())
        return reply

    def _failpoint_error(self, name: str, cmd: dict[str, Any], action: dict[str, Any]) -> dict[str, Any]:
        code = int(action["errorCode"])
        labels = action.get("errorLabels")
        if labels is None:
            labels = []
            if name == "getMore" and code in RESUMABLE_CODES:
                labels.append("ResumableChangeStreamError")
            if name in ("insert", "update", "delete") and "txnNumber" in cmd and code in RETRYABLE_WRITE_CODES:
                labels.append("RetryableWriteError")
        return CommandError(code, "FailPointError", f"Failing command {name} via 'failCommand' failpoint", labels).reply()

    # ---- commands ---------------------------------------------------------------------

    async def _command(self, name: str, cmd: dict[str, Any], connection_id: int) -> dict[str, Any]:
        db = cmd.get("$db", "admin")
        if name in ("hello", "ismaster"):
            return self._hello(connection_id, legacy=name == "ismaster")
        if name in ("ping", "endsessions", "killallsessions", "refreshsessions"):
            return {"ok": 1.0}
        if name == "buildinfo":
            return {"version": SERVER_VERSION, "versionArray": [7, 0, 99, 0], "maxBsonObjectSize": 16 * 1024 * 1024, "ok": 1.0}
        if name == "configurefailpoint":
            return self._configure_fail_point(cmd)
        if name == "getmore":
            return await self._get_more(cmd)
        if name == "killcursors":
            ids = [int(i) for i in cmd.get("cursors", [])]
            killed = [Int64(i) for i in ids if self.cursors.pop(i, None) is not None]
            missing = [Int64(i) for i in ids if i not in killed]
            return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [], "cursorsUnknown": [], "ok": 1.0}
        if name == "committransaction":
            return self._commit(cmd)
        if name == "aborttransaction":
            self._txns.pop(self._txn_key(cmd), None)
            return {"ok": 1.0}
        if name in ("insert", "update", "delete"):
            return self._write(name, db, cmd)
        if name == "find":
            return self._find(db, cmd)
        if name == "aggregate":
            return self._aggregate(db, cmd)
        if name == "listcollections":
            return self._list_collections(db, cmd)
        if name == "listdatabases":
            dbs = [{"name": n, "sizeOnDisk": 0, "empty": not c} for n, c in self.dbs.items()]
            return {"databases": dbs, "totalSize": 0, "ok": 1.0}
        if name == "create":
            if cmd["create"] in self.dbs.get(db, {}):
                raise CommandError(48, "NamespaceExists", f"Collection {db}.{cmd['create']} already exists.")
            coll = self._collection(db, cmd["create"], create=True)
            coll.pre_images = bool(cmd.get("changeStreamPreAndPostImages", {}).get("enabled"))
            if "viewOn" in cmd:  # db.createView(name, source, pipeline)
                coll.kind, coll.options = "view", {"viewOn": cmd["viewOn"], "pipeline": list(cmd.get("pipeline", []))}
            elif "timeseries" in cmd:  # db.createCollection(name, {timeseries: {timeField: ...}})
                coll.kind, coll.options = "timeseries", {"timeseries": {"granularity": "seconds", **cmd["timeseries"]}}
            return {"ok": 1.0}
        if name == "collmod":
            coll = self._collection(db, cmd["collMod"])
            if "changeStreamPreAndPostImages" in cmd:
                coll.pre_images = bool(cmd["changeStreamPreAndPostImages"].get("enabled"))
            return {"ok": 1.0}
        if name == "renamecollection":
            return self._rename(db, cmd)
        if name == "drop":
            self._drop(db, cmd["drop"])
            return {"ns": f"{db}.{cmd['drop']}", "nIndexesWas": 1, "ok": 1.0}
        if name == "dropdatabase":
            for coll in list(self.dbs.get(db, {})):
                self._drop(db, coll)
            if self.dbs.pop(db, None) is not None:
                self.oplog.append("dropDatabase", db, "")
            return {"dropped": db, "ok": 1.0}
        raise CommandError(59, "CommandNotFound", f"no such command: '{next(iter(cmd), '')}'")

    def _hello(self, connection_id: int, legacy: bool) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "helloOk": True,
            "isWritablePrimary": True,
            "secondary": False,
            "setName": self.replica_set,
            "setVersion": 1,
            "hosts": [self.address],
            "primary": self.address,
            "me": self.address,
            "electionId": self._election_id,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": wire.MAX_MESSAGE_BYTES,
            "maxWriteBatchSize": 100_000,
            "localTime": datetime.now(UTC),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": connection_id,
            "minWireVersion": 0,
            "maxWireVersion": MAX_WIRE_VERSION,
            "readOnly": False,
            "ok": 1.0,
        }
        if legacy:
            reply["ismaster"] = True
        # No topologyVersion: the driver then polls hello instead of awaiting it (see the guide).
        return reply

    def _configure_fail_point(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["configureFailPoint"] != "failCommand":
            raise CommandError(2, "BadValue", f"test server: unknown failpoint {cmd['configureFailPoint']!r}")
        mode = cmd.get("mode")
        data = dict(cmd.get("data", {}))
        if mode == "off":
            self.fail_point = FailPoint()
        elif mode == "alwaysOn":
            self.fail_point = FailPoint(None, set(data.get("failCommands", [])), data)
        elif isinstance(mode, dict) and "times" in mode:
            self.fail_point = FailPoint(int(mode["times"]), set(data.get("failCommands", [])), data)
        else:
            raise CommandError(2, "BadValue", f"test server: unsupported failpoint mode {mode!r}")
        return {"count": 0, "ok": 1.0}

    def _collection(self, db: str, name: str, create: bool = False) -> Collection:
        colls = self.dbs.setdefault(db, {}) if create else self.dbs.get(db, {})
        coll = colls.get(name)
        if coll is None:
            if not create:
                raise CommandError(26, "NamespaceNotFound", f"ns does not exist: {db}.{name}")
            coll = colls[name] = Collection(name)
        return coll

    def _rename(self, db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        """renameCollection on admin, within one database (mongod also renames across them)."""
        if db != "admin":
            raise CommandError(13, "Unauthorized", "renameCollection may only be run against the admin database.")
        source_db, _, source = str(cmd["renameCollection"]).partition(".")
        target_db, _, target = str(cmd.get("to", "")).partition(".")
        if target_db != source_db:
            raise CommandError(20, "IllegalOperation", "test server: renameCollection across databases")
        colls = self.dbs.get(source_db, {})
        if source not in colls:
            raise CommandError(26, "NamespaceNotFound", f"Source collection {source_db}.{source} does not exist")
        if target in colls:
            if not cmd.get("dropTarget"):
                raise CommandError(48, "NamespaceExists", "target namespace exists")
            self._drop(source_db, target)
        coll = colls[target] = colls.pop(source)
        coll.name = target
        self.oplog.append("rename", source_db, source, to_coll=target)
        return {"ok": 1.0}

    def _drop(self, db: str, name: str) -> None:
        if self.dbs.get(db, {}).pop(name, None) is not None:
            self.oplog.append("drop", db, name)
            for cid, stream in list(self.cursors.items()):
                if stream.db == db and stream.coll == name and stream.invalidated:
                    self.cursors.pop(cid, None)

    def _lookup(self, db: str, coll: str, key: dict[str, Any]) -> dict[str, Any] | None:
        c = self.dbs.get(db, {}).get(coll)
        doc = c.docs.get(id_key(key.get("_id"))) if c else None
        return copy.deepcopy(doc) if doc is not None else None

    # ---- writes (retryable, optionally in a transaction) -----------------------------------

    @staticmethod
    def _txn_key(cmd: dict[str, Any]) -> tuple[bytes, int]:
        lsid = cmd.get("lsid") or {}
        return bytes(lsid.get("id", b"")), int(cmd.get("txnNumber", 0))

    def _write(self, name: str, db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd.get("autocommit") is False:
            key = self._txn_key(cmd)
            txn = self._txns.get(key)
            if cmd.get("startTransaction"):
                txn = self._txns[key] = _Txn()
            if txn is None or txn.committed:
                raise CommandError(251, "NoSuchTransaction", f"Transaction {key[1]} has been aborted.", ["TransientTransactionError"])
            txn.writes.append((name, copy.deepcopy(cmd)))
            count = len(cmd.get({"insert": "documents", "update": "updates", "delete": "deletes"}[name], []))
            return {"n": count, "nModified": count, "ok": 1.0} if name == "update" else {"n": count, "ok": 1.0}
        retry_key = self._txn_key(cmd) if "txnNumber" in cmd else None
        if retry_key is not None and retry_key in self._retry_records:
            return copy.deepcopy(self._retry_records[retry_key])
        reply = self._apply_write(name, db, cmd, None)
        if retry_key is not None:
            self._retry_records[retry_key] = copy.deepcopy(reply)
            while len(self._retry_records) > MAX_RETRY_RECORDS:
                self._retry_records.popitem(last=False)
        return reply

    def _commit(self, cmd: dict[str, Any]) -> dict[str, Any]:
        key = self._txn_key(cmd)
        txn = self._txns.get(key)
        if txn is None:
            raise CommandError(251, "NoSuchTransaction", f"Transaction {key[1]} has been aborted.", ["TransientTransactionError"])
        if not txn.committed:
            txn.committed = True
            lsid = {k: v for k, v in cmd["lsid"].items()}
            for name, write in txn.writes:
                self._apply_write(name, write.get("$db", "admin"), write, (lsid, int(cmd["txnNumber"])))
        return {"ok": 1.0}

    def _apply_write(self, name: str, db: str, cmd: dict[str, Any], txn: tuple[dict[str, Any], int] | None) -> dict[str, Any]:
        coll = self._collection(db, cmd[name], create=True)
        if coll.kind == "view":  # as mongod: a view is read-only
            raise CommandError(166, "CommandNotSupportedOnView", f"Namespace {db}.{coll.name} is a view, not a collection")
        if coll.kind != "collection":  # mongod writes them to system.buckets.*, which streams do not show
            raise CommandError(20, "IllegalOperation", "test server: writes to time-series collections are not supported")
        extra: dict[str, Any] = {"lsid": txn[0], "txn_number": Int64(txn[1])} if txn else {}
        errors: list[dict[str, Any]] = []
        ordered = cmd.get("ordered", True)
        if name == "insert":
            n = 0
            for i, doc in enumerate(cmd.get("documents", [])):
                doc = dict(doc)
                if "_id" not in doc:
                    doc = {"_id": ObjectId(), **doc}
                key = id_key(doc["_id"])
                if key in coll.docs:
                    errors.append({"index": i, "code": 11000, "errmsg": f"E11000 duplicate key error collection: {db}.{coll.name} index: _id_ dup key: {{ _id: {doc['_id']!r} }}"})
                    if ordered:
                        break
                    continue
                coll.docs[key] = doc
                n += 1
                self.oplog.append("insert", db, coll.name, document_key={"_id": doc["_id"]}, full_document=copy.deepcopy(doc), **extra)
            reply: dict[str, Any] = {"n": n, "ok": 1.0}
        elif name == "update":
            n = modified = 0
            upserted = []
            for i, spec in enumerate(cmd.get("updates", [])):
                try:
                    matched, changed, upserted_id = self._update_one_spec(db, coll, spec, extra)
                except CommandError as exc:
                    errors.append({"index": i, "code": exc.code, "errmsg": str(exc)})
                    if ordered:
                        break
                    continue
                n += matched
                modified += changed
                if upserted_id is not None:
                    n += 1
                    upserted.append({"index": i, "_id": upserted_id})
            reply = {"n": n, "nModified": modified, "ok": 1.0}
            if upserted:
                reply["upserted"] = upserted
        else:
            n = 0
            for spec in cmd.get("deletes", []):
                limit = spec.get("limit", 0)
                for key, doc in list(coll.docs.items()):
                    if not matches(doc, spec.get("q")):
                        continue
                    del coll.docs[key]
                    n += 1
                    self.oplog.append("delete", db, coll.name, document_key={"_id": doc["_id"]},
                                      pre_image=doc if coll.pre_images else None, **extra)
                    if limit == 1:
                        break
            reply = {"n": n, "ok": 1.0}
        if errors:
            reply["writeErrors"] = errors
        return reply

    def _update_one_spec(self, db: str, coll: Collection, spec: dict[str, Any], extra: dict[str, Any]) -> tuple[int, int, Any]:
        query, update = spec.get("q", {}), spec.get("u")
        if not isinstance(update, dict):
            raise CommandError(9, "FailedToParse", "test server: pipeline updates are not supported")
        operators = is_operator_update(update)
        matched = changed = 0
        for key, doc in list(coll.docs.items()):
            if not matches(doc, query):
                continue
            matched += 1
            if operators:
                new, updated, removed = apply_update(doc, update)
                if not same_bson(new, doc):
                    coll.docs[key] = new
                    changed += 1
                    self.oplog.append("update", db, coll.name, document_key={"_id": doc["_id"]},
                                      update_description={"updatedFields": updated, "removedFields": removed, "truncatedArrays": []},
                                      pre_image=doc if coll.pre_images else None, **extra)
            else:
                if "_id" in update and update["_id"] != doc["_id"]:
                    raise CommandError(66, "ImmutableField", "the (immutable) field '_id' was found to have been altered")
                new = {"_id": doc["_id"], **{k: v for k, v in update.items() if k != "_id"}}
                if same_bson(new, doc):  # mongod: a replacement by the same document is a no-op
                    if not spec.get("multi"):
                        break
                    continue
                coll.docs[key] = new
                changed += 1
                self.oplog.append("replace", db, coll.name, document_key={"_id": doc["_id"]}, full_document=copy.deepcopy(new),
                                  pre_image=doc if coll.pre_images else None, **extra)
            if not spec.get("multi"):
                break
        if matched or not spec.get("upsert"):
            return matched, changed, None
        base = upsert_base(query)
        new = apply_update(base, update)[0] if operators else {**({"_id": base["_id"]} if "_id" in base else {}), **update}
        if "_id" not in new:
            new = {"_id": ObjectId(), **new}
        coll.docs[id_key(new["_id"])] = new
        self.oplog.append("insert", db, coll.name, document_key={"_id": new["_id"]}, full_document=copy.deepcopy(new), **extra)
        return 0, 0, new["_id"]

    # ---- reads -------------------------------------------------------------------------

    def _find(self, db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        c = self.dbs.get(db, {}).get(cmd["find"])
        docs = [copy.deepcopy(d) for d in (c.docs.values() if c else []) if matches(d, cmd.get("filter"))]
        docs = docs[int(cmd.get("skip", 0)):]
        if cmd.get("limit"):
            docs = docs[: abs(int(cmd["limit"]))]
        return {"cursor": {"id": Int64(0), "ns": f"{db}.{cmd['find']}", "firstBatch": docs}, "ok": 1.0}

    def _list_collections(self, db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        infos = [self._collection_info(name, c) for name, c in self.dbs.get(db, {}).items()]
        if any(c.kind == "view" for c in self.dbs.get(db, {}).values()):
            infos.append(self._collection_info("system.views", Collection("system.views")))  # where mongod keeps them
        infos = [i for i in infos if matches(i, cmd.get("filter"))]
        if cmd.get("nameOnly"):
            infos = [{"name": i["name"], "type": i["type"]} for i in infos]
        return {"cursor": {"id": Int64(0), "ns": f"{db}.$cmd.listCollections", "firstBatch": infos}, "ok": 1.0}

    @staticmethod
    def _collection_info(name: str, c: Collection) -> dict[str, Any]:
        """listCollections' entry, as mongod writes it (a view has no idIndex and is read-only)."""
        if c.kind == "view":
            return {"name": name, "type": "view", "options": dict(c.options), "info": {"readOnly": True}}
        options = {"changeStreamPreAndPostImages": {"enabled": True}} if c.pre_images else {}
        info: dict[str, Any] = {"name": name, "type": c.kind, "options": {**options, **c.options}, "info": {"readOnly": False}}
        if c.kind == "collection":
            info["idIndex"] = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
        return info

    def _aggregate(self, db: str, cmd: dict[str, Any]) -> dict[str, Any]:
        pipeline = cmd.get("pipeline", [])
        target = cmd["aggregate"]
        coll = None if target == 1 else target
        batch_size = int(cmd.get("cursor", {}).get("batchSize", 101))
        if pipeline and "$changeStream" in pipeline[0]:
            cursor_id = next(self._cursor_ids)
            stream = open_stream(self.oplog, cursor_id, db, coll, pipeline[0]["$changeStream"], pipeline[1:], batch_size,
                                 self.split_large_events)
            batch, pbrt = next_batch(self.oplog, stream, self._lookup, batch_size) if batch_size else ([], None)
            if pbrt is None:
                pbrt = token(stream.position)
            alive = not stream.invalidated or bool(stream.pending)
            if alive:
                self.cursors[cursor_id] = stream
            return {"cursor": {"firstBatch": batch, "postBatchResumeToken": pbrt, "id": Int64(cursor_id if alive else 0),
                               "ns": stream.ns}, "ok": 1.0}
        if coll is None:
            raise CommandError(73, "InvalidNamespace", "test server: database aggregation needs $changeStream")
        c = self.dbs.get(db, {}).get(coll)
        docs: list[Any] = [copy.deepcopy(d) for d in (c.docs.values() if c else [])]
        for stage in pipeline:
            (op, arg), = stage.items()
            if op == "$match":
                docs = [d for d in docs if matches(d, arg)]
            elif op == "$skip":
                docs = docs[int(arg):]
            elif op == "$limit":
                docs = docs[: int(arg)]
            elif op == "$group" and set(arg) == {"_id", "n"} and arg["n"] == {"$sum": 1}:
                docs = [{"_id": arg["_id"], "n": len(docs)}] if docs else []
            else:
                raise CommandError(40324, "Location40324", f"test server: unsupported pipeline stage {op}")
        return {"cursor": {"id": Int64(0), "ns": f"{db}.{coll}", "firstBatch": docs}, "ok": 1.0}

    async def _get_more(self, cmd: dict[str, Any]) -> dict[str, Any]:
        cursor_id = int(cmd["getMore"])
        stream = self.cursors.get(cursor_id)
        if stream is None:
            raise CommandError(43, "CursorNotFound", f"cursor id {cursor_id} not found")
        limit = int(cmd.get("batchSize") or 101)
        wait = cmd.get("maxTimeMS", DEFAULT_AWAIT_MS) / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                batch, pbrt = next_batch(self.oplog, stream, self._lookup, limit)
            except CommandError:
                self.cursors.pop(cursor_id, None)
                raise
            remaining = deadline - loop.time()
            if batch or stream.invalidated or remaining <= 0 or self.cursors.get(cursor_id) is not stream:
                break
            await self.oplog.wait_beyond(stream.position, remaining)
        alive = self.cursors.get(cursor_id) is stream and (not stream.invalidated or bool(stream.pending))
        if not alive:
            self.cursors.pop(cursor_id, None)
        return {"cursor": {"nextBatch": batch, "postBatchResumeToken": pbrt, "id": Int64(cursor_id if alive else 0),
                           "ns": stream.ns}, "ok": 1.0}


class ThreadedMongoTestServer:
    """`MongoTestServer` on its own event loop thread; control methods are thread-safe."""

    def __init__(self, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self.server = MongoTestServer(**kwargs)
        self._thread = threading.Thread(target=self._loop.run_forever, name="mongo-test-server", daemon=True)

    def start(self) -> ThreadedMongoTestServer:
        self._thread.start()
        self._call(self.server.start())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self.server.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)

        return self._call(call())

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def replica_set_url(self) -> str:
        return self.server.replica_set_url

    @property
    def port(self) -> int:
        return self.server.port

    def drop_connections(self) -> int:
        return self._run(self.server.drop_connections)

    def truncate_oplog(self, keep_last: int = 0) -> None:
        self._run(self.server.truncate_oplog, keep_last)

    def enable_pre_images(self, db: str, coll: str, enabled: bool = True) -> None:
        self._run(self.server.enable_pre_images, db, coll, enabled)

    def documents(self, db: str, coll: str) -> list[dict[str, Any]]:
        return self._run(self.server.documents, db, coll)

    def commands_seen(self) -> list[str]:
        return self._run(lambda: list(self.server.commands_seen))

    def oplog_head(self) -> int:
        return self._run(lambda: self.server.oplog.head)
