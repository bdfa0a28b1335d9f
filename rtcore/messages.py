"""Every protocol message as a msgspec Struct: inbound ones are decoded (and validated) once at
the edge, outbound ones encoded once. Field names are the wire names of docs/protocol.md."""

from __future__ import annotations

import re
from typing import Any

import msgspec

MessageId = int | str | None

# What msgspec raises besides DecodeError on text a client chose: invalid UTF-8 in a string
# (UnicodeDecodeError) and JSON nested past the interpreter's recursion limit (RecursionError,
# a 60 KB message of `[`). Uncaught, a WebSocket message so made left on_ws_frame and picows
# dropped the connection with 1011 (§6: 4000, the connection stays open), a publish body got
# 500 (§8: 400), and a token header so made 1011 / 500 (§6: 4002, §8: 401).
UNREADABLE_JSON = (UnicodeDecodeError, RecursionError)


# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or the other way round: JSON's
# grammar allows it, Unicode text cannot hold it (msgspec says "Input data was truncated").
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<![dD][89abAB][0-9a-fA-F]{2})(?<!\\)(?:\\\\)*\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def unreadable_json(exc: BaseException, text: bytes = b"") -> str:
    """Why msgspec could not read `text`: for the 4000 (or HTTP 400) message. Where the
    reason has no position of its own, the byte it is at (in a batch of 10,000 events, the
    publisher could not find the one to mend)."""
    if isinstance(exc, RecursionError):
        return "JSON nests too deeply"
    if isinstance(exc, UnicodeDecodeError) or "Invalid UTF-8" in str(exc):  # untyped decode, typed
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as bad:
            return f"text is not valid UTF-8 (byte {bad.start})"
        return "text is not valid UTF-8"
    surrogate = _LONE_SURROGATE.search(text)
    if surrogate:
        # JavaScript's JSON.stringify writes one for a string cut in the middle of an emoji
        return ("a \\u escape of half a UTF-16 surrogate pair (a string cut in the middle of a character), "
                f"at byte {surrogate.start()}")
    return str(exc)


# ---- client -> server -------------------------------------------------------------------


class Auth(msgspec.Struct, tag="auth", tag_field="type", forbid_unknown_fields=False):
    token: str
    id: MessageId = None
    resume: str | None = None
    since: int | None = None


class Subscribe(msgspec.Struct, tag="subscribe", tag_field="type", forbid_unknown_fields=False):
    channel: str
    id: MessageId = None
    filter: dict[str, Any] | None = None
    since: int | None = None


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="type", forbid_unknown_fields=False):
    channel: str
    id: MessageId = None


class Ping(msgspec.Struct, tag="ping", tag_field="type", forbid_unknown_fields=False):
    id: MessageId = None


ClientMessage = Auth | Subscribe | Unsubscribe | Ping

client_decoder = msgspec.json.Decoder(ClientMessage)

# ---- server -> client -------------------------------------------------------------------


class AuthOk(msgspec.Struct, tag="auth_ok", tag_field="type", omit_defaults=True):
    sessionId: str
    expiresAt: str
    resumed: bool  # no default: always on the wire
    id: MessageId = None


class Subscribed(msgspec.Struct, tag="subscribed", tag_field="type", omit_defaults=True):
    channel: str
    id: MessageId = None
    # The workspace's stream position when the subscription took effect: the events after it
    # that match are delivered. A client that has seen no event yet resumes `since` it, so the
    # frames in flight when its link died are replayed (docs/protocol.md §3, §7).
    seq: int | None = None


class Unsubscribed(msgspec.Struct, tag="unsubscribed", tag_field="type", omit_defaults=True):
    channel: str
    id: MessageId = None


class Pong(msgspec.Struct, tag="pong", tag_field="type", omit_defaults=True):
    id: MessageId = None
    # The workspace's stream position, as in Subscribed: the events up to it that match the
    # connection's subscriptions came before this pong. A quiet subscriber's `since` follows
    # it, so a reconnect in a busy workspace does not ask from before what the history holds.
    seq: int | None = None


class Error(msgspec.Struct, tag="error", tag_field="type", omit_defaults=True):
    code: int
    name: str
    message: str
    channel: str | None = None
    id: MessageId = None
    oldest: int | None = None


# Event bodies: encoded once per event, without "seq" (the history splices it in).


class PostgresEventBody(msgspec.Struct, tag="event", tag_field="type", omit_defaults=True):
    channel: str
    operation: str
    table: str
    schema: str
    record: dict[str, Any] | None
    timestamp: str
    correlationId: str
    oldRecord: dict[str, Any] | None = None
    changedColumns: list[str] | None = None


class MongoEventBody(msgspec.Struct, tag="event", tag_field="type", omit_defaults=True):
    channel: str
    operation: str
    collection: str
    document: dict[str, Any] | None
    operationType: str
    timestamp: str
    correlationId: str
    updateDescription: dict[str, Any] | None = None
    oldDocument: dict[str, Any] | None = None


class CustomEventBody(msgspec.Struct, tag="event", tag_field="type", omit_defaults=True):
    channel: str
    operation: str
    topic: str
    payload: Any
    timestamp: str
    correlationId: str


encoder = msgspec.json.Encoder()
encode = encoder.encode
