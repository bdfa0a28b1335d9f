"""MongoDB wire-protocol framing for the test server: read one message, parse OP_QUERY and
OP_MSG, build OP_REPLY and OP_MSG replies. Only what PyMongo sends to a server that advertises
no compression."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.codec_options import CodecOptions, DatetimeConversion

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

MSG_CHECKSUM_PRESENT = 1
MSG_MORE_TO_COME = 2

MAX_MESSAGE_BYTES = 48 * 1024 * 1024  # maxMessageSizeBytes we advertise

_HEADER = struct.Struct("<iiii")
_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")
_REPLY_PREFIX = struct.Struct("<iqii")

# Documents are kept with their original types; UUIDs stay bson.Binary so they round-trip.
# DATETIME_AUTO: dates beyond datetime's years 1-9999 (MongoDB stores any int64 of ms) stay
# DatetimeMS instead of failing the decode.
CODEC = CodecOptions(tz_aware=False, datetime_conversion=DatetimeConversion.DATETIME_AUTO)


class ProtocolError(Exception):
    """The peer sent something this server does not understand; the connection is closed."""


@dataclass
class Request:
    request_id: int
    op_code: int
    command: dict[str, Any]
    more_to_come: bool = False
    legacy_collection: str = ""  # OP_QUERY's fullCollectionName
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\x00", pos)
    return data[pos:end].decode(), end + 1


def _read_doc(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    (size,) = _INT32.unpack_from(data, pos)
    return bson.decode(data[pos : pos + size], CODEC), pos + size


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on the connection, or None at EOF."""
    try:
        header = await reader.readexactly(16)
    except asyncio.IncompleteReadError:
        return None
    length, request_id, _response_to, op_code = _HEADER.unpack(header)
    if not 16 < length <= MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message length {length} out of range")
    try:
        body = await reader.readexactly(length - 16)
    except asyncio.IncompleteReadError:
        return None
    if op_code == OP_QUERY:
        return _parse_query(request_id, body)
    if op_code == OP_MSG:
        return _parse_msg(request_id, body)
    raise ProtocolError(f"unsupported opCode {op_code}")


def _parse_query(request_id: int, body: bytes) -> Request:
    pos = 4  # flags
    collection, pos = _cstring(body, pos)
    pos += 8  # numberToSkip, numberToReturn
    query, pos = _read_doc(body, pos)
    # Legacy commands may wrap the command in $query (with $readPreference beside it).
    if "$query" in query:
        query = query["$query"]
    return Request(request_id, OP_QUERY, query, legacy_collection=collection)


def _parse_msg(request_id: int, body: bytes) -> Request:
    (flags,) = _UINT32.unpack_from(body, 0)
    end = len(body) - (4 if flags & MSG_CHECKSUM_PRESENT else 0)
    pos = 4
    command: dict[str, Any] | None = None
    sections: dict[str, list[dict[str, Any]]] = {}
    while pos < end:
        kind = body[pos]
        pos += 1
        if kind == 0:
            command, pos = _read_doc(body, pos)
        elif kind == 1:
            (size,) = _INT32.unpack_from(body, pos)
            section_end = pos + size
            name, p = _cstring(body, pos + 4)
            docs = []
            while p < section_end:
                doc, p = _read_doc(body, p)
                docs.append(doc)
            sections[name] = docs
            pos = section_end
        else:
            raise ProtocolError(f"unknown OP_MSG section kind {kind}")
    if command is None:
        raise ProtocolError("OP_MSG without a body section")
    # Kind-1 sequences are fields of the command (documents, updates, deletes).
    for name, docs in sections.items():
        command[name] = docs
    return Request(request_id, OP_MSG, command, more_to_come=bool(flags & MSG_MORE_TO_COME), sections=sections)


def _header(length: int, request_id: int, response_to: int, op_code: int) -> bytes:
    return _HEADER.pack(length, request_id, response_to, op_code)


def build_reply(request: Request, reply_id: int, document: dict[str, Any]) -> bytes:
    """The reply to `request` in the op code it expects (OP_REPLY for OP_QUERY)."""
    payload = bson.encode(document, codec_options=CODEC)
    if request.op_code == OP_QUERY:
        body = _REPLY_PREFIX.pack(0, 0, 0, 1) + payload
        return _header(16 + len(body), reply_id, request.request_id, OP_REPLY) + body
    body = _UINT32.pack(0) + b"\x00" + payload
    return _header(16 + len(body), reply_id, request.request_id, OP_MSG) + body
