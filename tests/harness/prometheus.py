"""A strict reader of the Prometheus text exposition format (0.0.4), for /metrics tests."""

from __future__ import annotations

import re

_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE_RE = re.compile(rf'^({_METRIC_NAME})(?:\{{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\}})? (\S+)$')


def parse_exposition(text: str) -> dict[str, float]:
    """Prometheus text format 0.0.4, strictly: each family's HELP and TYPE once, before its
    samples, which follow together; label values escaped; numbers. {sample with labels: value}."""
    samples: dict[str, float] = {}
    families: set[str] = set()
    family = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families, f"family {name} twice"
            families.add(name)
            family, typed = name, False
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == family and kind in ("counter", "gauge"), line
            typed = True
        else:
            m = _SAMPLE_RE.match(line)
            assert m, f"not a sample line: {line!r}"
            assert m.group(1) == family and typed, f"{line!r} outside its family's HELP/TYPE"
            key = line.rsplit(" ", 1)[0]
            assert key not in samples, f"sample {key} twice"
            samples[key] = float(m.group(3))
    return samples


def family_types(text: str) -> dict[str, str]:
    """{family name: its TYPE} of an exposition (parse_exposition checks the format)."""
    return {line.split(" ")[2]: line.split(" ")[3] for line in text.splitlines() if line.startswith("# TYPE ")}
