"""Collects the figures of benchmarks/test_core_bench.py and prints them, with their ratios
and targets, as one table at the end of the run (all numbers from this same run)."""

from __future__ import annotations

import pytest

# name -> value; filled by the benchmarks (seconds, bytes or counts)
CORE_RESULTS: dict[str, float] = {}


@pytest.fixture
def core_results() -> dict[str, float]:
    return CORE_RESULTS


def _row(name: str, value: str, target: str, ok: bool | None) -> str:
    verdict = "" if ok is None else ("ok" if ok else "MISSED")
    return f"| {name:<58} | {value:>16} | {target:>12} | {verdict:<6} |"


def pytest_terminal_summary(terminalreporter) -> None:
    r = CORE_RESULTS
    if not r:
        return
    lines = [
        _row("figure", "measured", "target", None),
        "|" + "-" * 60 + "|" + "-" * 18 + "|" + "-" * 14 + "|" + "-" * 8 + "|",
    ]
    if "index_compiled" in r:
        us = r["index_compiled"] * 1e6
        lines.append(_row("index match, 100k subs, compiled (median)", f"{us:.2f} us", "<= 3 us", us <= 3))
        if "index_scan" in r:
            ratio = r["index_scan"] / r["index_compiled"]
            lines.append(_row("reference linear scan, 100k subs (median)", f"{r['index_scan'] * 1e3:.1f} ms", "", None))
            lines.append(_row("  ratio linear scan / compiled index", f"{ratio:,.0f}x", ">= 200x", ratio >= 200))
        if "index_ref" in r:
            ratio = r["index_ref"] / r["index_compiled"]
            lines.append(_row("reference index (pure Python fallback) (median)", f"{r['index_ref'] * 1e6:.2f} us", "", None))
            lines.append(_row("  ratio reference index / compiled index", f"{ratio:.1f}x", "", None))
        if "matches_per_event" in r:
            lines.append(_row("  subscribers matched per event (mean)", f"{r['matches_per_event']:.1f}", "~10", None))
    if "predicate_compiled" in r and "predicate_ref" in r:
        ratio = r["predicate_ref"] / r["predicate_compiled"]
        lines.append(_row("predicate, compiled, per (filter, record)", f"{r['predicate_compiled'] * 1e9:.0f} ns", "", None))
        lines.append(_row("predicate, reference, per (filter, record)", f"{r['predicate_ref'] * 1e9:.0f} ns", "", None))
        lines.append(_row("  ratio reference / compiled", f"{ratio:.1f}x", ">= 10x", ratio >= 10))
    if "encode" in r:
        us = r["encode"] * 1e6
        size = r.get("encode_body_bytes", 0)
        lines.append(_row(f"encode one {size:.0f}-byte event to frame bytes", f"{us:.3f} us", "<= 1 us", us <= 1))
        if "encode_msgspec" in r:
            lines.append(_row("  of which msgspec encode alone", f"{r['encode_msgspec'] * 1e6:.3f} us", "", None))
            lines.append(_row("  frame building (event_frame) alone", f"{r['encode_frame'] * 1e6:.3f} us", "", None))
    if "memory_compiled" in r:
        b = r["memory_compiled"]
        lines.append(_row("memory per indexed subscription, 100k, compiled", f"{b:.0f} B", "<= 1024 B", b <= 1024))
        if "memory_ref" in r:
            lines.append(_row("memory per indexed subscription, 100k, reference", f"{r['memory_ref']:.0f} B", "", None))
    terminalreporter.write_sep("=", "rtcore figures (issue 3)")
    for line in lines:
        terminalreporter.write_line(line)
