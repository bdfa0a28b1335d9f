"""The subscription index: compiled (rtcore.index) and reference (rtcore.index_ref) indexes
against the brute-force LinearScan oracle, on fixed cases and random operation sequences."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtcore import engine, index, index_ref
from rtcore.errors import FilterError
from tests.test_predicate import PREDICATE_SETS, RECORD_POOL

IMPLS = [pytest.param(index_ref.SubscriptionIndex, id="ref"), pytest.param(index.SubscriptionIndex, id="compiled")]


class Sub:
    """Stands in for the server's Subscription objects: hashable by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


@pytest.mark.parametrize("make", IMPLS)
def test_routing_by_source_entity_operation(make):
    ix = make()
    a, b, c, d, e = (Sub(n) for n in "abcde")
    ix.add(a, "postgres", "products", None, {"category": "x"})
    ix.add(b, "postgres", "*", frozenset({"UPDATE"}), None)
    ix.add(c, "postgres", "orders", None, None)
    ix.add(d, "mongo", "products", None, {"category": "x"})
    ix.add(e, "postgres", "products", frozenset(), None)  # no operation: never matches
    assert set(ix.match("postgres", "products", "UPDATE", {"category": "x"})) == {a, b}
    assert set(ix.match("postgres", "products", "INSERT", {"category": "x"})) == {a}
    assert set(ix.match("postgres", "products", "INSERT", {"category": "y"})) == set()
    assert set(ix.match("postgres", "orders", "UPDATE", {})) == {b, c}
    assert set(ix.match("mongo", "products", "DELETE", {"category": "x"})) == {d}
    assert ix.match("events", "products", "PUBLISH", {"category": "x"}) == []
    assert len(ix) == 5 and a in ix and Sub("a") not in ix


@pytest.mark.parametrize("make", IMPLS)
def test_replace_remove_and_failed_add(make):
    ix = make()
    s = Sub("s")
    ix.add(s, "postgres", "t", None, {"a": 1})
    ix.add(s, "postgres", "t", None, {"a": 2})  # replaces
    assert len(ix) == 1
    assert ix.match("postgres", "t", "INSERT", {"a": 1}) == []
    assert ix.match("postgres", "t", "INSERT", {"a": 2}) == [s]
    with pytest.raises(FilterError, match=r"predicates\.a: unknown operator \$foo"):
        ix.add(s, "postgres", "t", None, {"a": {"$foo": 1}})
    assert ix.match("postgres", "t", "INSERT", {"a": 2}) == [s]  # unchanged by the failed add
    ix.remove(s)
    ix.remove(s)  # absent: no-op
    ix.remove(Sub("never added"))
    assert len(ix) == 0 and s not in ix
    assert ix.match("postgres", "t", "INSERT", {"a": 2}) == []


@pytest.mark.parametrize("make", IMPLS)
def test_unfiltered_subscribers_follow_adds_and_removes_between_matches(make):
    """Unfiltered subscriptions are copied to the result from a list kept beside their dict:
    a match after an add, a remove or a replacement by a filtered one sees the change."""
    ix = make()
    subs = [Sub(f"u{i}") for i in range(5)]
    for sub in subs:
        ix.add(sub, "events", "t", None, None)
    assert set(ix.match("events", "t", "PUBLISH", {"a": 1})) == set(subs)
    ix.remove(subs[0])
    assert set(ix.match("events", "t", "PUBLISH", {"a": 1})) == set(subs[1:])
    late = Sub("late")
    ix.add(late, "events", "t", None, None)
    assert set(ix.match("events", "t", "PUBLISH", {"a": 1})) == set(subs[1:]) | {late}
    ix.add(subs[1], "events", "t", None, {"a": 2})  # now filtered
    assert set(ix.match("events", "t", "PUBLISH", {"a": 1})) == set(subs[2:]) | {late}
    assert set(ix.match("events", "t", "PUBLISH", {"a": 2})) == set(subs[1:]) | {late}
    for sub in [*subs[1:], late]:
        ix.remove(sub)
    assert ix.match("events", "t", "PUBLISH", {"a": 2}) == []


@pytest.mark.parametrize("make", IMPLS)
def test_no_duplicates_when_a_subscription_sits_in_several_buckets(make):
    ix = make()
    ix.add("or", "events", "*", None, {"$or": [{"a": 1}, {"b": "x"}, {"a": {"$in": [2, 3]}}]})
    ix.add("in", "events", "*", None, {"tags": {"$in": ["p", "q", 1.0]}})
    record = {"a": [1, 2, 3, 1.0], "b": ["x", "x"], "tags": ["p", "q", 1, True]}
    assert Counter(ix.match("events", "orders", "PUBLISH", record)) == Counter({"or": 1, "in": 1})
    assert Counter(ix.match("events", "*", "PUBLISH", record)) == Counter({"or": 1, "in": 1})


@pytest.mark.parametrize("make", IMPLS)
def test_indexed_equality_follows_filter_semantics(make):
    ix = make()
    ix.add("one", "mongo", "c", None, {"n": 1})
    ix.add("true", "mongo", "c", None, {"n": True})
    ix.add("nested", "mongo", "c", None, {"d.e": "v", "x": {"$gt": 0}})
    ix.add("pos", "mongo", "c", None, {"arr.1": "b"})
    assert set(ix.match("mongo", "c", "INSERT", {"n": 1.0})) == {"one"}
    assert set(ix.match("mongo", "c", "INSERT", {"n": True})) == {"true"}
    assert set(ix.match("mongo", "c", "INSERT", {"n": [0, 1]})) == {"one"}
    assert set(ix.match("mongo", "c", "INSERT", {"d": [{"e": "w"}, {"e": "v"}], "x": 1})) == {"nested"}
    assert set(ix.match("mongo", "c", "INSERT", {"d": {"e": "v"}, "x": -1})) == set()
    assert set(ix.match("mongo", "c", "INSERT", {"arr": ["a", "b"]})) == {"pos"}
    # a custom event's scalar payload matches only empty predicate sets
    ix.add("all", "mongo", "c", None, {})
    assert set(ix.match("mongo", "c", "INSERT", 5)) == {"all"}


@pytest.mark.parametrize("make", IMPLS)
def test_equality_or_inequality_left_after_the_bucket_follows_filter_semantics(make):
    """A filter "g = G and u != I" (or "and u = J"): the bucket of g decides the first part;
    the compiled index checks the second from the entry itself (Entry.rkind), which must
    answer as the matcher does for scalars of every kind, arrays, objects and absence."""
    ix = make()
    ix.add("ne7", "events", "t", None, {"g": 1, "u": {"$ne": 7}})
    ix.add("eq7", "events", "t", None, {"g": 1, "u": 7})
    ix.add("ne_x", "events", "t", None, {"g": 1, "u": {"$ne": "x"}})
    ix.add("eq_true", "events", "t", None, {"g": 1, "u": True})
    ix.add("ne_none", "events", "t", None, {"g": 1, "u": {"$ne": None}})
    ix.add("eq_obj", "events", "t", None, {"g": 1, "u": {"$eq": {"k": 1}}})

    def run(record):
        return set(ix.match("events", "t", "PUBLISH", record))

    assert run({"g": 1, "u": 7}) == {"eq7", "ne_x", "ne_none"}
    assert run({"g": 1, "u": 7.0}) == {"eq7", "ne_x", "ne_none"}
    assert run({"g": 1, "u": Decimal("7")}) == {"eq7", "ne_x", "ne_none"}
    assert run({"g": 1, "u": 8}) == {"ne7", "ne_x", "ne_none"}
    assert run({"g": 1, "u": "x"}) == {"ne7", "ne_none"}
    assert run({"g": 1, "u": True}) == {"ne7", "ne_x", "eq_true", "ne_none"}  # True is not 1
    assert run({"g": 1, "u": 1}) == {"ne7", "ne_x", "ne_none"}
    assert run({"g": 1, "u": None}) == {"ne7", "ne_x"}
    assert run({"g": 1}) == {"ne7", "ne_x", "ne_none"}  # absent: no value equals
    assert run({"g": 1, "u": [1, 7]}) == {"eq7", "ne_x", "ne_none"}  # an element equals
    assert run({"g": 1, "u": [[7], {"a": 7}]}) == {"ne7", "ne_x", "ne_none"}  # nested: no
    assert run({"g": 1, "u": {"k": 1}}) == {"ne7", "ne_x", "ne_none", "eq_obj"}
    assert run({"g": 2, "u": 7}) == set()
    assert run({"g": 1, "u": float("nan")}) == {"ne7", "ne_x", "ne_none"}


@pytest.mark.parametrize("make", IMPLS)
def test_transitions_enter_leave_deliver(make):
    ix = make()
    assert not ix.has_transitions
    ix.add("t", "postgres", "p", None, {"price": {"$gte": 100}}, transitions=True)
    ix.add("plain", "postgres", "p", None, {"price": {"$gte": 100}})
    ix.add("eq", "postgres", "p", None, {"status": "open"}, transitions=True)
    assert ix.has_transitions

    def run(op, new, old):
        return tuple(set(part) for part in ix.match_transitions("postgres", "p", op, new, old))

    assert run("UPDATE", {"price": 150}, {"price": 50}) == ({"plain"}, {"t"}, set())
    assert run("UPDATE", {"price": 50}, {"price": 150}) == (set(), set(), {"t"})
    assert run("UPDATE", {"price": 150}, {"price": 120}) == ({"t", "plain"}, set(), set())
    assert run("UPDATE", {"price": 1}, {"price": 2}) == (set(), set(), set())
    # the old record is found through the hash buckets too
    assert run("UPDATE", {"status": "closed"}, {"status": "open"}) == (set(), set(), {"eq"})
    assert run("UPDATE", {"status": "open"}, {"status": "new"}) == (set(), {"eq"}, set())
    # no old record, or not an UPDATE: plain delivery
    assert run("UPDATE", {"price": 150}, None) == ({"t", "plain"}, set(), set())
    assert run("INSERT", {"price": 150}, {"price": 50}) == ({"t", "plain"}, set(), set())
    ix.remove("t")
    ix.remove("eq")
    assert not ix.has_transitions


def test_engine_uses_the_compiled_core():
    assert engine.COMPILED
    assert engine.SubscriptionIndex is index.SubscriptionIndex
    assert engine.FilterError is FilterError


# ---- property test: index == brute-force scan ----------------------------------------------

KEYS = st.integers(0, 11)
SOURCES = st.sampled_from(["postgres"] * 5 + ["mongo"])
ENTITIES = st.sampled_from(["t1", "t1", "*"])
OPS = st.sampled_from(["UPDATE", "UPDATE", "INSERT", "DELETE"])
OPERATIONS = st.none() | st.none() | st.frozensets(OPS, max_size=2)
# A small value domain, so that filters and records meet often.
SCALAR = st.sampled_from([0, 1, 1.0, Decimal("1"), "x", "y", True, None])
_leaf = SCALAR | st.lists(SCALAR, max_size=3) | st.dictionaries(st.sampled_from(["b", "0"]), SCALAR, max_size=2)
RECORD = st.one_of(
    st.fixed_dictionaries({"a": SCALAR, "b": SCALAR}, optional={"c": _leaf, "0": _leaf}),
    st.dictionaries(st.sampled_from(["a", "b", "c", "0"]), _leaf, max_size=4),
    st.sampled_from(RECORD_POOL + [None, 5, "s", [1]]),
)
PATH = st.sampled_from(["a", "a", "b", "b", "a.b", "c.0", "0"])
# Filters the index can put in hash buckets, next to arbitrary ones and invalid ones.
INDEXABLE = st.one_of(
    st.builds(lambda p, v: {p: v}, PATH, SCALAR),
    st.builds(lambda p, v: {p: {"$in": v}}, PATH, st.lists(SCALAR, min_size=1, max_size=4)),
    st.builds(lambda p, v, q, w: {"$or": [{p: v}, {q: w}]}, PATH, SCALAR, PATH, SCALAR),
    st.builds(lambda p, v, rest: {p: v, **rest}, PATH, SCALAR, PREDICATE_SETS[1]),
    st.builds(lambda p, v, q: {p: v, q: {"$ne": v}}, PATH, SCALAR, PATH),
)
PREDICATES = st.one_of(INDEXABLE, INDEXABLE, PREDICATE_SETS[0], st.just(None), st.just({"a": {"$bad": 1}}))

ADD = st.one_of(
    st.tuples(st.just("add"), KEYS, SOURCES, ENTITIES, OPERATIONS, PREDICATES, st.booleans()),
    st.tuples(st.just("add"), KEYS, SOURCES, ENTITIES, OPERATIONS, INDEXABLE, st.booleans()),
)
MATCH = st.tuples(st.just("match"), SOURCES, ENTITIES, OPS, RECORD, RECORD | st.none())
# Some subscriptions first, then adds, replaces, removes and matches interleaved.
COMMANDS = st.builds(
    lambda first, rest: first + rest,
    st.lists(ADD, min_size=1, max_size=6),
    st.lists(st.one_of(ADD, st.tuples(st.just("remove"), KEYS), MATCH, MATCH, MATCH), min_size=1, max_size=7),
)


def _bag(keys: list) -> Counter:
    counter = Counter(keys)
    assert all(n == 1 for n in counter.values()), f"duplicates in {keys}"
    return counter


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(COMMANDS)
def test_index_equals_linear_scan(commands):
    oracle = index_ref.LinearScan()
    indexes = [index_ref.SubscriptionIndex(), index.SubscriptionIndex()]
    for command in commands:
        if command[0] == "add":
            _, key, source, entity, ops, predicates, transitions = command
            try:
                oracle.add(key, source, entity, ops, predicates, transitions)
            except FilterError:
                for ix in indexes:
                    with pytest.raises(FilterError):
                        ix.add(key, source, entity, ops, predicates, transitions)
                continue
            for ix in indexes:
                ix.add(key, source, entity, ops, predicates, transitions)
        elif command[0] == "remove":
            for ix in [oracle, *indexes]:
                ix.remove(command[1])
        else:
            _, source, entity, op, record, old = command
            expected = _bag(oracle.match(source, entity, op, record))
            expected_t = [_bag(part) for part in oracle.match_transitions(source, entity, op, record, old)]
            for ix in indexes:
                assert _bag(ix.match(source, entity, op, record)) == expected
                got = [_bag(part) for part in ix.match_transitions(source, entity, op, record, old)]
                assert got == expected_t
        for ix in indexes:
            assert len(ix) == len(oracle)
            assert ix.has_transitions == oracle.has_transitions
            assert all((k in ix) == (k in oracle) for k in range(12))


# ---- bucket shapes of the compiled index: one item, a small array, a dict, and back ----------


def _check_against_oracle(ix, oracle, records, ops=("UPDATE", "INSERT")) -> None:
    for record in records:
        for op in ops:
            assert _bag(ix.match("postgres", "t", op, record)) == _bag(oracle.match("postgres", "t", op, record))
            for old in (None, records[0]):
                got = [_bag(p) for p in ix.match_transitions("postgres", "t", op, record, old)]
                assert got == [_bag(p) for p in oracle.match_transitions("postgres", "t", op, record, old)]


@pytest.mark.parametrize("make", IMPLS)
def test_a_crowded_value_grows_and_shrinks_its_bucket(make):
    """Up to 40 subscriptions on one value, of every kind (decided, residual, several keys,
    transitions), added and then removed one by one: same answers as the scan throughout."""
    import random

    rng = random.Random(7)
    kinds = [
        lambda: {"a": 1},
        lambda: {"a": 1, "n": {"$gte": rng.randrange(4)}},
        lambda: {"a": {"$in": [1, 2]}},
        lambda: {"$or": [{"a": 1}, {"b": "x"}]},
        lambda: {"a": 1, "b": {"$ne": "x"}},
    ]
    ix, oracle = make(), index_ref.LinearScan()
    records = [{"a": 1, "b": "x", "n": 2}, {"a": [1, 1, 2], "n": 0}, {"a": 2, "b": "y"}, {"a": 1.0, "n": 3}]
    subs = []
    for i in range(40):
        pred, ops, tr = rng.choice(kinds)(), rng.choice([None, frozenset({"UPDATE"})]), rng.random() < 0.2
        subs.append(i)
        for x in (ix, oracle):
            x.add(i, "postgres", "t", ops, pred, tr)
        if i % 4 == 0:
            _check_against_oracle(ix, oracle, records)
    rng.shuffle(subs)
    for n, i in enumerate(subs):
        for x in (ix, oracle):
            x.remove(i)
        if n % 3 == 0:
            _check_against_oracle(ix, oracle, records)
    assert len(ix) == 0 and ix.match("postgres", "t", "UPDATE", records[0]) == []


@pytest.mark.parametrize("make", IMPLS)
def test_long_arrays_and_repeated_values_give_each_subscriber_once(make):
    """A record whose arrays make more lookups than the compiled index stages at once (64):
    buckets reached several times still give each subscriber once."""
    ix, oracle = make(), index_ref.LinearScan()
    for i in range(30):
        for x in (ix, oracle):
            x.add(("eq", i), "postgres", "t", None, {"a": i})
            x.add(("in", i), "postgres", "t", None, {"b": {"$in": [i, i + 1]}})
            x.add(("rest", i), "postgres", "t", None, {"a": i, "b": {"$exists": True}})
    record = {"a": list(range(30)) * 5, "b": [i % 7 for i in range(150)]}
    _check_against_oracle(ix, oracle, [record, {"a": [3] * 200}])


@pytest.mark.parametrize("make", IMPLS)
def test_keys_with_equal_hashes_stay_apart(make):
    """-1 and -2 hash alike in CPython, as do 1 and 2**61: the buckets must still compare
    keys. 1, 1.0 and Decimal 1 are one key; True is another."""
    ix, oracle = make(), index_ref.LinearScan()
    values = [-1, -2, 1, 2**61, 2**62 + 1, True, "1"]
    for i, v in enumerate(values):
        for x in (ix, oracle):
            x.add(i, "postgres", "t", None, {"a": v})
    records = [{"a": v} for v in values] + [{"a": 1.0}, {"a": Decimal(1)}, {"a": values}]
    _check_against_oracle(ix, oracle, records)
    for x in (ix, oracle):
        x.remove(0)
        x.remove(2)
    _check_against_oracle(ix, oracle, records)


def test_table_grows_and_shrinks_with_thousands_of_values():
    ix, oracle = index.SubscriptionIndex(), index_ref.LinearScan()
    for i in range(5000):
        for x in (ix, oracle):
            x.add(i, "postgres", "t", None, {("a" if i % 2 else "b"): f"v{i}"})
    probe = [{"a": f"v{i}", "b": f"v{i + 1}"} for i in range(0, 5000, 97)]
    _check_against_oracle(ix, oracle, probe, ops=("UPDATE",))
    for i in range(0, 5000):
        if i % 50:
            for x in (ix, oracle):
                x.remove(i)
    _check_against_oracle(ix, oracle, probe, ops=("UPDATE",))
    for i in range(0, 5000, 50):
        for x in (ix, oracle):
            x.remove(i)
    assert len(ix) == 0 and ix.match("postgres", "t", "UPDATE", probe[0]) == []
    ix.add("again", "postgres", "t", None, {"a": "v1"})
    assert ix.match("postgres", "t", "UPDATE", {"a": "v1"}) == ["again"]


BULK_VALUE = st.sampled_from([0, 1, 1.0, "x", True])
BULK_PRED = st.one_of(
    st.builds(lambda v: {"a": v}, BULK_VALUE),
    st.builds(lambda v, n: {"a": v, "n": {"$gt": n}}, BULK_VALUE, st.integers(0, 3)),
    st.builds(lambda v, w: {"a": {"$in": [v, w]}}, BULK_VALUE, BULK_VALUE),
    st.builds(lambda v, w: {"$or": [{"a": v}, {"b": w}]}, BULK_VALUE, BULK_VALUE),
)
BULK_RECORD = st.fixed_dictionaries(
    {"a": BULK_VALUE | st.lists(BULK_VALUE, max_size=4), "b": BULK_VALUE, "n": st.integers(0, 4)}
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.tuples(st.integers(0, 59), BULK_PRED, st.booleans()), min_size=20, max_size=80),
    st.lists(st.integers(0, 59), max_size=60),
    st.lists(BULK_RECORD, min_size=1, max_size=4),
)
def test_crowded_buckets_equal_linear_scan(adds, removes, records):
    """Few values, many subscriptions: buckets of many entries, filled and emptied."""
    ix, oracle = index.SubscriptionIndex(), index_ref.LinearScan()
    for key, pred, tr in adds:
        for x in (ix, oracle):
            x.add(key, "postgres", "t", None, pred, tr)
    _check_against_oracle(ix, oracle, records, ops=("UPDATE",))
    for key in removes:
        for x in (ix, oracle):
            x.remove(key)
    _check_against_oracle(ix, oracle, records, ops=("UPDATE",))


# ---- BIG buckets: records in an array, swap-removed, decided without the Entry -----------------


def _big_bucket_filter(rng, i):
    """A filter on g == 1 of every kind a BIG bucket records: decided (direct), an inline $ne
    or equality residual (decided from the record in match()), several index keys, a matcher."""
    u = rng.choice([i, i % 5, -1, -2, 1, True, 1.0, "x", None])
    return rng.choice([
        {"g": 1},
        {"g": 1, "u": {"$ne": u}},
        {"g": 1, "u": {"$ne": u}},
        {"g": 1, "u": u},
        {"g": 1, "v": {"$ne": u}},
        {"g": {"$in": [1, 2]}, "u": {"$ne": u}},
        {"g": 1, "u": {"$gt": 2}},
        {"$or": [{"g": 1}, {"u": u}]},
    ])


BIG_RECORDS = [
    {"g": 1, "u": -1},
    {"g": 1, "u": -2},  # hashes as -1: the operand must be compared
    {"g": 1, "u": 1.0},
    {"g": 1, "u": True},
    {"g": 1, "u": 3, "v": "x"},
    {"g": 1, "u": [3, -1, "x", [1]]},
    {"g": 1, "u": {"a": 1}},
    {"g": 1},
    {"g": [1, 2], "u": None, "v": 1},
    {"g": 2, "u": 7},
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_big_bucket_swap_removals_re_adds_and_shrinking_equal_reference(seed):
    """One value's bucket grown to hundreds of entries, then emptied to a small array and one
    entry in random order (each removal moves the last record into the hole) with matches in
    between, entries replaced and re-added, and grown again: the compiled index answers as
    index_ref throughout, for match and match_transitions."""
    import random

    rng = random.Random(seed)
    ix, ref = index.SubscriptionIndex(), index_ref.SubscriptionIndex()
    ops_choices = [None, None, frozenset({"UPDATE"}), frozenset({"UPDATE", "INSERT"})]

    def add(key):
        pred, ops, tr = _big_bucket_filter(rng, key), rng.choice(ops_choices), rng.random() < 0.1
        entity = rng.choice(["t", "t", "*"])
        for x in (ix, ref):
            x.add(key, "postgres", entity, ops, pred, tr)

    def check():
        for record in BIG_RECORDS:
            for op in ("UPDATE", "INSERT"):
                assert _bag(ix.match("postgres", "t", op, record)) == _bag(ref.match("postgres", "t", op, record))
            got = [_bag(p) for p in ix.match_transitions("postgres", "t", "UPDATE", record, BIG_RECORDS[0])]
            assert got == [_bag(p) for p in ref.match_transitions("postgres", "t", "UPDATE", record, BIG_RECORDS[0])]

    live = list(range(300))
    for key in live:
        add(key)
    check()
    rng.shuffle(live)
    while live:
        for _ in range(rng.choice([1, 1, 3, 17])):
            if not live:
                break
            key = live.pop()
            for x in (ix, ref):
                x.remove(key)
        if rng.random() < 0.2 and live:
            add(rng.choice(live))  # a replacement: removed, then added with another filter
        if rng.random() < 0.1:
            live.append(1000 + len(live))
            add(live[-1])
        check()
    assert len(ix) == len(ref) == 0
    for key in range(40):  # the emptied bucket grows again
        add(key)
    check()
