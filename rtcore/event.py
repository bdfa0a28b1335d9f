"""The normalized change event that every source produces and every consumer reads.

A source turns its native change (a pgoutput row, a change-stream document, an HTTP publish)
into one `Event`. `body` is the event's outbound JSON object already encoded, without `seq`:
the workspace history assigns the position and splices it in, so an event is encoded once
whatever the number of subscribers.
"""

from __future__ import annotations

from typing import Any

import msgspec

SOURCE_KINDS = ("postgres", "mongo", "events")

OPERATIONS: dict[str, frozenset[str]] = {
    "postgres": frozenset({"INSERT", "UPDATE", "DELETE", "TRUNCATE"}),
    "mongo": frozenset({"INSERT", "UPDATE", "REPLACE", "DELETE"}),
    "events": frozenset({"PUBLISH"}),
}
ALL_OPERATIONS = frozenset().union(*OPERATIONS.values())
# Operations on a whole table rather than on a row (no record of their own): they reach every
# subscription of their channel whatever its predicates (a TRUNCATE empties a filtered view too).
WHOLE_ENTITY_OPERATIONS = frozenset({"TRUNCATE"})


class Event(msgspec.Struct, gc=False):
    """One change of one workspace, normalized and encoded once.

    source: "postgres" | "mongo" | "events"
    entity: the channel's name part: table ("products" or "sales.orders"), collection, topic
    operation: INSERT | UPDATE | DELETE | TRUNCATE | REPLACE | PUBLISH
    record: what predicates are evaluated on (row, document, payload)
    old_record: the previous row/document when known (UPDATE), for enter/leave transitions
    body: the JSON object of the outbound event message, encoded, without "seq"
    """

    workspace: str
    source: str
    entity: str
    operation: str
    record: Any
    body: bytes
    old_record: Any = None

    @property
    def channel(self) -> str:
        return f"{self.source}:{self.entity}"
