"""Pure-Python reference of the subscription index, and the brute-force scan it must equal.

`SubscriptionIndex` uses the same structure as the compiled `rtcore.index` (tables per
(source, entity or "*", operation or any), hash buckets per equality key on the attributes
subscribers filter on, a scan list for the rest), in plain Python: the fallback when the
extension is not built. `LinearScan` is the obviously correct oracle: every subscription,
every time. The property tests hold all three to the same answers.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from rtcore.predicate_ast import canon, index_keys, parse
from rtcore.predicate_ref import Matcher, expand, resolve

_ANY_OP = None  # table of the subscriptions that take every operation


class _Sub:
    __slots__ = ("key", "source", "entity", "operations", "matcher", "transitions", "keys", "slots")

    def __init__(self, key, source, entity, operations, matcher, transitions, keys) -> None:
        self.key = key
        self.source = source
        self.entity = entity
        self.operations = operations
        self.matcher = matcher
        self.transitions = transitions
        self.keys = keys  # [(dotted, parts, indexes, key)] or None: scanned
        self.slots: list[tuple[str, str, str | None]] = []

    def wants(self, source: str, entity: str, operation: str) -> bool:
        return (
            self.source == source
            and self.entity in (entity, "*")
            and (self.operations is None or operation in self.operations)
        )


class _Table:
    """The subscriptions of one (source, entity, operation) slot."""

    def __init__(self) -> None:
        self.count = 0
        self.scan: dict[Hashable, _Sub] = {}
        # dotted path -> (parts, indexes, {canonical value: {sub key: sub}})
        self.attrs: dict[str, tuple[tuple, tuple, dict[Any, dict[Hashable, _Sub]]]] = {}

    def insert(self, sub: _Sub) -> None:
        self.count += 1
        if sub.keys is None:
            self.scan[sub.key] = sub
            return
        for dotted, parts, indexes, key in sub.keys:
            buckets = self.attrs.setdefault(dotted, (parts, indexes, {}))[2]
            buckets.setdefault(key, {})[sub.key] = sub

    def delete(self, sub: _Sub) -> None:
        self.count -= 1
        if sub.keys is None:
            del self.scan[sub.key]
            return
        for dotted, _, _, key in sub.keys:
            buckets = self.attrs[dotted][2]
            bucket = buckets[key]
            bucket.pop(sub.key, None)
            if not bucket:
                del buckets[key]
                if not buckets:
                    del self.attrs[dotted]

    def candidates(self, record: Any) -> list[_Sub]:
        """Every subscription that could match `record` (a superset; may repeat)."""
        found = list(self.scan.values())
        if not isinstance(record, dict):
            return found
        for parts, indexes, buckets in self.attrs.values():
            for value in expand(resolve(record, parts, indexes)):
                if isinstance(value, (dict, list)):
                    continue  # index keys are scalars
                found.extend(buckets.get(canon(value), {}).values())
        return found


class SubscriptionIndex:
    """Every subscription of a process, matched per event by hash lookups."""

    def __init__(self) -> None:
        self._subs: dict[Hashable, _Sub] = {}
        self._tables: dict[tuple[str, str, str | None], _Table] = {}
        self._transitions = 0

    def __len__(self) -> int:
        return len(self._subs)

    def __contains__(self, key: object) -> bool:
        return key in self._subs

    @property
    def has_transitions(self) -> bool:
        return self._transitions > 0

    def add(
        self,
        key: Hashable,
        source: str,
        entity: str,
        operations: frozenset[str] | None,
        predicates: dict | None,
        transitions: bool = False,
    ) -> None:
        ast = parse(predicates)  # raises FilterError before anything changes
        matcher = Matcher(ast)
        keys = None if matcher.empty else index_keys(ast)
        ops = None if operations is None else frozenset(operations)
        self.remove(key)
        sub = _Sub(key, source, entity, ops, matcher, bool(transitions), keys)
        for op in [_ANY_OP] if ops is None else ops:
            slot = (source, entity, op)
            self._tables.setdefault(slot, _Table()).insert(sub)
            sub.slots.append(slot)
        self._subs[key] = sub
        self._transitions += sub.transitions

    def remove(self, key: Hashable) -> None:
        sub = self._subs.pop(key, None)
        if sub is None:
            return
        for slot in sub.slots:
            table = self._tables[slot]
            table.delete(sub)
            if not table.count:
                del self._tables[slot]
        self._transitions -= sub.transitions

    def _candidates(self, source: str, entity: str, operation: str, record: Any) -> dict[Hashable, _Sub]:
        found: dict[Hashable, _Sub] = {}
        entities = {entity, "*"}
        for ent in entities:
            for op in (operation, _ANY_OP):
                table = self._tables.get((source, ent, op))
                if table is not None:
                    for sub in table.candidates(record):
                        found[sub.key] = sub
        return found

    def match(self, source: str, entity: str, operation: str, record: Any) -> list:
        subs = self._candidates(source, entity, operation, record)
        return [key for key, sub in subs.items() if sub.matcher.matches(record)]

    def match_transitions(
        self, source: str, entity: str, operation: str, record: Any, old_record: Any
    ) -> tuple[list, list, list]:
        subs = self._candidates(source, entity, operation, record)
        tracked = operation == "UPDATE" and old_record is not None
        if tracked:
            for key, sub in self._candidates(source, entity, operation, old_record).items():
                if sub.transitions:
                    subs[key] = sub
        return _classify(subs.values(), record, old_record, tracked)


def _classify(subs, record: Any, old_record: Any, tracked: bool) -> tuple[list, list, list]:
    deliver, enter, leave = [], [], []
    for sub in subs:
        new = sub.matcher.matches(record)
        if not (tracked and sub.transitions):
            if new:
                deliver.append(sub.key)
            continue
        old = sub.matcher.matches(old_record)
        if new and old:
            deliver.append(sub.key)
        elif new:
            enter.append(sub.key)
        elif old:
            leave.append(sub.key)
    return deliver, enter, leave


class LinearScan:
    """The oracle: same API, tries every subscription on every event."""

    def __init__(self) -> None:
        self._subs: dict[Hashable, _Sub] = {}

    def __len__(self) -> int:
        return len(self._subs)

    def __contains__(self, key: object) -> bool:
        return key in self._subs

    @property
    def has_transitions(self) -> bool:
        return any(sub.transitions for sub in self._subs.values())

    def add(self, key, source, entity, operations, predicates, transitions=False) -> None:
        matcher = Matcher(parse(predicates))
        ops = None if operations is None else frozenset(operations)
        self._subs[key] = _Sub(key, source, entity, ops, matcher, bool(transitions), None)

    def remove(self, key) -> None:
        self._subs.pop(key, None)

    def match(self, source: str, entity: str, operation: str, record: Any) -> list:
        return [
            sub.key
            for sub in self._subs.values()
            if sub.wants(source, entity, operation) and sub.matcher.matches(record)
        ]

    def match_transitions(self, source, entity, operation, record, old_record) -> tuple[list, list, list]:
        subs = [sub for sub in self._subs.values() if sub.wants(source, entity, operation)]
        return _classify(subs, record, old_record, operation == "UPDATE" and old_record is not None)
