"""The one exception type for an invalid subscription filter (the server answers it with 4000)."""

from __future__ import annotations


class FilterError(ValueError):
    """A filter that cannot be compiled; the message names the path and the operator,
    e.g. ``predicates.price: unknown operator $foo``."""
