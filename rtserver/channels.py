"""Channel names and subscription filters: parsed and validated once, at subscribe time.

`postgres:*`, `postgres:{table}`, `mongo:*`, `mongo:{collection}`, `events:*`, `events:{topic}`
(docs/protocol.md §4). A bad name or kind is 4010 (channel_unavailable); a bad filter is 4000.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from rtcore.event import OPERATIONS

# Not rtcore.engine's: importing the engine here, early in a start (the configuration's checks
# import this module), logged its fallback to the references before the JSON log began. The
# reference is three bytes.count.
from rtcore.frames_ref import json_tokens

# Anchored with \Z: `$` also matches before a trailing newline, so "orders\n" (a publish URL's
# "orders%0A") would pass as a topic.
TOPIC_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
# A table or schema name as PostgreSQL stores it: quoted identifiers may hold hyphens, spaces,
# non-ASCII letters ("order-items", "produits_été"), so anything but the separator `.`, `"`
# and control characters, at most 63 bytes (NAMEDATALEN - 1; checked in valid_table_name).
_NAME = r'[^."\x00-\x1f\x7f]{1,63}'
_NAME_RE = re.compile(rf"^{_NAME}\Z")
TABLE_RE = re.compile(rf"^(?:({_NAME})\.)?({_NAME})\Z")


def _utf8_size(name: str) -> int:
    """Bytes of `name` in UTF-8; -1 for a lone surrogate, which no database name holds."""
    try:
        return len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def valid_collection(name: str) -> bool:
    """MongoDB's own rule for a collection name: not empty, no '$' or NUL, not system.*, at most
    255 bytes of UTF-8 (a namespace's limit). Spaces, ':', '@' and non-ASCII letters are allowed:
    such a collection exists, streams on mongo:* under its name, and must be subscribable."""
    return 0 < _utf8_size(name) <= 255 and "$" not in name and "\0" not in name and not name.startswith("system.")


_FILTER_KEYS = {"operations", "entity", "predicates", "transitions"}


class ChannelError(Exception):
    """4010: the channel does not exist or is malformed."""


class InvalidFilter(Exception):
    """4000: the filter is not valid for the channel."""


@dataclass(frozen=True)
class SubscriptionSpec:
    channel: str  # as the client wrote it (the key of the subscription on its connection)
    source: str  # postgres | mongo | events
    entity: str  # canonical name, or "*" for every entity of the source
    operations: frozenset[str] | None
    predicates: dict[str, Any] | None
    transitions: bool
    filter: dict[str, Any] | None  # the client's filter, kept to restore resumed sessions
    filter_bytes: int = 0  # the filter in JSON bytes (limits.max_filter_bytes)
    # The `,` `:` `[` of the filter's JSON, which what it holds decoded grows with (a suspended
    # session keeps it so: sessions.weigh counts it as the history counts an event's).
    filter_tokens: int = 0


def valid_table_name(name: str) -> bool:
    """A PostgreSQL table or schema name the channels can carry (see _NAME)."""
    return 0 < _utf8_size(name) <= 63 and _NAME_RE.match(name) is not None


def qualified_tables(tables: list[str]) -> set[str]:
    """postgres.tables as schema.table names (a bare name is of schema public)."""
    return {t if "." in t else f"public.{t}" for t in tables}


def unconfigured_table(schemas: list[str], tables: list[str], schema: str, name: str) -> str:
    """Why a PostgreSQL source configured with these postgres.schemas and postgres.tables
    leaves schema.name out ("" when it asks for it): a question of configuration alone."""
    if tables:
        if f"{schema}.{name}" in qualified_tables(tables):
            return ""
        return f"it is not among postgres.tables ({', '.join(tables)})"
    if schema in schemas:
        return ""
    return f"its schema {schema} is not among postgres.schemas ({', '.join(schemas)})"


def canonical_entity(source: str, name: str) -> str:
    """The canonical form of a table/collection/topic name, or ChannelError."""
    if source == "events":
        if not TOPIC_RE.match(name):
            raise ChannelError(f"events:{name}: a topic is 1-128 of [A-Za-z0-9_.:-]")
        return name
    if source == "postgres":
        m = TABLE_RE.match(name)
        if not m:
            raise ChannelError(f"postgres:{name}: a table is `name` or `schema.name`, without `\"` or control characters")
        schema, table = m.group(1), m.group(2)
        if not (valid_table_name(table) and (schema is None or valid_table_name(schema))):
            raise ChannelError(f"postgres:{name}: a table or schema name is at most 63 bytes")
        if schema == "public" and table == "*":
            # Its canonical name would be `*`, the wildcard: `postgres:public.*` took every
            # table of every schema, past channel permissions granting `postgres:public.*`.
            raise ChannelError(f"postgres:{name}: `*` is no table name; postgres:* is every published table")
        return table if schema in (None, "public") else f"{schema}.{table}"
    if source == "mongo":
        if not valid_collection(name):
            raise ChannelError(f"mongo:{name}: not a valid collection name")
        return name
    raise ChannelError(f"unknown channel kind {source!r}: use postgres:, mongo: or events:")


def subscription_key(channel: str) -> str:
    """The key of `channel` among a connection's subscriptions: one subscription per channel
    (§3), and `postgres:public.orders` is the channel `postgres:orders` (§4). Keyed as
    written, each spelling was a subscription of its own: a subscribe in the other spelling
    added a filter instead of replacing it, and an unsubscribe in it was answered while the
    table's events went on. A name that is no channel is its own key."""
    source, _, name = channel.partition(":")
    if source != "postgres" or name == "*":
        return channel
    try:
        return f"postgres:{canonical_entity(source, name)}"
    except ChannelError:
        return channel


def parse(channel: str, filter_: Any) -> SubscriptionSpec:
    """Parse a subscribe's channel and filter into a spec (predicates still uncompiled)."""
    if not isinstance(channel, str) or ":" not in channel:
        raise ChannelError(f"channel {channel!r} must look like postgres:{{table}}, mongo:{{collection}} or events:{{topic}}")
    source, _, name = channel.partition(":")
    if source not in OPERATIONS:
        raise ChannelError(f"unknown channel kind {source!r} in {channel!r}: use postgres:, mongo: or events:")
    entity = "*" if name == "*" else canonical_entity(source, name)

    operations: frozenset[str] | None = None
    predicates: dict[str, Any] | None = None
    transitions = False
    if filter_ is not None:
        if not isinstance(filter_, dict):
            raise InvalidFilter(f"{channel}: filter must be an object")
        unknown = set(filter_) - _FILTER_KEYS
        if unknown:
            raise InvalidFilter(f"{channel}: unknown filter field(s) {sorted(unknown)}; allowed: {sorted(_FILTER_KEYS)}")
        ops = filter_.get("operations")
        if ops is not None:
            if not isinstance(ops, list) or not ops or not all(isinstance(o, str) for o in ops):
                raise InvalidFilter(f"{channel}: filter.operations must be a non-empty list of operation names")
            known = frozenset().union(*OPERATIONS.values())
            bad = [o for o in ops if o not in known]
            if bad:
                raise InvalidFilter(f"{channel}: unknown operation(s) {bad}; known: {sorted(known)}")
            operations = frozenset(ops)
        ent = filter_.get("entity")
        if ent is not None:
            if not isinstance(ent, str):
                raise InvalidFilter(f"{channel}: filter.entity must be a string")
            try:
                ent_c = canonical_entity(source, ent)
            except ChannelError as exc:
                raise InvalidFilter(f"{channel}: filter.entity: {exc}") from None
            if entity == "*":
                entity = ent_c
            elif ent_c != entity:
                raise InvalidFilter(f"{channel}: filter.entity {ent!r} does not match the channel")
        preds = filter_.get("predicates")
        if preds is not None:
            if not isinstance(preds, dict):
                raise InvalidFilter(f"{channel}: filter.predicates must be an object")
            predicates = preds or None
        tr = filter_.get("transitions")
        if tr is None:  # absent, as a null operations, entity or predicates is
            tr = False
        if not isinstance(tr, bool):
            raise InvalidFilter(f"{channel}: filter.transitions must be true or false")
        transitions = tr
    encoded = _encoded(channel, filter_) if filter_ else b""
    return SubscriptionSpec(channel, source, entity, operations, predicates, transitions, filter_, len(encoded),
                            json_tokens(encoded))


def _encoded(channel: str, filter_: dict[str, Any]) -> bytes:
    """The filter as JSON (its size: limits.max_filter_bytes). Encoded a few calls deeper in the
    stack than the message was decoded: a filter at the decoder's very limit raised
    RecursionError here, and picows closed the connection with 1011."""
    try:
        return msgspec.json.encode(filter_)
    except RecursionError:
        raise InvalidFilter(f"{channel}: filter nests too deeply") from None
