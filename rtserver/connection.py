"""One WebSocket client: the protocol state machine of docs/protocol.md §1, §3, §6 and §7.

Inbound messages are decoded once with msgspec and handled in order. Handlers that must wait
(token verification, a database check of a channel) run as a task while later messages queue
behind them, so a client may send `auth` and `subscribe` back to back. Outbound frames go
through `push`: they join the pending frames of the connection's outbox and leave in one write
per loop iteration (see hub.py). A connection whose transport buffer passes the limit is
closed with 1013 without slowing anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from rtcore.engine import FilterError, Outbox, close_frame, event_frame, flush_all, queue_one, text_frame
from rtcore.messages import (
    UNREADABLE_JSON,
    Auth,
    AuthOk,
    Error,
    Ping,
    Pong,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    client_decoder,
    encode,
    unreadable_json,
)
from rtcore.timefmt import MAX_RFC3339_MS, iso_ms
from rtserver import channels
from rtserver.auth import AuthError, Identity
from rtserver.history import Replay
from rtserver.hub import Subscription, Workspace, replay_viewer
from rtserver.sessions import Session
from rtserver.sources.base import ChannelUnavailable, NoSuchChannel, await_position

if TYPE_CHECKING:
    from rtserver.app import Gateway

log = logging.getLogger("rtserver.connection")

CODE_NAMES = {
    1000: "normal_closure",
    1001: "going_away",
    1002: "protocol_error",
    # picows closes with it, on its own, for a close frame whose reason is not UTF-8 (RFC 6455
    # §5.5.1, §8.1): without a name here that close carried picows's words as its reason, and
    # the session-suspended record said "network".
    1007: "invalid_frame_payload_data",
    1008: "policy_violation",
    1009: "message_too_big",
    1011: "internal_error",
    1013: "try_again_later",
    4000: "invalid_message",
    4001: "token_expired",
    4002: "token_invalid",
    4003: "scope_denied",
    4008: "quota_exceeded",
    4010: "channel_unavailable",
    4011: "history_gap",
}

# Messages that arrive while a handler awaits (auth, a database channel check), or past a
# turn's budget (_PER_TURN), wait in order. Past _PAUSE_QUEUED the connection stops reading, so
# TCP holds the rest in the client's send buffer; reading resumes below _RESUME_QUEUED. Only a
# single read carrying more messages than _MAX_QUEUED (tiny ones, far beyond any client's need)
# closes the connection.
_PAUSE_QUEUED = 64
_RESUME_QUEUED = 16
_MAX_QUEUED = 4096
# Messages of one connection handled in one turn of the loop; the rest wait for the next turn,
# the other connections' work in between. picows hands over every frame of a read at once, and
# a read grows with the peer's backlog: 100,000 pings in one 3 MB read held the loop 1.4 s, and
# 100 `subscribe` with `since` (a replay each of a 10,000-event history) 1.6 s and 400 MB.
_PER_TURN = 32
# A replay of this many history entries counts as one message of a turn's budget: one of 1,000
# entries spends a turn, and a longer one the turns after it too (Connection._next_turn).
_REPLAY_ENTRIES_PER_MESSAGE = 32
_SLOW_CLOSE_GRACE = 5.0
# A replay leaves in pieces of a quarter of limits.send_buffer_bytes (at least this), each
# once the client has taken all but one piece (checked every _REPLAY_POLL seconds; while it
# takes nothing, the wait doubles up to _REPLAY_POLL_MAX: a client that stopped reading in a
# replay was looked at 500 times a second for as long as it stayed).
_MIN_REPLAY_PIECE = 16 * 1024
# A piece also ends after this many history entries looked at, and the loop gets a turn
# between two pieces: a piece was bounded by the bytes it sends only, so a filter matching few
# events scanned the whole history in one step (~6 ms for 10,000), and 200 clients subscribing
# with `since` at once held every other client 1.26 s (measured: a pong 2 ms before).
_REPLAY_SCAN = 256
_REPLAY_POLL = 0.002
_REPLAY_POLL_MAX = 0.256


# Stands for a binary message in the queue of messages (Connection._on_message): refused in its
# turn, compared by identity (a payload is a new object; only 0- and 1-byte ones are shared).
_BINARY = b"(a binary message)"


def _close_answer(code: int) -> int:
    """The code of the close frame answering a client's close with `code` (picows' 0 for none).

    picows refuses the codes below 3000 it does not know, but passes 0 (a close frame without
    a code), 1006 and codes from 5000: RFC 6455 §7.4 lets none of them be sent, so an empty
    close is answered 1000 and the others as the protocol errors they are (1002)."""
    if code == 0:
        return 1000
    if code == 1006 or code >= 5000:
        return 1002
    return code


def _message_refs(data: bytes) -> tuple[Any, str | None]:
    """Best-effort `id` and channel of a message that failed validation, to echo in the
    error: a subscribe refused for its shape (a `filter` that is no object, a `since` that is
    no integer) names its channel as any other refused subscribe does (§5)."""
    try:
        obj = msgspec.json.decode(data)
    except (msgspec.DecodeError, *UNREADABLE_JSON):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    mid = obj.get("id")
    if not isinstance(mid, (int, str)) or isinstance(mid, bool):
        mid = None
    channel = obj.get("channel")
    if obj.get("type") not in ("subscribe", "unsubscribe") or not isinstance(channel, str):
        channel = None
    return mid, channel


class Connection(WSListener):
    # `out` is what the fan-out loops (rtcore/fanout.pyx) touch for every delivery: an
    # extension type whose fields they read as C struct members. As slots, `out` and `_raw`
    # are fixed offsets here too; in the instance dict of a subclass of picows' extension type
    # each access would be a generic lookup.
    __slots__ = ("out", "_raw", "__dict__")

    def __init__(self, gw: Gateway, workspace_id: str, header_token: str | None, remote: str):
        super().__init__()
        self.gw = gw
        self.workspace_id = workspace_id
        self.workspace: Workspace | None = None
        self.remote = remote
        self._header_token = header_token
        self.transport: WSTransport | None = None
        self._raw = None  # the underlying asyncio transport: frames are written to it directly
        self.out = Outbox()  # pending frames, closed, and the transport's write
        self.identity: Identity | None = None
        self.session: Session | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self.last_rx = time.monotonic()
        self._queue: deque[bytes] = deque()
        self._busy = False
        self._reading_paused = False
        self._turn_handled = 0  # messages handled this turn, and replay work carried over (_next_turn)
        self._turn_scheduled = False
        self._invalid: deque[float] | None = None
        # The `since` of each replay still running past its first step (_in_flight): the session
        # is suspended at the lowest, not at the workspace's position (_teardown).
        self._replays: list[int] | None = None
        # A fragmented message being received, its payload so far in one buffer: kept as a bytes
        # object per fragment, 64 KiB sent in 2-byte fragments held ~1.8 MB (27 times
        # limits.max_message_bytes), before any auth message.
        self._fragments: bytearray | None = None
        self._fragmented = False  # between a data frame without FIN and the continuation with it
        self._timer: asyncio.TimerHandle | None = None  # auth deadline, then token expiry
        self._close_cause = "network"
        self._close_code: int | None = None
        self._ping_sent = False
        self._refreshed_at = float("-inf")  # loop time of the last token refresh handled
        # Set while a refresh waits on min_refresh_interval: the token's expiry handles it at
        # once rather than close the connection under it (_expired).
        self._refresh_wake: asyncio.Event | None = None
        # A refresh is being handled (waiting on the interval, or its token being verified: a
        # JWKS refetch for a new kid takes up to its timeout): the token's expiry leaves the
        # verdict to it (_expired).
        self._refreshing = False
        self._expiry_due = False  # the token expired while that refresh was being handled
        self._replay_wait = _REPLAY_POLL  # the last wait between two looks at the send buffer (_taken)
        self._held = False  # closed with bytes left to write: in gw.closing_sockets until the socket ends

    # ---- picows callbacks ----------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self._raw = transport.underlying_transport
        # Past this many bytes not yet taken by the socket, the transport calls pause_writing
        # (through picows): a reader that slow is closed with 1013.
        gw = self.gw
        self._raw.set_write_buffer_limits(high=gw.cfg.limits.send_buffer_bytes)
        # Frames up to a quarter of the limit leave it as it is (no call in the fan-out loop);
        # a larger one raises it by its size (_big_frame).
        self.out.big = gw.cfg.limits.send_buffer_bytes // 4
        self.out.on_big = self._big_frame
        self.out.write = self._raw.write
        gw.connections.add(self)
        gw.metrics.connections_total += 1
        loop = asyncio.get_running_loop()
        if self._header_token is not None:
            token, self._header_token = self._header_token, None
            self._run(self._authenticate(token, None, None, None))
        else:
            self._timer = loop.call_later(gw.cfg.limits.auth_timeout, self._auth_timeout)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.last_rx = time.monotonic()
        self._ping_sent = False
        mt = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # RFC 6455 §5.2: no extension is negotiated, so no reserved bit may be set (a frame
            # compressed without permessage-deflate was read as text: "not JSON", then 1008).
            self._protocol_error("a frame with a reserved bit set, and no extension negotiated")
            return
        if (mt == WSMsgType.TEXT or mt == WSMsgType.BINARY) and self._fragmented:
            # RFC 6455 §5.4: a message's fragments are not interleaved with another message's;
            # taking the new one silently dropped the fragments before it.
            self._protocol_error("a new message began before the fragmented one ended")
            return
        if mt == WSMsgType.TEXT:
            if frame.fin:
                self._on_message(frame.get_payload_as_bytes())
            else:
                self._fragmented = True
                first = frame.get_payload_as_bytes()
                if len(first) > self.gw.cfg.limits.max_message_bytes:
                    self._too_big(len(first))
                else:
                    self._fragments = bytearray(first)
        elif mt == WSMsgType.CONTINUATION:
            if not self._fragmented:
                self._protocol_error("a continuation frame without a message to continue")
                return
            self._fragmented = not frame.fin
            fragments = self._fragments
            if fragments is None:
                return  # a message already refused (too big, binary): its rest is dropped
            # One buffer, its length the running total: a peer sending endless empty
            # continuation frames grows nothing, and no frame costs a sum over those before it
            # (a list of fragments summed at each one was quadratic: 50,000 such frames, 300 KB,
            # stalled the loop 18 s).
            fragments += frame.get_payload_as_bytes()
            size = len(fragments)
            if size > self.gw.cfg.limits.max_message_bytes:
                self._fragments = None
                self._too_big(size)
            elif frame.fin:
                data = bytes(fragments)
                self._fragments = None
                self._on_message(data)
        elif mt == WSMsgType.CLOSE:
            code = int(frame.get_close_code())
            answer = _close_answer(code)
            if answer == code:
                self._close_cause = "client_close"
                self._close_code = code
                transport.send_close(frame.get_close_code(), frame.get_close_message())
            else:
                # No code (picows reads it as 0: "no status received", 1005), or one no close
                # frame may carry: answered with a code that may be sent (echoed, 0 made the
                # server's close frame invalid, and clients failed the handshake).
                self._close_cause = "client_close" if code == 0 else "protocol_error"
                self._close_code = 1005 if code == 0 else answer
                transport.send_close(WSCloseCode(answer))
            self._disconnect()
        elif mt == WSMsgType.BINARY:
            self._fragmented = not frame.fin
            # Refused in its turn: its 4000 went out at once, ahead of the answers to the
            # messages before it (auth_ok among them, while the token was being checked).
            self._on_message(_BINARY)
        # PING is answered by picows (auto pong); PONG only refreshes last_rx.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._close_code is None:
            self._take_layer_close_code(transport)
        self._teardown()
        if self._held:
            self._held = False
            self.gw.closing_sockets -= 1

    def close_after_layer(self) -> None:
        """picows sent a close frame of its own (a frame breaking RFC 6455): nothing more is
        written, as after the gateway's own close (a no-op once closed)."""
        if not self.closed and self.transport is not None:
            self.close(1002)  # takes the code picows sent (close: is_close_frame_sent)

    def _take_layer_close_code(self, transport: WSTransport) -> None:
        """Take the code of a close that picows sent on its own (a frame breaking RFC 6455:
        1002; a length over what it reads: 1009), so the session-suspended record names it
        instead of a dropped connection's "network"."""
        handshake = transport.close_handshake
        if handshake is None or handshake.sent is None or handshake.recv_then_sent:
            return  # no close sent, or it answered the client's (on_ws_frame took that one)
        code = int(handshake.sent.code)
        self._close_code = code
        self._close_cause = CODE_NAMES.get(code, self._close_cause)

    def pause_writing(self) -> None:
        """The transport's buffer passed its high-water mark (see on_ws_connected). Called
        from inside a write: close after it, not in the middle of it."""
        if not self.closed:
            asyncio.get_running_loop().call_soon(self._slow_reader)

    def resume_writing(self) -> None:
        pass

    def _big_frame(self, size: int) -> None:
        """A frame larger than any before is about to be written (rtcore.fanout calls this
        before the write): the send buffer may hold it beyond limits.send_buffer_bytes. What
        the kernel does not take at once of a 9 MiB row waits there however fast the client
        reads, and is no sign of a slow reader."""
        self.out.big = size
        self._raw.set_write_buffer_limits(high=self.gw.cfg.limits.send_buffer_bytes + size)

    # ---- outbound ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """No frame is queued or written any more (kept in the outbox the fan-out loops read)."""
        return self.out.closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self.out.closed = value

    def push(self, frame: bytes) -> None:
        """Queue a complete frame for this iteration's write (rtcore/fanout: one frame as bytes,
        several as a list, the same frame twice in a row once)."""
        if queue_one(self.out, frame):
            self.gw.hub.schedule(self.out)

    def flush(self) -> None:
        """Write the pending frames now (the hub flushes every dirty outbox the same way)."""
        writes, frames = flush_all([self.out])
        m = self.gw.metrics
        m.writes += writes
        m.frames_out += frames

    def send(self, message: msgspec.Struct) -> None:
        self.push(text_frame(encode(message)))

    def send_error(
        self, code: int, message: str, *, channel: str | None = None, mid: Any = None, oldest: int | None = None
    ) -> None:
        self.send(Error(code=code, name=CODE_NAMES[code], message=message, channel=channel, id=mid, oldest=oldest))

    def close(self, code: int, detail: str | None = None, cause: str | None = None, mid: Any = None) -> None:
        """Send `detail` as an error (when given; `mid`: the id of the message refused), then a
        close frame with the code's name."""
        if self.closed:
            return
        if self.transport is not None and self.transport.is_close_frame_sent:
            # picows closed it on its own (_take_layer_close_code) and its close frame waits behind
            # frames the peer has not read: no second close frame, the code is the one sent.
            self._take_layer_close_code(self.transport)
            self._teardown()
            self._disconnect()
            return
        if cause is not None:
            self._close_cause = cause
        self._close_code = code
        if detail is not None:
            # 1011 too (a token that cannot be checked now): without its reason a client could
            # not tell an identity provider out of reach from a failure of the gateway.
            self.send_error(code, detail, mid=mid)
        self.push(close_frame(code, CODE_NAMES.get(code, "")))
        self.flush()
        self.closed = True
        self._teardown()
        self._disconnect()

    def _disconnect(self) -> None:
        """Close the transport once what is queued for the peer has been written. A graceful
        close waits for that however long it takes: a peer that reads nothing (a hung client
        whose TCP stack still acknowledges) held the socket and its queued bytes for as long as
        it lived, after the connection had left every count. It gets limits.idle_timeout to
        read them, as an HTTP peer does, then the connection is dropped."""
        if self.transport is None:
            return
        self.transport.disconnect(graceful=True)
        raw = self._raw
        if raw is not None and raw.get_write_buffer_size():
            self._held_until(self.gw.cfg.limits.idle_timeout)

    def _held_until(self, grace: float) -> None:
        """A closed connection whose socket still has bytes for its peer: aborted after `grace`
        seconds if it has not ended by then (a no-op once the transport is gone). Out of
        gw.connections already, it counts against the client sockets until it ends
        (http.FrontProtocol): peers that stop reading and get closed could otherwise hold
        descriptors beyond every limit."""
        asyncio.get_running_loop().call_later(grace, self._raw.abort)
        if not self._held:
            self._held = True
            self.gw.closing_sockets += 1

    def _slow_reader(self) -> None:
        if self.closed:
            return
        self.gw.metrics.drops_slow_reader += 1
        log.info(
            "closing slow reader",
            extra={"fields": {"workspace": self.workspace_id, "remote": self.remote, "code": 1013}},
        )
        raw = self._raw
        # The close frame queues behind what the client has not read; if it never reads on,
        # abort after a grace period so its buffer is freed.
        self.closed = True
        self._close_cause = "slow_reader"
        self._close_code = 1013
        raw.write(close_frame(1013, "try_again_later"))
        self._teardown()
        raw.close()
        self._held_until(_SLOW_CLOSE_GRACE)

    # ---- inbound -------------------------------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        self.gw.metrics.messages_in += 1
        if self.closed:
            return
        if len(data) > self.gw.cfg.limits.max_message_bytes:
            self._too_big(len(data))
            return
        queue = self._queue
        if self._busy or queue or self._turn_handled >= _PER_TURN:
            if len(queue) >= _MAX_QUEUED:
                self.gw.metrics.invalid_messages += 1
                self.send_error(4000, f"over {_MAX_QUEUED} messages sent while earlier ones waited")
                self.close(1008, cause="policy_violation")
                return
            queue.append(data)
            if len(queue) >= _PAUSE_QUEUED and not self._reading_paused and self._raw is not None:
                self._reading_paused = True
                self._raw.pause_reading()
            self._drain()
            return
        self._handle(data)

    def _handle(self, data: bytes) -> None:
        """Handle one message on this turn's budget; the first of a turn schedules the next turn."""
        self._turn_handled += 1
        if not self._turn_scheduled:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)
        self._dispatch(data)

    def _next_turn(self) -> None:
        self._turn_scheduled = False
        # What a long replay charged beyond the turn's budget is paid from the next turns: one
        # scan of a 10,000-event history (~16 ms when no event matches the filter) counts as
        # 312 messages, so a client sending them back to back gets one every ten turns, as its
        # share of the loop, instead of one every turn.
        self._turn_handled = max(0, self._turn_handled - _PER_TURN)
        self._drain()

    def _drain(self) -> None:
        """Handle waiting messages, in order, while no handler awaits and the turn's budget
        lasts; then resume reading once few wait."""
        queue = self._queue
        while queue and not self._busy and not self.closed and self._turn_handled < _PER_TURN:
            self._handle(queue.popleft())
        if queue and not self._busy and not self.closed and not self._turn_scheduled:
            # The budget was spent outside _handle (a replay from an async handler).
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)
        if self._reading_paused and len(queue) <= _RESUME_QUEUED and not self.closed:
            self._reading_paused = False
            self._raw.resume_reading()

    def _protocol_error(self, detail: str) -> None:
        if self.closed:
            return  # frames the client sent before it read the close
        log.info("websocket protocol error",
                 extra={"fields": {"workspace": self.workspace_id, "remote": self.remote, "detail": detail}})
        self.close(1002, cause="protocol_error")

    def _too_big(self, size: int) -> None:
        self._refuse_size(size)
        self.close(1009, cause="message_too_big")

    def layer_refused_frame(self, code: int, size: int | None) -> None:
        """picows refused a frame unread (breaking RFC 6455: 1002; `size` bytes, more than it
        reads: 1009) and closes as soon as this returns. Its close frame's reason would be its
        own words: the close is sent here instead, with the code's name as every close has it
        (picows then sends none), after the 4000 that any message over the limit gets."""
        transport = self.transport
        name = CODE_NAMES.get(code)
        if self.closed or transport is None or transport.is_close_frame_sent or name is None:
            return
        if code == 1009:
            self._refuse_size(size)
        # Out before the close: what is queued (the error too). picows does not deliver the
        # frame read just before the refused one (its parser reads one frame ahead).
        self.flush()
        transport.send_close(WSCloseCode(code), name.encode())

    def _refuse_size(self, size: int | None) -> None:
        self.gw.metrics.invalid_messages += 1  # a 4000 as _invalid_message's, counted alike
        limit = self.gw.cfg.limits.max_message_bytes
        what = "message" if size is None else f"message of {size} bytes"
        self.send_error(4000, f"{what} exceeds the {limit}-byte limit")

    def _dispatch(self, data: bytes) -> None:
        if data is _BINARY:
            self._invalid_message("binary frames are not supported: send JSON text", None)
            return
        try:
            msg = client_decoder.decode(data)
        except msgspec.ValidationError as exc:
            self._invalid_message(f"invalid message: {exc}", *_message_refs(data))
            return
        except (msgspec.DecodeError, *UNREADABLE_JSON) as exc:
            self._invalid_message(f"not JSON: {unreadable_json(exc, data)}", None)
            return
        if self.identity is None:
            if isinstance(msg, Auth):
                # The deadline is the client's, to send a token: the time the gateway takes to
                # verify it (a JWKS refetch, bounded by its own timeout) does not count.
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._run(self._authenticate(msg.token, msg.resume, msg.since, msg.id))
            else:
                # A refused subscribe (or unsubscribe) names its channel, as after auth (§5).
                channel = msg.channel if isinstance(msg, (Subscribe, Unsubscribe)) else None
                self.send_error(4003, "authenticate first: send {\"type\":\"auth\",\"token\":...}", channel=channel,
                                mid=msg.id)
            return
        if isinstance(msg, Subscribe):
            self._subscribe(msg)
        elif isinstance(msg, Unsubscribe):
            self._unsubscribe(msg)
        elif isinstance(msg, Ping):
            self.send(Pong(id=msg.id, seq=self.workspace.history.position))
        elif isinstance(msg, Auth):
            self._run(self._refresh(msg))

    def _invalid_message(self, message: str, mid: Any, channel: str | None = None) -> None:
        """4000 (`channel`: the subscribe's, for a refused filter); 1008 past the rate."""
        self.gw.metrics.invalid_messages += 1
        self.send_error(4000, message, mid=mid, channel=channel)
        self._count_invalid()

    def _count_invalid(self) -> None:
        """One more invalid message this minute: 1008 at limits.max_invalid_per_minute."""
        now = time.monotonic()
        if self._invalid is None:
            self._invalid = deque()
        q = self._invalid
        q.append(now)
        while q and q[0] < now - 60.0:
            q.popleft()
        if len(q) >= self.gw.cfg.limits.max_invalid_per_minute:
            self.close(1008, cause="policy_violation")

    def _run(self, coro: Awaitable[None]) -> None:
        """Run an async handler; messages arriving meanwhile wait their turn."""
        self._busy = True
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Future) -> None:
        self._busy = False
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "message handler failed",
                exc_info=task.exception(),
                extra={"fields": {"workspace": self.workspace_id, "remote": self.remote}},
            )
            self.close(1011, cause="internal_error")
            return
        self._drain()

    # ---- auth ----------------------------------------------------------------------------

    def _auth_timeout(self) -> None:
        self._timer = None
        if self.identity is None and not self.closed:
            self.gw.metrics.auth_failures[4002] += 1
            self.gw.audit.emit(
                "auth-denied", workspace_id=self.workspace_id, code=4002, reason="auth timeout", remote_addr=self.remote
            )
            self.close(4002, "auth timeout", cause="auth_timeout")

    async def _authenticate(self, token: str, resume: str | None, since: int | None, mid: Any) -> None:
        gw = self.gw
        try:
            identity = _unexpired(await gw.auth.authenticate(token, self.workspace_id))
        except AuthError as exc:
            # Audited even when the client has left meanwhile (a slow key set refetch): one
            # sending tokens and leaving at once must leave its failed attempts in the trail.
            gw.metrics.auth_failures[exc.code] += 1
            gw.audit.emit(
                "auth-denied",
                workspace_id=self.workspace_id,
                subject=exc.subject,
                code=exc.code,
                reason=exc.audited,
                remote_addr=self.remote,
            )
            self.close(exc.code, str(exc), cause=exc.name, mid=mid)
            return
        if self.closed:
            return
        if gw.draining:
            self.close(1001, cause="shutdown")
            return
        ws = gw.hub.workspace(self.workspace_id)
        gw.ensure_workspace_sources(self.workspace_id)
        limits = gw.cfg.limits
        refusal = None
        if len(ws.connections) >= limits.max_connections:
            refusal = f"workspace {self.workspace_id} has reached its limit of {limits.max_connections} connections"
        elif gw.hub.subjects.get(identity.subject, 0) >= limits.max_connections_per_subject:
            refusal = f"subject has reached its limit of {limits.max_connections_per_subject} connections"
        if refusal is not None:
            gw.metrics.auth_failures[4008] += 1
            gw.audit.emit(
                "auth-denied",
                workspace_id=self.workspace_id,
                subject=identity.subject,
                code=4008,
                reason=refusal,
                remote_addr=self.remote,
            )
            self.close(4008, refusal, cause="quota_exceeded", mid=mid)
            return
        if self._timer is not None:
            self._timer.cancel()
        self.identity = identity
        self.workspace = ws
        gw.hub.joined(ws, self)
        subjects = gw.hub.subjects
        subjects[identity.subject] = subjects.get(identity.subject, 0) + 1
        self._arm_expiry()

        session = gw.sessions.take(resume, identity.subject, self.workspace_id) if resume else None
        resumed = session is not None
        if session is None:
            session = gw.sessions.new(identity.subject, self.workspace_id)
        self.session = session
        self.send(AuthOk(sessionId=session.id, expiresAt=_expires(identity), resumed=resumed, id=mid))
        gw.audit.emit(
            "auth-granted",
            workspace_id=self.workspace_id,
            subject=identity.subject,
            session_id=session.id,
            remote_addr=self.remote,
            refresh=False,
        )
        if resumed:
            gw.audit.emit(
                "session-resumed",
                workspace_id=self.workspace_id,
                subject=identity.subject,
                session_id=session.id,
                remote_addr=self.remote,
            )
            pending = self._restore(session, since if since is not None else session.last_seq)
            if pending is not None:
                await pending

    async def _refresh(self, msg: Auth) -> None:
        self._refreshing = True
        try:
            await self._refresh_token(msg)
        finally:
            self._refreshing = False
        if self._expiry_due and not self.closed:
            # The token it was to replace expired while it was handled, and it was refused.
            self._expired()

    async def _refresh_token(self, msg: Auth) -> None:
        gw = self.gw
        assert self.identity is not None and self.session is not None
        # Each refresh is a signature check and an audit record: one connection refreshing in
        # a loop took ~190 us each, a core and 5,000 audit records a second (measured). A
        # sooner one waits; the connection's later messages wait behind it (_run), and past
        # _PAUSE_QUEUED of them TCP holds the rest.
        loop = asyncio.get_running_loop()
        wait = self._refreshed_at + gw.cfg.limits.min_refresh_interval - loop.time()
        if wait > 0:
            self._refresh_wake = wake = asyncio.Event()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
            finally:
                self._refresh_wake = None
            if self.closed:
                return
        self._refreshed_at = loop.time()
        try:
            identity = await gw.auth.authenticate(msg.token, self.workspace_id)
            if identity.subject != self.identity.subject:
                raise AuthError(4003, "a refresh token must be for the same subject", subject=identity.subject)
            # Taken as a refresh, a token just past `exp` replaced a valid one and closed the
            # connection with 4001 at once: refused, the connection carries on under the old
            # token (§1).
            _unexpired(identity)
        except AuthError as exc:
            gw.metrics.auth_failures[exc.code] += 1
            gw.audit.emit(
                "auth-denied",
                workspace_id=self.workspace_id,
                subject=exc.subject,
                session_id=self.session.id,
                code=exc.code,
                reason=exc.audited,
                remote_addr=self.remote,
                refresh=True,
            )
            if not self.closed:
                self.send_error(exc.code, f"token refresh refused: {exc}", mid=msg.id)
            return  # _refresh closes the connection if its token expired meanwhile
        if self.closed:
            return
        self._expiry_due = False
        self.identity = identity
        self._arm_expiry()
        self.send(AuthOk(sessionId=self.session.id, expiresAt=_expires(identity), resumed=False, id=msg.id))
        self._drop_ungranted()
        gw.audit.emit(
            "auth-granted",
            workspace_id=self.workspace_id,
            subject=identity.subject,
            session_id=self.session.id,
            remote_addr=self.remote,
            refresh=True,
        )

    def _arm_expiry(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self.identity is not None
        loop = asyncio.get_running_loop()
        delay = self.identity.expires_at - time.time()
        self._timer = loop.call_later(max(0.0, delay), self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._refreshing:
            # A refresh sent before exp waits on min_refresh_interval (handled now) or is being
            # verified: the connection is closed only if it is refused (it was closed under
            # the refresh, a valid token the client had sent in time).
            self._expiry_due = True
            if self._refresh_wake is not None:
                self._refresh_wake.set()
            return
        self._expiry_due = False
        if not self.closed:
            self.gw.metrics.auth_failures[4001] += 1
            self.close(4001, "token expired: refresh it with an auth message before exp", cause="token_expired")

    # ---- subscriptions -------------------------------------------------------------------

    def _subscribe(self, msg: Subscribe) -> None:
        gw = self.gw
        try:
            spec = channels.parse(msg.channel, msg.filter)
        except channels.ChannelError as exc:
            self.send_error(4010, str(exc), channel=msg.channel, mid=msg.id)
            return
        except channels.InvalidFilter as exc:
            self._invalid_message(str(exc), msg.id, channel=msg.channel)
            return
        assert self.identity is not None
        key = channels.subscription_key(msg.channel)
        if not gw.auth.may_subscribe(self.identity, msg.channel):
            self.send_error(4003, gw.auth.channel_refusal(self.identity, msg.channel), channel=msg.channel, mid=msg.id)
            return
        if key not in self.subscriptions and len(self.subscriptions) >= gw.cfg.limits.max_subscriptions:
            self.send_error(
                4008,
                f"subscription limit of {gw.cfg.limits.max_subscriptions} per connection reached",
                channel=msg.channel,
                mid=msg.id,
            )
            return
        # A compiled filter takes 27-39 bytes of memory per byte received: without a bound, 100
        # subscriptions of 38 KB filters held 110 MB for one connection (measured).
        held = sum(sub.spec.filter_bytes for k, sub in self.subscriptions.items() if k != key)
        if held + spec.filter_bytes > gw.cfg.limits.max_filter_bytes:
            self.send_error(
                4008,
                f"filters of this connection would take {held + spec.filter_bytes} bytes of JSON, over the limit of "
                f"{gw.cfg.limits.max_filter_bytes}",
                channel=msg.channel,
                mid=msg.id,
            )
            return
        if spec.source == "events":
            self._add_then_replay(spec, msg.since, msg.id)
            return
        source = gw.source(self.workspace_id, spec.source)
        if source is None:
            self.send_error(
                4010,
                gw.why_no_source(self.workspace_id, spec.source),
                channel=msg.channel,
                mid=msg.id,
            )
            return
        positioned = getattr(source, "positioned", None)  # a Kafka bus node's sources have none
        if spec.entity == "*" and (positioned is None or positioned.is_set()):
            self._add_then_replay(spec, msg.since, msg.id)
            return
        self._run(self._checked_add(source, spec, msg, positioned))

    async def _checked_add(self, source: Any, spec: channels.SubscriptionSpec, msg: Subscribe,
                           positioned: asyncio.Event | None) -> None:
        try:
            entity = await source.check_channel(self.workspace_id, spec.entity)
            if positioned is not None and not positioned.is_set():
                db = getattr(source, "database", None)  # a MongoDB feed's; PostgreSQL's is in its URL
                await await_position(positioned, spec.channel, self.workspace_id,
                                     f"{spec.source} database {db!r}" if db else f"the {spec.source} database")
        except ChannelUnavailable as exc:
            if not self.closed:
                self.send_error(4010, str(exc), channel=msg.channel, mid=msg.id)
                if isinstance(exc, NoSuchChannel):
                    self._count_invalid()
            return
        if self.closed:
            return
        if entity != spec.entity:
            spec = dataclasses.replace(spec, entity=entity)
        pending = self._add(spec, msg.since, msg.id)
        if pending is not None:
            await pending

    def _add_then_replay(self, spec: channels.SubscriptionSpec, since: int | None, mid: Any) -> None:
        pending = self._add(spec, since, mid)
        if pending is not None:
            self._run(pending)  # later messages wait until the replay from the bus is done

    def _add(self, spec: channels.SubscriptionSpec, since: int | None, mid: Any) -> Awaitable[None] | None:
        ws = self.workspace
        assert ws is not None and self.session is not None
        sub = Subscription(self, spec)
        try:
            self.gw.hub.add(ws, sub)
        except FilterError as exc:
            self._invalid_message(f"{spec.channel}: {exc}", mid, channel=spec.channel)
            return None
        key = channels.subscription_key(spec.channel)  # the other spelling of the channel replaced too
        old = self.subscriptions.get(key)
        if old is not None:
            old.end = ws.history.position
            self.gw.hub.remove(ws, old)
        self.subscriptions[key] = sub
        self.session.specs[key] = spec
        # Live events match at delivery, in seq order: every one after this position reaches
        # the subscription (the position as in _teardown's suspend).
        sub.start = ws.history.position
        self.send(Subscribed(channel=spec.channel, id=mid, seq=sub.start))
        if since is not None:
            return self._replay([sub], since, old)
        return None

    def _unsubscribe(self, msg: Unsubscribe) -> None:
        key = channels.subscription_key(msg.channel)
        sub = self.subscriptions.pop(key, None)
        if sub is not None and self.workspace is not None:
            self.gw.hub.remove(self.workspace, sub)
        if self.session is not None:
            self.session.specs.pop(key, None)
        self.send(Unsubscribed(channel=msg.channel, id=msg.id))

    def _restore(self, session: Session, since: int) -> Awaitable[None] | None:
        """Re-create a resumed session's subscriptions and replay what it missed."""
        ws = self.workspace
        assert ws is not None
        self._drop_ungranted()
        self._drop_unavailable()
        dropped, session.dropped = session.dropped, []  # told once
        for channel, why in dropped:
            self.send_error(4000, why, channel=channel)
        subs = []
        for key, spec in list(session.specs.items()):
            sub = Subscription(self, spec)
            try:
                self.gw.hub.add(ws, sub)
            except FilterError as exc:
                # Saved by a version that took it: failing the resume (1011) suspended the
                # session again as it was, and every resume failed alike until it expired.
                self.gw.metrics.invalid_messages += 1
                self._drop(key, 4000, f"{spec.channel}: {exc}: subscription dropped")
                continue
            sub.start = ws.history.position
            self.subscriptions[key] = sub
            subs.append(sub)
        if subs:
            return self._replay(subs, since)
        return None

    def _drop_ungranted(self) -> None:
        """Drop the subscriptions the current token does not grant, each with a 4003 error.

        The channel permissions are the token's: a refreshed token, or the token resuming a
        session, may grant fewer channels than the one that subscribed.
        """
        assert self.identity is not None and self.session is not None
        auth = self.gw.auth
        specs = self.session.specs
        for key in [k for k, spec in specs.items() if not auth.may_subscribe(self.identity, spec.channel)]:
            self._drop(key, 4003, f"{auth.channel_refusal(self.identity, specs[key].channel)}: subscription dropped")

    def _drop_unavailable(self) -> None:
        """Drop, each with a 4010 error, the resumed session's subscriptions whose source the
        workspace no longer has, or whose table its source's configuration no longer
        publishes (postgres.schemas, postgres.tables): a session saved by a drained restart
        outlives the configuration it subscribed under, and restored silently such a
        subscription waited for events that could never come, where a subscribe to it gets
        4010 (§4)."""
        assert self.session is not None
        gw = self.gw
        for key, spec in [(k, s) for k, s in self.session.specs.items() if s.source != "events"]:
            source = gw.source(self.workspace_id, spec.source)
            if source is None:
                why = gw.why_no_source(self.workspace_id, spec.source)
                self._drop(key, 4010, f"{why}: subscription dropped")
            elif spec.source == "postgres" and spec.entity != "*":
                schema, _, name = spec.entity.rpartition(".")
                why = channels.unconfigured_table(source.schemas, source.tables, schema or "public", name)
                if why:
                    self._drop(key, 4010, f"{spec.channel}: table is not published: {why}: subscription dropped")

    def _drop(self, key: str, code: int, message: str) -> None:
        """Take the channel of `key` (channels.subscription_key) out of the session and the
        connection, and tell the client why, naming the channel as it subscribed."""
        assert self.session is not None
        spec = self.session.specs.pop(key)
        sub = self.subscriptions.pop(key, None)
        if sub is not None and self.workspace is not None:
            self.gw.hub.remove(self.workspace, sub)
        self.send_error(code, message, channel=spec.channel)

    def _replay(
        self, subs: list[Subscription], since: int, replaced: Subscription | None = None
    ) -> Awaitable[None] | None:
        """Push retained events after `since` that match any of `subs`, in order, but those
        `replaced` (the subscription a subscribe to the same channel replaced) delivered.

        Runs synchronously right after the subscriptions were indexed, so a live event can
        neither slip between the replay and the live stream nor arrive twice. When `since` is
        older than the memory history and the bus can read back (Kafka), returns the
        awaitable that does so (see `_replay_from_bus`); the caller awaits it.
        """
        ws = self.workspace
        assert ws is not None
        bus = self.gw.bus
        if getattr(bus, "behind", None) is not None and bus.behind(ws.id, since):
            for sub in subs:
                self.gw.hub.remove(ws, sub)  # held back: what this node delivers next, the client has
            return self._in_flight(since, self._replay_after_catching_up(subs, since, replaced))
        replay = ws.history.since(since)
        self._charge_replay(len(replay.entries))
        if (any(replay.gap_for(sub.spec.source, sub.spec.entity) for sub in subs)
                and getattr(bus, "can_read_back", None) is not None and bus.can_read_back(ws.id, since)):
            # Some channel's events after `since` were evicted here; the topic still has them.
            for sub in subs:
                self.gw.hub.remove(ws, sub)  # held back from the live stream until the read-back is done
            return self._in_flight(since, self._replay_from_bus(subs, since, replaced))
        rest = self._replay_entries(subs, since, replay, replaced)
        return None if rest is None else self._in_flight(since, rest)

    def _in_flight(self, since: int, rest: Awaitable[None]) -> Awaitable[None]:
        """`rest` of a replay from `since`, which the session remembers until it is done: cut
        off meanwhile, the session was suspended at the workspace's position, as if all of it
        had been sent, and a resume without `since` skipped what it had not."""
        if self._replays is None:
            self._replays = []
        self._replays.append(since)
        return self._replay_done(since, rest)

    async def _replay_done(self, since: int, rest: Awaitable[None]) -> None:
        try:
            await rest
        finally:
            assert self._replays is not None
            self._replays.remove(since)

    async def _replay_from_bus(self, subs: list[Subscription], since: int, replaced: Subscription | None) -> None:
        """Replay from the bus what the memory history no longer holds, then switch to memory.

        The subscriptions stay out of the index meanwhile; live events land in the memory
        history. The read-back returns, without yielding to the loop, once it has reached the
        history's floor; the memory tail and re-indexing then run in the same step, so the
        client gets every event once, in order.
        """
        ws = self.workspace
        assert ws is not None
        m = self.gw.metrics
        view = replay_viewer(subs, self._others(subs, replaced))

        def emit(seq: int, event: Any) -> None:
            shown = view(event, seq)
            if shown is not None:
                self.push(event_frame(event.body, seq, shown))
                m.replayed += 1

        lost: frozenset[str] = frozenset()
        announced = False

        def gap_first(oldest: int) -> None:
            nonlocal announced
            announced = True
            self._send_gaps(self._still_subscribed(subs), _not_retained(since, oldest), oldest)

        try:
            upto, oldest, lost = await self.gw.bus.read_back(
                ws.id, since, lambda: ws.history.floor, emit, lambda: self.closed, self._taken, gap_first
            )
        except Exception as exc:  # noqa: BLE001 - the memory replay below reports the gap
            log.warning(
                "read-back from the bus failed: %s", exc,
                extra={"fields": {"workspace": self.workspace_id, "since": since}},
            )
            upto, oldest = since, None
        if self.closed or self.workspace is not ws:
            return
        live = self._still_subscribed(subs)
        for sub in live:
            self.gw.hub.add(ws, sub)
        if oldest is not None:
            if not announced:
                self._send_gaps(live, _not_retained(since, oldest), oldest)
        elif lost:
            self._send_loss_gaps(live, since, lost, ws.history.oldest())
        if upto != since:  # read back from Kafka: from `since`, or from where the stream holds
            self._replayed(live, since if oldest is None else oldest - 1)
        tail = ws.history.since(upto)
        self._charge_replay(len(tail.entries))
        pending = self._replay_entries(live, upto, tail, replaced)
        if pending is not None:
            await pending

    async def _replay_after_catching_up(
        self, subs: list[Subscription], since: int, replaced: Subscription | None
    ) -> None:
        """The client has seen events up to `since` on another node that this one has not read
        yet (Kafka bus: nodes read at their own pace). Live, they would reach the client again,
        seq going back: the subscriptions stay out of the index until this node has read up to
        `since` (bus.catch_up returns without yielding once it has), then the memory replay
        and re-indexing run in the same step."""
        ws = self.workspace
        assert ws is not None
        await self.gw.bus.catch_up(ws.id, since, lambda: self.closed)
        if self.closed or self.workspace is not ws:
            return
        live = self._still_subscribed(subs)
        for sub in live:
            self.gw.hub.add(ws, sub)
        replay = ws.history.since(since)
        self._charge_replay(len(replay.entries))
        pending = self._replay_entries(live, since, replay, replaced)
        if pending is not None:
            await pending

    def _still_subscribed(self, subs: list[Subscription]) -> list[Subscription]:
        """Those of `subs` not unsubscribed or replaced while their replay was under way."""
        key = channels.subscription_key
        return [sub for sub in subs if self.subscriptions.get(key(sub.spec.channel)) is sub]

    def _charge_replay(self, entries: int) -> None:
        """A replay counts against the turn's budget as a message per _REPLAY_ENTRIES_PER_MESSAGE
        entries it looks at (a scan, a frame for each match): after a long one the connection's
        next message waits for the next turn, after the flush; a short one (a resume after a
        blip) does not hold back the messages behind it, which other connections' work (a
        publish) would otherwise overtake."""
        self._turn_handled += entries // _REPLAY_ENTRIES_PER_MESSAGE

    def _send_gaps(self, subs: list[Subscription], message: str, oldest: int) -> None:
        """history_gap (4011) on each channel: the client reloads what the stream cannot give."""
        for sub in subs:
            self.send_error(4011, message, channel=sub.spec.channel, oldest=oldest)
        self.gw.metrics.history_gaps += len(subs)

    def _send_loss_gaps(self, subs: list[Subscription], since: int, lost: frozenset[str], oldest: int) -> None:
        """history_gap on the channels of the sources that reported lost changes after `since`."""
        for source in sorted(lost):
            hit = [sub for sub in subs if sub.spec.source == source]
            if hit:
                self._send_gaps(hit, f"{source} changes after {since} may have been lost (the source reported a loss)",
                                oldest)

    def _replay_entries(
        self, subs: list[Subscription], since: int, replay: Any, replaced: Subscription | None = None
    ) -> Awaitable[None] | None:
        """Push the retained entries of `replay` that `subs` show, after its gap or loss
        notices. What does not fit in one piece (_replay_piece bytes) leaves in pieces, each
        once the client has taken the one before (_replay_paced), with `subs` out of the index
        meanwhile: a replay larger than the send buffer, written at once, passed
        limits.send_buffer_bytes and closed the connection with 1013 however fast the client
        read (a resume after a long disconnect in a busy workspace), again at every reconnect.
        Returns the awaitable that sends the rest, or None when all of it is queued."""
        gapped, whole = self._notify_gaps(subs, since, replay)
        view = replay_viewer(subs, self._others(subs, replaced))
        self._replayed(gapped, replay.oldest - 1)
        self._replayed(whole, since)
        entries = replay.entries
        done = self._push_piece(view, entries, 0)
        if done == len(entries):
            return None
        ws = self.workspace
        assert ws is not None
        for sub in subs:
            self.gw.hub.remove(ws, sub)  # held back from the live stream until the replay is out
        return self._replay_paced(subs, view, entries, done)

    @staticmethod
    def _replayed(subs: list[Subscription], after: int) -> None:
        """`subs` are replayed every retained event after `after` (before they take any other
        message): from then on they count as having delivered it (Subscription.start), so a
        later subscription's replay leaves it out. Before, `events:*` and `events:orders`
        subscribed with the same `since` (a client's fresh session) sent every `orders` event
        of the window twice, the second copies after later events."""
        for sub in subs:
            if after < sub.start:
                sub.start = after

    def _notify_gaps(
        self, subs: list[Subscription], since: int, replay: Any
    ) -> tuple[list[Subscription], list[Subscription]]:
        """history_gap on the channels of `subs` that may miss events after `since` (the history
        evicted some of theirs, or cannot vouch for any channel), else on those whose source
        reported a loss. Returns those of `subs` the history may miss events of, and the others."""
        gapped: list[Subscription] = []
        whole: list[Subscription] = []
        for sub in subs:
            (gapped if replay.gap_for(sub.spec.source, sub.spec.entity) else whole).append(sub)
        if gapped:
            self._send_gaps(
                gapped, f"events after {since} may be missing from the history; it holds {replay.oldest} onwards",
                replay.oldest,
            )
        if replay.lost:
            self._send_loss_gaps(whole, since, replay.lost, replay.oldest)
        return gapped, whole

    @property
    def _replay_piece(self) -> int:
        return max(_MIN_REPLAY_PIECE, self.gw.cfg.limits.send_buffer_bytes // 4)

    def _others(self, subs: list[Subscription], replaced: Subscription | None = None) -> list[Subscription]:
        """The connection's subscriptions besides `subs`, and the one `replaced` by a subscribe
        to the same channel (those a replay for `subs` must not repeat: see replay_viewer).
        Without it, a filter replaced `since` the client's last seen event replayed what the
        old filter had sent meanwhile, and what the restored filter of a resumed session had
        just replayed."""
        others = [sub for sub in self.subscriptions.values() if all(sub is not s for s in subs)]
        if replaced is not None:
            others.append(replaced)
        return others

    def _push_piece(
        self, view: Callable[[Any, int], bytes | None], entries: list[Any], start: int, scan: int | None = _REPLAY_SCAN
    ) -> int:
        """Push what `view` shows of entries[start:] until a piece is full (_replay_piece bytes,
        or `scan` entries looked at, when given); returns the index of the first entry not
        looked at."""
        budget = self._replay_piece
        i, n, end = start, 0, len(entries) if scan is None else min(len(entries), start + scan)
        while i < end and budget > 0:
            entry = entries[i]
            i += 1
            shown = view(entry.event, entry.seq)
            if shown is None:
                continue
            frame = entry.frame if shown == b"" else event_frame(entry.event.body, entry.seq, shown)
            self.push(frame)
            budget -= len(frame)
            n += 1
        self.gw.metrics.replayed += n
        return i

    async def _replay_paced(
        self, subs: list[Subscription], view: Callable[[Any, int], bytes | None], entries: list[Any], done: int
    ) -> None:
        """The rest of a replay, a piece each time the client has taken the pieces before,
        read afresh from the history for each piece: entries held between pieces kept those
        the history evicted meanwhile alive, outside every memory bound, for as long as a
        client took to read them (a history's worth for each slow reader). What the history
        evicted before the client got to it is reported with a history_gap, as to any reader
        from before an eviction. Up to where the history ended when the replay began, a piece
        is bounded by entries looked at too; after it by bytes only, or a replay could chase
        for ever a workspace appending more than _REPLAY_SCAN events a turn. The last piece
        and the return of `subs` to the index happen in one step, so no live event slips
        between or arrives twice."""
        ws = self.workspace
        assert ws is not None
        last = entries[done - 1].seq  # every entry up to here was looked at
        began = entries[-1].seq
        told = dict(ws.history.losses)  # the losses the first piece's notices covered
        del entries
        while True:
            await self._taken()
            if self.closed or self.workspace is not ws:
                return
            live = self._still_subscribed(subs)
            tail = ws.history.since(last)
            lost = frozenset(src for src in tail.lost if ws.history.losses[src] != told.get(src))
            told.update(ws.history.losses)
            self._notify_gaps(live, last, Replay(tail.gap, tail.oldest, tail.entries, lost, tail.scoped))
            entries = tail.entries
            scan = _REPLAY_SCAN if entries and entries[0].seq <= began else None
            done = self._push_piece(view, entries, 0, scan)
            if done == len(entries):  # the whole tail in this step: live from here
                for sub in live:
                    self.gw.hub.add(ws, sub)
                return
            last = entries[done - 1].seq
            del tail, entries

    async def _taken(self) -> None:
        """Write what is queued, then wait until the client has taken all but a piece of it:
        at least a turn of the loop, for the other clients (_REPLAY_SCAN)."""
        self.flush()
        piece = self._replay_piece
        raw = self._raw
        if raw is None:
            return
        wait = _REPLAY_POLL
        size = raw.get_write_buffer_size()
        if size <= piece:
            await asyncio.sleep(0)
            size = raw.get_write_buffer_size()
        while not self.closed and size > piece:
            await asyncio.sleep(wait)
            left = raw.get_write_buffer_size()
            # Back to the short wait as soon as the client takes something.
            wait = _REPLAY_POLL if left < size else min(wait * 2, _REPLAY_POLL_MAX)
            self._replay_wait = wait
            size = left

    # ---- teardown ------------------------------------------------------------------------

    def _teardown(self) -> None:
        """Drop subscriptions and counts (idempotent), suspend the session."""
        self.closed = True
        self.out.on_big = None  # a bound method of this connection: no cycle through the outbox
        gw = self.gw
        gw.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ws = self.workspace
        if ws is None:
            return
        self.workspace = None
        for sub in self.subscriptions.values():
            gw.hub.remove(ws, sub)
        self.subscriptions = {}
        gw.hub.left(ws, self)
        assert self.identity is not None
        subject = self.identity.subject
        subjects = gw.hub.subjects
        left = subjects.get(subject, 1) - 1
        if left:
            subjects[subject] = left
        else:
            subjects.pop(subject, None)
        if self.session is not None:
            # The position the session is up to: the last event, or where the history starts
            # when it has none yet (nothing before that happened while this connection lived).
            # Where a resume without `since` replays from: a replay still running had not sent
            # what follows its start (a client that had some of it drops them by seq).
            gw.sessions.suspend(self.session, min((ws.history.position, *(self._replays or ()))))
            gw.audit.emit(
                "session-suspended",
                workspace_id=self.workspace_id,
                subject=subject,
                session_id=self.session.id,
                code=self._close_code,
                reason=self._close_cause,
                remote_addr=self.remote,
            )

    # ---- liveness (called by the gateway's sweeper) -----------------------------------------

    def check_idle(self, now: float, idle_timeout: float) -> None:
        silent = now - self.last_rx
        if silent > idle_timeout:
            self.close(1001, cause="idle_timeout")
        elif silent > idle_timeout / 2 and not self._ping_sent and self.transport is not None:
            self._ping_sent = True
            self.transport.send_ping()


def _not_retained(since: int, oldest: int) -> str:
    """The history_gap message of a read-back from before what the event stream holds."""
    return f"events after {since} are no longer retained by the event stream; it holds {oldest} onwards"


def _expires(identity: Identity) -> str:
    # A token's exp past 9999 (an identity provider's "never") has no RFC 3339 date: written
    # as an expanded year ("+3168873852708-..."), no date parser read it. The last date is said.
    return iso_ms(min(int(identity.expires_at * 1000), MAX_RFC3339_MS))


def _unexpired(identity: Identity) -> Identity:
    """`identity`, or AuthError 4001 when its token is past `exp`. The leeway lets a token a
    few seconds past `exp` through authenticate() (clock skew, §2), but a session ends exactly
    at `exp`: at connect such a session had ended before it began, yet the connection got
    auth_ok, and a resumed session's missed events, before its expiry timer closed it."""
    if identity.expires_at <= time.time():
        raise AuthError(4001, f"token expired at {_expires(identity)}", subject=identity.subject)
    return identity
