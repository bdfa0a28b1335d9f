"""An asyncio client for the gateway (the Python twin of clients/js): subscriptions that
survive reconnects.

It authenticates by message (or by header: `header_auth`, which cannot resume a session),
resumes its session with the last seen `seq` after any disconnect (or re-subscribes with
`since` when the session is gone or authentication is by header, so missed
events are replayed from the gateway's history and a `history_gap` is reported when they
cannot be), refreshes the token in-band before it expires (`refresh_margin`, 30 s, before
`exp`, but not before 75% of the time left has passed; the time left is read from the local clock but taken as
the token's lifetime `exp - iat` at most, and after a refresh the next one waits a quarter of
that lifetime at least, 10 s without `iat`: a device clock ahead of the issuer's, which sees
every fresh token as expired, refreshes four times per lifetime instead of in a loop),
reconnects at once with a fresh token on 4001 (unless that token's `exp` is within 5 s of the
one the gateway closed at, or the 4001 ends a connection itself opened at once after a 4001 that
lasted less than 5 s: then it backs off,
so a stale token cannot cause a reconnect storm), backs off
exponentially (1 s doubling to 30 s, each wait up to half as long again at random, never
over 30 s) on other losses and when `get_token`
fails or has not answered within `open_timeout` (at connect or for a refresh: reported to on_error as a RealtimeError named
"token_unavailable", then retried; a failed refresh with the backoff while the token lasts,
then at the 4001 that ends the session),
and stops with a RealtimeError on terminal codes (4002, 4003, 1008, 1009: reported to on_error
once, its message carrying the reason the gateway gave before the close; but a 4002 after the
error "auth timeout", which says the auth message came too late, is retried like the closes
below) and on HTTP 404 to
the upgrade before any connection succeeded (a wrong URL: the gateway answers it to a malformed workspace id or any other path;
code 404, name "upgrade_refused"). The gateway's other answer before the upgrade, HTTP 503
(draining, at its connection limit, a Kafka node not ready), and any other status (a proxy's
502, 429; a 404 once a connection has succeeded) are retried with the backoff and reported to on_error as an "upgrade_refused"
RealtimeError whose code is the status, once per distinct status until a connection
succeeds; a connect that gets no HTTP answer at all (refused, unreachable, timed out) likewise,
as a RealtimeError named "connect_failed" (code 0), once per distinct failure. So is a close
the client retries, once per distinct close code until a connection succeeds: a RealtimeError
whose code is the close code, named as PROTOCOL.md §6 names it (1011 "internal_error": the
gateway could not check the token, its identity provider out of reach; 1013 "try_again_later":
the client read too slowly; 1001 "going_away": the gateway shut down, or closed an idle
connection; 4008 "quota_exceeded": connections per workspace or per subject over the limit;
1006 "abnormal_closure": the link died without a close frame), its message carrying the close
reason and the error the gateway sent just before the close, if any ("connection closed:
quota_exceeded: workspace w1 has reached its limit of 1 connections; retrying"). A close after
a connection had succeeded (1013, 1001, a lost link) is thus reported each time, a quota or an
identity provider out of reach once until it clears. A 4001 is not reported as a close (the
client reconnects with a fresh token); the gateway's error just before it is, as it comes. Dead links are
detected by the `websockets` keepalive pings; a JSON ping every `position_interval` (25 s)
brings the stream position, so subscriptions that get no events in a busy workspace resume
from what the history still holds (no needless history_gap); so does one after each
history_gap, so a source's loss told live is not told again by the next resume. A subscription made or changed while
disconnected is sent with `since` too (a filter changed while disconnected, or not yet
acknowledged when the link died, makes the client start a fresh session instead of resuming:
the resumed session would replay the outage with the old filter first), and an unsubscribe the gateway had not acknowledged
before a link loss is sent again after a resume; nothing is delivered for a channel once
it is unsubscribed (what was in flight, or what a resumed session replays there before the
unsubscribe reaches the gateway). Each event is delivered once, also when the
replays of overlapping subscriptions overlap after a reconnect. An async on_event is awaited
before the next frame is read: events stay in order, a slow one holds the connection back (past
the gateway's send buffer it closes with 1013 and the client resumes), and it cannot await
subscribe(). An exception raised by a callback (on_event, on_state, on_gap, on_error) is
logged and swallowed.

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
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.http11 import Response
from websockets.uri import parse_uri

log = logging.getLogger("rtserver.client")

TERMINAL_CODES = frozenset({4002, 4003, 1008, 1009})
_SUBSCRIPTION_REFUSALS = frozenset({4000, 4003, 4008, 4010})
# After a 4001 the client reconnects at once with a new token, but only when that token is
# fresh (its `exp` more than _FRESH_MARGIN past the one the gateway closed at, see _fresh: the
# gateway refuses a token past `exp` with 4001, as it closes at `exp`) and only once
# until a connection has been healthy
# (authenticated for _HEALTHY_AFTER): otherwise it backs off.
_FRESH_MARGIN = 5.0
_HEALTHY_AFTER = 5.0
# After an in-band refresh the next one waits at least this share of the token's lifetime: a
# device clock ahead of the issuer's then costs at most four refreshes per lifetime instead of
# a loop, and each fresh token is still replaced with three quarters of its life left. With an
# accurate clock the schedule never comes this soon (75% of the time left at the earliest).
_REFRESH_SPACING = 0.25
_REFRESH_FLOOR = 10.0  # the same for a token without `iat`, whose lifetime is unknown
_MIN_REFRESH_GAP = 1.0  # the gateway's limits.min_refresh_interval: a sooner one waits there
_KEPT = 1000  # entries of RealtimeClient.resumed and .closes
_CODE_NAMES = {
    1000: "normal_closure", 1001: "going_away", 1002: "protocol_error", 1006: "abnormal_closure",
    1008: "policy_violation", 1009: "message_too_big", 1011: "internal_error", 1013: "try_again_later", 4000: "invalid_message",
    4001: "token_expired", 4002: "token_invalid", 4003: "scope_denied", 4008: "quota_exceeded",
    4010: "channel_unavailable", 4011: "history_gap",
}

TokenSource = Callable[[], "str | Awaitable[str]"]
EventHandler = Callable[[dict[str, Any]], Any]


def _refusal_text(body: bytes | None) -> str:
    """What an HTTP refusal of the upgrade says, for the error: the gateway's JSON `error`, or
    the start of another server's (a proxy's) body."""
    text = body.decode("utf-8", "replace").strip() if body else ""
    with contextlib.suppress(ValueError):
        error = json.loads(text).get("error") if text.startswith("{") else None
        if isinstance(error, str):
            text = error
    return text[:200]


class RealtimeError(Exception):
    """A close code or error message from the gateway (code 0: raised by the client), or the
    HTTP status that refused the WebSocket upgrade (name "upgrade_refused": terminal for a 404
    before any connection succeeded)."""

    def __init__(self, code: int, message: str = "", *, name: str | None = None, channel: str | None = None,
                 terminal: bool = False):
        super().__init__(message or _CODE_NAMES.get(code, f"error {code}"))
        self.code = code
        self.name = name or _CODE_NAMES.get(code, "error")
        self.channel = channel
        self.terminal = terminal


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (not verified: only to know when to refresh)."""
    return _token_times(token)[0]


def _token_times(token: str) -> tuple[float | None, float | None]:
    """The `exp` and `iat` claims of a JWT (not verified), each None when absent."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        exp, iat = claims.get("exp"), claims.get("iat")
    except (IndexError, ValueError, AttributeError):
        return None, None
    return (float(exp) if _is_number(exp) else None, float(iat) if _is_number(iat) else None)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refresh_delay(token: str, margin: float, since_refresh: float | None) -> float | None:
    """Seconds until the in-band refresh of `token`, just received; None: it has no `exp`.

    Due `margin` before `exp` by the local clock (but not before 75% of the time left has passed),
    but the local clock may be off the issuer's, which set `exp` and `iat`:
    * behind: the time left is taken as the token's lifetime (`exp - iat`) at most;
    * ahead: every fresh token looks about to expire, or expired (a device 400 s fast, 300 s
      tokens), and was refreshed as fast as the gateway answered, for good: a token request and
      an audit record at the gateway each. So a refresh never comes sooner than
      _REFRESH_SPACING of the lifetime after the previous one on the connection
      (`since_refresh` seconds ago), or _REFRESH_FLOOR without `iat`, and never sooner than the
      gateway's own pace. The first refresh on a connection is not held back: a token that
      really is near its end (from a cache) is replaced in time."""
    exp, iat = _token_times(token)
    if exp is None:
        return None
    lifetime = exp - iat if iat is not None and exp > iat else None
    remaining = exp - time.time()
    if lifetime is not None:
        remaining = min(remaining, lifetime)
    delay = max(remaining - margin, remaining * 0.75, 0.0)
    if since_refresh is not None:
        spacing = max(_MIN_REFRESH_GAP, lifetime * _REFRESH_SPACING if lifetime is not None else _REFRESH_FLOOR)
        delay = max(delay, spacing - since_refresh)
    return delay


def _websocket_url(url: str) -> str:
    """`url` as the client connects to it: `http(s)://` taken as `ws(s)://`, as the JS client's
    runtimes (browsers, the `ws` package) do. One that is no WebSocket URL raises ValueError: the
    connection loop took it for a failed attempt, retried it for good and told on_error nothing."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        url = ("wss" if scheme.lower() == "https" else "ws") + "://" + rest
    try:
        parse_uri(url)
    except (InvalidURI, ValueError) as exc:
        raise ValueError(f"{url!r} is no WebSocket URL ({exc}): the gateway's is "
                         "ws[s]://host/workspaces/{workspaceId}/realtime/connect") from None
    return url


def channel_matches(channel: str, event_channel: str, filter: dict | None = None) -> bool:
    """Whether an event on concrete `event_channel` belongs to a subscription on `channel`.

    As the gateway matches: a `*` channel narrowed by `filter.entity` to that one name, and
    names compared whole (a topic or collection may hold dots: `events:*` with entity
    `created` is not `events:order.created`), a PostgreSQL table of schema `public` with or
    without the schema (events name it without)."""
    if subscription_key(channel) == subscription_key(event_channel):
        return True  # a history_gap notice names the subscription's channel as it was written
    kind, _, name = channel.partition(":")
    event_kind, _, event_name = event_channel.partition(":")
    if kind != event_kind:
        return False
    if name == "*":
        name = (filter or {}).get("entity")
        if not name:
            return True
    return _canonical(kind, name) == event_name


def _canonical(kind: str, name: str) -> str:
    """A channel's name as the gateway writes it in events (rtserver.channels.canonical_entity)."""
    if kind == "postgres" and name.startswith("public.") and "." not in name[7:] and name[7:] not in ("", "*"):
        return name[7:]
    return name


def subscription_key(channel: str) -> str:
    """The subscription `channel` is at the gateway (rtserver.channels.subscription_key): a
    table of schema `public` is one channel in either spelling, `postgres:orders` and
    `postgres:public.orders`. Keyed as written, the client kept two subscriptions where the
    gateway kept one: the replaced filter's on_event still got the table's events, and an
    unsubscribe in one spelling left the other registered, subscribed again after a reconnect."""
    kind, _, name = channel.partition(":")
    if kind != "postgres" or name == "*":
        return channel
    return f"{kind}:{_canonical(kind, name)}"


class _Subscription:
    __slots__ = ("channel", "filter", "on_event", "acked", "sent_id", "waiters")

    def __init__(self, channel: str, filter: dict | None, on_event: EventHandler | None):
        self.channel = channel
        self.filter = filter
        self.on_event = on_event
        self.acked = False  # confirmed on the current session
        self.sent_id: str | None = None  # id of the last subscribe sent for it: its answer echoes it
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
            sub = filters.get(subscription_key(self.channel))
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
    (`ws://host:port/workspaces/{id}/realtime/connect`; `http(s)://` is taken as `ws(s)://`, and
    one that is no WebSocket URL raises ValueError here); `get_token` returns a JWT (or an
    awaitable of one) and is called for every connection and every refresh: a coroutine
    function on the event loop, a plain function in a worker thread (asyncio.to_thread), so
    that one fetching from an identity provider holds neither the loop nor `open_timeout` (it
    must then not create tasks or futures itself). Anything but a str (None, bytes, a number),
    or with `header_auth` a token with a character a header cannot carry (a trailing newline
    from a file), is refused as "token_unavailable", naming the type or the fault, never the
    token.

    Duplicates. Live, the gateway sends a connection each event once, in `seq` order. Replays
    break that order: after a reconnect, every subscription the gateway does not restore (all
    of them on a fresh session; on a resumed one those made or changed while disconnected) is
    sent again with `since`, and each such subscribe replays its own channel from `since`
    while the subscriptions already in place deliver live events: an event that matches two
    subscriptions comes twice, and seqs interleave. The rule that keeps each event once:

    * `_floor`: every event up to this seq that matches the subscriptions has been
      delivered. It is the `since` of the resume and of every re-subscribe.
    * Outside a catch-up events arrive in seq order, so one at or below the last delivered
      seq is a duplicate, dropped; otherwise `_floor` follows the events, and the `seq` of a
      `subscribed` reply (the stream position it took effect at) when that is higher, and of
      a `pong`: every `position_interval` the client sends a ping, so a subscription that
      gets no events in a busy workspace still asks for what is in the history on reconnect.
    * Sending a subscribe with `since` starts a catch-up: `_floor` stays put, events at or
      below it are dropped, the seqs delivered above it are kept in `_catchup` and one already
      there is dropped. After the subscribes the client sends a ping with an id; the gateway
      handles a connection's messages in order, replays included, so its pong comes after
      every replay: `_floor` moves to the highest seq delivered and the set is cleared. The
      set thus holds at most one replay window (what the gateway's history holds after
      `_floor`, plus the live events of the catch-up). A connection lost during a catch-up
      keeps both; the next one asks again from the same `_floor` and sends a new ping.
    """

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
        max_message_bytes: int = 65536,
        open_timeout: float = 10.0,
        position_interval: float = 25.0,
        on_gap: Callable[[dict[str, Any]], Any] | None = None,
        on_state: Callable[[str], Any] | None = None,
        on_error: Callable[[RealtimeError], Any] | None = None,
    ):
        self.url = _websocket_url(url)
        self.get_token = get_token
        self.header_auth = header_auth
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.refresh_margin = refresh_margin
        self.proactive_refresh = proactive_refresh
        self.max_buffered = max_buffered
        self.max_message_bytes = max_message_bytes  # the gateway's limits.max_message_bytes
        self.open_timeout = open_timeout
        self.position_interval = position_interval
        self.on_gap = on_gap
        self.on_state = on_state
        self.on_error = on_error

        self.state = "idle"  # idle | connecting | open | reconnecting | closed
        self.session_id: str | None = None
        self.last_seq: int | None = None  # the highest seq delivered
        # The latest _KEPT session starts (was each resumed?) and close codes, oldest first: a
        # client that runs for months through a flapping network must not grow without bound.
        # A connection attempt that failed before its upgrade counts as a close 1006, as the JS
        # client's "close" event has it.
        self.resumed: list[bool] = []
        self.closes: list[int] = []
        self.attempt = 0
        self.error: RealtimeError | None = None
        # By subscription_key: one per channel as the gateway counts them, each keeping the
        # spelling the application subscribed with (sent, and named in what on_error gets).
        self._subs: dict[str, _Subscription] = {}
        # Unsubscribes the gateway has not acknowledged: subscription_key -> id of the one sent
        # (None: not sent yet; sent under the key, which the gateway takes as the channel). A
        # resumed session gets its channels back, so they are sent again.
        self._pending_unsubs: dict[str, str | None] = {}
        # subscription_keys the gateway's session holds a subscription on (it answered a
        # subscribe, and no unsubscribe since): a resume restores them with their filters.
        self._session_channels: set[str] = set()
        # Held weakly until iterated: an events() iterator the application drops without
        # iterating it (its generator never started, so its `finally` never runs) must not keep
        # buffering. One being iterated is held (_iterated): a task suspended in it may have no
        # other reference than the feed's wake-up event.
        self._feeds: weakref.WeakSet[_Feed] = weakref.WeakSet()
        self._iterated: set[_Feed] = set()
        self._floor: int | None = None  # see the class docstring
        self._catchup: set[int] | None = None
        self._marker: str | None = None  # id of the ping that ends the catch-up
        self._position_asked = False  # a ping sent after a history_gap, its pong not yet here
        self._ws: ClientConnection | None = None
        self._outbox: asyncio.Queue[str] | None = None  # the current connection's, in send order
        self._authed = False
        self._authed_at: float | None = None
        self._expired_once = False  # reconnected at once after a 4001 since the last healthy connection
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._ids = 0
        self._pending_token: str | None = None  # sent in a refresh, in force once acknowledged
        self._refreshed_at: float | None = None  # monotonic start of the connection's last refresh
        self._presented: str | None = None  # the token the gateway last took (at connect or a refresh)
        # What failed connects and retried closes reported to on_error (HTTP statuses,
        # connect_failed kinds, "close <code>"), until a connection succeeds: each kind once, not
        # at every attempt (all of them: with the last one only, two failures taking turns, a
        # quota close and a 503, were reported at every attempt)
        self._refusal_reported: set[int | str] = set()
        self._auth_timed_out = False  # this connection's 4002 is "auth timeout", not a bad token
        # The error that refused this connection's authentication (a bad token, a workspace not
        # granted): the terminal close that follows reports it, once, with the gateway's reason.
        self._refusal: RealtimeError | None = None
        # The message of this connection's latest 4000 (invalid_message): the detail of the 1009
        # (a message over the gateway's limit) or 1008 (too many invalid ones) closing it.
        self._last_invalid: str | None = None
        self._callback_tasks: set[asyncio.Future[Any]] = set()
        self._start_fresh = False  # a resume abandoned for a fresh session (_serve)

    # ---- public API ----------------------------------------------------------------------

    async def __aenter__(self) -> RealtimeClient:
        try:
            await self.connect()
        except BaseException:
            # No __aexit__ follows a failed __aenter__ (a timeout around `async with`, say):
            # the connection loop would go on in the background for good.
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Starts the connection loop; returns after the first `auth_ok`, raises a
        RealtimeError when the gateway refuses for good (4002 unless after "auth timeout", 4003,
        1008, 1009, or HTTP 404 to the upgrade before any connection succeeded: a wrong URL)
        or the client is closed. Cancelled (a timeout), it leaves the loop retrying: close() stops
        it (`async with` closes the client when entering fails)."""
        if self.state == "closed":
            raise self._closed_error()
        if self._task is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(), name=f"rtclient {self.url}")
        assert self._ready is not None
        await asyncio.shield(self._ready)

    async def subscribe(self, channel: str, filter: dict | None = None,
                        on_event: EventHandler | None = None, *, timeout: float | None = None) -> Callable[[], None]:
        """Subscribes (replacing an earlier filter on `channel`); returns the unsubscribe
        function once the gateway has confirmed. A link lost meanwhile, or a client that is
        reconnecting when it is called, does not fail it: the subscription is sent on the next
        connection (with `since`, so the events of the outage are replayed) and subscribe()
        returns when that confirms, as the JS client's `ready` settles. Called before connect(), it returns at once: the subscription is sent
        on connect, and a refusal then goes to on_error.

        Raises a RealtimeError when the gateway refuses (4010, 4003, 4008, 4000), when the
        channel is unsubscribed or the client closes before the confirmation, and when the
        client is already closed. With `timeout` (seconds), a confirmation that has not come
        in time withdraws the subscription and raises a RealtimeError named "timeout". When
        subscribe() raises or is cancelled once sent, the channel is not subscribed (not even
        with the filter this call was to replace); a filter refused at once (below) leaves any
        earlier subscription of the channel as it was. A filter that JSON cannot carry raises
        TypeError (a datetime, say) or ValueError (NaN, Infinity) at once (a channel that is no
        str raises TypeError too), and one whose subscribe message
        would pass `max_message_bytes` (the gateway's limits.max_message_bytes, 64 KiB unless
        the operator changed it) a RealtimeError named "message_too_big", also at once: the
        gateway answers such a message with a close 1009, which ends the whole client.

        A table of schema `public` is one channel in either spelling, as at the gateway:
        subscribing to `postgres:public.orders` after `postgres:orders` replaces that subscription
        (filter and on_event), and unsubscribe() in either spelling ends it; on_error and gap
        notices name the channel as the application last wrote it (subscription_key() gives the
        spelling both share).

        `on_event` gets the events on `channel` (narrowed by `filter.entity` on a `*` channel),
        routed by channel only: the gateway sends an event once per connection without saying
        which filter matched, so beside an overlapping subscription (`events:*` next to a
        filtered `events:orders`) it also gets events its own predicates exclude.

        An async on_event is awaited before the next frame is read (events stay in order), so
        the confirmation cannot arrive while one runs: awaited in an on_event handler,
        subscribe() raises RuntimeError at once (start it in a task instead)."""
        if not isinstance(channel, str):  # it failed deep inside, an AttributeError naming no argument
            raise TypeError(f"channel must be a str such as 'events:orders', not {type(channel).__name__}")
        if self.state == "closed":
            raise self._closed_error()
        if self._task is not None and asyncio.current_task() is self._task:
            # It would wait for a reply that is read only after the handler returns: for good.
            raise RuntimeError(f"subscribe({channel!r}) awaited in an on_event handler would wait for itself: "
                               "start it in a task (asyncio.create_task) instead")
        # A filter JSON cannot carry (a datetime, say) raises here, before it is registered:
        # registered, it failed every connection's re-subscribe, a reconnect loop. NaN and
        # Infinity too (json.dumps writes them): the gateway's "not JSON" has no id to match.
        # Kept as a copy: the application's dict, changed later (a template reused for the next
        # subscribe), changed what a reconnect sends.
        filter = json.loads(json.dumps(filter, allow_nan=False))
        # Over the gateway's message limit it is answered 4000 and a close 1009, terminal: one
        # subscribe with a large `$in` closed the client for good. Refused here, as the call's.
        size = len(_dumps({"type": "subscribe", "channel": channel, "id": f"sub-{2**53}", "filter": filter,
                           "since": 2**63}).encode())
        if size > self.max_message_bytes:
            raise RealtimeError(1009, f"subscribe to {channel}: a message of {size} bytes, over the gateway's "
                                f"{self.max_message_bytes}-byte limit (limits.max_message_bytes)",
                                name="message_too_big", channel=channel)
        sub = _Subscription(channel, filter, on_event)
        key = subscription_key(channel)  # the other spelling of a public table is replaced too
        old = self._subs.get(key)
        if old is not None:
            sub.waiters, old.waiters = old.waiters, []
        self._subs[key] = sub
        self._pending_unsubs.pop(key, None)

        def unsubscribe() -> None:
            self.unsubscribe(channel, sub)

        if self.state == "idle":
            return unsubscribe
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(_retrieve)
        sub.waiters.append(waiter)
        if self._authed:  # else on the next auth_ok
            if old is not None and self._floor is not None:
                # A replacement: the replay of an outage (a resume's, a re-subscribe's) may still
                # be on its way with the old filter, and sent without `since` the events of the
                # outage that only the new filter takes were lost. With `since` the gateway
                # replays what the new filter shows and the old one had not sent (protocol §4),
                # a catch-up keeping each event once.
                self._send_subscribe(sub, self._floor)
                self._start_catchup()
            else:
                self._send_subscribe(sub, None)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            self.unsubscribe(channel, sub)
            raise RealtimeError(0, f"subscription to {channel} not confirmed within {timeout} s: withdrawn",
                                name="timeout", channel=channel) from None
        except asyncio.CancelledError:
            self.unsubscribe(channel, sub)
            raise
        return unsubscribe

    def unsubscribe(self, channel: str, only: object = None) -> None:
        """Stops the subscription on `channel`: sent at once when connected, else on the next
        connection, and again after a resume until the gateway has acknowledged it. A table of
        schema `public` is one channel in either spelling, as at the gateway."""
        key = subscription_key(channel)
        sub = self._subs.get(key)
        if sub is None or (only is not None and sub is not only):
            return
        del self._subs[key]
        _settle(sub.waiters, RealtimeError(0, f"unsubscribed from {sub.channel}", channel=sub.channel))
        if self.state == "closed":
            return
        self._pending_unsubs[key] = None
        if self._authed:
            self._send_unsubscribe(key)  # queued behind what was sent before: order kept

    def events(self, channel: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Events, and `{"type": "history_gap", ...}` notices, from now on (buffered from
        this call, not from the first iteration; one dropped before it is iterated stops
        buffering once garbage-collected). Ends when the client closes; raises the
        terminal RealtimeError, or a `buffer_overflow` one past `max_buffered` unread items.
        Iterating one obtained after the client closed raises a RealtimeError (the terminal
        error, or code 1000 "client closed")."""
        feed = _Feed(channel, self.max_buffered)
        if self.state == "closed":
            feed.end(self._closed_error())
        else:
            self._feeds.add(feed)

        async def iterate() -> AsyncIterator[dict[str, Any]]:
            self._iterated.add(feed)
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
                self._iterated.discard(feed)

        return iterate()

    async def close(self) -> None:
        """Closes for good (the gateway keeps the session resumable for a while)."""
        self._finish(None)
        ws = self._ws
        if ws is not None:
            # A normal closure (1000), as the JS client sends: cancelled inside `async with
            # connect()`, the connection task's websockets closed with 1011 (internal_error),
            # which the gateway's audit trail recorded for every client that closed.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            # Not `await task`: a close() cancelled meanwhile would pass its cancellation to the
            # task and carry on (rtserver.tasks; this module imports nothing of the server's).
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    # ---- the connection loop -------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._callback(self.on_state, state, "on_state")

    def _callback(self, fn: Callable[[Any], Any] | None, arg: Any, name: str) -> None:
        """Calls a user callback; what it raises is logged, never lets the client down."""
        if fn is None:
            return
        try:
            result = fn(arg)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(lambda t: self._callback_done(t, name))
        except asyncio.CancelledError:
            if _cancelling():
                raise
            log.exception("%s callback failed", name, extra={"fields": {"url": self.url}})
        except Exception:
            log.exception("%s callback failed", name, extra={"fields": {"url": self.url}})

    def _callback_done(self, task: asyncio.Future[Any], name: str) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s callback failed", name, exc_info=task.exception(), extra={"fields": {"url": self.url}})

    def _closed_error(self) -> RealtimeError:
        e = self.error
        if e is None:
            return RealtimeError(1000, "client closed")
        return RealtimeError(e.code, str(e), name=e.name, channel=e.channel, terminal=e.terminal)

    async def _token(self) -> object:
        fn = self.get_token
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
            return await fn()
        # A plain function (the README's) may fetch from an identity provider: called in a
        # thread, so that a token service that hangs neither freezes the application's event
        # loop nor escapes open_timeout (it did both, called on the loop).
        token = await asyncio.to_thread(fn)
        if inspect.isawaitable(token):
            token = await token
        return token

    async def _fetch_token(self) -> str | None:
        """A token, or None when get_token failed or has not answered within open_timeout
        (reported to on_error; retried after a backoff): one that never answered (a token
        service's request hanging on a dead link) held the client "reconnecting" for good, with
        nothing reported."""
        try:
            try:
                token = await asyncio.wait_for(self._token(), self.open_timeout)
            except TimeoutError:
                raise TimeoutError(f"get_token did not answer within {self.open_timeout} s") from None
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                raise RuntimeError("get_token was cancelled") from None
            if not isinstance(token, str):
                # None was taken for a failure nobody heard of; bytes failed to encode, each
                # attempt; a number went as the token (with header_auth a terminal 4002). Never
                # the value itself in the message: bytes would print the token.
                raise TypeError(f"get_token returned {type(token).__name__}, not a token (a str)")
            if self.header_auth and not all(" " <= ch <= "~" for ch in token):
                # websockets refuses the header with an error that quotes it, token included.
                raise ValueError("get_token returned a token an Authorization header cannot carry "
                                 "(a control or non-ASCII character: a trailing newline?)")
            return token
        except Exception as exc:
            log.warning("get_token failed", extra={"fields": {"url": self.url, "error": repr(exc)}})
            err = RealtimeError(0, f"get_token failed: {exc!r}", name="token_unavailable")
            err.__cause__ = exc
            self._callback(self.on_error, err, "on_error")
            return None

    async def _run(self) -> None:
        at_once = False  # right after a 4001
        while self.state != "closed":
            self._set_state("connecting" if self.session_id is None and self.attempt == 0 else "reconnecting")
            token = await self._fetch_token()
            if self.state == "closed":
                return
            if token is not None and at_once and not _fresh(token, self._presented):
                # The gateway would refuse it with 4001, or take it and close with 4001 soon.
                log.info("new token expires within %s s: backing off", _FRESH_MARGIN, extra={"fields": {"url": self.url}})
                token = None
            at_once = False
            if token is not None:
                code = await self._connect_once(token)
                if code is None:
                    return  # closed, or stopped for good
                if self._start_fresh:
                    self._start_fresh = False
                    continue
                if code == 4001 and not self._expired_once:
                    self._expired_once = True  # a fresh token, at once; if that fails too, back off
                    at_once = True
                    continue
            delay = self._backoff()
            self.attempt += 1
            self._set_state("reconnecting")
            await asyncio.sleep(delay)

    def _backoff(self) -> float:
        """The wait before the next attempt: backoff_initial doubled per failed attempt up to
        backoff_max (the product's schedule: 1 s, 2 s, 4 s ... 30 s), each up to half as long
        again at random to spread a herd of clients, never shorter than the schedule nor longer than
        backoff_max."""
        base = min(self.backoff_max, self.backoff_initial * 2 ** min(self.attempt, 30))
        return min(self.backoff_max, base * (1 + random.random() / 2))

    async def _connect_once(self, token: str) -> int | None:
        """One connection; its close code, or None when the client is closed or stopped."""
        code = 1006
        closed: tuple[int, str] | None = None  # the close code and reason of a connection that opened
        self._presented = token
        self._refreshed_at = None
        self._auth_timed_out = False
        self._refusal = None
        self._last_invalid = None
        try:
            headers = {"Authorization": f"Bearer {token}"} if self.header_auth else None
            # No max_size: an event frame is as large as its change (a PostgreSQL row can hold
            # megabytes). With a limit, such an event closed the connection from this side (1009),
            # lost what followed it in flight, and came back with every replay.
            async with connect(self.url, additional_headers=headers, open_timeout=self.open_timeout,
                               max_size=None, close_timeout=2) as ws:
                self._ws = ws
                try:
                    await self._serve(ws, token)
                finally:
                    self._ws = None
                    self._authed = False
                code = ws.close_code or 1006
                closed = (code, ws.close_reason or "")
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            # No close frame received: a lost link, or the keepalive's timeout (the reason this
            # side sent says so).
            frame = exc.rcvd if exc.rcvd is not None else exc.sent
            closed = (code, frame.reason if frame is not None else "")
        except InvalidStatus as exc:
            self._upgrade_refused(exc.response)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            log.info("connect failed", extra={"fields": {"url": self.url, "error": _redacted(str(exc), token)}})
            self._connect_failed(exc, token)
        except Exception:  # an unexpected message, say: reconnect rather than stop
            log.exception("connection failed", extra={"fields": {"url": self.url}})
        if self._authed_at is not None and time.monotonic() - self._authed_at >= _HEALTHY_AFTER:
            self._expired_once = False  # a healthy connection: the next 4001 reconnects at once again
        self._authed_at = None
        if self.state == "closed":
            return None
        _keep(self.closes, code)
        refusal, self._refusal = self._refusal, None
        if refusal is not None and refusal.code != code:
            # No close of its own followed it (the link died first, or a 4000 before a 1009):
            # reported as it came, before the close, terminal or not.
            self._callback(self.on_error, refusal, "on_error")
        # The gateway's error before the close, carried in the close's report.
        why = f": {refusal}" if refusal is not None and refusal.code == code else ""
        if not why and code in (1008, 1009) and self._last_invalid:
            why = f": {self._last_invalid}"  # the gateway said why in a 4000 just before
        if code in TERMINAL_CODES and not (code == 4002 and self._auth_timed_out):
            self._finish(RealtimeError(code, f"connection closed: {_CODE_NAMES.get(code, code)}{why}", terminal=True))
            return None
        if closed is not None and code != 4001 and not self._start_fresh:
            self._report_close(code, closed[1], why)
        return code

    def _report_close(self, code: int, reason: str, why: str) -> None:
        """A close that is retried, to on_error once per code until a connection succeeds (as
        _report_retrying does): an application learns why it reconnects (1011: the gateway could
        not check the token, its identity provider out of reach; 1013: it read too slowly; 1001:
        the gateway shut down or found it idle; 4008: a connection quota; 1006: the link died),
        and a quota that holds for an hour is one report, not one per attempt. Its message
        carries the close reason, and (`why`) the gateway's error before the close when one came.
        A 4001 is routine (a fresh token, at once) and not reported here."""
        name = _CODE_NAMES.get(code, "error")
        self._report_retrying(f"close {code}", RealtimeError(code, f"connection closed: {reason or name}{why}; retrying",
                                                             name=name))

    def _connect_failed(self, exc: BaseException, token: str = "") -> None:
        """No WebSocket at all (refused, unreachable, a timeout, no HTTP answer): retried with the
        backoff, and reported to on_error once per distinct failure until a connection succeeds,
        so an application learns why it stays "reconnecting" (the gateway down, a wrong port)."""
        kind = type(exc).__name__  # the same failure's text may vary (an address, a port)
        why = f"{kind}: {_redacted(str(exc), token)}" if str(exc) else kind
        self._report_retrying(kind, RealtimeError(0, f"cannot connect to {self.url}: {why}; retrying",
                                                  name="connect_failed"))

    def _report_retrying(self, kind: int | str, err: RealtimeError) -> None:
        """A failed connect or a close that is retried, to on_error once per `kind` (an HTTP
        status, an exception's name, "close <code>") until a connection succeeds, not at every
        attempt."""
        if kind not in self._refusal_reported:
            self._refusal_reported.add(kind)
            self._callback(self.on_error, err, "on_error")

    def _upgrade_refused(self, response: Response) -> None:
        """An HTTP status instead of the upgrade. 404 before any connection succeeded is a wrong
        URL (the gateway answers it to a malformed workspace id and to any other path,
        PROTOCOL.md §1) that no retry can mend: terminal. Any other status, or a 404 once a
        connection has succeeded (a proxy's during a deploy; the gateway's 503: draining, at its
        connection limit, a Kafka node not ready; a proxy's 502 or 429) is retried with the backoff and reported to on_error
        once per distinct status until a connection succeeds, not at every attempt."""
        status = response.status_code
        body = _refusal_text(response.body)
        detail = f"{self.url} refused the WebSocket upgrade with HTTP {status}" + (f": {body}" if body else "")
        log.info("upgrade refused", extra={"fields": {"url": self.url, "status": status, "body": body}})
        if status == 404 and self.session_id is None:
            # Never connected: the URL is wrong. Once it has worked, a 404 is a proxy's or a load
            # balancer's in the middle of a deploy, and retried like the others.
            self._finish(RealtimeError(status, f"{detail} (a wrong URL: the gateway's is "
                                       "ws[s]://host/workspaces/{workspaceId}/realtime/connect)",
                                       name="upgrade_refused", terminal=True))
        else:
            self._report_retrying(status, RealtimeError(status, f"{detail}; retrying", name="upgrade_refused"))

    async def _write(self, ws: ClientConnection, outbox: asyncio.Queue[str]) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(await outbox.get())

    async def _serve(self, ws: ClientConnection, token: str) -> None:
        outbox: asyncio.Queue[str] = asyncio.Queue()
        self._outbox = outbox
        writer = asyncio.create_task(self._write(ws, outbox))
        refresher: asyncio.Task[None] | None = None
        positions: asyncio.Task[None] | None = None
        try:
            if not self.header_auth:
                msg: dict[str, Any] = {"type": "auth", "token": token}
                if self.session_id is not None and not self._replaced_offline():
                    msg["resume"] = self.session_id
                    if self._floor is not None:
                        msg["since"] = self._floor
                self._send(msg)
            async for raw in ws:
                if self.state == "closed":
                    break  # close() called (by a handler, say): what was read meanwhile goes nowhere
                msg = json.loads(raw)
                if not isinstance(msg, dict):
                    continue
                kind = msg.get("type")
                if kind == "event":
                    await self._on_event(msg)
                elif kind == "auth_ok":
                    if (not self._authed and msg.get("resumed") and msg.get("sessionId") == self.session_id
                            and self._replaced_offline()):
                        # A filter changed after the auth message (with `resume`) left: the
                        # resumed session would replay the outage with the old filter, to the new
                        # handler. Abandoned before any of it is read: a fresh session, at once.
                        self._start_fresh = True
                        return
                    if self._authed:
                        token = self._pending_token or token  # a refresh was accepted
                    else:
                        self._on_auth_ok(msg)
                    if refresher is not None:
                        refresher.cancel()
                    self._presented = token
                    refresher = asyncio.create_task(self._refresh_later(ws, token, self._refreshed_at))
                    if positions is None and self.position_interval > 0:
                        positions = asyncio.create_task(self._ask_positions(ws))
                elif kind == "subscribed":
                    key = _key_of(msg.get("channel"))
                    self._session_channels.add(key)
                    sub = self._subs.get(key)
                    if sub is not None and _answers(msg, sub.sent_id):
                        sub.acked = True
                        _settle(sub.waiters, None)
                    self._at_position(msg.get("seq"))
                elif kind == "unsubscribed":
                    key, mid = _key_of(msg.get("channel")), msg.get("id")
                    self._session_channels.discard(key)
                    if mid is not None and self._pending_unsubs.get(key) == mid:
                        del self._pending_unsubs[key]
                elif kind == "pong":
                    self._position_asked = False
                    if self._marker is not None and msg.get("id") == self._marker:
                        # Every replay asked for is done: all up to last_seq has been delivered
                        # (and up to the floor, which may be higher: a `subscribed` position).
                        self._marker = None
                        self._catchup = None
                        if self.last_seq is not None and (self._floor is None or self.last_seq > self._floor):
                            self._floor = self.last_seq
                    self._at_position(msg.get("seq"))
                elif kind == "error":
                    self._on_error(msg)
        finally:
            self._marker = None
            self._position_asked = False
            if self._outbox is outbox:
                self._outbox = None
            writer.cancel()
            if refresher is not None:
                refresher.cancel()
            if positions is not None:
                positions.cancel()

    def _on_auth_ok(self, msg: dict[str, Any]) -> None:
        self._authed = True
        self._authed_at = time.monotonic()
        self._refusal = None
        self.attempt = 0
        self._refusal_reported.clear()
        resumed = bool(msg.get("resumed")) and msg.get("sessionId") == self.session_id
        self.session_id = msg.get("sessionId")
        _keep(self.resumed, resumed)
        self._set_state("open")
        if resumed:
            for channel in sorted(self._pending_unsubs):
                self._send_unsubscribe(channel)  # the resumed session has it back
        else:
            self._pending_unsubs.clear()  # a new session has no subscriptions
            self._session_channels.clear()
        since = self._floor
        for sub in list(self._subs.values()):
            if resumed and sub.acked:
                continue  # restored by the gateway
            # A new session, or subscribed (or changed) while disconnected: ask for what was
            # missed since the last event seen, so the outage is replayed (or a gap reported).
            self._send_subscribe(sub, since)
            if since is not None and self._catchup is None:
                self._catchup = set()
        if resumed and since is not None and self._catchup is None:
            # The resume's own replay is a catch-up too: `_floor` stays where it asked from
            # until the replay is done, so a filter replaced meanwhile asks from there.
            self._catchup = set()
        if self._catchup is not None:
            self._start_catchup()
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _start_catchup(self) -> None:
        """A catch-up until the pong of a ping sent now (after every replay asked for so far)."""
        if self._catchup is None:
            self._catchup = set()
        self._ids += 1
        self._marker = f"catchup-{self._ids}"
        self._send({"type": "ping", "id": self._marker})

    def _at_position(self, seq: object) -> None:
        """The `seq` of a `subscribed` reply or a `pong`: the position the gateway's stream had
        reached when it sent it. The connection's frames come in order, so every event up to it
        that matches the subscriptions came before; outside a catch-up (whose replays follow
        their replies) `_floor` moves up to it. Before the first event it is what a resume asks
        `since`: without it the events in flight when the link died were lost; and a quiet
        subscription in a busy workspace would ask from before what the history holds (a
        history_gap at each reconnect, for nothing)."""
        if isinstance(seq, int) and self._catchup is None and (self._floor is None or seq > self._floor):
            self._floor = seq

    def _ask_position(self) -> None:
        """A ping after a history_gap: its pong's position (_at_position) is past what the gap
        told. A source's loss (§7) comes with the history's first event as `oldest`, before
        what the client has, so _floor stayed before the loss: every resume until the next
        event or position ping asked from there and the application was told the loss again.
        In a catch-up its closing pong does the same."""
        if self._catchup is None and not self._position_asked:
            self._position_asked = True
            self._send({"type": "ping"})

    async def _ask_positions(self, ws: ClientConnection) -> None:
        """A ping every position_interval; its pong carries the stream position (_at_position)."""
        while True:
            await asyncio.sleep(self.position_interval)
            if self._ws is ws and self._catchup is None:
                self._send({"type": "ping"})

    async def _refresh_later(self, ws: ClientConnection, token: str, refreshed_at: float | None) -> None:
        """Refreshes `token` in-band when _refresh_delay says; `refreshed_at` (monotonic): when
        the last refresh on this connection started, None before the first."""
        self._pending_token = None
        if not self.proactive_refresh:
            return
        since = time.monotonic() - refreshed_at if refreshed_at is not None else None
        delay = _refresh_delay(token, self.refresh_margin, since)
        if delay is None:
            return
        await asyncio.sleep(delay)
        exp, _ = _token_times(token)
        retry = self.backoff_initial
        while True:
            self._refreshed_at = time.monotonic()
            fresh = await self._fetch_token()  # a failure goes to on_error, as at connect
            if fresh is not None:
                break
            # Tried again with the backoff while the token lasts: one failure of the token
            # service cost a disconnect (the 4001 at exp, then a reconnect).
            if exp is None or exp - time.time() <= retry:
                return  # the gateway closes with 4001 at exp; we reconnect then
            await asyncio.sleep(retry)
            retry = min(retry * 2, self.backoff_max)
        if self._ws is ws:
            self._pending_token = fresh
            self._ids += 1
            self._send({"type": "auth", "token": fresh, "id": f"refresh-{self._ids}"})

    async def _on_event(self, msg: dict[str, Any]) -> None:
        seq = msg.get("seq")
        if isinstance(seq, int):
            # Drop duplicates (the rule is in the class docstring).
            if self._catchup is not None:
                if (self._floor is not None and seq <= self._floor) or seq in self._catchup:
                    return
                self._catchup.add(seq)
            elif self.last_seq is not None and seq <= self.last_seq:
                return
            else:
                self._floor = seq
            if self.last_seq is None or seq > self.last_seq:
                self.last_seq = seq
        channel = msg.get("channel", "")
        subs = [sub for sub in self._subs.values() if channel_matches(sub.channel, channel, sub.filter)]
        if not subs:
            # For a channel the application has left: in flight when it unsubscribed, or
            # replayed by a resumed session that had it back before the unsubscribe arrived.
            return
        for sub in subs:
            if self.state == "closed":
                return  # a handler of this event closed the client
            # Not to one that a handler of this event unsubscribed (or replaced): "nothing is
            # delivered for a channel once unsubscribe() is called".
            if sub.on_event is not None and self._subs.get(subscription_key(sub.channel)) is sub:
                try:
                    result = sub.on_event(msg)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    # The handler's own (it awaited a future someone else cancelled), unless this
                    # task is being cancelled (close()): it ended the connection task silently.
                    if _cancelling():
                        raise
                    log.exception("event handler failed", extra={"fields": {"channel": sub.channel}})
                except Exception:  # a handler's bug must not cost the connection
                    log.exception("event handler failed", extra={"fields": {"channel": sub.channel}})
        for feed in list(self._feeds):
            feed.push(msg, self._subs)

    def _on_error(self, msg: dict[str, Any]) -> None:
        code = msg.get("code", 0)
        channel = msg.get("channel")
        if code == 4011:
            oldest = msg.get("oldest")
            if isinstance(oldest, int) and (self._floor is None or oldest - 1 > self._floor):
                # The history holds nothing before `oldest` (no replay can bring it) and the
                # application has been told: the next resume asks from there, else it got the
                # same gap again after every reconnect until an event came.
                self._floor = oldest - 1
            self._ask_position()
            if self._left(channel):
                return  # replayed for a channel the client has left (a resumed session had it back)
            sub = self._subs.get(_key_of(channel))
            gap = {"type": "history_gap", "code": 4011, "channel": sub.channel if sub is not None else channel,
                   "oldest": msg.get("oldest"), "message": msg.get("message")}
            self._callback(self.on_gap, gap, "on_gap")
            for feed in list(self._feeds):
                feed.push(gap, self._subs)
            return
        if code == 4000:
            self._last_invalid = str(msg.get("message", ""))
        if code == 4002 and not self._authed and msg.get("message") == "auth timeout":
            # Our auth message came too late (a frozen process, a stalled link), not a bad
            # token: the close 4002 that follows is retried with the backoff, not the end.
            self._auth_timed_out = True
        sub = self._refused(msg) if code in _SUBSCRIPTION_REFUSALS else None
        if sub is None and code in _SUBSCRIPTION_REFUSALS and self._left(channel):
            # The refusal of a subscribe the client has withdrawn: the application left the
            # channel, or the client dropped it on a refusal already reported (a resume's 4010
            # for a table no longer published, then the answer to the subscribe of the same
            # channel changed while disconnected: one channel, reported twice).
            return
        err = RealtimeError(code, msg.get("message", ""), name=msg.get("name"),
                            channel=sub.channel if sub is not None else channel)
        if not self._authed and sub is None and not channel and msg.get("id") is None and code != 4001:
            # Why the gateway refuses the connection; its close follows: on_error gets that
            # close once, this reason in its message (terminal: it got both, and the error
            # connect() raised said only "connection closed: token_invalid"; retried, as 4008
            # over a connection quota: it got this error at every attempt). A 4001 (a token
            # expired at connect) is reported as it comes, as ever: the client gets a fresh one.
            if self._refusal is not None:
                # No close followed that one (a 4000 for a malformed auth message: the connection
                # stays open until the auth timeout): reported as it came, not replaced unheard.
                self._callback(self.on_error, self._refusal, "on_error")
            self._refusal = err
            return
        if sub is not None:
            # Refused: not retried, and unsubscribed at the gateway too, which keeps a
            # subscription whose replacement it refuses (events nobody receives, a quota slot).
            _settle(sub.waiters, err)
            self.unsubscribe(sub.channel, sub)
        self._callback(self.on_error, err, "on_error")

    def _replaced_offline(self) -> bool:
        """Whether a subscription the gateway's session holds has a filter (or handler) the
        gateway has not acknowledged: changed while disconnected, or its subscribe unanswered
        when the link died. Resumed, the session would replay the outage on that channel with
        the filter it holds, before the new subscribe arrived, to the new handler (and the
        gateway does not replay again what the replaced subscription delivered): a fresh
        session, every subscription sent with `since`, delivers what the new filter takes."""
        return any(not sub.acked and key in self._session_channels for key, sub in self._subs.items())

    def _left(self, channel: object) -> bool:
        """Whether `channel` (as a gateway message names it) is one the client has unsubscribed
        and not subscribed again, its unsubscribe not yet acknowledged."""
        key = _key_of(channel)
        return bool(channel) and key in self._pending_unsubs and key not in self._subs

    def _refused(self, msg: dict[str, Any]) -> _Subscription | None:
        """The subscription an error answers: by channel, or by id (a bad filter's 4000 has no channel)."""
        channel, mid = msg.get("channel"), msg.get("id")
        if channel:
            sub = self._subs.get(_key_of(channel))
            return sub if sub is not None and _answers(msg, sub.sent_id) else None
        if mid is not None:
            return next((s for s in self._subs.values() if s.sent_id == mid), None)
        return None

    def _send_subscribe(self, sub: _Subscription, since: int | None) -> None:
        sub.acked = False
        self._ids += 1
        sub.sent_id = f"sub-{self._ids}"
        msg: dict[str, Any] = {"type": "subscribe", "channel": sub.channel, "id": sub.sent_id}
        if sub.filter:
            msg["filter"] = sub.filter
        if since is not None:
            msg["since"] = since
        self._send(msg)

    def _send_unsubscribe(self, channel: str) -> None:
        self._ids += 1
        mid = f"unsub-{self._ids}"
        self._pending_unsubs[channel] = mid
        self._send({"type": "unsubscribe", "channel": channel, "id": mid})

    def _send(self, msg: dict[str, Any]) -> None:
        """Queues `msg` on the current connection: messages leave in the order of the calls."""
        if self._outbox is not None:
            self._outbox.put_nowait(_dumps(msg))

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
        self._pending_unsubs.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(closed)
            self._ready.add_done_callback(_retrieve)
        if error is not None:
            self._callback(self.on_error, error, "on_error")


def _dumps(msg: dict[str, Any]) -> str:
    """`msg` as sent: compact UTF-8 JSON, as the JS client writes it. json.dumps' defaults (", "
    and ": " separators, \\uXXXX for every non-ASCII character) made a subscribe up to three times
    the JS client's size, refused as message_too_big (max_message_bytes) where the gateway takes
    the JS client's. A string UTF-8 cannot carry (a lone surrogate) is escaped as before."""
    text = json.dumps(msg, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(msg, separators=(",", ":"))
    return text


def _redacted(text: str, token: str) -> str:
    """`text` without `token` (an error quoting the Authorization header, say)."""
    return text.replace(token, "[token]") if token else text


def _cancelling() -> bool:
    """Whether the current task is being cancelled (close(), a caller's timeout), as opposed to
    a CancelledError some callback raised of its own."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _keep(entries: list[Any], entry: Any) -> None:
    entries.append(entry)
    if len(entries) > _KEPT:
        del entries[0]


def _fresh(token: str, expired: str | None) -> bool:
    """Whether `token` is fresh enough to reconnect with at once after the 4001 that ended
    `expired` (the token the gateway last took): its `exp` more than _FRESH_MARGIN past that
    one's, at which the gateway closed by its own clock. The local clock may be off the
    issuer's (ahead: every fresh token looked stale, a needless backoff after each 4001); it is
    used only when a token has no `exp` to compare."""
    exp = token_expiry(token)
    if exp is None:
        return True
    before = token_expiry(expired) if expired is not None else None
    if before is not None:
        return exp - before > _FRESH_MARGIN
    return exp - time.time() > _FRESH_MARGIN


def _key_of(channel: object) -> object:
    """The subscription_key of a channel a gateway message names (anything else as it is)."""
    return subscription_key(channel) if isinstance(channel, str) else channel


def _answers(msg: dict[str, Any], sent_id: str | None) -> bool:
    """Whether a reply is to the last message sent for a channel (not to an earlier one)."""
    mid = msg.get("id")
    return mid is None or mid == sent_id


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
        fut.exception()  # mark retrieved: a refusal nobody awaits any more is reported via on_error
