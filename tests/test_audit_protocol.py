"""Findings of the wire-protocol audit (docs/protocol.md §1, §6), each against a real
`rtserver serve` subprocess with a raw WebSocket client (hand-made frames, or `websockets`)."""

from __future__ import annotations

import asyncio
import json

from tests.test_protocol import _masked, _raw_ws, _read_frame


async def test_a_close_frame_whose_reason_is_not_utf8_is_closed_1007_with_its_name(gateway):
    """picows answers a close frame whose reason is not UTF-8 with 1007 on its own. The code
    had no name in the gateway: the close frame's reason was picows's words ("Received CLOSE
    with invalid UTF-8 reason") where every close carries the code's name (§6), and the
    session-suspended record said (1007, "network"), as for a dropped connection."""
    reader, writer = await _raw_ws(gateway)
    try:
        writer.write(_masked(0x1, json.dumps({"type": "auth", "token": gateway.token("w1")}).encode()))
        assert json.loads((await _read_frame(reader))[1])["type"] == "auth_ok"
        writer.write(_masked(0x8, (1000).to_bytes(2, "big") + b"bye \xff"))
        opcode, data = await _read_frame(reader)
        assert (opcode, int.from_bytes(data[:2], "big"), data[2:]) == (0x8, 1007, b"invalid_frame_payload_data")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # one close frame, then the end
    finally:
        writer.close()
    (rec,) = await gateway.audit_records("session-suspended")
    assert (rec["code"], rec["reason"]) == (1007, "invalid_frame_payload_data")
