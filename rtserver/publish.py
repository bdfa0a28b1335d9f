"""The publish API's pieces that do not need the gateway: the custom event made from a request,
the batch request's shape, and the answers built from what the bus did with the events
(docs/protocol.md §8)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgspec

from rtcore.event import Event
from rtcore.messages import CustomEventBody, encode
from rtserver.bus import BusUnavailable

log = logging.getLogger("rtserver.app")

_json = msgspec.json.Encoder()
CORRELATION_MAX = 128


class BatchEvent(msgspec.Struct, forbid_unknown_fields=True):
    topic: str
    payload: Any
    correlationId: str | None = None


class Batch(msgspec.Struct, forbid_unknown_fields=True):
    events: list[BatchEvent]


batch_decoder = msgspec.json.Decoder(Batch)
BATCH_SHAPE = '{"events": [{"topic": ..., "payload": ..., "correlationId": ... (optional)}, ...]}'


def error_body(message: str) -> bytes:
    return _json.encode({"error": message})


def correlation_problem(corr: str) -> bool:
    """Whether `corr` cannot be a correlation id (refused rather than replaced: the publisher
    would look for its own id in vain)."""
    return not corr or len(corr) > CORRELATION_MAX or not corr.isprintable()


def custom_event(workspace: str, topic: str, payload: Any, corr: str, timestamp: str) -> Event:
    """The event of a publish: its body encoded once, for every subscriber. RecursionError when
    the payload nests too deeply to be encoded (see Gateway._publish)."""
    body = encode(CustomEventBody(channel=f"events:{topic}", operation="PUBLISH", topic=topic, payload=payload,
                                  timestamp=timestamp, correlationId=corr))
    return Event(workspace=workspace, source="events", entity=topic, operation="PUBLISH", record=payload, body=body)


def refused(exc: BusUnavailable, workspace: str, topic: str, corr: str) -> tuple[int, bytes]:
    log_unconfirmed(exc, workspace, topic, corr)
    return exc.status, error_body(str(exc))  # 503s are counted in rt_publish_requests_total


def log_unconfirmed(exc: BusUnavailable, workspace: str, topic: str, corr: str) -> None:
    if exc.status == 504:  # the outcome is unknown to the publisher: leave a trace of it
        log.warning("publish not confirmed: %s", exc, extra={"fields": {
            "workspace": workspace, "topic": topic, "correlation_id": corr}})


def outcome(seq: asyncio.Future[int], workspace: str, topic: str, corr: str) -> tuple[int, bytes]:
    """The answer to a publish once the bus confirmed it (or did not: BusUnavailable)."""
    failure = _failure(seq, workspace, topic, corr)
    if failure is not None:
        return failure[0], error_body(failure[1])
    return 202, _json.encode({"seq": seq.result(), "correlationId": corr})


def _failure(seq: asyncio.Future[int], workspace: str, topic: str, corr: str) -> tuple[int, str] | None:
    """(status, message) of a bus confirmation that failed; None when it holds a seq."""
    if seq.cancelled():
        return 503, f"the event's confirmation was cancelled; it may not be published (workspace {workspace})"
    exc = seq.exception()
    if isinstance(exc, BusUnavailable):
        log_unconfirmed(exc, workspace, topic, corr)
        return exc.status, str(exc)
    if exc is not None:
        log.error("publish failed", exc_info=exc, extra={"fields": {
            "workspace": workspace, "topic": topic, "correlation_id": corr}})
        return 500, "internal error"
    return None


def batch_answer(seqs: Sequence[int | asyncio.Future[int]], corrs: list[str]) -> tuple[int, bytes]:
    """The 202 of a batch whose events all have their seq (no future among `seqs`)."""
    return 202, _json.encode({"events": [{"seq": s, "correlationId": c} for s, c in zip(seqs, corrs, strict=True)]})


def batch_outcome(seqs: Sequence[int | asyncio.Future[int]], events: list[Event],
                  corrs: list[str]) -> asyncio.Future[tuple[int, bytes]]:
    """The answer to a batch once the bus has confirmed (or not) each of its events: 202 with
    each event's seq when all are published; otherwise the status of the first that is not
    (504 when any outcome is unknown), with each event's seq or its status and error. At
    least one of `seqs` is a future (batch_answer otherwise)."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[tuple[int, bytes]] = loop.create_future()
    pending = [s for s in seqs if type(s) is not int]
    left = len(pending)

    def settled(_: asyncio.Future) -> None:
        nonlocal left
        left -= 1
        if left or answer.done():
            return
        items: list[dict[str, Any]] = []
        first: tuple[int, str] | None = None
        unknown = False
        for i, (seq, event, corr) in enumerate(zip(seqs, events, corrs, strict=True)):
            failure = None if type(seq) is int else _failure(seq, event.workspace, event.entity, corr)
            if failure is None:
                items.append({"seq": seq if type(seq) is int else seq.result(), "correlationId": corr})
                continue
            items.append({"status": failure[0], "error": failure[1], "correlationId": corr})
            unknown = unknown or failure[0] == 504
            if first is None:
                first = (failure[0], f"events[{i}]: {failure[1]}")
        if first is None:
            answer.set_result((202, _json.encode({"events": items})))
            return
        published = sum(1 for item in items if "seq" in item)
        status = 504 if unknown else first[0]
        message = (f"{len(items) - published} of the batch's {len(items)} events not confirmed as published; "
                   f"the first: {first[1]}")
        answer.set_result((status, _json.encode({"error": message, "events": items})))

    for fut in pending:
        fut.add_done_callback(settled)
    return answer
