"""The test server's in-memory data: databases of collections of documents, the query subset
(equality, comparison, $in/$nin/$exists, $and/$or/$nor, dotted paths) and the update operators
($set, $unset, $inc, $push; or a replacement document)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import bson

_MISSING = object()


class CommandError(Exception):
    """A command failure returned to the client as {ok: 0, code, codeName, errmsg}."""

    def __init__(self, code: int, code_name: str, message: str, labels: list[str] | None = None):
        super().__init__(message)
        self.code = code
        self.code_name = code_name
        self.labels = labels or []

    def reply(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ok": 0.0, "errmsg": str(self), "code": self.code, "codeName": self.code_name}
        if self.labels:
            doc["errorLabels"] = list(self.labels)
        return doc


def same_bson(a: Any, b: Any) -> bool:
    """Equal as mongod tells a no-op write: the same BSON, types and field order included
    (Python's == has True == 1 == 1.0 and ignores the order of a document's fields)."""
    return bson.encode({"v": a}) == bson.encode({"v": b})


def id_key(value: Any) -> bytes:
    """A hashable key for an _id of any BSON type."""
    return bson.encode({"_id": value})


@dataclass
class Collection:
    name: str
    docs: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    pre_images: bool = False  # changeStreamPreAndPostImages.enabled
    # listCollections' type: "collection", or "view" (create with viewOn) or "timeseries"
    # (create with timeseries), which take no writes here and stream no changes on MongoDB.
    kind: str = "collection"
    options: dict[str, Any] = field(default_factory=dict)  # a view's viewOn/pipeline, timeseries


def get_path(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _MISSING
    return doc


def _compare(a: Any, b: Any) -> int | None:
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return (a > b) - (a < b)
    if type(a) is type(b):
        try:
            return (a > b) - (a < b)
        except TypeError:
            return None
    return None


def _value_matches(value: Any, cond: Any) -> bool:
    if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
        return all(_operator_matches(value, op, arg) for op, arg in cond.items())
    if value is _MISSING:
        return cond is None
    if isinstance(value, list) and not isinstance(cond, list):
        return cond in value
    return value == cond


def _operator_matches(value: Any, op: str, arg: Any) -> bool:
    if op == "$eq":
        return _value_matches(value, arg)
    if op == "$ne":
        return not _value_matches(value, arg)
    if op == "$in":
        return any(_value_matches(value, a) for a in arg)
    if op == "$nin":
        return not any(_value_matches(value, a) for a in arg)
    if op == "$exists":
        return (value is not _MISSING) == bool(arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if value is _MISSING:
            return False
        c = _compare(value, arg)
        if c is None:
            return False
        return {"$gt": c > 0, "$gte": c >= 0, "$lt": c < 0, "$lte": c <= 0}[op]
    raise CommandError(2, "BadValue", f"unknown operator: {op}")


def matches(doc: dict[str, Any], query: dict[str, Any] | None) -> bool:
    for key, cond in (query or {}).items():
        if key == "$and":
            if not all(matches(doc, q) for q in cond):
                return False
        elif key == "$or":
            if not any(matches(doc, q) for q in cond):
                return False
        elif key == "$nor":
            if any(matches(doc, q) for q in cond):
                return False
        elif key.startswith("$"):
            raise CommandError(2, "BadValue", f"unknown top level operator: {key}")
        elif not _value_matches(get_path(doc, key), cond):
            return False
    return True


def _parent(doc: dict[str, Any], path: str, create: bool) -> tuple[Any, str]:
    parts = path.split(".")
    node: Any = doc
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)]
            continue
        if part not in node:
            if not create:
                return None, parts[-1]
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise CommandError(28, "PathNotViable", f"cannot create field in element {{{part}: {node!r}}}")
    return node, parts[-1]


def apply_update(doc: dict[str, Any], update: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Apply operator update `update` to a copy of `doc`: (new document, updatedFields,
    removedFields) as a change stream reports them."""
    new = copy.deepcopy(doc)
    updated: dict[str, Any] = {}
    removed: list[str] = []
    for op, fields in update.items():
        if not isinstance(fields, dict):
            raise CommandError(9, "FailedToParse", f"modifier {op} expects a document")
        for path, arg in fields.items():
            if path == "_id" or path.startswith("_id."):
                raise CommandError(66, "ImmutableField", "Performing an update on the path '_id' would modify the immutable field '_id'")
            if op == "$set":
                parent, leaf = _parent(new, path, True)
                if isinstance(parent, dict) and leaf in parent and same_bson(parent[leaf], arg):
                    continue  # the same value: no change, not in updatedFields
                parent[leaf] = copy.deepcopy(arg)
                updated[path] = copy.deepcopy(arg)
            elif op == "$unset":
                parent, leaf = _parent(new, path, False)
                if isinstance(parent, dict) and leaf in parent:
                    del parent[leaf]
                    removed.append(path)
            elif op == "$inc":
                parent, leaf = _parent(new, path, True)
                current = parent.get(leaf, 0)
                if not isinstance(current, (int, float)) or isinstance(current, bool):
                    raise CommandError(14, "TypeMismatch", f"Cannot apply $inc to a value of non-numeric type at {path}")
                parent[leaf] = current + arg
                updated[path] = parent[leaf]
            elif op == "$push":
                parent, leaf = _parent(new, path, True)
                array = parent.setdefault(leaf, [])
                if not isinstance(array, list):
                    raise CommandError(2, "BadValue", f"The field '{path}' must be an array")
                array.append(copy.deepcopy(arg))
                updated[path] = copy.deepcopy(array)
            else:
                raise CommandError(9, "FailedToParse", f"Unknown modifier: {op}. Expected a valid update modifier or pipeline-style update specified as an array")
    return new, updated, removed


def is_operator_update(update: dict[str, Any]) -> bool:
    keys = list(update)
    if keys and all(k.startswith("$") for k in keys):
        return True
    if any(k.startswith("$") for k in keys):
        raise CommandError(9, "FailedToParse", "update document mixes operators and fields")
    return False


def upsert_base(query: dict[str, Any]) -> dict[str, Any]:
    """The equality fields of an upsert's query become the new document's fields."""
    base: dict[str, Any] = {}
    for key, cond in query.items():
        if key.startswith("$") or "." in key:
            continue
        if isinstance(cond, dict) and any(k.startswith("$") for k in cond):
            if "$eq" in cond:
                base[key] = copy.deepcopy(cond["$eq"])
            continue
        base[key] = copy.deepcopy(cond)
    return base
