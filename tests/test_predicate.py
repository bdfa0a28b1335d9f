"""The predicate engine: MongoDB semantics table, invalid filters, and property tests holding
the compiled matcher (rtcore.predicate) to the reference (rtcore.predicate_ref)."""

from __future__ import annotations

import math
import random
import tracemalloc
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtcore import predicate, predicate_ref
from rtcore.errors import FilterError

IMPLS = [pytest.param(predicate_ref, id="ref"), pytest.param(predicate, id="compiled")]

PRODUCT = {
    "id": 7,
    "category": "electronics",
    "price": 149.5,
    "stock": 0,
    "active": True,
    "discount": None,
    "tags": ["sale", "new"],
    "dims": {"w": 10, "h": 2.5, "unit": "cm"},
    "variants": [{"sku": "A1", "qty": 3}, {"sku": "B2", "qty": 0, "sizes": [38, 40]}],
    "matrix": [[1, 2], [3]],
    "cost": Decimal("99.90"),
}

SEMANTICS = [
    # plain values and $eq
    ({"category": "electronics"}, True),
    ({"category": "books"}, False),
    ({"category": {"$eq": "electronics"}}, True),
    ({"category": "electronics", "price": {"$gte": 100}}, True),
    ({"category": "electronics", "price": {"$gte": 150}}, False),
    # numbers across int/float/Decimal; bool is not a number
    ({"id": 7.0}, True),
    ({"id": Decimal("7")}, True),
    ({"cost": Decimal("99.9")}, True),
    ({"cost": {"$gt": 99}}, True),
    ({"cost": {"$lt": 99.95}}, True),
    ({"price": {"$gt": Decimal("149.4"), "$lt": 150}}, True),
    ({"stock": False}, False),
    ({"stock": 0}, True),
    ({"active": 1}, False),
    ({"active": True}, True),
    ({"active": {"$gt": False}}, True),
    ({"active": {"$gte": 1}}, False),
    # different types never compare
    ({"price": {"$gt": "100"}}, False),
    ({"category": {"$gt": 5}}, False),
    ({"category": {"$gt": "a"}}, True),
    ({"category": {"$lt": "f"}}, True),
    ({"id": "7"}, False),
    ({"id": {"$ne": "7"}}, True),
    # null is a value; a missing field is not null
    ({"discount": None}, True),
    ({"missing": None}, False),
    ({"discount": {"$exists": True}}, True),
    # missing field matches only $exists:false, $ne, $nin (and $not)
    ({"missing": {"$exists": False}}, True),
    ({"missing": {"$exists": True}}, False),
    ({"missing": {"$ne": 1}}, True),
    ({"missing": {"$nin": [1, 2]}}, True),
    ({"missing": {"$in": [1, None]}}, False),
    ({"missing": {"$gt": 0}}, False),
    ({"missing": {"$lt": 0}}, False),
    ({"missing": 1}, False),
    ({"missing": {"$not": {"$gt": 1}}}, True),
    # ... but a $not of what a missing field matches does not
    ({"missing": {"$not": {"$exists": False}}}, False),
    ({"missing": {"$not": {"$ne": 1}}}, False),
    ({"missing": {"$not": {"$nin": [1]}}}, False),
    ({"missing": {"$not": {"$exists": True}}}, True),
    # $in / $nin
    ({"category": {"$in": ["books", "electronics"]}}, True),
    ({"category": {"$nin": ["books", "electronics"]}}, False),
    ({"id": {"$in": [1.0, 7.0]}}, True),
    ({"active": {"$in": [1]}}, False),
    ({"tags": {"$in": ["new"]}}, True),
    ({"tags": {"$nin": ["new"]}}, False),
    ({"dims": {"$in": [{"unit": "cm", "h": 2.5, "w": 10}]}}, True),
    # objects compare whole (member order irrelevant), arrays element-wise
    ({"dims": {"w": 10, "h": 2.5, "unit": "cm"}}, True),
    ({"dims": {"unit": "cm", "w": 10.0, "h": 2.5}}, True),
    ({"dims": {"w": 10, "h": 2.5}}, False),
    ({"tags": ["sale", "new"]}, True),
    ({"tags": ["new", "sale"]}, False),
    # equality against an array field matches any element or the whole array
    ({"tags": "sale"}, True),
    ({"tags": "old"}, False),
    ({"tags": {"$ne": "sale"}}, False),
    ({"tags": {"$ne": "old"}}, True),
    ({"matrix": [3]}, True),
    ({"matrix": 3}, False),
    ({"tags": {"$gt": "r"}}, True),
    # dotted paths: objects, array positions, arrays of objects
    ({"dims.unit": "cm"}, True),
    ({"dims.w": {"$lte": 10}}, True),
    ({"dims.depth": {"$exists": False}}, True),
    ({"tags.1": "new"}, True),
    ({"tags.0": "new"}, False),
    ({"variants.sku": "B2"}, True),
    ({"variants.qty": {"$gt": 2}}, True),
    ({"variants.qty": {"$gt": 5}}, False),
    ({"variants.sizes": 40}, True),
    ({"variants.1.sku": "B2"}, True),
    ({"variants.0.sku": "B2"}, False),
    ({"variants.sizes": {"$exists": True}}, True),
    ({"category.x": {"$exists": False}}, True),
    # logical operators
    ({"$or": [{"category": "books"}, {"price": {"$lt": 200}}]}, True),
    ({"$or": [{"category": "books"}, {"price": {"$lt": 100}}]}, False),
    ({"$and": [{"category": "electronics"}, {"tags": "new"}]}, True),
    ({"$and": [{"category": "electronics"}, {"tags": "old"}]}, False),
    ({"price": {"$not": {"$gt": 200}}}, True),
    ({"price": {"$not": {"$gt": 100, "$lt": 200}}}, False),
    ({"$or": [{"$and": [{"id": 7}, {"stock": {"$lte": 0}}]}, {"id": 8}]}, True),
    ({"$and": [{}]}, True),
    # empty filters match everything
    ({}, True),
    (None, True),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("predicates", "expected"), SEMANTICS, ids=[repr(p) for p, _ in SEMANTICS])
def test_mongo_semantics(impl, predicates, expected):
    assert impl.compile_predicates(predicates).matches(PRODUCT) is expected


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_non_object_records(impl):
    nan = impl.compile_predicates({"x": float("nan")})
    assert nan.matches({"x": float("nan")}) is True
    assert nan.matches({"x": Decimal("NaN")}) is True
    assert nan.matches({"x": 1.0}) is False
    assert impl.compile_predicates({"x": {"$gt": 0}}).matches({"x": math.nan}) is False
    assert impl.compile_predicates({"x": {"$lt": float("nan")}}).matches({"x": 1}) is False
    # a custom event's scalar payload matches only the empty predicate set
    for payload in (5, "text", None, [1, 2], True):
        assert impl.compile_predicates(None).matches(payload) is True
        assert impl.compile_predicates({}).matches(payload) is True
        assert impl.compile_predicates({"x": {"$exists": False}}).matches(payload) is False
        assert impl.compile_predicates({"$and": [{}]}).matches(payload) is False


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_is_within_inclusive_bounds_of_nan(impl):
    # MongoDB: NaN compares false to everything except that it equals NaN, so $gte/$lte NaN
    # (like $eq) match a NaN field while $gt/$lt never do.
    for op, expected in (("$gte", True), ("$lte", True), ("$gt", False), ("$lt", False)):
        for operand in (float("nan"), Decimal("NaN")):
            matcher = impl.compile_predicates({"x": {op: operand}})
            assert matcher.matches({"x": float("nan")}) is expected, (op, operand)
            assert matcher.matches({"x": Decimal("NaN")}) is expected, (op, operand)
            assert matcher.matches({"x": [1, float("nan")]}) is expected, (op, operand)
            assert matcher.matches({"x": 1}) is False
            assert matcher.matches({"x": float("inf")}) is False
    assert impl.compile_predicates({"x": {"$gte": 0}}).matches({"x": float("nan")}) is False
    assert impl.compile_predicates({"x": {"$lte": 0}}).matches({"x": float("nan")}) is False
    assert impl.compile_predicates({"x": {"$not": {"$gte": float("nan")}}}).matches({"x": float("nan")}) is False


INVALID = [
    ({"price": {"$foo": 1}}, "predicates.price: unknown operator $foo"),
    ({"$nor": [{"a": 1}]}, "predicates: unknown operator $nor"),
    ({"$not": {"a": 1}}, 'predicates: $not applies to the operators of a field, e.g. {"price": {"$not": {"$gt": 100}}}'),
    ({"$or": []}, "predicates: $or expects a non-empty array"),
    ({"$and": {"a": 1}}, "predicates: $and expects a non-empty array"),
    ({"$or": [1]}, "predicates.$or[0]: must be an object"),
    ({"$or": [{"a": {"$bad": 1}}]}, "predicates.$or[0].a: unknown operator $bad"),
    ({"a": {"$in": 5}}, "predicates.a: $in expects an array"),
    ({"a": {"$nin": list(range(1001))}}, "predicates.a: $nin has more than 1000 values"),
    ({"a": {"$gt": None}}, "predicates.a: $gt expects a number, string or boolean"),
    ({"a": {"$lte": [1]}}, "predicates.a: $lte expects a number"),
    ({"a": {"$exists": 1}}, "predicates.a: $exists expects true or false"),
    ({"a": {"$not": 5}}, "predicates.a: $not expects a non-empty object"),
    ({"a": {"$not": {}}}, "predicates.a: $not expects a non-empty object"),
    ({"a": {"$gt": 1, "b": 2}}, "predicates.a: cannot mix operators"),
    # MongoDB reads this one (first member plain) as a literal document; here it is refused
    ({"a": {"b": 2, "$gt": 1}}, "predicates.a: cannot mix operators"),
    ({"a..b": 1}, "predicates.a..b: invalid field path"),
    ({"": 1}, "predicates.: invalid field path"),
    ({"a.$b": 1}, "predicates.a.$b: invalid field path"),
    ({".".join("abcdefghi"): 1}, "path has more than 8 segments"),
    ({"a": {"$eq": [[[[[[[[[1]]]]]]]]]}}, "predicates.a: $eq value nests deeper than 8 levels"),
    ({"a": {"$eq": {1, 2}}}, "predicates.a: $eq value of unsupported type set"),
    ({f"f{i}": i for i in range(65)}, "predicates.f64: $eq exceeds the limit of 64 clauses"),
    # empty members cost a clause each: nested, they would otherwise build filters of any size
    ({"$and": [{"$or": [{}] * 64}] * 64}, "exceeds the limit of 64 clauses"),
    ({"$or": [{"a": 1}] * 33}, "predicates.$or[32]: $or exceeds the limit of 64 clauses"),
    ({"a": {"$in": [{"$x": 1}], "$gt": 1}} | {f"f{i}": {"$exists": True} for i in range(63)}, "exceeds the limit of 64"),
    ([1, 2], "predicates: must be an object"),
    ("a", "predicates: must be an object"),
]


def _nested(depth: int) -> dict:
    spec: dict = {"a": 1}
    for _ in range(depth - 1):
        spec = {"$and": [spec]}
    return spec


INVALID.append((_nested(9), "nests deeper than 8 levels"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("predicates", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_filters_raise_filter_error(impl, predicates, message):
    with pytest.raises(FilterError) as raised:
        impl.compile_predicates(predicates)
    assert message in str(raised.value)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("impl", IMPLS)
def test_limits_at_the_boundary_compile(impl):
    impl.compile_predicates(_nested(8))
    impl.compile_predicates({f"f{i}": i for i in range(64)})
    impl.compile_predicates({"a": {"$in": list(range(1000))}})
    impl.compile_predicates({".".join("abcdefgh"): 1})
    matcher = impl.compile_predicates({"a": {"$in": list(range(1000))}})
    assert matcher.matches({"a": 999.0}) and not matcher.matches({"a": 1000})


# ---- property tests: compiled == reference -----------------------------------------------

NAMES = ["a", "b", "c", "0", "1"]
PATHS = ["a", "b", "c", "a.b", "a.0", "a.b.c", "b.1", "c.a.b", "0"]
SCALARS = [
    0, 1, 2, -1, 3, 1.0, 2.5, 0.0, -0.0, True, False, None, "x", "y", "", "10", "2",
    Decimal("1"), Decimal("2.5"), Decimal("NaN"), float("nan"), float("inf"), 10**20, -2.5,
    # where int, float and Decimal part ways: beyond 2**53 and 64 bits, signalling NaN, -inf;
    # strings beyond the BMP and a lone surrogate (a JSON "\ud800" escape decodes to one)
    2**53 + 1, float(2**53), Decimal(2**53 + 1), 2**63, -(2**63) - 1, 2**64 + 1, Decimal("sNaN"), float("-inf"),
    "\U0001F600", "\ud800", "\uffff",
]


def _value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth >= 3 or roll < 0.6:
        return rng.choice(SCALARS)
    if roll < 0.8:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(NAMES): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _record(rng: random.Random) -> dict:
    return {rng.choice(NAMES): _value(rng) for _ in range(rng.randint(0, 4))}


# Drawing from fixed pools keeps an example cheap, so 10k of them fit in CI time.
_RNG = random.Random(20240115)
VALUE_POOL = [_value(_RNG) for _ in range(400)]
RECORD_POOL = [_record(_RNG) for _ in range(1500)]
values = st.sampled_from(VALUE_POOL)
records = st.sampled_from(RECORD_POOL)

range_operands = st.one_of(
    st.sampled_from([0, 1, 2, 1.5, Decimal("1.5"), float("nan"), True, False, "x", "", "y"]),
    st.integers(-3, 3),
)
field_ops = st.one_of(
    st.tuples(st.sampled_from(["$eq", "$ne"]), values),
    st.tuples(st.sampled_from(["$in", "$nin"]), st.lists(values, max_size=4)),
    st.tuples(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), range_operands),
    st.tuples(st.just("$exists"), st.booleans()),
)



# Strategies are built once: constructing them inside a draw dominates the run time.
_op_lists = st.lists(field_ops, min_size=1, max_size=3)
_path_lists = st.lists(st.sampled_from(PATHS), max_size=3, unique=True)
_logic_ops = st.sampled_from(["$and", "$or"])
_coin = st.integers(0, 3)


@st.composite
def _operator_specs(draw, depth):
    spec = dict(draw(_op_lists))
    if depth < 2 and draw(_coin) == 0:
        spec["$not"] = draw(OPERATOR_SPECS[depth + 1])
    return spec


OPERATOR_SPECS = [_operator_specs(d) for d in range(3)]
_field_value = st.one_of(values, OPERATOR_SPECS[0])


@st.composite
def _predicate_sets(draw, depth):
    spec = {path: draw(_field_value) for path in draw(_path_lists)}
    if depth < 2 and draw(_coin) == 0:
        spec[draw(_logic_ops)] = draw(SET_LISTS[depth + 1])
    return spec


PREDICATE_SETS = [_predicate_sets(d) for d in range(3)]
SET_LISTS = [st.lists(strategy, min_size=1, max_size=3) for strategy in PREDICATE_SETS]


def _same_answer(predicates, record_list):
    try:
        ref = predicate_ref.compile_predicates(predicates)
    except FilterError:
        with pytest.raises(FilterError):
            predicate.compile_predicates(predicates)
        return
    compiled = predicate.compile_predicates(predicates)
    for record in record_list:
        assert compiled.matches(record) == ref.matches(record), (predicates, record)


PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(PREDICATE_SETS[0], st.lists(records, min_size=1, max_size=8))
def test_compiled_matches_reference(predicates, record_list):
    _same_answer(predicates, record_list)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["$eq", "$ne", "$gt", "$in", "$nin", "$exists", "$not", "$and", "$or", "$foo", "a.b", ""]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(
        st.sampled_from(["$eq", "$ne", "$gt", "$lte", "$in", "$nin", "$exists", "$not", "$and", "$or", "$x", "a", "b", "a.b", "a..b", ""])
        | st.text(max_size=4),
        inner,
        max_size=3,
    ),
    max_leaves=12,
)


@PROPERTY
@given(json_values, st.lists(records, max_size=3))
def test_arbitrary_json_filter_compiles_or_raises_filter_error(predicates, record_list):
    # Never any other exception, and when it compiles both engines agree.
    _same_answer(predicates, record_list)


@pytest.mark.parametrize("impl", IMPLS)
def test_long_field_paths_are_not_kept_after_their_filters(impl):
    """Field paths are split once and shared between filters naming them, in a process-wide
    cache of 4096 names: bounded in names, not in bytes. A client could subscribe and
    unsubscribe with 4096 distinct paths of ~60 KB each (a subscribe message holds 64 KiB)
    and leave ~500 MB (each name and its split segments) held for the life of the process,
    every workspace's memory. A filter's long paths now go when the filter goes."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            # 8 segments of 4 KB: a valid path, one per filter, 32 KB each
            path = ".".join(f"{impl.__name__.rpartition('.')[2]}{i:04d}{s}" + "x" * 4000 for s in range(8))
            assert not impl.compile_predicates({path: 1}).matches({"a": 1})
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # ~13 MB (200 names and their segments) were kept; nothing of the sort now
    assert kept < 1_000_000, kept


@pytest.mark.parametrize("compile_", [predicate.compile_predicates, predicate_ref.compile_predicates])
def test_the_documented_time_range_orders_postgresql_timestamps_as_the_clock(compile_):
    """docs/protocol.md: timestamptz values carry only the fraction digits they need, so a
    range written `$gte`/`$lt` with six fraction digits is the one that orders them as the
    clock does; a bound without a fraction is not (`.` sorts before `Z`)."""
    doc = compile_({"t": {"$gte": "2024-01-15T10:00:00.000000Z", "$lt": "2024-01-15T11:00:00.000000Z"}})
    inside = ["2024-01-15T10:00:00Z", "2024-01-15T10:00:00.3Z", "2024-01-15T10:59:59.999999Z",
              "2024-01-15T10:30:00Z"]
    outside = ["2024-01-15T09:59:59.999999Z", "2024-01-15T11:00:00Z", "2024-01-15T11:00:00.1Z",
               "2024-01-15T09:59:59Z"]
    assert [doc.matches({"t": v}) for v in inside] == [True] * 4
    assert [doc.matches({"t": v}) for v in outside] == [False] * 4
    naive = compile_({"t": {"$gte": "2024-01-15T10:00:00Z"}})
    assert not naive.matches({"t": "2024-01-15T10:00:00.3Z"})  # the trap the docs describe
