"""Pure-Python reference of rtcore.mongo: a MongoDB change event (as PyMongo decodes it: a dict
of BSON types) becomes one normalized `Event` per target workspace, with the seed's event shape
(`collection`, `document`, `operationType`) encoded once.

BSON -> JSON: ObjectId -> 24-hex string, datetime -> RFC 3339 ms Z, Decimal128 -> number (int
when integral, else float; NaN/Infinity -> that float, written as null in bodies), Binary/bytes ->
base64, UUID -> canonical string, Int64 -> int, Timestamp -> {"t","i"}, Regex -> {"$regex","$options"}, DBRef ->
{"$ref","$id"[,"$db"], other fields}, MinKey/MaxKey -> {"$minKey":1}/{"$maxKey":1}, Code -> its source.
The compiled module must give byte-identical bodies; tests compare the two.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import bson
from bson import DBRef, Decimal128, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary
from bson.code import Code
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument

from rtcore.event import Event
from rtcore.messages import MongoEventBody, encode
from rtcore.timefmt import iso_ms, now_ms

OPERATIONS = {"insert": "INSERT", "update": "UPDATE", "replace": "REPLACE", "delete": "DELETE"}
_UUID_SUBTYPES = (3, 4)
# A date outside datetime's years 1-9999 (MongoDB keeps any int64 of milliseconds) decodes as
# DatetimeMS instead of failing the whole change, as the compiled decoder reads it.
# Sub-documents stay RawBSONDocument until to_json reads them in their stored order: decoded
# to dicts, one holding $ref and $id would become a DBRef, written $ref, $id first (the
# compiled module, reading the bytes, keeps the stored order).
_DECODE = CodecOptions(document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_REGEX_FLAGS = (("i", re.IGNORECASE), ("l", re.LOCALE), ("m", re.MULTILINE), ("s", re.DOTALL),
                ("u", re.UNICODE), ("x", re.VERBOSE))


def to_json(value: Any) -> Any:
    """A BSON value (as PyMongo decodes it) as a JSON-ready Python value."""
    if value is None or type(value) in (str, bool, float):
        return value
    if isinstance(value, int):
        return int(value)  # Int64 and bool-free ints: msgspec refuses int subclasses
    if isinstance(value, (dict, RawBSONDocument)) or isinstance(value, Mapping):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, _dt.datetime):
        return iso_datetime(value)
    if isinstance(value, Decimal128):
        return decimal_to_number(value)
    if isinstance(value, Binary):
        if value.subtype in _UUID_SUBTYPES and len(value) == 16:
            return str(uuid.UUID(bytes=bytes(value)))
        return base64.b64encode(value).decode()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (str, float)):  # bson.Code and other subclasses
        return str(value) if isinstance(value, str) else float(value)
    return _to_json_rare(value)


def _to_json_rare(value: Any) -> Any:
    if isinstance(value, DatetimeMS):
        return iso_ms(int(value))
    if isinstance(value, Timestamp):
        return {"t": value.time, "i": value.inc}
    if isinstance(value, Regex):
        return {"$regex": value.pattern, "$options": _regex_options(value.flags)}
    if isinstance(value, DBRef):
        # as_doc(): $ref, $id, $db, then the other fields a DBRef may carry (bson.decode moves
        # them into the DBRef; dropping them would lose data the compiled raw path keeps).
        return {key: to_json(item) for key, item in value.as_doc().items()}
    if isinstance(value, MinKey):
        return {"$minKey": 1}
    if isinstance(value, MaxKey):
        return {"$maxKey": 1}
    if isinstance(value, Code):
        return str(value)
    if hasattr(value, "pattern"):  # re.Pattern from a custom codec
        return {"$regex": value.pattern, "$options": ""}
    return str(value)


def iso_datetime(value: _dt.datetime) -> str:
    """RFC 3339, milliseconds, Z; naive datetimes are UTC (PyMongo's default), years 4 digits."""
    if value.tzinfo is not None:
        value = value.astimezone(_dt.UTC)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:{value.minute:02d}:"
        f"{value.second:02d}.{value.microsecond // 1000:03d}Z"
    )


def _regex_options(flags: int | str) -> str:
    if isinstance(flags, str):
        return "".join(sorted(flags))
    return "".join(letter for letter, bit in _REGEX_FLAGS if flags & bit)


def decimal_to_number(value: Decimal128) -> int | float:
    dec = value.to_decimal()
    if not dec.is_finite():
        # The float itself, as for a double: the body writes null (JSON has no such number)
        # while filters compare it as MongoDB does (Infinity > every finite number; null does
        # not match NaN). float() refuses a signalling NaN, hence the explicit nan.
        return float("nan") if dec.is_nan() else float(dec)
    if dec == dec.to_integral_value() and -(2**63) <= dec < 2**63:  # int64's range, both ends
        return int(dec)
    return float(dec)


def change_timestamp(change: Mapping[str, Any]) -> str:
    """Commit time: wallTime (MongoDB 6.0+) else clusterTime's seconds."""
    wall = change.get("wallTime")
    if isinstance(wall, _dt.datetime):
        return iso_datetime(wall)
    if isinstance(wall, DatetimeMS):
        return iso_ms(int(wall))
    cluster = change.get("clusterTime")
    if isinstance(cluster, Timestamp):
        return iso_ms(cluster.time * 1000)
    return iso_ms(now_ms())


def correlation_id(change: Mapping[str, Any]) -> str:
    """`<lsid uuid>:<txnNumber>` for a transaction's changes, else a digest of the resume token."""
    lsid = change.get("lsid")
    if lsid is not None and change.get("txnNumber") is not None:
        sid = lsid.get("id") if isinstance(lsid, Mapping) else None
        return f"{to_json(sid)}:{int(change['txnNumber'])}"
    # As JSON values, as the compiled module reads it: a token without a _data string (none on
    # MongoDB 4.4+) digests the same whether it came as a dict or a RawBSONDocument.
    token = to_json(change.get("_id"))
    data = token.get("_data") if isinstance(token, dict) else None
    raw = data.encode() if isinstance(data, str) else repr(token).encode()
    return "mongo-" + hashlib.blake2b(raw, digest_size=12).hexdigest()


def _update_description(desc: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if desc is None:
        return None
    out: dict[str, Any] = {
        "updatedFields": to_json(desc.get("updatedFields") or {}),
        "removedFields": list(desc.get("removedFields") or []),
    }
    truncated = desc.get("truncatedArrays")
    if truncated:
        out["truncatedArrays"] = to_json(truncated)
    return out


def decode_raw(raw: bytes | RawBSONDocument) -> dict[str, Any]:
    """BSON bytes (or a RawBSONDocument) as JSON-ready values."""
    data = raw.raw if isinstance(raw, RawBSONDocument) else raw
    return to_json(bson.decode(data, _DECODE))


def normalize_raw(raw: bytes | RawBSONDocument, workspaces: Sequence[str]) -> list[Event]:
    """`normalize_change` of a change event still in BSON (PyMongo's RawBSONDocument or bytes)."""
    data = raw.raw if isinstance(raw, RawBSONDocument) else raw
    return normalize_change(bson.decode(data, _DECODE), workspaces)


def normalize_decoded(change: dict[str, Any], workspaces: Sequence[str]) -> list[Event]:
    """`normalize_change` of a change event already decoded by `decode_raw` (JSON-ready)."""
    operation = OPERATIONS.get(change.get("operationType"))  # type: ignore[arg-type]
    if operation is None or not workspaces:
        return []
    collection = (change.get("ns") or {}).get("coll", "")
    key = change.get("documentKey") or {}
    if operation == "DELETE":
        record = body_document = key
    else:
        body_document = change.get("fullDocument")
        record = body_document if body_document is not None else key
    old = change.get("fullDocumentBeforeChange")
    wall, cluster = change.get("wallTime"), change.get("clusterTime")
    if isinstance(wall, str):
        timestamp = wall
    elif isinstance(cluster, dict):
        timestamp = iso_ms(cluster["t"] * 1000)
    else:
        timestamp = iso_ms(now_ms())
    lsid = change.get("lsid")
    if lsid is not None and change.get("txnNumber") is not None:
        correlation = f"{lsid.get('id')}:{change['txnNumber']}"
    else:
        token = change.get("_id")
        data = token.get("_data") if isinstance(token, dict) else None
        raw = data.encode() if isinstance(data, str) else repr(token).encode()
        correlation = "mongo-" + hashlib.blake2b(raw, digest_size=12).hexdigest()
    update = None
    desc = change.get("updateDescription")
    if operation == "UPDATE" and desc is not None:
        update = {"updatedFields": desc.get("updatedFields") or {}, "removedFields": list(desc.get("removedFields") or [])}
        if desc.get("truncatedArrays"):
            update["truncatedArrays"] = desc["truncatedArrays"]
    body = encode(
        MongoEventBody(
            channel="mongo:" + collection, operation=operation, collection=collection, document=body_document,
            operationType=change["operationType"], timestamp=timestamp, correlationId=correlation,
            updateDescription=update, oldDocument=old,
        )
    )
    if operation == "DELETE" and old is not None:
        record = old  # the pre-image: predicates match the document deleted, not its key alone
    return [Event(ws, "mongo", collection, operation, record, body, old) for ws in workspaces]


def normalize_change(change: Mapping[str, Any], workspaces: Sequence[str]) -> list[Event]:
    """One Event per workspace for a data change (insert/update/replace/delete); [] otherwise
    (drop, rename, invalidate... are the source's business)."""
    operation = OPERATIONS.get(change.get("operationType"))  # type: ignore[arg-type]
    if operation is None or not workspaces:
        return []
    ns = change.get("ns") or {}
    collection = ns.get("coll", "")
    key = to_json(change.get("documentKey") or {})
    if operation == "DELETE":
        document = None
        record = key
        body_document: dict[str, Any] | None = key
    else:
        full = change.get("fullDocument")
        document = to_json(full) if full is not None else None
        record = document if document is not None else key
        body_document = document  # null when updateLookup found the document gone
    before = change.get("fullDocumentBeforeChange")
    old = to_json(before) if before is not None else None
    body = encode(
        MongoEventBody(
            channel="mongo:" + collection,
            operation=operation,
            collection=collection,
            document=body_document,
            operationType=change["operationType"],
            timestamp=change_timestamp(change),
            correlationId=correlation_id(change),
            updateDescription=_update_description(change.get("updateDescription")) if operation == "UPDATE" else None,
            oldDocument=old,
        )
    )
    if operation == "DELETE" and old is not None:
        record = old  # the pre-image: predicates match the document deleted, not its key alone
    return [Event(ws, "mongo", collection, operation, record, body, old) for ws in workspaces]
