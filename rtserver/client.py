"""An asyncio client for the gateway (the Python twin of clients/js): subscriptions that
survive reconnects.

It authenticates by message (or by header), resumes its session with the last seen `seq`
after any disconnect (or re-subscribes with `since` when the session is gone, so missed
events are replayed from the gateway's history and a `history_gap` is reported when they
cannot be), refreshes the token in-band before it expires, reconnects at once with a fresh
token on 4001, backs off exponentially (1 s doubling to 30 s, with jitter) on other losses,
and stops with a RealtimeError on terminal codes (4002, 4003, 1008, 1009). Dead links are
detected by the `websockets` keepalive pings.

    async with RealtimeClient(url, get_token) as client:
        events = client.events()  # buffers from here on
        await client.subscribe("events:orders", {"predicates": {"status": "paid"}})
        async for item in events:  # events, and {"type": "history_gap", ...} notices
            ...
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

log = logging.getLogger("rtserver.client")

TERMINAL_CODES = frozenset({4002, 4003, 1008, 1009})
_SUBSCRIPTION_REFUSALS = frozenset({4000, 4003, 4008, 4010})
_SEEN_LIMIT = 4096  # recent seqs remembered to drop a replayed duplicate
_CODE_NAMES = {
    1000: "normal_closure", 1001: "going_away", 1006: "abnormal_closure", 1008: "policy_violation",
    1009: "message_too_big", 1011: "internal_error", 1013: "try_again_later", 4000: "invalid_message",
    4001: "token_expired", 4002: "token_invalid", 4003: "scope_denied", 4008: "quota_exceeded",
    4010: "channel_unavailable", 4011: "history_gap",
}

TokenSource = Callable[[], "str | Awaitable[str]"]
EventHandler = Callable[[dict[str, Any]], Any]


class RealtimeError(Exception):
    """A close code or error message from the gateway (code 0: raised by the client)."""

    def __init__(self, code: int, message: str = "", *, name: str | None = None, channel: str | None = None,
                 terminal: bool = False):
        super().__init__(message or _CODE_NAMES.get(code, f"error {code}"))
        self.code = code
        self.name = name or _CODE_NAMES.get(code, "error")
        self.channel = channel
        self.terminal = terminal


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (not verified: only to know when to refresh)."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except (IndexError, ValueError, AttributeError):
        return None


def channel_matches(channel: str, event_channel: str, filter: dict | None = None) -> bool:
    """Whether an event on concrete `event_channel` belongs to a subscription on `channel`."""
    if channel == event_channel:
        return True
    kind, _, name = channel.partition(":")
    if name != "*" or not event_channel.startswith(kind + ":"):
        return False
    entity = (filter or {}).get("entity")
    rest = event_channel[len(kind) + 1:]
    return not entity or rest == entity or rest.endswith("." + entity)


class _Subscription:
    __slots__ = ("channel", "filter", "on_event", "acked", "ever_acked", "waiters")

    def __init__(self, channel: str, filter: dict | None, on_event: EventHandler | None):
        self.channel = channel
        self.filter = filter
        self.on_event = on_event
        self.acked = False  # confirmed on the current session
        self.ever_acked = False
        self.waiters: list[asyncio.Future[None]] = []


class _Feed:
    """One `events()` iterator's bounded buffer; overflowing ends it with an error."""

    def __init__(self, channel: str | None, limit: int):
        self.channel = channel
        self.limit = limit
        self.items: deque[dict[str, Any]] = deque()
        self.wake = asyncio.Event()
        self.done = False
        self.error: BaseException | None = None

    def push(self, item: dict[str, Any], filters: dict[str, _Subscription]) -> None:
        if self.done:
            return
        if self.channel and item.get("channel"):
            sub = filters.get(self.channel)
            if not channel_matches(self.channel, item["channel"], sub.filter if sub else None):
                return
        if len(self.items) >= self.limit:
            self.end(RealtimeError(0, f"event iterator overflow: more than {self.limit} unread events",
                                   name="buffer_overflow"))
            return
        self.items.append(item)
        self.wake.set()

    def end(self, error: BaseException | None) -> None:
        if not self.done:
            self.done = True
            self.error = error
            self.wake.set()


class RealtimeClient:
    """A gateway connection that reconnects by itself. `url` is the full WebSocket URL
    (`ws://host:port/workspaces/{id}/realtime/connect`); `get_token` returns a JWT (or an
    awaitable of one) and is called for every connection and every refresh."""

    def __init__(
        self,
        url: str,
        get_token: TokenSource,
        *,
        header_auth: bool = False,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        refresh_margin: float = 30.0,
        proactive_refresh: bool = True,
        max_buffered: int = 10000,
        open_timeout: float = 10.0,
        on_gap: Callable[[dict[str, Any]], Any] | None = None,
        on_state: Callable[[str], Any] | None = None,
        on_error: Callable[[RealtimeError], Any] | None = None,
    ):
        self.url = url
        self.get_token = get_token
        self.header_auth = header_auth
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.refresh_margin = refresh_margin
        self.proactive_refresh = proactive_refresh
        self.max_buffered = max_buffered
        self.open_timeout = open_timeout
        self.on_gap = on_gap
        self.on_state = on_state
        self.on_error = on_error

        self.state = "idle"  # idle | connecting | open | reconnecting | closed
        self.session_id: str | None = None
        self.last_seq: int | None = None
        self.resumed: list[bool] = []  # one entry per session start: was it resumed?
        self.closes: list[int] = []  # close codes seen, in order
        self.attempt = 0
        self.error: RealtimeError | None = None
        self._subs: dict[str, _Subscription] = {}
        self._pending_unsubs: set[str] = set()
        self._feeds: set[_Feed] = set()
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._ws: ClientConnection | None = None
        self._authed = False
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._refresh_ids = 0
        self._pending_token: str | None = None  # sent in a refresh, in force once acknowledged

    # ---- public API ----------------------------------------------------------------------

    async def __aenter__(self) -> RealtimeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Starts the connection loop; returns after the first `auth_ok`, raises a
        RealtimeError when the gateway refuses for good (4002, 4003, 1008, 1009)."""
        if self._task is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(), name=f"rtclient {self.url}")
        assert self._ready is not None
        await asyncio.shield(self._ready)

    async def subscribe(self, channel: str, filter: dict | None = None,
                        on_event: EventHandler | None = None, *, timeout: float = 10.0) -> Callable[[], None]:
        """Subscribes (replacing an earlier filter on `channel`); returns the unsubscribe
        function. While connected, waits for the gateway's confirmation and raises a
        RealtimeError if it refuses (4010, 4003, 4008, 4000)."""
        sub = _Subscription(channel, filter, on_event)
        old = self._subs.get(channel)
        if old is not None:
            sub.waiters, old.waiters = old.waiters, []
        self._subs[channel] = sub
        self._pending_unsubs.discard(channel)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sub.waiters.append(waiter)
        if self.state == "open":
            await self._send_subscribe(sub, None)
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        else:
            waiter.add_done_callback(_retrieve)

        def unsubscribe() -> None:
            self.unsubscribe(channel, sub)

        return unsubscribe

    def unsubscribe(self, channel: str, only: object = None) -> None:
        sub = self._subs.get(channel)
        if sub is None or (only is not None and sub is not only):
            return
        del self._subs[channel]
        _settle(sub.waiters, RealtimeError(0, f"unsubscribed from {channel}"))
        if self.state == "open" and self._ws is not None:
            asyncio.ensure_future(self._send({"type": "unsubscribe", "channel": channel}))
        else:
            self._pending_unsubs.add(channel)

    def events(self, channel: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Events, and `{"type": "history_gap", ...}` notices, from now on (buffered from
        this call, not from the first iteration). Ends when the client closes; raises the
        terminal RealtimeError, or a `buffer_overflow` one past `max_buffered` unread items."""
        feed = _Feed(channel, self.max_buffered)
        self._feeds.add(feed)

        async def iterate() -> AsyncIterator[dict[str, Any]]:
            try:
                while True:
                    if feed.items:
                        yield feed.items.popleft()
                        continue
                    if feed.done:
                        if feed.error is not None:
                            raise feed.error
                        return
                    feed.wake.clear()
                    await feed.wake.wait()
            finally:
                self._feeds.discard(feed)

        return iterate()

    async def close(self) -> None:
        """Closes for good (the gateway keeps the session resumable for a while)."""
        self._finish(None)
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    # ---- the connection loop -------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_state is not None:
                self.on_state(state)

    async def _token(self) -> str:
        token = self.get_token()
        if inspect.isawaitable(token):
            token = await token
        return token

    async def _run(self) -> None:
        expired_once = False
        while self.state != "closed":
            self._set_state("connecting" if self.session_id is None and self.attempt == 0 else "reconnecting")
            code = 1006
            try:
                token = await self._token()
                headers = {"Authorization": f"Bearer {token}"} if self.header_auth else None
                async with connect(self.url, additional_headers=headers, open_timeout=self.open_timeout,
                                   max_size=8 << 20, close_timeout=2) as ws:
                    self._ws = ws
                    try:
                        await self._serve(ws, token)
                    finally:
                        self._ws = None
                        self._authed = False
                    code = ws.close_code or 1006
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                log.info("connect failed", extra={"fields": {"url": self.url, "error": str(exc)}})
            except RealtimeError as exc:
                self._finish(exc)
                return
            if self.state == "closed":
                return
            self.closes.append(code)
            if code in TERMINAL_CODES:
                self._finish(RealtimeError(code, f"connection closed: {_CODE_NAMES.get(code, code)}",
                                           terminal=True))
                return
            if code == 4001 and not expired_once:
                expired_once = True  # a fresh token, at once; if that fails too, back off
                continue
            if code != 4001:
                expired_once = False
            base = min(self.backoff_max, self.backoff_initial * 2 ** min(self.attempt, 30))
            self.attempt += 1
            self._set_state("reconnecting")
            await asyncio.sleep(base / 2 + random.random() * base / 2)  # jitter spreads a herd

    async def _serve(self, ws: ClientConnection, token: str) -> None:
        if not self.header_auth:
            msg: dict[str, Any] = {"type": "auth", "token": token}
            if self.session_id is not None:
                msg["resume"] = self.session_id
                if self.last_seq is not None:
                    msg["since"] = self.last_seq
            await ws.send(json.dumps(msg))
        refresher: asyncio.Task[None] | None = None
        try:
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "event":
                    await self._on_event(msg)
                elif kind == "auth_ok":
                    if self._authed:
                        token = self._pending_token or token  # a refresh was accepted
                    else:
                        await self._on_auth_ok(msg)
                    if refresher is not None:
                        refresher.cancel()
                    refresher = asyncio.create_task(self._refresh_later(ws, token))
                elif kind == "subscribed":
                    sub = self._subs.get(msg.get("channel"))
                    if sub is not None:
                        sub.acked = sub.ever_acked = True
                        _settle(sub.waiters, None)
                elif kind == "error":
                    self._on_error(msg)
        finally:
            if refresher is not None:
                refresher.cancel()

    async def _on_auth_ok(self, msg: dict[str, Any]) -> None:
        self._authed = True
        self.attempt = 0
        resumed = bool(msg.get("resumed")) and msg.get("sessionId") == self.session_id
        self.session_id = msg.get("sessionId")
        self.resumed.append(resumed)
        self._set_state("open")
        for channel in sorted(self._pending_unsubs):
            await self._send({"type": "unsubscribe", "channel": channel})
        self._pending_unsubs.clear()
        for sub in list(self._subs.values()):
            if resumed and sub.acked:
                continue  # restored by the gateway
            # A new session: ask for what was missed since the last seen event.
            await self._send_subscribe(sub, self.last_seq if sub.ever_acked else None)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def _refresh_later(self, ws: ClientConnection, token: str) -> None:
        self._pending_token = None
        if not self.proactive_refresh:
            return
        exp = token_expiry(token)
        if exp is None:
            return
        remaining = exp - time.time()
        await asyncio.sleep(max(remaining - self.refresh_margin, remaining * 0.75, 0.0))
        try:
            fresh = await self._token()
        except Exception as exc:  # the gateway closes with 4001 at exp; we reconnect then
            log.warning("token refresh failed", extra={"fields": {"url": self.url, "error": str(exc)}})
            return
        if self._ws is ws:
            self._pending_token = fresh
            self._refresh_ids += 1
            await self._send({"type": "auth", "token": fresh, "id": f"refresh-{self._refresh_ids}"})

    async def _on_event(self, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if isinstance(seq, int):
            if seq in self._seen:
                return  # the same event replayed for a second channel
            self._seen.add(seq)
            self._seen_order.append(seq)
            if len(self._seen_order) > _SEEN_LIMIT:
                self._seen.discard(self._seen_order.popleft())
            if self.last_seq is None or seq > self.last_seq:
                self.last_seq = seq
        channel = msg.get("channel", "")
        for sub in list(self._subs.values()):
            if sub.on_event is not None and channel_matches(sub.channel, channel, sub.filter):
                try:
                    result = sub.on_event(msg)
                    if inspect.isawaitable(result):
                        await result
                except Exception:  # a handler's bug must not cost the connection
                    log.exception("event handler failed", extra={"fields": {"channel": sub.channel}})
        for feed in list(self._feeds):
            feed.push(msg, self._subs)

    def _on_error(self, msg: dict[str, Any]) -> None:
        code = msg.get("code", 0)
        channel = msg.get("channel")
        if code == 4011:
            gap = {"type": "history_gap", "code": 4011, "channel": channel, "oldest": msg.get("oldest"),
                   "message": msg.get("message")}
            if self.on_gap is not None:
                self.on_gap(gap)
            for feed in list(self._feeds):
                feed.push(gap, self._subs)
            return
        err = RealtimeError(code, msg.get("message", ""), name=msg.get("name"), channel=channel)
        if channel and channel in self._subs and code in _SUBSCRIPTION_REFUSALS:
            sub = self._subs.pop(channel)  # refused: not retried
            _settle(sub.waiters, err)
        if self.on_error is not None:
            self.on_error(err)

    async def _send_subscribe(self, sub: _Subscription, since: int | None) -> None:
        sub.acked = False
        msg: dict[str, Any] = {"type": "subscribe", "channel": sub.channel}
        if sub.filter:
            msg["filter"] = sub.filter
        if since is not None:
            msg["since"] = since
        await self._send(msg)

    async def _send(self, msg: dict[str, Any]) -> None:
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps(msg))

    def _finish(self, error: RealtimeError | None) -> None:
        if self.state == "closed":
            return
        self.error = error
        self._set_state("closed")
        closed = error or RealtimeError(1000, "client closed")
        for sub in self._subs.values():
            _settle(sub.waiters, closed)
        for feed in list(self._feeds):
            feed.end(error)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(closed)
            self._ready.add_done_callback(_retrieve)
        if error is not None and self.on_error is not None:
            self.on_error(error)


def _settle(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for w in waiters:
        if not w.done():
            if error is None:
                w.set_result(None)
            else:
                w.set_exception(error)
    waiters.clear()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark retrieved: a refusal before connect is reported via on_error
