"""Pure-Python reference matcher: evaluates the predicate AST directly, written for clarity.

The compiled `rtcore.predicate` must agree with it on every (filter, record); the property
tests check that. It is also the fallback when the extension is not built.
"""

from __future__ import annotations

from typing import Any

from rtcore.predicate_ast import NUM, canon, is_nan, parse, type_class


def resolve(value: Any, parts: tuple, indexes: tuple) -> list:
    """Every value the path reaches in `value` (empty when the field is missing)."""
    if not parts:
        return [value]
    if isinstance(value, dict):
        if parts[0] in value:
            return resolve(value[parts[0]], parts[1:], indexes[1:])
        return []
    if isinstance(value, list):
        found = []
        if 0 <= indexes[0] < len(value):
            found += resolve(value[indexes[0]], parts[1:], indexes[1:])
        for element in value:
            if isinstance(element, dict):
                found += resolve(element, parts, indexes)
        return found
    return []


def expand(candidates: list) -> list:
    """The values a condition is tried on: each candidate, and the elements of array ones."""
    out = []
    for value in candidates:
        out.append(value)
        if isinstance(value, list):
            out.extend(value)
    return out


def _equal_key(value: Any, key: Any) -> bool:
    return canon(value) == key


def _compare(op: str, value: Any, operand: Any, cls: str) -> bool:
    if type_class(value) != cls:
        return False
    if cls == NUM and (is_nan(value) or is_nan(operand)):
        # As in MongoDB: NaN is smaller or greater than nothing but equals NaN.
        return op in ("gte", "lte") and is_nan(value) and is_nan(operand)
    if op == "gt":
        return value > operand
    if op == "gte":
        return value >= operand
    if op == "lt":
        return value < operand
    return value <= operand


def clause_holds(clause: tuple, candidates: list) -> bool:
    kind = clause[0]
    if kind == "exists":
        return bool(candidates) == clause[1]
    if kind == "not":
        return not all(clause_holds(c, candidates) for c in clause[1])
    values = expand(candidates)
    if kind == "eq":
        return any(_equal_key(v, clause[1]) for v in values)
    if kind == "ne":
        return not any(_equal_key(v, clause[1]) for v in values)
    if kind == "in":
        return any(canon(v) in clause[1] for v in values)
    if kind == "nin":
        return not any(canon(v) in clause[1] for v in values)
    return any(_compare(kind, v, clause[1], clause[2]) for v in values)


def node_holds(node: tuple, record: Any) -> bool:
    kind = node[0]
    if kind == "true":
        return True
    if kind == "and":
        return all(node_holds(child, record) for child in node[1])
    if kind == "or":
        return any(node_holds(child, record) for child in node[1])
    _, _, parts, indexes, clauses = node
    candidates = resolve(record, parts, indexes)
    return all(clause_holds(clause, candidates) for clause in clauses)


class Matcher:
    """A validated filter; `matches(record)` evaluates it."""

    __slots__ = ("ast", "empty")

    def __init__(self, ast: tuple) -> None:
        self.ast = ast
        self.empty = ast == ("true",)

    def matches(self, record: object) -> bool:
        # A non-object record (a custom event's scalar payload) matches only the empty filter.
        if self.empty:
            return True
        if not isinstance(record, dict):
            return False
        return node_holds(self.ast, record)


def compile_predicates(predicates: object) -> Matcher:
    """Compiles `predicates` (None, {} or a predicate object); raises FilterError."""
    return Matcher(parse(predicates))


__all__ = ["Matcher", "compile_predicates"]
