// @rtserver/client: a WebSocket client for the rtserver realtime gateway (docs/protocol.md).
//
// Works in browsers (no dependencies) and in Node.js (uses the `ws` package when
// globalThis.WebSocket is missing, or when header authentication is asked for).
// It authenticates, keeps subscriptions alive across reconnects (resuming the session with
// the last seen `seq`, or re-subscribing with `since` when the session is gone), refreshes
// the token before it expires, backs off exponentially on failures and stops on terminal
// codes (4002 token_invalid, 4003 scope_denied, 1008 policy_violation, 1009 message_too_big)
// with a RealtimeError.
//
// rtserver/static/rtclient.js is a verbatim copy of this file (the demo page loads it);
// tests/test_js_client.py checks that the two stay identical.

/** Close codes after which reconnecting cannot help: the token or the grant is wrong, or the
 * client sends what the gateway refuses (and would send it again). */
export const TERMINAL_CODES = Object.freeze([4002, 4003, 1008, 1009]);

const CODE_NAMES = {
  1000: "normal_closure", 1001: "going_away", 1006: "abnormal_closure", 1008: "policy_violation",
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

/** Decodes the `exp` claim (seconds since the epoch) of a JWT without verifying it. */
export function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "===".slice((b64.length + 3) % 4);
    const json = typeof atob === "function"
      ? decodeURIComponent(Array.from(atob(padded), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""))
      : globalThis.Buffer.from(padded, "base64").toString("utf8");
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/** Whether an event on concrete `eventChannel` belongs to a subscription on `channel`. */
export function channelMatches(channel, eventChannel, filter) {
  if (channel === eventChannel) return true;
  const i = channel.indexOf(":");
  if (channel.slice(i + 1) !== "*" || !eventChannel.startsWith(channel.slice(0, i + 1))) return false;
  const entity = filter && filter.entity;
  return !entity || eventChannel.slice(i + 1) === entity || eventChannel.slice(i + 1).endsWith("." + entity);
}

const MAX_TIMER_MS = 2 ** 31 - 1;
const SEEN_LIMIT = 4096; // recent seqs remembered to drop a replayed duplicate

class Subscription {
  constructor(channel, filter, onEvent) {
    this.channel = channel;
    this.filter = filter || null;
    this.onEvent = onEvent || null;
    this.acked = false; // the gateway confirmed it on the current session
    this.everAcked = false;
    this.waiters = [];
  }
}

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

    this.state = "idle"; // idle | connecting | open | reconnecting | closed
    this.sessionId = null;
    this.lastSeq = null;
    this.subs = new Map();
    this.pendingUnsubs = new Set();
    this.listeners = new Map();
    this.iterators = new Set();
    this.ws = null;
    this.attempt = 0;
    this.expired = false; // the last close was 4001: reconnect at once, once
    this.timers = { retry: null, refresh: null, ping: null };
    this.seen = new Set();
    this.seenOrder = [];
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
   * function; its `ready` promise settles when the gateway confirms or refuses.
   */
  subscribe(channel, filter, onEvent) {
    if (typeof filter === "function" && onEvent === undefined) { onEvent = filter; filter = null; }
    const old = this.subs.get(channel);
    const sub = new Subscription(channel, filter, onEvent);
    if (old) sub.waiters = old.waiters.splice(0);
    this.subs.set(channel, sub);
    this.pendingUnsubs.delete(channel);
    const ready = new Promise((resolve, reject) => sub.waiters.push({ resolve, reject }));
    ready.catch(() => {});
    if (this.state === "open") this._sendSubscribe(sub, null);
    if (this.state === "idle") this._start();
    const unsubscribe = () => this.unsubscribe(channel, sub);
    unsubscribe.ready = ready;
    return unsubscribe;
  }

  /** Stops the subscription on `channel`. */
  unsubscribe(channel, only) {
    const sub = this.subs.get(channel);
    if (!sub || (only && sub !== only)) return;
    this.subs.delete(channel);
    for (const w of sub.waiters.splice(0)) w.reject(new RealtimeError(0, `unsubscribed from ${channel}`));
    if (this.state === "open") this._send({ type: "unsubscribe", channel });
    else this.pendingUnsubs.add(channel);
  }

  /**
   * Events (and `history_gap` notices) as an async iterator, optionally for one channel.
   * Bounded: past `maxBufferedEvents` unread items the iterator throws a RealtimeError.
   */
  events(channel) {
    const client = this;
    const queue = [];
    let wake = null;
    let done = false;
    let failure = null;
    const it = {
      push(item) {
        if (done) return;
        if (channel && item.channel && !channelMatches(channel, item.channel, client.subs.get(channel)?.filter)) return;
        if (queue.length >= client.maxBuffered) {
          failure = new RealtimeError(0, `event iterator overflow: more than ${client.maxBuffered} unread events`,
            { name: "buffer_overflow" });
          done = true;
        } else {
          queue.push(item);
        }
        if (wake) { const w = wake; wake = null; w(); }
      },
      end(err) {
        if (done) return;
        done = true;
        failure = err || null;
        if (wake) { const w = wake; wake = null; w(); }
      },
    };
    this.iterators.add(it);
    if (this.state === "idle") this._start();
    return {
      [Symbol.asyncIterator]() { return this; },
      async next() {
        for (;;) {
          if (queue.length) return { value: queue.shift(), done: false };
          if (done) {
            client.iterators.delete(it);
            if (failure) { const f = failure; failure = null; throw f; }
            return { value: undefined, done: true };
          }
          await new Promise((resolve) => { wake = resolve; });
        }
      },
      async return() {
        done = true;
        client.iterators.delete(it);
        return { value: undefined, done: true };
      },
    };
  }

  /** Closes for good (the session stays resumable on the server for a while). */
  close() {
    this.closedByUser = true;
    this._finish(null);
  }

  // ---- connection lifecycle ------------------------------------------------------------

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
      try { fn(value); } catch (err) { setTimeout(() => { throw err; }); }
    }
  }

  async _socketClass() {
    if (this.WebSocketImpl) return this.WebSocketImpl;
    if (!this.headerAuth && typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
    const spec = "ws";
    const mod = await import(/* webpackIgnore: true */ spec);
    return mod.WebSocket || mod.default;
  }

  async _connect() {
    if (this.state === "closed") return;
    this._setState(this.attempt === 0 && !this.sessionId ? "connecting" : "reconnecting");
    let token, WS;
    try {
      token = await this.getToken();
      WS = await this._socketClass();
    } catch (err) {
      if (this.state === "closed") return;
      this._emit("error", err);
      this._scheduleRetry();
      return;
    }
    if (this.state === "closed") return;
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
    this.token = token;
    this.authed = false;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      if (!this.headerAuth) {
        const msg = { type: "auth", token };
        if (this.sessionId) {
          msg.resume = this.sessionId;
          if (this.lastSeq !== null) msg.since = this.lastSeq;
        }
        this._send(msg);
      }
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
    ws.onerror = () => {}; // a close event follows, with the code
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this._onClose(ev.code, ev.reason);
    };
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
        const sub = this.subs.get(msg.channel);
        if (sub) {
          sub.acked = sub.everAcked = true;
          for (const w of sub.waiters.splice(0)) w.resolve();
        }
        break;
      }
      case "error":
        this._onError(msg);
        break;
      default:
        break; // pong, unsubscribed
    }
  }

  _onAuthOk(msg) {
    if (this.authed) {
      // An answer to an in-band refresh: same session, new expiry.
      this._scheduleRefresh();
      return;
    }
    this.authed = true;
    this.attempt = 0;
    this.expired = false;
    const resumed = Boolean(msg.resumed) && msg.sessionId === this.sessionId;
    this.sessionId = msg.sessionId;
    this._setState("open");
    this._scheduleRefresh();
    for (const channel of this.pendingUnsubs) this._send({ type: "unsubscribe", channel });
    this.pendingUnsubs.clear();
    for (const sub of this.subs.values()) {
      if (resumed && sub.acked) continue; // restored by the gateway
      // On a new session, ask for what was missed since the last seen event.
      this._sendSubscribe(sub, sub.everAcked ? this.lastSeq : null);
    }
    this._emit("open", { sessionId: msg.sessionId, resumed, expiresAt: msg.expiresAt });
    this._readyResolve({ sessionId: msg.sessionId, resumed });
  }

  _onEvent(msg) {
    const seq = msg.seq;
    if (typeof seq === "number") {
      if (this.seen.has(seq)) return; // the same event replayed for a second channel
      this.seen.add(seq);
      this.seenOrder.push(seq);
      if (this.seenOrder.length > SEEN_LIMIT) this.seen.delete(this.seenOrder.shift());
      if (this.lastSeq === null || seq > this.lastSeq) this.lastSeq = seq;
    }
    for (const sub of this.subs.values()) {
      if (sub.onEvent && channelMatches(sub.channel, msg.channel, sub.filter)) {
        try { sub.onEvent(msg); } catch (err) { setTimeout(() => { throw err; }); }
      }
    }
    this._emit("event", msg);
    for (const it of this.iterators) it.push(msg);
  }

  _onError(msg) {
    const err = new RealtimeError(msg.code, msg.message, { name: msg.name, channel: msg.channel });
    if (msg.code === 4011) {
      const gap = { type: "history_gap", code: 4011, channel: msg.channel, oldest: msg.oldest, message: msg.message };
      this._emit("gap", gap);
      for (const it of this.iterators) it.push(gap);
      return;
    }
    if (msg.channel && this.subs.has(msg.channel) && [4000, 4003, 4008, 4010].includes(msg.code)) {
      // The gateway refused this subscription: it is not retried.
      const sub = this.subs.get(msg.channel);
      this.subs.delete(msg.channel);
      for (const w of sub.waiters.splice(0)) w.reject(err);
    }
    this._emit("error", err);
  }

  _onClose(code, reason) {
    this._clearTimers();
    if (this.state === "closed") return;
    this._emit("close", { code, reason });
    if (TERMINAL_CODES.includes(code)) {
      this._finish(new RealtimeError(code, `connection closed: ${reason || CODE_NAMES[code] || code}`,
        { name: reason || CODE_NAMES[code], terminal: true }));
      return;
    }
    if (code === 4001 && !this.expired) {
      // The token expired: get a fresh one and come back at once (once; then back off).
      this.expired = true;
      this._setState("reconnecting");
      this._connect();
      return;
    }
    this._scheduleRetry();
  }

  _scheduleRetry() {
    if (this.state === "closed") return;
    this._setState("reconnecting");
    const base = Math.min(this.backoffMax, this.backoffInitial * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    const delay = base / 2 + Math.random() * (base / 2); // jitter: spread a herd of clients
    this.timers.retry = setTimeout(() => { this.timers.retry = null; this._connect(); }, delay);
  }

  _scheduleRefresh() {
    clearTimeout(this.timers.refresh);
    this.timers.refresh = null;
    if (!this.proactiveRefresh) return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const remaining = exp * 1000 - Date.now();
    const delay = Math.max(remaining - this.refreshMargin, remaining * 0.75, 0);
    this.timers.refresh = setTimeout(() => this._refresh(), Math.min(delay, MAX_TIMER_MS));
  }

  async _refresh() {
    this.timers.refresh = null;
    const ws = this.ws;
    let token;
    try {
      token = await this.getToken();
    } catch (err) {
      this._emit("error", err);
      return; // the gateway closes with 4001 at exp; we reconnect from there
    }
    if (this.ws !== ws || !ws || !this.authed) return;
    this.token = token;
    this._send({ type: "auth", token, id: `refresh-${this.nextId++}` });
  }

  _armPing() {
    clearTimeout(this.timers.ping);
    const ws = this.ws;
    this.timers.ping = setTimeout(() => {
      if (this.ws !== ws) return;
      this._send({ type: "ping" });
      // Silence after a ping means a dead link (a browser cannot see it otherwise).
      this.timers.ping = setTimeout(() => {
        if (this.ws !== ws) return;
        this.ws = null;
        try {
          if (typeof ws.terminate === "function") ws.terminate(); else ws.close();
        } catch { /* already closing */ }
        this._onClose(1006, "no answer to ping");
      }, this.pongTimeout);
    }, this.pingInterval);
  }

  _clearTimers() {
    for (const k of Object.keys(this.timers)) { clearTimeout(this.timers[k]); this.timers[k] = null; }
  }

  _sendSubscribe(sub, since) {
    sub.acked = false;
    const msg = { type: "subscribe", channel: sub.channel };
    if (sub.filter) msg.filter = sub.filter;
    if (since !== null && since !== undefined) msg.since = since;
    this._send(msg);
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
    if (ws) { try { ws.close(1000); } catch { /* not open yet */ } }
    this.error = error;
    this._setState("closed");
    for (const sub of this.subs.values()) {
      for (const w of sub.waiters.splice(0)) w.reject(error || new RealtimeError(1000, "client closed"));
    }
    for (const it of [...this.iterators]) it.end(error);
    this.iterators.clear();
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
