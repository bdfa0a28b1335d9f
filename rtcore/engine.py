"""The one place rtserver takes the core from: the compiled extensions when they are built,
the pure-Python references otherwise (same API and answers, slower). `COMPILED` says which."""

from __future__ import annotations

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

__all__ = [
    "COMPILED",
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
