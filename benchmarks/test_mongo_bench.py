"""MongoDB change-event normalization: rtcore.mongo (compiled) vs rtcore.mongo_ref (pure Python)
on the same change events carrying ~530-byte documents (benchmarks/mongo_docs.py).

Two inputs, as a source can receive them:
- raw: the change event's BSON bytes (what MongoSource reads, via RawBSONDocument); the pure
  Python path is bson.decode (PyMongo's C decoder) + the reference normalizer;
- dict: the change event already decoded by PyMongo into bson types.
Each round normalizes 100 distinct events; divide by 100 for per-event numbers. Not part of the
test suite; run:
    python -m pytest benchmarks/test_mongo_bench.py -p no:cacheprovider --benchmark-only
or `python benchmarks/test_mongo_bench.py` for a per-event table (CPU time: best and median of 9
runs of 50 rounds; the pure-Python column is the best).
"""

from __future__ import annotations

import sys
import time
import timeit
from pathlib import Path

import bson
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.mongo_docs import bson_size, order_change  # noqa: E402
from rtcore import mongo, mongo_ref  # noqa: E402

OPERATIONS = ("insert", "update", "replace", "delete")
CHANGES = [order_change(i, OPERATIONS[i % 3]) for i in range(100)]  # insert/update/replace with documents
RAWS = [bson.encode(c) for c in CHANGES]
DICTS = [bson.decode(r) for r in RAWS]
WORKSPACES = ["w1"]


def _raw(impl) -> None:
    normalize, ws = impl.normalize_raw, WORKSPACES
    for raw in RAWS:
        normalize(raw, ws)


def _dict(impl) -> None:
    normalize, ws = impl.normalize_change, WORKSPACES
    for change in DICTS:
        normalize(change, ws)


def _decoded_then_compiled(_impl) -> None:
    """What MongoSource would cost reading dicts: PyMongo's decode + the compiled normalizer."""
    normalize, decode, ws = mongo.normalize_change, bson.decode, WORKSPACES
    for raw in RAWS:
        normalize(decode(raw), ws)


def _decode_then_normalize_decoded(_impl) -> None:
    """What MongoSource calls today: rtcore.mongo.decode_raw, then normalize_decoded."""
    decode, normalize, ws = mongo.decode_raw, mongo.normalize_decoded, WORKSPACES
    for raw in RAWS:
        normalize(decode(raw), ws)


def test_outputs_are_identical() -> None:
    for raw in RAWS:  # what is measured is the one-pass path, not its fallback
        assert mongo.normalize_raw_fast_path(raw, WORKSPACES) is not None
    for raw, change in zip(RAWS, DICTS, strict=True):
        assert mongo.normalize_raw(raw, WORKSPACES)[0].body == mongo_ref.normalize_raw(raw, WORKSPACES)[0].body
        assert mongo.normalize_change(change, WORKSPACES)[0].body == mongo_ref.normalize_change(change, WORKSPACES)[0].body


@pytest.mark.benchmark(group="mongo-normalize-raw")
def test_raw_compiled(benchmark) -> None:
    benchmark(_raw, mongo)


@pytest.mark.benchmark(group="mongo-normalize-raw")
def test_raw_pure_python(benchmark) -> None:
    benchmark(_raw, mongo_ref)


@pytest.mark.benchmark(group="mongo-normalize-raw")
def test_raw_pymongo_decode_then_compiled(benchmark) -> None:
    benchmark(_decoded_then_compiled, mongo)


@pytest.mark.benchmark(group="mongo-normalize-dict")
def test_dict_compiled(benchmark) -> None:
    benchmark(_dict, mongo)


@pytest.mark.benchmark(group="mongo-normalize-dict")
def test_dict_pure_python(benchmark) -> None:
    benchmark(_dict, mongo_ref)


def _per_event_us(fn, impl, repeat: int = 9, number: int = 50) -> float:
    return _best_median_us(fn, impl, repeat, number)[0]


def _best_median_us(fn, impl, repeat: int = 9, number: int = 50) -> tuple[float, float]:
    # CPU time, not wall time: the machine is shared, and a descheduled process is not slower.
    timer = timeit.Timer(lambda: fn(impl), timer=time.process_time)
    runs = sorted(t / number / len(RAWS) * 1e6 for t in timer.repeat(number=number, repeat=repeat))
    return runs[0], runs[len(runs) // 2]


def main() -> None:
    print(f"documents: {bson_size(CHANGES[0])} bytes of BSON; change events: {len(RAWS[0])} bytes")
    print(f"compiled: {mongo.__file__}")
    for name, fn in (("raw BSON -> Event", _raw), ("PyMongo dict -> Event", _dict)):
        (compiled, median), pure = _best_median_us(fn, mongo), _per_event_us(fn, mongo_ref)
        print(f"{name:24s} compiled {compiled:6.2f} us (median {median:5.2f})   pure Python {pure:6.2f} us"
              f"   x{pure / compiled:4.1f}")
    print(f"{'decode_raw + normalize_decoded':24s} {_per_event_us(_decode_then_normalize_decoded, mongo):6.2f} us")
    print(f"{'bson.decode + compiled':24s} {_per_event_us(_decoded_then_compiled, mongo):6.2f} us")
    print(f"{'(bson.decode alone)':24s} {_per_event_us(lambda _: [bson.decode(r) for r in RAWS], None):6.2f} us")


if __name__ == "__main__":
    main()
