"""The one place rtserver takes the core from: the compiled extensions when they are built,
the pure-Python references otherwise (same API and answers, slower). `COMPILED` says which."""

from __future__ import annotations

import importlib
import logging

from rtcore.errors import FilterError

try:
    from rtcore.fanout import Outbox, SubKey, flush_all, push_all, queue_one
    from rtcore.frames import close_frame, event_frame, json_tokens, text_frame, with_seq
    from rtcore.index import SubscriptionIndex
    from rtcore.predicate import Matcher, compile_predicates

    COMPILED = True
except ImportError as exc:  # the extensions are not built: fall back, loudly
    logging.getLogger("rtserver.engine").warning(
        "rtcore extensions not built, using the pure-Python reference engine",
        extra={"fields": {"error": str(exc)}},
    )
    from rtcore.fanout_ref import Outbox, SubKey, flush_all, push_all, queue_one  # type: ignore[assignment]
    from rtcore.frames_ref import close_frame, event_frame, json_tokens, text_frame, with_seq
    from rtcore.index_ref import SubscriptionIndex
    from rtcore.predicate_ref import Matcher, compile_predicates

    COMPILED = False

# Every compiled module of rtcore (the engine's four, and the decoders the sources take).
COMPILED_MODULES = ("fanout", "frames", "index", "predicate", "pgoutput", "mongo")


def reference_modules() -> list[str]:
    """The compiled modules that are not built, whose pure-Python references run instead: the
    decoders fell back without a word, and the start-up line said compiled_core true."""
    missing = []
    for name in COMPILED_MODULES:
        try:
            importlib.import_module(f"rtcore.{name}")
        except ImportError:
            missing.append(name)
    return missing


__all__ = [
    "COMPILED",
    "COMPILED_MODULES",
    "FilterError",
    "Matcher",
    "Outbox",
    "SubKey",
    "SubscriptionIndex",
    "close_frame",
    "compile_predicates",
    "event_frame",
    "flush_all",
    "json_tokens",
    "push_all",
    "queue_one",
    "text_frame",
    "with_seq",
]
