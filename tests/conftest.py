"""Loads every fixture module of tests/harness (one per service) as a pytest plugin."""

import pathlib

_HARNESS = pathlib.Path(__file__).parent / "harness"

pytest_plugins = [
    *sorted(f"tests.harness.{p.stem}" for p in _HARNESS.glob("fixtures_*.py")),
    "pytester",  # tests/test_harness.py runs pytest sessions of its own
]
