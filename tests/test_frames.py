"""Compiled frame building (rtcore.frames) is byte-identical to rtcore.frames_ref."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtcore import frames, frames_ref, messages

SIZES = [0, 1, 2, 124, 125, 126, 127, 65534, 65535, 65536, 70000]
SEQS = [0, 1, 9, 10, 1234, -1, -(2**63), 2**63 - 1, 2**63, 2**80, -(2**70)]


@pytest.mark.parametrize("size", SIZES)
def test_text_frame_headers_at_length_boundaries(size):
    payload = b"x" * size
    frame = frames.text_frame(payload)
    assert frame == frames_ref.text_frame(payload)
    assert frame[0] == 0x81 and frame.endswith(payload)


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("size", SIZES)
def test_event_frame_and_with_seq(size, seq):
    body = b"{" + b"a" * size + b"}"
    for extra in (b"", b',"x":1'):
        assert frames.event_frame(body, seq, extra) == frames_ref.event_frame(body, seq, extra)
        assert frames.with_seq(body, seq, extra) == frames_ref.with_seq(body, seq, extra)


def test_non_bytes_arguments_behave_as_reference():
    assert frames.text_frame(bytearray(b"ab")) == frames_ref.text_frame(bytearray(b"ab"))
    assert frames.event_frame(b"{}", True) == frames_ref.event_frame(b"{}", True)
    assert frames.with_seq(memoryview(b'{"a":1}'), 5) == frames_ref.with_seq(memoryview(b'{"a":1}'), 5)
    assert frames.event_frame(b"", 3) == frames_ref.event_frame(b"", 3)


def test_close_frame():
    for code, reason in [(1000, ""), (4001, "token_expired"), (1008, "é" * 100)]:
        assert frames.close_frame(code, reason) == frames_ref.close_frame(code, reason)


def test_event_frame_of_an_encoded_message_is_valid_json():
    body = messages.encode(
        messages.CustomEventBody(
            channel="events:orders", operation="PUBLISH", topic="orders", payload={"n": 1},
            timestamp="2024-01-15T10:00:00.000Z", correlationId="c-1",
        )
    )
    frame = frames.event_frame(body, 42)
    header = 2 if frame[1] < 126 else 4
    length = frame[1] if header == 2 else int.from_bytes(frame[2:4], "big")
    assert length == len(frame) - header
    decoded = msgspec.json.decode(frame[header:])
    assert decoded["seq"] == 42 and decoded["payload"] == {"n": 1}


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(), st.binary(max_size=20))
def test_frames_identical_to_reference(body, seq, extra):
    assert frames.event_frame(body, seq, extra) == frames_ref.event_frame(body, seq, extra)
    assert frames.with_seq(body, seq, extra) == frames_ref.with_seq(body, seq, extra)
    assert frames.text_frame(body) == frames_ref.text_frame(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(alphabet=',:[]{}"ab1 ', max_size=300).map(str.encode))
def test_json_tokens_is_the_references(body):
    assert frames.json_tokens(body) == frames_ref.json_tokens(body)
    assert frames.json_tokens(bytearray(body)) == frames_ref.json_tokens(bytearray(body))


def test_json_tokens_counts_separators_and_arrays():
    assert frames.json_tokens(b'{"a":[1,2],"b":{"c":"x,y"}}') == 7  # those in strings too: an upper bound
