"""Parsing and validation of subscription predicates into a small AST, plus the canonical
value keys that equality, `$in` and the subscription index all compare by.

Both the reference matcher (`predicate_ref`) and the compiled one (`predicate`) are built from
this AST, so there is exactly one definition of what a valid filter is. Semantics follow
MongoDB's for the supported subset:

- numbers (int, float, Decimal; never bool) compare with each other; other types compare only
  within their own type (str with str, bool with bool); a comparison across types is false;
- equality is on canonical keys: objects compare whole (member order does not matter), arrays
  element by element, NaN equals NaN;
- a path resolves through objects, indexes arrays with a numeric segment, and fans out over
  arrays of objects; a condition on an array field matches the array itself or any element;
- a missing field matches only `$exists: false`, `$ne`, `$nin` (and a `$not` around anything);
  unlike MongoDB, `null` equality does not match a missing field.

AST nodes are tuples:
    ("true",)                           matches everything
    ("and", [node, ...]) / ("or", [node, ...])
    ("field", dotted, parts, indexes, [clause, ...])   all clauses must hold
clauses:
    ("eq", key) ("ne", key) ("in", frozenset) ("nin", frozenset)
    ("gt"|"gte"|"lt"|"lte", operand, type_class) ("exists", bool) ("not", [clause, ...])
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rtcore.errors import FilterError

MAX_DEPTH = 8  # logical nesting, path segments, nesting of an operand value
MAX_CLAUSES = 64
MAX_IN = 1000
MAX_INDEX_KEYS = 1024  # a subscription with more candidate index keys is scanned instead


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:
        return self.name


# Canonical keys of values that Python's own equality would conflate or mis-compare.
TRUE_KEY = _Marker("TRUE_KEY")
FALSE_KEY = _Marker("FALSE_KEY")
NAN_KEY = _Marker("NAN_KEY")
NOMATCH = _Marker("NOMATCH")  # a record value that can equal no operand
LIST_TAG = _Marker("LIST_TAG")
DICT_TAG = _Marker("DICT_TAG")

NUM, STR, BOOL = "num", "str", "bool"
RANGE_OPS = ("gt", "gte", "lt", "lte")
_INF = float("inf")


# Integers beyond 64 bits (and the floats and decimals equal to one) are keyed by BigKey:
# CPython hashes an int as its value modulo 2**61 - 1, so a client could choose any number of
# such integers with one hash (n + k * (2**61 - 1)), and every set, dict and index bucket keyed
# by them would compare each with all the others. Within 64 bits at most a few dozen numbers
# share a hash.
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
_FLOAT_2_63 = 9223372036854775808.0


class BigKey:
    """The canonical key of an integer outside int64 (or of a float or decimal equal to one):
    equal iff the integers are, hashed from the integer's bytes (str/bytes hashing, keyed per
    process), not from Python's int hash, which a client can make collide at will."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: int) -> None:
        self.value = value
        self._hash = hash(value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return type(other) is BigKey and other.value == self.value

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __repr__(self) -> str:
        return f"BigKey({self.value})"

    def __reduce__(self) -> tuple:
        return (BigKey, (self.value,))


def canon(value: Any, budget: int = MAX_DEPTH) -> Any:
    """The canonical, hashable key of a value: equal keys iff equal under filter semantics.

    Containers nested deeper than `budget` give NOMATCH (no valid operand is that deep)."""
    if isinstance(value, bool):
        return TRUE_KEY if value else FALSE_KEY
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else BigKey(int(value))
    if isinstance(value, float):
        if value != value:
            return NAN_KEY
        if -_FLOAT_2_63 <= value < _FLOAT_2_63 or value in (_INF, -_INF):
            return value
        return BigKey(int(value))  # beyond 2**53 every float is an integer
    if value is None:
        return None
    if isinstance(value, Decimal):
        if value.is_nan():
            return NAN_KEY
        # (an integer of more digits than int() reads from text is no JSON number's)
        if value.is_finite() and not INT64_MIN <= value <= INT64_MAX and value.adjusted() < 4300 \
                and value == value.to_integral_value():
            return BigKey(int(value))
        return value
    if isinstance(value, dict):
        if budget <= 0:
            return NOMATCH
        return (DICT_TAG, frozenset((k, canon(v, budget - 1)) for k, v in value.items()))
    if isinstance(value, list):
        if budget <= 0:
            return NOMATCH
        return (LIST_TAG, tuple(canon(v, budget - 1) for v in value))
    return NOMATCH


def is_container_key(key: Any) -> bool:
    return type(key) is tuple


def type_class(value: Any) -> str | None:
    """The comparison class of a value for $gt/$gte/$lt/$lte, or None if it has none."""
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, str):
        return STR
    if isinstance(value, (int, float, Decimal)):
        return NUM
    return None


def is_nan(value: Any) -> bool:
    if isinstance(value, float):
        return value != value
    if isinstance(value, Decimal):
        return value.is_nan()
    return False


def _value_depth(value: Any, path: str, op: str, level: int = 0) -> None:
    """Rejects operand values that are not JSON-like or nest deeper than MAX_DEPTH."""
    if isinstance(value, dict):
        if level >= MAX_DEPTH:
            raise FilterError(f"{path}: {op} value nests deeper than {MAX_DEPTH} levels")
        for k, v in value.items():
            if not isinstance(k, str):
                raise FilterError(f"{path}: {op} value has a non-string member name")
            _value_depth(v, path, op, level + 1)
    elif isinstance(value, list):
        if level >= MAX_DEPTH:
            raise FilterError(f"{path}: {op} value nests deeper than {MAX_DEPTH} levels")
        for v in value:
            _value_depth(v, path, op, level + 1)
    elif not (value is None or isinstance(value, (bool, int, float, str, Decimal))):
        raise FilterError(f"{path}: {op} value of unsupported type {type(value).__name__}")


class _Parser:
    def __init__(self) -> None:
        self.clauses = 0

    def count(self, path: str, op: str) -> None:
        self.clauses += 1
        if self.clauses > MAX_CLAUSES:
            raise FilterError(f"{path}: {op} exceeds the limit of {MAX_CLAUSES} clauses")

    def predicate_set(self, spec: Any, where: str, depth: int) -> tuple:
        if not isinstance(spec, dict):
            raise FilterError(f"{where}: must be an object")
        if depth > MAX_DEPTH:
            raise FilterError(f"{where}: nests deeper than {MAX_DEPTH} levels")
        nodes = []
        for name, value in spec.items():
            if not isinstance(name, str):
                raise FilterError(f"{where}: member names must be strings")
            if name.startswith("$"):
                nodes.append(self.logical(name, value, where, depth))
            else:
                nodes.append(self.field(name, value, where, depth))
        if not nodes:
            return ("true",)
        return nodes[0] if len(nodes) == 1 else ("and", nodes)

    def logical(self, op: str, value: Any, where: str, depth: int) -> tuple:
        if op == "$not":
            # As in MongoDB, $not negates a field's operators; docs that list it beside
            # $and/$or read as if it took a predicate set, and "unknown operator" left a
            # client to guess where it goes.
            raise FilterError(
                f'{where}: $not applies to the operators of a field, e.g. {{"price": {{"$not": {{"$gt": 100}}}}}}'
            )
        if op not in ("$and", "$or"):
            raise FilterError(f"{where}: unknown operator {op}")
        if not isinstance(value, list) or not value:
            raise FilterError(f"{where}: {op} expects a non-empty array of objects")
        if len(value) > MAX_CLAUSES:
            raise FilterError(f"{where}: {op} exceeds the limit of {MAX_CLAUSES} clauses")
        children = []
        for i, v in enumerate(value):
            # Each member is a clause of its own, an empty one too: otherwise nesting empty
            # members would build filters of any size under the limit.
            self.count(f"{where}.{op}[{i}]", op)
            children.append(self.predicate_set(v, f"{where}.{op}[{i}]", depth + 1))
        return ("and" if op == "$and" else "or", children)

    def field(self, name: str, value: Any, where: str, depth: int) -> tuple:
        path = f"{where}.{name}"
        parts, indexes = _split_path(name, path)
        if isinstance(value, dict) and any(isinstance(k, str) and k.startswith("$") for k in value):
            clauses = self.operators(value, path, depth)
        else:
            self.count(path, "$eq")
            clauses = [self.equality("eq", value, path, "$eq")]
        return ("field", name, parts, indexes, clauses)

    def operators(self, spec: dict, path: str, depth: int) -> list:
        if depth > MAX_DEPTH:
            raise FilterError(f"{path}: nests deeper than {MAX_DEPTH} levels")
        clauses = []
        for op, operand in spec.items():
            if not isinstance(op, str) or not op.startswith("$"):
                raise FilterError(f"{path}: cannot mix operators and plain members ({op!r})")
            self.count(path, op)
            if op in ("$eq", "$ne"):
                clauses.append(self.equality(op[1:], operand, path, op))
            elif op in ("$in", "$nin"):
                if not isinstance(operand, list):
                    raise FilterError(f"{path}: {op} expects an array")
                if len(operand) > MAX_IN:
                    raise FilterError(f"{path}: {op} has more than {MAX_IN} values")
                for v in operand:
                    _value_depth(v, path, op)
                clauses.append((op[1:], frozenset(canon(v) for v in operand)))
            elif op in ("$gt", "$gte", "$lt", "$lte"):
                cls = type_class(operand)
                if cls is None:
                    raise FilterError(f"{path}: {op} expects a number, string or boolean")
                clauses.append((op[1:], operand, cls))
            elif op == "$exists":
                if not isinstance(operand, bool):
                    raise FilterError(f"{path}: $exists expects true or false")
                clauses.append(("exists", operand))
            elif op == "$not":
                if not isinstance(operand, dict) or not operand:
                    raise FilterError(f"{path}: $not expects a non-empty object of operators")
                if not all(isinstance(k, str) and k.startswith("$") for k in operand):
                    raise FilterError(f"{path}: $not expects operators only")
                clauses.append(("not", self.operators(operand, path, depth + 1)))
            else:
                raise FilterError(f"{path}: unknown operator {op}")
        return clauses

    def equality(self, kind: str, operand: Any, path: str, op: str) -> tuple:
        _value_depth(operand, path, op)
        return (kind, canon(operand))


_PATHS: dict[str, tuple[tuple, tuple]] = {}
_PATHS_MAX = 4096  # bounded: clients choose paths; beyond it paths are split per filter
# Bounded in bytes too: the cache outlives the filters, and 4096 names of ~60 KB (as long as a
# subscribe message allows), each held with its segments, kept ~500 MB for the process's life.
# Longer names are split per filter and go with it; real field paths are far shorter.
_PATH_CACHED_CHARS = 256


_NAMES: dict[str, str] = {}


def shared_name(name: str) -> str:
    """One str object for equal field names (path segments): filters on the same field hold one
    copy, and the index's field cache (index.pyx FieldCache) knows it by identity. Not
    sys.intern: on Python 3.12 an interned string is immortal, and these names are the clients'
    choice (every field name a client ever sent stayed in memory for the life of the process).
    Bounded as _PATHS is: beyond it, or longer than _PATH_CACHED_CHARS, a name is its own."""
    found = _NAMES.get(name)
    if found is not None:
        return found
    if len(_NAMES) < _PATHS_MAX and len(name) <= _PATH_CACHED_CHARS:
        _NAMES[name] = name
    return name


def _split_path(name: str, path: str) -> tuple[tuple, tuple]:
    """(segments, array indexes) of a dotted field path, shared between filters naming it."""
    cached = _PATHS.get(name)
    if cached is not None:
        return cached
    parts = tuple(name.split("."))
    if len(parts) > MAX_DEPTH:
        raise FilterError(f"{path}: path has more than {MAX_DEPTH} segments")
    for part in parts:
        if not part or part.startswith("$"):
            raise FilterError(f"{path}: invalid field path")
    result = (parts, tuple(_array_index(p) for p in parts))
    if len(_PATHS) < _PATHS_MAX and len(name) <= _PATH_CACHED_CHARS:
        _PATHS[name] = result
    return result


def _array_index(part: str) -> int:
    """The array position a path segment names, or -1 (canonical decimal digits only)."""
    if part.isascii() and part.isdigit() and (part == "0" or not part.startswith("0")) and len(part) < 10:
        return int(part)
    return -1


def parse(predicates: Any) -> tuple:
    """Validates `predicates` (None, or an object) into an AST; raises FilterError."""
    if predicates is None:
        return ("true",)
    return _Parser().predicate_set(predicates, "predicates", 1)


def _is_scalar_key(key: Any) -> bool:
    return type(key) is not tuple and key is not NOMATCH


def index_keys(node: tuple) -> list[tuple[str, tuple, tuple, Any]] | None:
    """Equality keys (dotted, parts, indexes, key) such that the node can match a record only
    if the record has one of them (some value at `parts` with that canonical key), or None
    when no such set exists (the subscription must be scanned)."""
    kind = node[0]
    if kind == "field":
        _, dotted, parts, indexes, clauses = node
        best, _ = _fewest_keys(clauses, _indexable_clause_keys)
        if best is None:
            return None
        return [(dotted, parts, indexes, k) for k in best]
    if kind == "and":
        return _fewest_keys(node[1], index_keys)[0]
    if kind == "or":
        union: dict = {}
        for child in node[1]:
            keys = index_keys(child)
            if keys is None:
                return None
            for entry in keys:
                union[(entry[0], entry[3])] = entry
            if len(union) > MAX_INDEX_KEYS:
                return None
        return list(union.values())
    return None


def _fewest_keys(items: Any, keys_of: Any) -> tuple[Any, int]:
    """(keys, position) of the item with the fewest index keys (the first of equals), or
    (None, -1): the one choice index_keys and residual both make."""
    best, best_i = None, -1
    for i, item in enumerate(items):
        keys = keys_of(item)
        if keys is not None and (best is None or len(keys) < len(best)):
            best, best_i = keys, i
    return best, best_i


def _indexable_clause_keys(clause: tuple) -> list | None:
    if clause[0] == "eq" and _is_scalar_key(clause[1]):
        return [clause[1]]
    if clause[0] == "in" and clause[1] and all(_is_scalar_key(k) for k in clause[1]):
        return list(clause[1])
    return None


def residual(node: tuple) -> tuple | None:
    """What is left to check once a record hit one of index_keys(node): the node without the
    equality / `$in` clause those keys came from ("true" when nothing is left), or None when
    nothing can be dropped (an `$or`, or no keys). Each clause of a field holds on its own
    (one array element may satisfy one clause and another the next), so dropping the one a
    bucket hit proves changes nothing else."""
    kind = node[0]
    if kind == "field":
        _, dotted, parts, indexes, clauses = node
        best, best_i = _fewest_keys(clauses, _indexable_clause_keys)
        if best is None:
            return None
        rest = list(clauses[:best_i]) + list(clauses[best_i + 1:])
        return ("field", dotted, parts, indexes, rest) if rest else ("true",)
    if kind == "and":
        best, best_i = _fewest_keys(node[1], index_keys)
        if best is None:
            return None
        sub = residual(node[1][best_i])
        if sub is None:
            return None
        rest = [c for i, c in enumerate(node[1]) if i != best_i]
        if sub != ("true",):
            rest.append(sub)
        if not rest:
            return ("true",)
        return rest[0] if len(rest) == 1 else ("and", rest)
    return None


def keys_decide(node: tuple) -> bool:
    """True when having one of index_keys(node) is not only necessary but sufficient: the
    filter is one equality / `$in` on scalars, or an `$or` of such, so a bucket hit is a match
    and the matcher need not run."""
    kind = node[0]
    if kind == "field":
        clauses = node[4]
        if len(clauses) != 1:
            return False
        clause = clauses[0]
        if clause[0] == "eq":
            return _is_scalar_key(clause[1])
        return clause[0] == "in" and bool(clause[1]) and all(_is_scalar_key(k) for k in clause[1])
    if kind == "or" or (kind == "and" and len(node[1]) == 1):
        return all(keys_decide(child) for child in node[1])
    return False
