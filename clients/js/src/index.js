// @rtserver/client: a WebSocket client for the rtserver realtime gateway (docs/protocol.md).
//
// Works in browsers (no dependencies) and in Node.js (uses the `ws` package when
// globalThis.WebSocket is missing, or when header authentication is asked for).
// It authenticates, keeps subscriptions alive across reconnects (resuming the session with
// the last seen `seq`, or re-subscribing with `since` when the session is gone, or when a
// subscription was made or changed while disconnected; a filter changed while disconnected
// makes it start a fresh session: resumed, the session would replay the outage with the old
// filter), delivers each event once, refreshes
// the token before it expires (on a schedule a device clock off the issuer's cannot turn into a
// loop: refreshDelay), reconnects at once with a new token on 4001 (unless that token's `exp`
// is within 5 s of the one the gateway closed at, or the 4001 ends a connection itself opened
// at once after a 4001 that lasted less than 5 s: then it backs off),
// backs off exponentially on other failures (a connection attempt that does not open within
// openTimeoutMs counts as one, and so does an HTTP status instead of the upgrade (but a 404
// before any connection succeeded),
// reported once per status; a close it retries is reported once per close code until a
// connection succeeds: _reportClose) and stops on terminal codes (4002 token_invalid, 4003
// scope_denied, 1008 policy_violation, 1009 message_too_big; but a 4002 after the error "auth
// timeout", which says the auth message came too late, is retried), and on HTTP 404 to the upgrade
// before any connection succeeded (a wrong URL; seen only with the `ws` package), with a
// RealtimeError.
//
// rtserver/static/rtclient.js is a verbatim copy of this file (the demo page loads it);
// tests/test_js_client.py checks that the two stay identical.

/** Close codes after which reconnecting cannot help: the token or the grant is wrong, or the
 * client sends what the gateway refuses (and would send it again). */
export const TERMINAL_CODES = Object.freeze([4002, 4003, 1008, 1009]);

const CODE_NAMES = {
  1000: "normal_closure", 1001: "going_away", 1002: "protocol_error", 1006: "abnormal_closure", 1008: "policy_violation",
  1009: "message_too_big", 1011: "internal_error", 1013: "try_again_later", 4000: "invalid_message",
  4001: "token_expired", 4002: "token_invalid", 4003: "scope_denied", 4008: "quota_exceeded",
  4010: "channel_unavailable", 4011: "history_gap",
};

/** An error from the gateway (a close code or an error message), or from the client. */
export class RealtimeError extends Error {
  constructor(code, message, details = {}) {
    super(message || CODE_NAMES[code] || `error ${code}`);
    this.name = "RealtimeError";
    this.code = code;
    this.codeName = details.name || CODE_NAMES[code] || "error";
    this.channel = details.channel;
    this.terminal = Boolean(details.terminal);
  }
}

// What subscribe() returns for a subscription it refuses before registering it: an
// unsubscribe that has nothing to do, whose `ready` rejects with `error`.
function refusedSubscription(error) {
  const ready = Promise.reject(error);
  ready.catch(() => {});
  const unsubscribe = () => {};
  unsubscribe.ready = ready;
  return unsubscribe;
}

const utf8 = new TextEncoder();
function utf8Length(text) {
  return utf8.encode(text).length;
}

/** Decodes the `exp` claim (seconds since the epoch) of a JWT without verifying it. */
export function tokenExpiry(token) {
  return tokenTimes(token).exp;
}

// The `exp` and `iat` claims of a JWT (not verified), each null when absent.
function tokenTimes(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "===".slice((b64.length + 3) % 4);
    const json = typeof atob === "function"
      ? decodeURIComponent(Array.from(atob(padded), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""))
      : globalThis.Buffer.from(padded, "base64").toString("utf8");
    const { exp, iat } = JSON.parse(json);
    return { exp: typeof exp === "number" ? exp : null, iat: typeof iat === "number" ? iat : null };
  } catch {
    return { exp: null, iat: null };
  }
}

/**
 * Whether an event on concrete `eventChannel` belongs to a subscription on `channel`, as the
 * gateway matches: a `*` channel narrowed by `filter.entity` to that one name, and names
 * compared whole (a topic or collection may hold dots: `events:*` with entity `created` is not
 * `events:order.created`), a PostgreSQL table of schema `public` with or without the schema
 * (events name it without).
 */
export function channelMatches(channel, eventChannel, filter) {
  // a history_gap notice names the subscription's channel as written
  if (subscriptionKey(channel) === subscriptionKey(eventChannel)) return true;
  const i = channel.indexOf(":");
  const j = eventChannel.indexOf(":");
  const kind = channel.slice(0, i);
  if (i < 0 || j < 0 || kind !== eventChannel.slice(0, j)) return false;
  let name = channel.slice(i + 1);
  if (name === "*") {
    name = filter && filter.entity;
    if (!name) return true;
  }
  return canonical(kind, name) === eventChannel.slice(j + 1);
}

// A channel's name as the gateway writes it in events (rtserver/channels.py canonical_entity).
function canonical(kind, name) {
  const rest = name.slice(7);
  return kind === "postgres" && name.startsWith("public.") && !rest.includes(".") && rest !== "" && rest !== "*"
    ? rest : name;
}

/**
 * The subscription `channel` is at the gateway (rtserver/channels.py subscription_key): a table
 * of schema `public` is one channel in either spelling, `postgres:orders` and
 * `postgres:public.orders`. Keyed as written, the client kept two subscriptions where the
 * gateway kept one: the replaced filter's onEvent still got the table's events, and an
 * unsubscribe in one spelling left the other registered, subscribed again after a reconnect.
 */
export function subscriptionKey(channel) {
  const i = channel.indexOf(":");
  const kind = channel.slice(0, i);
  const name = channel.slice(i + 1);
  if (i < 0 || kind !== "postgres" || name === "*") return channel;
  return `${kind}:${canonical(kind, name)}`;
}

// The subscriptionKey of a channel a gateway message names (anything else as it is).
function keyOf(channel) {
  return typeof channel === "string" ? subscriptionKey(channel) : channel;
}

const MAX_TIMER_MS = 2 ** 31 - 1;
// After a 4001 the client reconnects at once with a new token, but only when that token is
// fresh (its `exp` more than FRESH_MARGIN_MS past the one the gateway closed at, see isFresh:
// the gateway refuses a token past `exp` with 4001, as it closes at `exp`) and only
// once until a connection has been healthy (authenticated for HEALTHY_AFTER_MS): otherwise it
// backs off.
const FRESH_MARGIN_MS = 5000;
const HEALTHY_AFTER_MS = 5000;
// After an in-band refresh the next one waits at least this share of the token's lifetime: a
// device clock ahead of the issuer's then costs at most four refreshes per lifetime instead of
// a loop, and each fresh token is still replaced with three quarters of its life left. With an
// accurate clock the schedule never comes this soon (75% of the time left at the earliest).
const REFRESH_SPACING = 0.25;
const REFRESH_FLOOR_MS = 10000; // the same for a token without `iat`, whose lifetime is unknown
const MIN_REFRESH_GAP_MS = 1000; // the gateway's limits.min_refresh_interval: a sooner one waits there

// Whether `token` is fresh enough to reconnect with at once after the 4001 that ended
// `expired` (the connection's token): its `exp` more than FRESH_MARGIN_MS past that one's, at
// which the gateway closed by its own clock. The local clock may be off the issuer's (ahead:
// every fresh token looked stale, a needless backoff after each 4001); it is used only when a
// token has no `exp` to compare.
function isFresh(token, expired) {
  const exp = tokenExpiry(token);
  if (exp === null) return true;
  const before = expired ? tokenExpiry(expired) : null;
  if (before !== null) return (exp - before) * 1000 > FRESH_MARGIN_MS;
  return exp * 1000 - Date.now() > FRESH_MARGIN_MS;
}

// Milliseconds until the in-band refresh of `token`, just received; null: it has no `exp`.
// Due `marginMs` before `exp` by the local clock (but not before 75% of the time left has passed),
// but the local clock may be off the issuer's, which set `exp` and `iat`:
// - behind: the time left is taken as the token's lifetime (`exp - iat`) at most;
// - ahead: every fresh token looks about to expire, or expired (a device 400 s fast, 300 s
//   tokens), and was refreshed as fast as the gateway answered, for good: a token request and
//   an audit record at the gateway each. So a refresh never comes sooner than REFRESH_SPACING
//   of the lifetime after the previous one on the connection (`sinceRefreshMs` ago), or
//   REFRESH_FLOOR_MS without `iat`, and never sooner than the gateway's own pace. The first
//   refresh on a connection is not held back: a token that really is near its end (from a
//   cache) is replaced in time.
function refreshDelay(token, marginMs, sinceRefreshMs) {
  const { exp, iat } = tokenTimes(token);
  if (exp === null) return null;
  const lifetime = iat !== null && exp > iat ? (exp - iat) * 1000 : null;
  let remaining = exp * 1000 - Date.now();
  if (lifetime !== null) remaining = Math.min(remaining, lifetime);
  let delay = Math.max(remaining - marginMs, remaining * 0.75, 0);
  if (sinceRefreshMs !== null) {
    const spacing = Math.max(MIN_REFRESH_GAP_MS, lifetime !== null ? lifetime * REFRESH_SPACING : REFRESH_FLOOR_MS);
    delay = Math.max(delay, spacing - sinceRefreshMs);
  }
  return delay;
}

// A clock for intervals that the wall clock's jumps do not move.
function monotonicMs() {
  return typeof performance === "object" && performance ? performance.now() : Date.now();
}

// A failing getToken, reported as the Python client does: a RealtimeError named
// "token_unavailable" (code 0) whose `cause` is what getToken threw. The client retries.
function tokenUnavailable(err) {
  const error = new RealtimeError(0, `getToken failed: ${err instanceof Error ? err.message : String(err)}`,
    { name: "token_unavailable" });
  error.cause = err;
  return error;
}

// getToken's result when it is a token: anything else throws (reported as "token_unavailable",
// retried), as the Python client refuses anything but a str. Sent as it was, undefined or null (an
// unset variable, an empty response) got a 4000 and the gateway's 10 s auth timeout at every
// attempt, and with headerAuth "Bearer undefined" a terminal 4002; a token with a character a
// header cannot carry (a trailing newline from a file) made `ws` throw, a terminal "error". The
// message names the type or the fault, never the token.
function checkedToken(token, headerAuth) {
  if (typeof token !== "string") {
    throw new TypeError(`getToken returned ${token === null ? "null" : typeof token}, not a token (a string)`);
  }
  if (headerAuth && !/^[\x20-\x7e]*$/.test(token)) {
    throw new TypeError("getToken returned a token an Authorization header cannot carry "
      + "(a control or non-ASCII character: a trailing newline?)");
  }
  return token;
}

// What a listener (an onEvent callback, an on() listener) throws is reported and goes no
// further, as in the Python client: it must not cost the connection, nor the application (thrown
// again from a timer, it was an uncaught exception, which ends a Node.js process). Browsers
// report it like an uncaught error (window "error" event, console); elsewhere console.error.
function reportListenerError(err) {
  if (typeof globalThis.window === "object" && typeof globalThis.reportError === "function") globalThis.reportError(err);
  else console.error("rtclient: a listener failed:", err);
}

// Calls a listener; what it throws, or the promise it returns rejects with (an async
// listener: unhandled, such a rejection also ends a Node.js process), is reported.
function callListener(fn, value) {
  try {
    const result = fn(value);
    if (result && typeof result.then === "function") result.then(undefined, reportListenerError);
  } catch (err) {
    reportListenerError(err);
  }
}

// A JSON.stringify replacer that refuses what JSON has no number for (NaN, Infinity).
function finiteOnly(key, value) {
  if (typeof value === "number" && !Number.isFinite(value)) {
    throw new TypeError(`filter: ${value} at ${JSON.stringify(key)} is no JSON number`);
  }
  return value;
}

// Whether a reply is to the last message sent for a channel (not to an earlier one).
function answers(msg, sentId) {
  return msg.id === undefined || msg.id === null || msg.id === sentId;
}

// What an HTTP refusal of the upgrade says, for the error: the gateway's JSON `error`, or the
// start of another server's (a proxy's) body.
function refusalText(body) {
  let text = body.trim();
  if (text.startsWith("{")) {
    try {
      const error = JSON.parse(text).error;
      if (typeof error === "string") text = error;
    } catch { /* not JSON: shown as it came */ }
  }
  return text.slice(0, 200);
}

class Subscription {
  constructor(channel, filter, onEvent) {
    this.channel = channel;
    this.filter = filter || null;
    this.onEvent = onEvent || null;
    this.acked = false; // the gateway confirmed it on the current session
    this.sentId = null; // id of the last subscribe sent for it: its answer echoes it
    this.waiters = [];
  }
}

// Duplicates. Live, the gateway sends a connection each event once, in `seq` order. Replays
// break that order: after a reconnect, every subscription the gateway does not restore (all of
// them on a fresh session; on a resumed one those made or changed while disconnected) is sent
// again with `since`, and each such subscribe replays its own channel from `since` while the
// subscriptions already in place deliver live events: an event that matches two subscriptions
// comes twice, and seqs interleave. The rule that keeps each event once:
// - `floor`: every event up to this seq that matches the subscriptions has been delivered. It
//   is the `since` of the resume and of every re-subscribe.
// - Outside a catch-up events arrive in seq order, so one at or below the last delivered seq is
//   a duplicate, dropped; otherwise `floor` follows the events, and the `seq` of a `subscribed`
//   reply (the stream position it took effect at) or of a `pong` when that is higher.
// - Sending a subscribe with `since` starts a catch-up: `floor` stays put, events at or below
//   it are dropped, the seqs delivered above it are kept in `catchup` and one already there is
//   dropped. After the subscribes the client sends a ping with an id; the gateway handles a
//   connection's messages in order, replays included, so its pong comes after every replay:
//   `floor` moves to the highest seq delivered and the set is cleared. The set thus holds at
//   most one replay window (what the gateway's history holds after `floor`, plus the live
//   events of the catch-up). A connection lost during a catch-up keeps both; the next one asks
//   again from the same `floor` and sends a new ping.

/**
 * A connection to the gateway that reconnects by itself. See index.d.ts for the options.
 */
export class RealtimeClient {
  constructor(options) {
    if (!options || !options.url || typeof options.getToken !== "function") {
      throw new TypeError("connect({url, getToken}) needs a url and a getToken function");
    }
    this.url = options.url;
    this.getToken = options.getToken;
    this.headerAuth = Boolean(options.headerAuth);
    this.WebSocketImpl = options.WebSocket || null;
    this.backoffInitial = options.backoffInitialMs ?? 1000;
    this.backoffMax = options.backoffMaxMs ?? 30000;
    this.refreshMargin = options.refreshMarginMs ?? 30000;
    this.proactiveRefresh = options.proactiveRefresh ?? true;
    this.pingInterval = options.pingIntervalMs ?? 25000;
    this.pongTimeout = options.pongTimeoutMs ?? 10000;
    this.maxBuffered = options.maxBufferedEvents ?? 10000;
    this.maxMessageBytes = options.maxMessageBytes ?? 65536; // the gateway's limits.max_message_bytes
    this.openTimeout = options.openTimeoutMs ?? 10000;

    this.state = "idle"; // idle | connecting | open | reconnecting | closed
    this.sessionId = null;
    this.lastSeq = null; // the highest seq delivered
    this.floor = null; // see "Duplicates" above
    this.catchup = null;
    this.marker = null; // id of the ping that ends the catch-up
    this.positionAsked = false; // a ping sent after a history_gap, its pong not yet here
    // By subscriptionKey: one per channel as the gateway counts them, each keeping the spelling
    // the application subscribed with (sent, and named in what "error" gets).
    this.subs = new Map();
    // Unsubscribes the gateway has not acknowledged: subscriptionKey -> id of the one sent (null:
    // not sent yet; sent under the key, which the gateway takes as the channel). A resumed
    // session gets its channels back, so they are sent again.
    this.pendingUnsubs = new Map();
    // subscriptionKeys the gateway's session holds a subscription on (it answered a subscribe,
    // and no unsubscribe since): a resume restores them with their filters.
    this.sessionChannels = new Set();
    this.listeners = new Map();
    this.iterators = new Set(); // WeakRefs to the events() iterators' feeds
    this.iterated = new Set(); // the feeds being iterated
    this.ws = null;
    this.attempt = 0;
    this.expired = false; // reconnected at once after a 4001 since the last healthy connection
    this.authedAt = null;
    this.refreshedAt = null;
    this.pendingToken = null;
    // What failed connects and retried closes reported (HTTP statuses, connect_failed kinds,
    // "close <code>"), until a connection succeeds: each kind once (all of them: with the last
    // one only, two failures taking turns, a quota close and a 503, were reported at every attempt).
    this.refusalReported = new Set();
    this.opened = false; // the current WebSocket has opened
    this.skipResume = false; // the next connection starts a fresh session (a resume abandoned at its auth_ok)
    this.timers = { retry: null, refresh: null, ping: null, open: null, token: null };
    this.nextId = 1;
    this.closedByUser = false;
    this.error = null;

    this._readyResolve = null;
    this.ready = new Promise((resolve, reject) => { this._readyResolve = resolve; this._readyReject = reject; });
    this.ready.catch(() => {});
    this.closed = new Promise((resolve, reject) => { this._closedResolve = resolve; this._closedReject = reject; });
    this.closed.catch(() => {});
  }

  // ---- public API ----------------------------------------------------------------------

  /** Listen to "state", "event", "gap", "error", "open", "close"; returns a remover. */
  on(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(fn);
    return () => this.listeners.get(name)?.delete(fn);
  }

  /**
   * Subscribes to `channel` (replacing an earlier filter on it). Returns the unsubscribe
   * function; its `ready` promise settles when the gateway confirms (waiting across
   * reconnects: a subscription not confirmed before a link loss is sent again, with `since`)
   * or refuses, or when the client closes. After close() or a terminal error, `ready` rejects.
   */
  subscribe(channel, filter, onEvent) {
    if (typeof filter === "function" && onEvent === undefined) { onEvent = filter; filter = null; }
    if (typeof channel !== "string") { // it failed deep inside ("reading 'indexOf'"), naming no argument
      throw new TypeError(`channel must be a string such as "events:orders", not ${channel === null ? "null" : typeof channel}`);
    }
    if (this.state === "closed") return refusedSubscription(this._closedError());
    // A filter JSON cannot carry (a BigInt, a cycle) throws here, before it is registered:
    // registered, it failed every connection's re-subscribe. NaN and Infinity too, which
    // JSON.stringify would write as null: a filter that silently matched nothing. Kept as a
    // copy: the application's object, changed later (a template reused for the next
    // subscribe), changed what a reconnect sends.
    const json = JSON.stringify(filter, finiteOnly);
    filter = json === undefined ? null : JSON.parse(json);
    // Over the gateway's message limit a subscribe is answered 4000 and a close 1009, which ends
    // the client with every other subscription: one with a large `$in` closed it for good. That
    // subscribe alone is refused, before it is registered (the largest id and since it may carry).
    const size = utf8Length(JSON.stringify({ type: "subscribe", channel, id: `sub-${Number.MAX_SAFE_INTEGER}`,
      filter, since: Number.MAX_SAFE_INTEGER }));
    if (size > this.maxMessageBytes) {
      return refusedSubscription(new RealtimeError(1009,
        `subscribe to ${channel}: a message of ${size} bytes, over the gateway's ${this.maxMessageBytes}-byte limit `
        + "(limits.max_message_bytes)", { name: "message_too_big", channel }));
    }
    const key = subscriptionKey(channel); // the other spelling of a public table is replaced too
    const old = this.subs.get(key);
    const sub = new Subscription(channel, filter, onEvent);
    if (old) sub.waiters = old.waiters.splice(0);
    this.subs.set(key, sub);
    this.pendingUnsubs.delete(key);
    const ready = new Promise((resolve, reject) => sub.waiters.push({ resolve, reject }));
    ready.catch(() => {});
    if (this.state === "open" && this.authed) {
      if (old && this.floor !== null) {
        // A replacement: the outage's replay (a resume's, or a re-subscribe's with since) may still
        // be coming with the old filter. Sent with `since`, the gateway replays what the new filter
        // shows and the old one had not sent; a new catch-up marker keeps each event once.
        this._sendSubscribe(sub, this.floor);
        this._startCatchup();
      } else {
        this._sendSubscribe(sub, null);
      }
    } // else on the next auth_ok
    if (this.state === "idle") this._start();
    const unsubscribe = () => this.unsubscribe(channel, sub);
    unsubscribe.ready = ready;
    return unsubscribe;
  }

  /**
   * Stops the subscription on `channel`: sent at once when connected, else on the next
   * connection, and again after a resume until the gateway has acknowledged it. A table of
   * schema `public` is one channel in either spelling, as at the gateway.
   */
  unsubscribe(channel, only) {
    const key = subscriptionKey(channel);
    const sub = this.subs.get(key);
    if (!sub || (only && sub !== only)) return;
    this.subs.delete(key);
    for (const w of sub.waiters.splice(0)) {
      w.reject(new RealtimeError(0, `unsubscribed from ${sub.channel}`, { channel: sub.channel }));
    }
    if (this.state === "closed") return;
    this.pendingUnsubs.set(key, null);
    if (this.state === "open" && this.authed) this._sendUnsubscribe(key);
  }

  /**
   * Events (and `history_gap` notices) as an async iterator, optionally for one channel.
   * Bounded: past `maxBufferedEvents` unread items the iterator throws a RealtimeError.
   * One obtained after close() or a terminal error throws a RealtimeError when iterated.
   */
  events(channel) {
    const client = this;
    const queue = [];
    // The next() calls waiting for an item: each is woken to look again (the protocol allows
    // several pending at once; with one slot, a second call took the first one's wake-up).
    let waiting = [];
    const wakeAll = () => { const w = waiting; waiting = []; for (const resolve of w) resolve(); };
    let done = false;
    let failure = null;
    if (this.state === "closed") { done = true; failure = this._closedError(); }
    const it = {
      push(item) {
        if (done) return;
        if (channel && item.channel
          && !channelMatches(channel, item.channel, client.subs.get(subscriptionKey(channel))?.filter)) return;
        if (queue.length >= client.maxBuffered) {
          failure = new RealtimeError(0, `event iterator overflow: more than ${client.maxBuffered} unread events`,
            { name: "buffer_overflow" });
          done = true;
        } else {
          queue.push(item);
        }
        wakeAll();
      },
      end(err) {
        if (done) return;
        done = true;
        failure = err || null;
        wakeAll();
      },
    };
    // Held weakly until iterated (where WeakRef exists): an iterator the application drops
    // without iterating it must not keep buffering. One being iterated is held (this.iterated):
    // a loop suspended in next() may have no other reference than its wake-up in `it`.
    const ref = typeof WeakRef === "function" ? new WeakRef(it) : { deref: () => it };
    if (!done) this.iterators.add(ref);
    if (this.state === "idle") this._start();
    const stop = () => {
      client.iterators.delete(ref);
      client.iterated.delete(it);
    };
    return {
      [Symbol.asyncIterator]() { return this; },
      async next() {
        for (;;) {
          if (queue.length) return { value: queue.shift(), done: false };
          if (done) {
            stop();
            if (failure) { const f = failure; failure = null; throw f; }
            return { value: undefined, done: true };
          }
          client.iterated.add(it); // held while it waits: its loop may have no other reference
          await new Promise((resolve) => { waiting.push(resolve); });
          if (!waiting.length) client.iterated.delete(it);
        }
      },
      async return() {
        // Ends the iterator, also for a next() pending on it (stopped from outside the loop),
        // which nothing would wake otherwise: close() no longer sees the iterator.
        done = true;
        failure = null;
        queue.length = 0;
        stop();
        wakeAll();
        return { value: undefined, done: true };
      },
    };
  }

  /** The events() iterators still held by the application (or being iterated). */
  _liveIterators() {
    const live = [];
    for (const ref of this.iterators) {
      const it = ref.deref();
      if (it) live.push(it); else this.iterators.delete(ref);
    }
    return live;
  }

  /** Closes for good (the session stays resumable on the server for a while). */
  close() {
    this.closedByUser = true;
    this._finish(null);
  }

  // ---- connection lifecycle ------------------------------------------------------------

  _closedError() {
    const e = this.error;
    if (!e) return new RealtimeError(1000, "client closed");
    return new RealtimeError(e.code, e.message, { name: e.codeName, channel: e.channel, terminal: e.terminal });
  }

  _start() {
    if (this.state !== "idle") return;
    this._connect();
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  _emit(name, value) {
    const set = this.listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      callListener(fn, value);
    }
  }

  async _socketClass() {
    if (this.WebSocketImpl) return this.WebSocketImpl;
    if (!this.headerAuth && typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
    const spec = "ws";
    const mod = await import(/* webpackIgnore: true */ spec);
    return mod.WebSocket || mod.default;
  }

  async _connect(atOnce = false) {
    if (this.state === "closed") return;
    this._setState(this.attempt === 0 && !this.sessionId ? "connecting" : "reconnecting");
    if (this.state === "closed") return; // closed by a state listener: no getToken() for nothing
    let token, WS;
    try {
      token = await this._fetchToken();
    } catch (err) {
      if (this.state === "closed") return;
      this._emit("error", tokenUnavailable(err));
      this._scheduleRetry();
      return;
    }
    try {
      WS = await this._socketClass();
    } catch (err) {
      // No WebSocket to use (headerAuth in a browser, or Node.js without `ws` and without a
      // global WebSocket): no retry can help.
      if (this.state !== "closed") {
        this._finish(new RealtimeError(0, `no WebSocket implementation${this.headerAuth ? " for headerAuth (Node.js only)" : ""}: ${err && err.message}`,
          { name: "websocket_unavailable", terminal: true }));
      }
      return;
    }
    if (this.state === "closed") return;
    if (atOnce && !isFresh(token, this.token)) {
      // Right after a 4001: the gateway would accept this token within its leeway and close
      // with 4001 at once. Back off instead (getToken is called again after the delay).
      this._scheduleRetry();
      return;
    }
    let ws;
    try {
      ws = this.headerAuth
        ? new WS(this.url, { headers: { Authorization: `Bearer ${token}` } })
        : new WS(this.url);
    } catch (err) {
      this._finish(new RealtimeError(0, `cannot open ${this.url}: ${err.message}`, { terminal: true }));
      return;
    }
    this.ws = ws;
    this.token = token; // the token the gateway took (at connect, then at each accepted refresh)
    this.pendingToken = null; // sent in a refresh, this.token once the gateway answers auth_ok
    this.refreshedAt = null; // (monotonicMs) when the connection's last refresh started
    this.authed = false;
    this.opened = false; // the upgrade succeeded: its close is a retried close, not a failed connect
    this.authTimedOut = false; // this connection's 4002 is "auth timeout", not a bad token
    // The error that refused this connection's authentication (a bad token, a workspace not
    // granted): the terminal close that follows reports it, once, with the gateway's reason.
    this.refusal = null;
    // The message of this connection's latest 4000 (invalid_message): the detail of the 1009 (a
    // message over the gateway's limit) or 1008 (too many invalid ones) closing it.
    this.lastInvalid = null;
    // An upgrade that never completes (a stuck proxy, a half-open path) counts as a failed
    // attempt: without this the client would stay "connecting" for good. Reported like a
    // connect that got no answer, as the Python client does (a stuck proxy looked like a slow
    // start); this timer is the client's own, so in browsers too.
    this.timers.open = setTimeout(() => {
      this.timers.open = null;
      if (this.ws !== ws) return;
      this._reportRetrying("timeout", new RealtimeError(0,
        `cannot connect to ${this.url}: opening handshake timed out after ${this.openTimeout} ms; retrying`, { name: "connect_failed" }));
      if (this.ws === ws) this._abandon(ws, "opening handshake timed out"); // unless an error listener closed the client
    }, this.openTimeout);
    let opened = false; // the upgrade succeeded: an error from then on is no failed connect
    ws.onopen = () => {
      opened = true;
      if (this.ws !== ws) return;
      this.opened = true;
      clearTimeout(this.timers.open);
      this.timers.open = null;
      if (!this.headerAuth) {
        const msg = { type: "auth", token };
        if (this.sessionId && !this.skipResume && !this._replacedOffline()) {
          msg.resume = this.sessionId;
          if (this.floor !== null) msg.since = this.floor;
        }
        this._send(msg);
      }
      this.skipResume = false;
      this._armPing();
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      let msg;
      try {
        msg = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data));
      } catch {
        return;
      }
      this._armPing();
      this._onMessage(msg);
    };
    ws.onerror = (ev) => {
      // A close event follows, with the code. A connect that got no HTTP answer (refused,
      // unreachable) is retried; the `ws` package says why (a browser's WebSocket does not):
      // reported once per kind of failure until a connection succeeds.
      if (this.ws !== ws || opened || !ev || !ev.error) return;
      const kind = ev.error.code || ev.error.name || "error";
      this._reportRetrying(kind, new RealtimeError(0, `cannot connect to ${this.url}: ${ev.message || kind}; retrying`,
        { name: "connect_failed" }));
    };
    if (typeof ws.on === "function") {
      // The `ws` package (Node.js) tells the HTTP status that refused the upgrade; a browser's
      // WebSocket (and Node's global one) does not: an error, then a close 1006, retried.
      ws.on("unexpected-response", (req, res) => this._upgradeRefused(ws, res));
    }
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this._onClose(ev.code, ev.reason);
    };
  }

  // getToken's token; throws what it throws, or an Error when it has not settled within
  // openTimeoutMs: one that never settled (a fetch hanging on a dead link) held the client
  // "connecting" for good, with nothing reported.
  _fetchToken() {
    clearTimeout(this.timers.token);
    const late = new Promise((resolve, reject) => {
      this.timers.token = setTimeout(() => {
        this.timers.token = null;
        reject(new Error(`getToken did not settle within ${this.openTimeout} ms`));
      }, this.openTimeout);
    });
    const timer = this.timers.token;
    return Promise.race([Promise.resolve().then(() => this.getToken()), late])
      .then((token) => checkedToken(token, this.headerAuth))
      .finally(() => { clearTimeout(timer); if (this.timers.token === timer) this.timers.token = null; });
  }

  // A failed connect or a close that is retried, reported on "error" once per `kind` (an HTTP
  // status, a connect error's code, "close <code>") until a connection succeeds, not at every
  // attempt.
  _reportRetrying(kind, err) {
    if (this.refusalReported.has(kind)) return;
    this.refusalReported.add(kind);
    this._emit("error", err);
  }

  /**
   * An HTTP status instead of the upgrade. 404 before any connection succeeded is a wrong URL
   * (the gateway answers it to a malformed workspace id and to any other path, docs/protocol.md
   * §1) that no retry can mend: terminal. Any other status, or a 404 once a connection has
   * succeeded (a proxy's during a deploy; the gateway's 503: draining, at its connection limit,
   * a Kafka node not ready; a proxy's 502 or 429) is retried with the backoff and reported on "error" once per
   * distinct status until a connection succeeds, not at every attempt. A little of the body is
   * read first: the gateway says there why it refused.
   */
  _upgradeRefused(ws, res) {
    const status = res.statusCode;
    let body = "";
    let settled = false;
    const settle = () => {
      if (settled) return;
      settled = true;
      if (this.ws !== ws) return; // abandoned meanwhile (openTimeoutMs) or closed
      this.ws = null;
      try { ws.terminate(); } catch { /* already closing */ }
      body = refusalText(body);
      const detail = `${this.url} refused the WebSocket upgrade with HTTP ${status}${body ? `: ${body}` : ""}`;
      if (status === 404 && this.sessionId === null) {
        // Never connected: the URL is wrong. Once it has worked, a 404 is a proxy's or a load
        // balancer's in the middle of a deploy, and retried like the others.
        this._finish(new RealtimeError(404, `${detail} (a wrong URL: the gateway's is `
          + "ws[s]://host/workspaces/{workspaceId}/realtime/connect)", { name: "upgrade_refused", terminal: true }));
        return;
      }
      this._reportRetrying(status, new RealtimeError(status, `${detail}; retrying`, { name: "upgrade_refused" }));
      if (this.state === "closed") return; // closed by an error listener
      this._onClose(1006, `HTTP ${status}`);
    };
    res.setEncoding("utf8");
    res.on("data", (chunk) => { if (body.length < 200) body += chunk; });
    res.on("end", settle);
    res.on("error", settle);
    res.on("close", settle);
  }

  _onMessage(msg) {
    switch (msg.type) {
      case "event":
        this._onEvent(msg);
        break;
      case "auth_ok":
        this._onAuthOk(msg);
        break;
      case "subscribed": {
        this.sessionChannels.add(keyOf(msg.channel));
        const sub = this.subs.get(keyOf(msg.channel));
        if (sub && answers(msg, sub.sentId)) {
          sub.acked = true;
          for (const w of sub.waiters.splice(0)) w.resolve();
        }
        this._atPosition(msg.seq);
        break;
      }
      case "unsubscribed": {
        const key = keyOf(msg.channel);
        this.sessionChannels.delete(key);
        if (msg.id !== undefined && this.pendingUnsubs.get(key) === msg.id) this.pendingUnsubs.delete(key);
        break;
      }
      case "pong":
        this.positionAsked = false;
        if (this.marker !== null && msg.id === this.marker) {
          // Every replay asked for is done: all up to lastSeq has been delivered (and up to the
          // floor, which may be higher: a `subscribed` position).
          this.marker = null;
          this.catchup = null;
          if (this.lastSeq !== null && (this.floor === null || this.lastSeq > this.floor)) this.floor = this.lastSeq;
        }
        this._atPosition(msg.seq);
        break;
      case "error":
        this._onError(msg);
        break;
      default:
        break;
    }
  }

  _onAuthOk(msg) {
    if (this.authed) {
      // An answer to an in-band refresh: same session, new expiry, and its token in force.
      if (this.pendingToken !== null) this.token = this.pendingToken;
      this.pendingToken = null;
      this._scheduleRefresh();
      return;
    }
    if (Boolean(msg.resumed) && msg.sessionId === this.sessionId && this._replacedOffline()) {
      // A filter changed after the resume left (between the socket's open and this auth_ok): the
      // session is about to replay the outage with the old filter. Start a fresh session instead,
      // as for a filter changed while disconnected (nothing of this replay is delivered).
      const ws = this.ws;
      this.ws = null;
      this._clearTimers();
      this.opened = false;
      this.skipResume = true;
      try { ws.close(1000); } catch { /* closing */ }
      this._connect();
      return;
    }
    this.authed = true;
    this.authedAt = Date.now();
    this.refusal = null;
    this.attempt = 0;
    this.refusalReported.clear();
    const resumed = Boolean(msg.resumed) && msg.sessionId === this.sessionId;
    this.sessionId = msg.sessionId;
    this._setState("open");
    if (this.state === "closed") return; // closed by a state listener: no refresh timer to outlive it
    this._scheduleRefresh();
    if (resumed) {
      for (const channel of [...this.pendingUnsubs.keys()]) this._sendUnsubscribe(channel); // the session has it back
    } else {
      this.pendingUnsubs.clear(); // a new session has no subscriptions
      this.sessionChannels.clear();
    }
    const since = this.floor;
    for (const sub of [...this.subs.values()]) {
      if (resumed && sub.acked) continue; // restored by the gateway
      // A new session, or subscribed (or changed) while disconnected: ask for what was missed
      // since the last event seen, so the outage is replayed (or a gap reported).
      this._sendSubscribe(sub, since);
      if (since !== null && this.catchup === null) this.catchup = new Set();
    }
    // The resume's own replay is a catch-up too: `floor` stays where it asked from until the
    // replay is done, so a filter replaced meanwhile asks from there.
    if (resumed && since !== null && this.catchup === null) this.catchup = new Set();
    if (this.catchup !== null) this._startCatchup();
    this._emit("open", { sessionId: msg.sessionId, resumed, expiresAt: msg.expiresAt });
    this._readyResolve({ sessionId: msg.sessionId, resumed });
  }

  _onEvent(msg) {
    const seq = msg.seq;
    if (typeof seq === "number") {
      // Drop duplicates (the rule is under "Duplicates" above).
      if (this.catchup !== null) {
        if ((this.floor !== null && seq <= this.floor) || this.catchup.has(seq)) return;
        this.catchup.add(seq);
      } else if (this.lastSeq !== null && seq <= this.lastSeq) {
        return;
      } else {
        this.floor = seq;
      }
      if (this.lastSeq === null || seq > this.lastSeq) this.lastSeq = seq;
    }
    const channel = typeof msg.channel === "string" ? msg.channel : "";
    const subs = [...this.subs.values()].filter((sub) => channelMatches(sub.channel, channel, sub.filter));
    // For a channel the application has left: in flight when it unsubscribed, or replayed by a
    // resumed session that had it back before the unsubscribe arrived.
    if (!subs.length) return;
    for (const sub of subs) {
      if (this.state === "closed") return; // a callback of this event closed the client
      // Not to one that an earlier callback of this event unsubscribed (or replaced).
      if (sub.onEvent && this.subs.get(subscriptionKey(sub.channel)) === sub) {
        callListener(sub.onEvent, msg);
      }
    }
    if (this.state === "closed") return;
    this._emit("event", msg);
    for (const it of this._liveIterators()) it.push(msg);
  }

  _onError(msg) {
    if (msg.code === 4011) {
      if (typeof msg.oldest === "number" && (this.floor === null || msg.oldest - 1 > this.floor)) {
        // The history holds nothing before `oldest` (no replay can bring it) and the
        // application has been told: the next resume asks from there, else it got the same
        // gap again after every reconnect until an event came.
        this.floor = msg.oldest - 1;
      }
      this._askPosition();
      // Not for a channel the client has left (a resumed session had it back).
      if (this._left(msg.channel)) return;
      const channel = this.subs.get(keyOf(msg.channel))?.channel ?? msg.channel; // as the application wrote it
      const gap = { type: "history_gap", code: 4011, channel, oldest: msg.oldest, message: msg.message };
      this._emit("gap", gap);
      for (const it of this._liveIterators()) it.push(gap);
      return;
    }
    if (msg.code === 4000) this.lastInvalid = String(msg.message ?? "");
    if (msg.code === 4002 && !this.authed && msg.message === "auth timeout") {
      // Our auth message came too late (a frozen tab, a stalled link), not a bad token: the
      // close 4002 that follows is retried with the backoff, not the end.
      this.authTimedOut = true;
    }
    const refusal = [4000, 4003, 4008, 4010].includes(msg.code);
    const sub = refusal ? this._refused(msg) : null;
    if (!sub && refusal && this._left(msg.channel)) {
      // The refusal of a subscribe the client has withdrawn: the application left the channel,
      // or the client dropped it on a refusal already reported (a resume's 4010 for a table no
      // longer published, then the answer to the subscribe of the same channel changed while
      // disconnected: one channel, reported twice).
      return;
    }
    const err = new RealtimeError(msg.code, msg.message, { name: msg.name, channel: sub ? sub.channel : msg.channel });
    if (!this.authed && !sub && !msg.channel && (msg.id === undefined || msg.id === null) && msg.code !== 4001) {
      // Why the gateway refuses the connection; its close follows: "error" gets that close
      // once, this reason in its message (terminal: it got both, and `ready` rejected with
      // "connection closed: token_invalid" only; retried, as 4008 over a connection quota: it
      // got this error at every attempt). A 4001 (a token expired at connect) is reported as it
      // comes, as ever: the client gets a fresh one.
      // No close followed the one held before (a 4000 for a malformed auth message: the
      // connection stays open until the auth timeout): reported as it came, not replaced unheard.
      if (this.refusal) this._emit("error", this.refusal);
      this.refusal = err;
      return;
    }
    if (sub) {
      // The gateway refused this subscription: it is not retried, and it is unsubscribed at the
      // gateway too, which keeps a subscription whose replacement it refuses (events nobody
      // receives, a quota slot).
      for (const w of sub.waiters.splice(0)) w.reject(err);
      this.unsubscribe(sub.channel, sub);
    }
    this._emit("error", err);
  }

  // Whether a subscription the gateway's session holds has a filter (or handler) the gateway has
  // not acknowledged: changed while disconnected, or its subscribe unanswered when the link died.
  // Resumed, the session would replay the outage on that channel with the filter it holds,
  // before the new subscribe arrived, to the new handler (and the gateway does not replay again
  // what the replaced subscription delivered): a fresh session, every subscription sent with
  // `since`, delivers what the new filter takes.
  _replacedOffline() {
    for (const [key, sub] of this.subs) if (!sub.acked && this.sessionChannels.has(key)) return true;
    return false;
  }

  // Whether `channel` (as a gateway message names it) is one the client has unsubscribed and not
  // subscribed again, its unsubscribe not yet acknowledged.
  _left(channel) {
    const key = keyOf(channel);
    return Boolean(channel) && this.pendingUnsubs.has(key) && !this.subs.has(key);
  }

  // The subscription an error answers: by channel, or by id (a bad filter's 4000 has no channel).
  _refused(msg) {
    if (msg.channel) {
      const sub = this.subs.get(keyOf(msg.channel));
      return sub && answers(msg, sub.sentId) ? sub : null;
    }
    if (msg.id === undefined || msg.id === null) return null;
    for (const sub of this.subs.values()) if (sub.sentId === msg.id) return sub;
    return null;
  }

  _onClose(code, reason) {
    this._clearTimers();
    const refusal = this.refusal;
    this.refusal = null;
    const opened = this.opened; // a WebSocket that opened closed (else a failed connect, reported as such)
    this.opened = false;
    this.authed = false;
    this.marker = null;
    this.positionAsked = false;
    if (this.authedAt !== null && Date.now() - this.authedAt >= HEALTHY_AFTER_MS) {
      this.expired = false; // a healthy connection: the next 4001 reconnects at once again
    }
    this.authedAt = null;
    if (this.state === "closed") return;
    this._emit("close", { code, reason });
    // A close listener may have called close(): it is final (the 4001 path below would set the
    // state back to "reconnecting" and connect again).
    if (this.state === "closed") return;
    // No close of its own followed it (the link died first, or a 4000 before a 1009): reported
    // as it came, before the close, terminal or not.
    if (refusal && refusal.code !== code) this._emit("error", refusal);
    if (this.state === "closed") return; // closed by an error listener
    // The gateway's error before the close, carried in the close's report.
    let why = refusal && refusal.code === code ? `: ${refusal.message}` : "";
    // The gateway said why in a 4000 just before.
    if (!why && (code === 1008 || code === 1009) && this.lastInvalid) why = `: ${this.lastInvalid}`;
    if (TERMINAL_CODES.includes(code) && !(code === 4002 && this.authTimedOut)) {
      this._finish(new RealtimeError(code, `connection closed: ${reason || CODE_NAMES[code] || code}${why}`,
        { name: reason || CODE_NAMES[code], terminal: true }));
      return;
    }
    if (opened && code !== 4001) this._reportClose(code, reason, why);
    if (this.state === "closed") return; // closed by an error listener
    if (code === 4001 && !this.expired) {
      // The token expired: get a new one and come back at once (if it is fresh; once until a
      // connection has been healthy; else back off).
      this.expired = true;
      this._connect(true); // which says "connecting" or "reconnecting", as after any close
      return;
    }
    this._scheduleRetry();
  }

  // A close that is retried, on "error" once per code until a connection succeeds (as
  // _reportRetrying does): an application learns why it reconnects (1011: the gateway could not
  // check the token, its identity provider out of reach; 1013: it read too slowly; 1001: the
  // gateway shut down or found it idle; 4008: a connection quota; 1006: the link died), and a
  // quota that holds for an hour is one report, not one per attempt. Its message carries the
  // close reason, and (`why`) the gateway's error before the close when one came. A 4001 is
  // routine (a fresh token, at once) and not reported here.
  _reportClose(code, reason, why) {
    const name = CODE_NAMES[code] || "error";
    this._reportRetrying(`close ${code}`, new RealtimeError(code, `connection closed: ${reason || name}${why}; retrying`, { name }));
  }

  _scheduleRetry() {
    if (this.state === "closed") return;
    this._setState("reconnecting");
    // A state listener may have called close(): a timer armed now would outlive it (and keep a
    // Node.js process alive for up to backoffMaxMs).
    if (this.state === "closed") return;
    const delay = this._backoffDelay();
    this.attempt = Math.min(this.attempt + 1, 30);
    this.timers.retry = setTimeout(() => { this.timers.retry = null; this._connect(); }, delay);
  }

  // The wait before the next attempt: backoffInitialMs doubled per failed attempt up to
  // backoffMaxMs (the product's schedule: 1 s, 2 s, 4 s ... 30 s), each up to half as long again
  // at random to spread a herd of clients, never shorter than the schedule nor longer than
  // backoffMaxMs.
  _backoffDelay() {
    const base = Math.min(this.backoffMax, this.backoffInitial * 2 ** this.attempt);
    return Math.min(this.backoffMax, base * (1 + Math.random() / 2));
  }

  _scheduleRefresh() {
    clearTimeout(this.timers.refresh);
    this.timers.refresh = null;
    if (!this.proactiveRefresh) return;
    const since = this.refreshedAt === null ? null : monotonicMs() - this.refreshedAt;
    const delay = refreshDelay(this.token, this.refreshMargin, since);
    if (delay === null) return;
    this.timers.refresh = setTimeout(() => this._refresh(), Math.min(delay, MAX_TIMER_MS));
  }

  async _refresh(retryMs = this.backoffInitial) {
    this.timers.refresh = null;
    this.refreshedAt = monotonicMs();
    const ws = this.ws;
    let token;
    try {
      token = await this._fetchToken();
    } catch (err) {
      if (this.state === "closed") return;
      this._emit("error", tokenUnavailable(err));
      // Tried again with the backoff while the token lasts: one failure of the token service
      // cost a disconnect (the 4001 at exp, then a reconnect). Past it, the gateway closes with
      // 4001 at exp and we reconnect from there.
      const { exp } = tokenTimes(this.token);
      if (this.ws === ws && ws && this.authed && exp !== null && exp * 1000 - Date.now() > retryMs) {
        this.timers.refresh = setTimeout(() => this._refresh(Math.min(retryMs * 2, this.backoffMax)), retryMs);
      }
      return;
    }
    if (this.ws !== ws || !ws || !this.authed) return;
    // Not this.token before the gateway takes it: a refused refresh leaves the connection
    // under the old token, whose exp the 4001 at its end is judged by (isFresh).
    this.pendingToken = token;
    this._send({ type: "auth", token, id: `refresh-${this.nextId++}` });
  }

  /**
   * The `seq` of a `subscribed` reply or a `pong`: the position the gateway's stream had reached
   * when it sent it. The connection's frames come in order, so every event up to it that
   * matches the subscriptions came before; outside a catch-up (whose replays follow their
   * replies) `floor` moves up to it. Before the first event it is what a resume asks `since`:
   * without it the events in flight when the link died were lost; and a quiet subscription in
   * a busy workspace would ask from before what the history holds (a history_gap at each
   * reconnect, for nothing). The keepalive ping (pingIntervalMs) brings one when it is quiet.
   */
  _atPosition(seq) {
    if (typeof seq === "number" && this.catchup === null && (this.floor === null || seq > this.floor)) {
      this.floor = seq;
    }
  }

  // A ping after a history_gap: its pong's position (_atPosition) is past what the gap told. A
  // source's loss (docs/protocol.md §7) comes with the history's first event as `oldest`, before
  // what the client has, so `floor` stayed before the loss: every resume until the next event
  // or keepalive ping asked from there and the application was told the loss again. In a
  // catch-up its closing pong does the same.
  _askPosition() {
    if (this.catchup !== null || this.positionAsked) return;
    this.positionAsked = true;
    this._send({ type: "ping" });
  }

  /** A catch-up until the pong of a ping sent now (after every replay asked for so far). */
  _startCatchup() {
    if (this.catchup === null) this.catchup = new Set();
    this.marker = `catchup-${this.nextId++}`;
    this._send({ type: "ping", id: this.marker });
  }

  _armPing() {
    clearTimeout(this.timers.ping);
    // 0 (or less) turns the pings off, as the Python client's position_interval=0 does: armed
    // again at each message, a 0 ms ping sent one a pong, hundreds a second.
    if (!(this.pingInterval > 0)) return;
    const ws = this.ws;
    this.timers.ping = setTimeout(() => {
      if (this.ws !== ws) return;
      this._send({ type: "ping" });
      // Silence after a ping means a dead link (a browser cannot see it otherwise).
      this.timers.ping = setTimeout(() => {
        if (this.ws === ws) this._abandon(ws, "no answer to ping");
      }, this.pongTimeout);
    }, this.pingInterval);
  }

  /** Give up on a socket that went silent: drop it at once and handle it as a lost link. */
  _abandon(ws, reason) {
    this.ws = null;
    try {
      if (typeof ws.terminate === "function") ws.terminate(); else ws.close();
    } catch { /* already closing */ }
    this._onClose(1006, reason);
  }

  _clearTimers() {
    for (const k of Object.keys(this.timers)) { clearTimeout(this.timers[k]); this.timers[k] = null; }
  }

  _sendSubscribe(sub, since) {
    sub.acked = false;
    sub.sentId = `sub-${this.nextId++}`;
    const msg = { type: "subscribe", channel: sub.channel, id: sub.sentId };
    if (sub.filter) msg.filter = sub.filter;
    if (since !== null && since !== undefined) msg.since = since;
    this._send(msg);
  }

  _sendUnsubscribe(channel) {
    const id = `unsub-${this.nextId++}`;
    this.pendingUnsubs.set(channel, id);
    this._send({ type: "unsubscribe", channel, id });
  }

  _send(msg) {
    const ws = this.ws;
    if (ws && ws.readyState === 1) ws.send(JSON.stringify(msg));
  }

  _finish(error) {
    if (this.state === "closed") return;
    this._clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      try { ws.close(1000); } catch { /* not open yet */ }
      if (typeof ws.terminate === "function") {
        // A dead link never answers the close frame: the `ws` package would hold the socket (and
        // a Node.js process) for 30 s. Unref'd: it fires only when something still holds the process.
        const t = setTimeout(() => { try { ws.terminate(); } catch { /* gone */ } }, 1000);
        if (t && typeof t.unref === "function") t.unref();
      }
    }
    this.error = error;
    this.pendingUnsubs.clear();
    this._setState("closed");
    for (const sub of this.subs.values()) {
      for (const w of sub.waiters.splice(0)) w.reject(error || new RealtimeError(1000, "client closed"));
    }
    for (const it of this._liveIterators()) it.end(error);
    this.iterators.clear();
    this.iterated.clear();
    if (error) {
      this._emit("error", error);
      this._readyReject(error);
      this._closedReject(error);
    } else {
      this._readyReject(new RealtimeError(1000, "client closed"));
      this._closedResolve();
    }
  }
}

/** Creates a client and starts connecting. */
export function connect(options) {
  const client = new RealtimeClient(options);
  client._start();
  return client;
}

export default connect;
