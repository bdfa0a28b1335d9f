// The JS client against a real gateway (started by tests/test_js_client.py).
import { test } from "node:test";
import assert from "node:assert/strict";

import { spawn } from "node:child_process";
import { readFileSync, unlinkSync, writeFileSync } from "node:fs";
import net from "node:net";
import { fileURLToPath } from "node:url";
import v8 from "node:v8";
import vm from "node:vm";

import { connect, RealtimeClient, RealtimeError, tokenExpiry, channelMatches } from "../src/index.js";
import { GATEWAY, GATEWAY_CHANNEL_PERMISSIONS, GATEWAY_HASTY, GATEWAY_IDLE, GATEWAY_NO_IDP, GATEWAY_ONE_CONNECTION, GATEWAY_QUOTA, GATEWAY_SKEWED,
  GATEWAY_SMALL_BUFFER, GATEWAY_WIDE, PG_DSN, SKEWED_OFFSET, psql, publish, startProxy, token, unverifiableToken, waitFor,
  wsUrl } from "./helpers.js";

const fast = { backoffInitialMs: 50, backoffMaxMs: 400 };
v8.setFlagsFromString("--expose-gc");
const gc = vm.runInNewContext("gc");

function collect(client) {
  const events = [];
  const opens = [];
  const gaps = [];
  const closes = [];
  client.on("event", (e) => events.push(e));
  client.on("open", (o) => opens.push(o));
  client.on("gap", (g) => gaps.push(g));
  client.on("close", (c) => closes.push(c));
  return { events, opens, gaps, closes };
}

const described = (errors) => errors.map((e) => [e.code, e.codeName, e.terminal]);

test("subscribe receives matching events, unsubscribe stops them", { timeout: 30000 }, async () => {
  const client = connect({ url: wsUrl("js-basic"), getToken: () => token({ workspace: "js-basic" }) });
  try {
    const got = [];
    const unsubscribe = client.subscribe("events:orders", { predicates: { big: true } }, (e) => got.push(e));
    await client.ready;
    await unsubscribe.ready;
    const a = await publish("js-basic", "orders", { big: true, n: 1 });
    await publish("js-basic", "orders", { big: false, n: 2 });
    const c = await publish("js-basic", "orders", { big: true, n: 3 });
    await waitFor(() => got.length >= 2, 5000, "two events");
    assert.deepEqual(got.map((e) => [e.seq, e.payload.n, e.channel, e.operation]),
      [[a.seq, 1, "events:orders", "PUBLISH"], [c.seq, 3, "events:orders", "PUBLISH"]]);
    unsubscribe();
    // After the unsubscribe round trip, nothing more arrives.
    const other = [];
    const unsub2 = client.subscribe("events:other", (e) => other.push(e));
    await unsub2.ready;
    await publish("js-basic", "orders", { big: true, n: 4 });
    const d = await publish("js-basic", "other", { n: 5 });
    await waitFor(() => other.length === 1, 5000, "event on events:other");
    assert.equal(other[0].seq, d.seq);
    assert.equal(got.length, 2);
    assert.equal(client.state, "open");
  } finally {
    client.close();
  }
});

test("events() is an async iterator; header auth works from Node", { timeout: 30000 }, async () => {
  const client = connect({ url: wsUrl("js-iter"), getToken: () => token({ workspace: "js-iter" }), headerAuth: true });
  try {
    await client.subscribe("events:*", { entity: "a" }).ready;
    const iterator = client.events(); // buffers from now on
    const published = [];
    for (let i = 0; i < 5; i++) published.push((await publish("js-iter", i % 2 ? "b" : "a", { i })).seq);
    const want = published.filter((_, i) => i % 2 === 0);
    const seen = [];
    for await (const ev of iterator) {
      seen.push(ev.seq);
      if (seen.length === want.length) break;
    }
    assert.deepEqual(seen, want);
  } finally {
    client.close();
  }
  await client.closed;
  assert.equal(client.state, "closed");
});

test("a refused subscription rejects its ready promise with the code", { timeout: 30000 }, async () => {
  const client = connect({ url: wsUrl("js-refuse"), getToken: () => token({ workspace: "js-refuse" }) });
  try {
    const unsub = client.subscribe("nosuch:thing", null, () => {});
    await assert.rejects(unsub.ready, (err) => err instanceof RealtimeError && err.code === 4010);
    // The gateway's 4000 for a bad filter names no channel: matched by the subscribe's id.
    const bad = client.subscribe("events:x", { bogus: 1 });
    await assert.rejects(within(bad.ready, 5000), (err) => err instanceof RealtimeError && err.code === 4000 && err.channel === "events:x");
    assert.equal(client.state, "open");
  } finally {
    client.close();
  }
});

test("network loss: the session resumes and every event arrives exactly once", { timeout: 30000 }, async () => {
  const ws = "js-lossless";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), ...fast });
  const { events, opens } = collect(client);
  try {
    await client.subscribe("events:flow").ready;
    const published = [];
    let running = true;
    const publisher = (async () => {
      let i = 0;
      while (running) published.push((await publish(ws, "flow", { i: i++ })).seq);
    })();
    for (let cut = 0; cut < 3; cut++) {
      await waitFor(() => published.length > (cut + 1) * 15, 10000, "publishing");
      proxy.cut();
      await waitFor(() => client.state === "open" && opens.length === cut + 2, 10000, "reconnect");
    }
    running = false;
    await publisher;
    await waitFor(() => events.length >= published.length, 10000, `${published.length} events`);
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(events.map((e) => e.seq), published);
    assert.ok(opens.slice(1).every((o) => o.resumed), JSON.stringify(opens));
    assert.equal(new Set(opens.map((o) => o.sessionId)).size, 1);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a new session (header auth) re-subscribes with since: events missed meanwhile are replayed", { timeout: 30000 }, async () => {
  const ws = "js-resubscribe";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), headerAuth: true, ...fast });
  const { events, opens, gaps } = collect(client);
  try {
    await client.subscribe("events:r", { predicates: { keep: true } }).ready;
    const first = await publish(ws, "r", { keep: true });
    await waitFor(() => events.length === 1, 5000, "first event");
    proxy.hold = true;
    proxy.cut();
    await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
    const missed = [];
    for (let i = 0; i < 6; i++) {
      const out = await publish(ws, "r", { keep: i % 2 === 0, i });
      if (i % 2 === 0) missed.push(out.seq);
    }
    proxy.hold = false;
    await waitFor(() => events.length === 1 + missed.length, 10000, "replayed events");
    assert.equal(opens.length, 2);
    assert.equal(opens[1].resumed, false);
    assert.notEqual(opens[1].sessionId, opens[0].sessionId);
    const live = await publish(ws, "r", { keep: true });
    await waitFor(() => events.length === 2 + missed.length, 5000, "live event");
    assert.deepEqual(events.map((e) => e.seq), [first.seq, ...missed, live.seq]);
    assert.equal(gaps.length, 0);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("history_gap is surfaced when the history no longer holds what was missed", { timeout: 30000 }, async () => {
  // The gateway runs with RT_HISTORY_EVENTS=500: large enough that the other tests' reconnects
  // never outrun it, small enough to overflow here.
  const ws = "js-gap";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), ...fast });
  const { events, gaps } = collect(client);
  const items = [];
  const iterating = (async () => {
    for await (const item of client.events()) items.push(item);
  })();
  try {
    await client.subscribe("events:g").ready;
    const first = await publish(ws, "g", { i: -1 });
    await waitFor(() => events.length === 1, 5000, "first event");
    proxy.hold = true;
    proxy.cut();
    await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
    const missed = [];
    for (let i = 0; i < 510; i++) missed.push((await publish(ws, "g", { i })).seq);
    proxy.hold = false;
    await waitFor(() => events.length === 501, 10000, "replay of the retained 500");
    assert.equal(gaps.length, 1);
    assert.equal(gaps[0].channel, "events:g");
    assert.equal(gaps[0].code, 4011);
    assert.equal(gaps[0].oldest, missed[10]);
    assert.deepEqual(events.map((e) => e.seq), [first.seq, ...missed.slice(10)]);
    // The iterator saw the gap notice in order: before the replayed events.
    assert.deepEqual(items.map((x) => x.type), ["event", "history_gap", ...Array(500).fill("event")]);
  } finally {
    client.close();
    await proxy.close();
    await iterating;
  }
});

test("a history_gap is reported once, not again after every reconnect", { timeout: 30000 }, async () => {
  // The event missed on events:g was evicted by others (RT_HISTORY_EVENTS=500): a gap, and
  // nothing to replay. The next reconnect asked from the same position and got the gap again.
  // (events:h lost nothing: no gap there.)
  const ws = "js-gap-once";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), ...fast });
  const { events, opens, gaps } = collect(client);
  try {
    await client.subscribe("events:g").ready;
    await client.subscribe("events:h").ready;
    await publish(ws, "g", {});
    await waitFor(() => events.length === 1, 5000, "first event");
    proxy.hold = true;
    proxy.cut();
    await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
    await publish(ws, "g", { missed: true });
    for (let i = 0; i < 510; i++) await publish(ws, "other", { i });
    proxy.hold = false;
    await waitFor(() => gaps.length === 1, 10000, "the gap on events:g");
    proxy.cut(); // before any event: the floor is where the gap said the history starts
    await waitFor(() => client.state === "open" && opens.length === 3, 10000, "reconnect");
    const h = await publish(ws, "h", {}); // comes after the resume's replay and gaps, in order
    await waitFor(() => events.at(-1).seq === h.seq, 5000, "the live event");
    assert.deepEqual(opens.map((o) => o.resumed), [false, true, true]);
    assert.deepEqual(gaps.map((g) => g.channel), ["events:g"]);
    assert.equal(events.length, 2); // the first event and the live one: the missed one was evicted
  } finally {
    client.close();
    await proxy.close();
  }
});

test("token_expired (4001): getToken is called and the session resumes at once", { timeout: 30000 }, async () => {
  const ws = "js-expiry";
  let calls = 0;
  const getToken = () => (calls++ === 0 ? token({ workspace: ws, ttl: 2 }) : token({ workspace: ws }));
  const client = connect({ url: wsUrl(ws), getToken, proactiveRefresh: false, backoffInitialMs: 10000 });
  const { events, opens, closes } = collect(client);
  try {
    await client.subscribe("events:x").ready;
    await waitFor(() => closes.length === 1, 8000, "the 4001 close");
    assert.equal(closes[0].code, 4001);
    // No backoff (it would be >= 5 s here): reconnected at once with a new token.
    await waitFor(() => opens.length === 2, 2000, "reconnect after 4001");
    assert.equal(calls, 2);
    assert.equal(opens[1].resumed, true);
    const e = await publish(ws, "x", { after: true });
    await waitFor(() => events.length === 1, 5000, "event after refresh");
    assert.equal(events[0].seq, e.seq);
  } finally {
    client.close();
  }
});

test("after a refused refresh, the 4001 at exp reconnects at once with a token fresher than the one that expired", { timeout: 30000 }, async () => {
  // The freshness of the token taken after a 4001 is judged against the token the gateway
  // closed at. The client took a refresh's token as its own when it sent it, refused or not:
  // a new token no later than the refused one looked stale, and the client backed off
  // (backoffInitialMs) instead of coming back at once.
  const ws = "js-refused-refresh";
  const refused = token({ workspace: ws, sub: "someone-else", ttl: 60 }); // another subject: 4003
  const next = token({ workspace: ws, ttl: 60 }); // the same exp as the refused one
  let calls = 0;
  const getToken = () => [token({ workspace: ws, ttl: 4 }), refused, next][Math.min(calls++, 2)];
  const client = connect({ url: wsUrl(ws), getToken, backoffInitialMs: 10000 });
  const { opens, closes } = collect(client);
  const errors = [];
  client.on("error", (e) => errors.push(e));
  try {
    await client.subscribe("events:x").ready;
    await waitFor(() => errors.some((e) => e.code === 4003), 8000, "the refused refresh");
    await waitFor(() => closes.length === 1, 8000, "the 4001 close");
    assert.equal(closes[0].code, 4001);
    await waitFor(() => opens.length === 2, 3000, "reconnect at once after 4001");
    assert.equal(calls, 3);
    assert.equal(opens[1].resumed, true);
  } finally {
    client.close();
  }
});

test("proactive refresh renews the token in-band before exp, without reconnecting", { timeout: 30000 }, async () => {
  const ws = "js-refresh";
  let calls = 0;
  const getToken = () => { calls++; return token({ workspace: ws, ttl: 3 }); };
  const client = connect({ url: wsUrl(ws), getToken });
  const { events, closes } = collect(client);
  try {
    await client.subscribe("events:x").ready;
    // Three tokens of 3 s each have come and gone: the connection stayed up.
    await waitFor(() => calls >= 4, 10000, "refreshes");
    assert.equal(closes.length, 0);
    const e = await publish(ws, "x", {});
    await waitFor(() => events.length === 1, 5000, "event");
    assert.equal(events[0].seq, e.seq);
    assert.equal(client.state, "open");
  } finally {
    client.close();
  }
});

test("scope_denied (4003) and token_invalid (4002) are terminal: typed error, no retry", { timeout: 30000 }, async () => {
  for (const [tok, code] of [[token({ workspace: "elsewhere" }), 4003], [token({ secret: "wrong-secret-xxxxxxxxxxxxxxxxxxxxxx" }), 4002]]) {
    const proxy = await startProxy();
    let calls = 0;
    const client = connect({ url: wsUrl("js-denied", proxy.port), getToken: () => { calls++; return tok; }, ...fast });
    const states = [];
    const errors = [];
    client.on("state", (s) => states.push(s));
    client.on("error", (e) => errors.push(e));
    try {
      await assert.rejects(client.ready, (err) => err instanceof RealtimeError && err.code === code && err.terminal);
      await assert.rejects(client.closed, (err) => err.code === code);
      assert.equal(client.state, "closed");
      // Reported once, with the gateway's reason (the error event got the reason, then the
      // terminal error again, and `ready` rejected with "connection closed: token_invalid" only).
      assert.deepEqual(errors.map((e) => [e.code, e.terminal]), [[code, true]]);
      assert.match(errors[0].message, code === 4003 ? /does not grant workspace/ : /signature/);
      await assert.rejects(client.ready, (err) => err === errors[0]);
      await new Promise((r) => setTimeout(r, 300)); // several backoff periods
      assert.equal(proxy.accepted, 1);
      assert.equal(calls, 1);
      assert.ok(!states.includes("reconnecting"), JSON.stringify(states));
    } finally {
      client.close();
      await proxy.close();
    }
  }
});

test("gateway unreachable: backs off and connects when it appears", { timeout: 30000 }, async () => {
  const proxy = await startProxy();
  proxy.hold = true;
  const client = connect({ url: wsUrl("js-backoff", proxy.port), getToken: () => token({ workspace: "js-backoff" }), ...fast });
  try {
    await waitFor(() => proxy.accepted >= 3, 5000, "retries");
    proxy.hold = false;
    const { resumed } = await client.ready;
    assert.equal(resumed, false);
    assert.equal(client.attempt, 0); // reset on success
  } finally {
    client.close();
    await proxy.close();
  }
});

test("token expiry decoding and channel routing", { timeout: 30000 }, () => {
  const t = token({ ttl: 100 });
  const exp = tokenExpiry(t);
  assert.ok(Math.abs(exp - (Date.now() / 1000 + 100)) < 5);
  assert.equal(tokenExpiry("not-a-jwt"), null);
  assert.ok(channelMatches("postgres:*", "postgres:products"));
  assert.ok(channelMatches("postgres:*", "postgres:products", { entity: "products" }));
  assert.ok(!channelMatches("postgres:*", "postgres:orders", { entity: "products" }));
  assert.ok(!channelMatches("mongo:*", "postgres:orders"));
  assert.ok(!channelMatches("events:a", "events:b"));
  assert.ok(channelMatches("postgres:public.products", "postgres:products"));
  assert.ok(channelMatches("postgres:*", "postgres:products", { entity: "public.products" }));
  assert.ok(!channelMatches("postgres:*", "postgres:sales.products", { entity: "products" }));
  assert.ok(channelMatches("postgres:sales.products", "postgres:sales.products"));
  assert.ok(!channelMatches("events:*", "events:order.created", { entity: "created" }));
  assert.ok(!channelMatches("events:public.x", "events:x")); // only PostgreSQL has schemas
  // a history_gap notice names the subscription's channel as it was written
  assert.ok(channelMatches("events:*", "events:*", { entity: "created" }));
  assert.ok(channelMatches("postgres:public.products", "postgres:public.products"));
});

test("events reach the callbacks of the subscriptions the gateway matched", { timeout: 30000 }, async () => {
  // Topics may hold dots: `events:*` narrowed to entity `created` is not `events:order.created`,
  // which reaches the connection through its own subscription.
  const ws = "js-routing";
  const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }) });
  const narrowed = [];
  const orderCreated = [];
  const items = client.events("events:*");
  try {
    await client.subscribe("events:*", { entity: "created" }, (e) => narrowed.push(e.channel)).ready;
    await client.subscribe("events:order.created", (e) => orderCreated.push(e.channel)).ready;
    await publish(ws, "order.created", {});
    const last = await publish(ws, "created", {});
    const seen = [];
    while (seen.at(-1)?.seq !== last.seq) seen.push((await within(items.next(), 5000)).value);
    assert.deepEqual(seen.map((e) => e.channel), ["events:created"]);
    assert.deepEqual(narrowed, ["events:created"]);
    assert.deepEqual(orderCreated, ["events:order.created"]);
  } finally {
    client.close();
  }
});

test("backoff follows the schedule from 1 s to 30 s, the jitter only lengthening a wait", () => {
  // It used to halve a wait at random: a first retry after 0.5 s.
  const random = Math.random;
  try {
    for (const r of [0, 0.5, 0.999999]) {
      Math.random = () => r;
      const client = new RealtimeClient({ url: "ws://127.0.0.1:9/workspaces/w1/realtime/connect", getToken: () => "unused" });
      const waits = [];
      for (let attempt = 0; attempt < 8; attempt++) {
        client.attempt = attempt;
        waits.push(client._backoffDelay());
      }
      const schedule = [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
      assert.ok(schedule.every((s, i) => s <= waits[i] && waits[i] <= Math.min(30000, s * 1.5)), JSON.stringify(waits));
      if (r === 0) assert.deepEqual(waits, schedule);
    }
  } finally {
    Math.random = random;
  }
});

test("a failing getToken is reported as token_unavailable, at connect and for a refresh", { timeout: 30000 }, async () => {
  // The refresh is tried again with the backoff while the token lasts: one failure of the token
  // service cost a disconnect (the 4001 at exp, then a reconnect).
  const ws = "js-token-fails";
  let calls = 0;
  const getToken = () => {
    calls++;
    if (calls === 1 || calls === 3) throw new Error("token service 503"); // the first connect, the refresh
    return token({ workspace: ws, ttl: calls === 2 ? 3 : 3600 });
  };
  const client = new RealtimeClient({ url: wsUrl(ws), getToken, ...fast });
  const { opens, closes } = collect(client);
  const errors = [];
  client.on("error", (e) => errors.push(e));
  try {
    client.subscribe("events:x"); // starts the client, listeners in place
    await client.ready;
    await waitFor(() => calls === 4, 10000, "the refresh tried again");
    await new Promise((r) => setTimeout(r, 3000)); // past the first token's exp
    assert.equal(client.state, "open");
    assert.deepEqual(closes.map((c) => c.code), []);
    assert.equal(opens.length, 1);
    assert.ok(errors.every((e) => e instanceof RealtimeError), errors.map(String).join());
    assert.deepEqual(errors.map((e) => [e.code, e.codeName, e.cause?.message]),
      [[0, "token_unavailable", "token service 503"], [0, "token_unavailable", "token service 503"]]);
  } finally {
    client.close();
  }
});

test("a refresh failing until exp is reported, and the 4001 that follows reconnects", { timeout: 30000 }, async () => {
  const ws = "js-token-fails-long";
  let calls = 0;
  let exp = 0;
  const getToken = () => {
    calls++;
    if (calls > 1 && Date.now() < exp) throw new Error("token service 503"); // down until the token's end
    exp = Date.now() + 3000;
    return token({ workspace: ws, ttl: calls === 1 ? 3 : 3600 });
  };
  const client = new RealtimeClient({ url: wsUrl(ws), getToken, ...fast });
  const { opens, closes } = collect(client);
  const errors = [];
  client.on("error", (e) => errors.push(e));
  try {
    client.subscribe("events:x");
    await client.ready;
    await waitFor(() => opens.length === 2 && client.state === "open", 10000, "the reconnect after 4001");
    assert.deepEqual(closes.map((c) => c.code), [4001]);
    assert.ok(calls > 3, `${calls} calls`);
    const failed = errors.filter((e) => e.code !== 4001);
    assert.ok(failed.every((e) => e.codeName === "token_unavailable"), failed.map(String).join());
    assert.equal(failed.length, calls - 2);
  } finally {
    client.close();
  }
});

test("a getToken that never settles is reported as token_unavailable and retried", { timeout: 30000 }, async () => {
  // A fetch hanging on a dead link: the client waited for it for good, "connecting" with nothing
  // reported. Past openTimeoutMs it now counts as a failed getToken.
  const ws = "js-token-hangs";
  let calls = 0;
  const getToken = () => (++calls === 1 ? new Promise(() => {}) : token({ workspace: ws }));
  const client = new RealtimeClient({ url: wsUrl(ws), getToken, openTimeoutMs: 300, ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  try {
    client.subscribe("events:x");
    let opened = false;
    client.ready.then(() => { opened = true; });
    await waitFor(() => opened, 10000, "the connection after the getToken that never settled");
    assert.equal(calls, 2);
    assert.deepEqual(errors.map((e) => [e.code, e.codeName, e.terminal]), [[0, "token_unavailable", false]]);
    assert.match(errors[0].cause.message, /did not settle within 300 ms/);
  } finally {
    client.close();
  }
});

test("an events() iterator dropped before it is iterated stops buffering; one being iterated keeps receiving",
  { timeout: 30000 }, async () => {
    // The README's pattern creates events() before awaiting the subscription: when that
    // rejects, the iterator is dropped without being iterated. It must not hold events for good.
    const ws = "js-iter-dropped";
    const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }) });
    const got = [];
    try {
      await client.subscribe("events:kept", (e) => got.push(e.seq)).ready;
      client.events(); // dropped at once
      const iterated = [];
      (async () => { for await (const item of client.events()) iterated.push(item.seq); })(); // no reference kept
      await new Promise((r) => setTimeout(r, 0)); // WeakRef targets live until the job ends
      gc();
      const e = await publish(ws, "kept", {});
      await waitFor(() => got.length === 1 && iterated.length === 1, 5000, "the event");
      assert.deepEqual([got, iterated], [[e.seq], [e.seq]]);
      assert.equal(client.iterators.size, 1);
    } finally {
      client.close();
    }
  });

test("a filter JSON cannot carry throws and registers nothing", { timeout: 30000 }, async () => {
  // Registered, it failed the re-subscribe of every connection (in Node.js an uncaught exception).
  const ws = "js-bad-filter";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), ...fast });
  const { events, opens, closes } = collect(client);
  try {
    await client.subscribe("events:ok").ready;
    assert.throws(() => client.subscribe("events:bad", { predicates: { n: 10n } }), TypeError);
    proxy.cut();
    await waitFor(() => client.state === "open" && opens.length === 2, 5000, "reconnect");
    const e = await publish(ws, "ok", {});
    await waitFor(() => events.length === 1, 5000, "the event");
    assert.equal(events[0].seq, e.seq);
    assert.deepEqual([closes.length, opens.map((o) => o.resumed)], [1, [false, true]]);
  } finally {
    client.close();
    await proxy.close();
  }
});

// ---- reconnect edge cases ------------------------------------------------------------------

/** Settles like `promise`, or rejects with "`what`: still pending after `ms` ms". */
function within(promise, ms = 2000, what = "") {
  let timer;
  const message = `${what ? `${what}: ` : ""}still pending after ${ms} ms`;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(message)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

test("a new session re-subscribing overlapping channels delivers each event once, however many were missed",
  { timeout: 60000, skip: GATEWAY_WIDE ? false : "RT_TEST_GATEWAY_WIDE is not set" }, async () => {
    // Header auth: every reconnect is a new session, re-subscribed with `since`; events:* and
    // events:orders each replay the 5000 events missed, more than any fixed dedupe window.
    const ws = "js-dedupe";
    const proxy = await startProxy({ gateway: GATEWAY_WIDE });
    const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), headerAuth: true,
      maxBufferedEvents: 100000, ...fast });
    const { events, opens } = collect(client);
    const onAll = [];
    const onOrders = [];
    const items = client.events();
    try {
      await client.subscribe("events:*", (e) => onAll.push(e.seq)).ready;
      await client.subscribe("events:orders", (e) => onOrders.push(e.seq)).ready;
      const first = await publish(ws, "orders", { i: -1 }, GATEWAY_WIDE);
      await waitFor(() => events.length === 1, 5000, "first event");
      proxy.hold = true;
      proxy.cut();
      await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
      const missed = [];
      let n = 0;
      const worker = async () => {
        while (n < 5000) { n++; missed.push((await publish(ws, "orders", { n }, GATEWAY_WIDE)).seq); }
      };
      await Promise.all(Array.from({ length: 8 }, worker));
      missed.sort((a, b) => a - b);
      proxy.hold = false;
      await waitFor(() => opens.length === 2 && client.state === "open", 10000, "reconnect");
      assert.equal(opens[1].resumed, false);
      await waitFor(() => events.length >= 5001, 20000, "the replay");
      const live = await publish(ws, "orders", { live: true }, GATEWAY_WIDE);
      const seqs = [];
      while (seqs.at(-1) !== live.seq) seqs.push((await within(items.next(), 10000)).value.seq);
      const want = [first.seq, ...missed, live.seq];
      assert.deepEqual(seqs, want);
      await new Promise((r) => setTimeout(r, 200));
      assert.deepEqual(events.map((e) => e.seq), want);
      assert.deepEqual(onAll, want);
      assert.deepEqual(onOrders, want);
    } finally {
      client.close();
      await proxy.close();
    }
  });

test("4001 with a token inside the gateway's leeway backs off instead of reconnecting in a loop", { timeout: 30000 }, async () => {
  // A token cache that serves a token until it sees it expired: exp 1 s ago is refused with
  // 4001 at connect (the gateway's 5 s leeway does not outlast exp); `ready` never settles.
  const ws = "js-storm";
  const stale = token({ workspace: ws, ttl: -1 });
  let calls = 0;
  const client = connect({ url: wsUrl(ws), getToken: () => { calls++; return stale; }, proactiveRefresh: false,
    backoffInitialMs: 200, backoffMaxMs: 400 });
  const { closes } = collect(client);
  try {
    await new Promise((r) => setTimeout(r, 2000));
    assert.ok(closes.length > 0 && closes.every((c) => c.code === 4001), JSON.stringify(closes));
    assert.ok(calls < 30, `getToken called ${calls} times in 2 s`); // 0.1-0.2 s apart; a storm makes hundreds
    assert.notEqual(client.state, "closed");
  } finally {
    client.close();
  }
});

test("an unsubscribe lost on a dead link is sent again after the resume", { timeout: 30000 }, async () => {
  const ws = "js-unsub-lost";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), ...fast });
  const { opens } = collect(client);
  const items = client.events();
  try {
    await client.subscribe("events:a").ready;
    await client.subscribe("events:b").ready;
    await publish(ws, "b", {});
    assert.equal((await within(items.next(), 5000)).value.channel, "events:b");
    proxy.frozen = true;
    client.unsubscribe("events:a"); // written into a link that no longer carries anything
    await new Promise((r) => setTimeout(r, 300));
    proxy.frozen = false;
    proxy.cut();
    await waitFor(() => client.state === "open" && opens.length === 2, 5000, "resume");
    assert.equal(opens[1].resumed, true); // the gateway restored events:a with the session
    await publish(ws, "a", { x: "must not arrive" });
    const b = await publish(ws, "b", {});
    const { value } = await within(items.next(), 5000);
    assert.deepEqual([value.channel, value.seq], ["events:b", b.seq]);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a channel unsubscribed while disconnected delivers nothing after the resume", { timeout: 30000 }, async () => {
  // The resumed session has events:a back and replays what it missed there before the
  // unsubscribe, sent after auth_ok, reaches the gateway: that replay is not the app's.
  const ws = "js-unsub-offline";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), ...fast });
  const { events, opens } = collect(client);
  try {
    await client.subscribe("events:a").ready;
    await client.subscribe("events:b").ready;
    await publish(ws, "b", {});
    await waitFor(() => events.length === 1, 5000, "first event");
    proxy.hold = true;
    proxy.cut();
    await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
    client.unsubscribe("events:a");
    await publish(ws, "a", { x: "must not arrive" });
    proxy.hold = false;
    await waitFor(() => client.state === "open" && opens.length === 2, 5000, "resume");
    assert.equal(opens[1].resumed, true);
    const b = await publish(ws, "b", {});
    await waitFor(() => events.at(-1).seq === b.seq, 5000, "the live event");
    assert.deepEqual(events.map((e) => e.channel), ["events:b", "events:b"]);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a listener that throws is reported; the client and the process carry on", { timeout: 30000 }, async () => {
  const ws = "js-listener-throws";
  const reported = [];
  const consoleError = console.error;
  console.error = (...args) => reported.push(args.at(-1)?.message);
  const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }) });
  const got = [];
  try {
    client.on("event", () => { throw new Error("bug in an event listener"); });
    client.on("event", async () => { throw new Error("bug in an async event listener"); });
    client.on("event", (e) => got.push(e.seq));
    await client.subscribe("events:a", () => { throw new Error("bug in a callback"); }).ready;
    await client.subscribe("events:b", async () => { throw new Error("bug in an async callback"); }).ready;
    const a = await publish(ws, "a", {});
    const b = await publish(ws, "b", {});
    await waitFor(() => got.length === 2, 5000, "both events");
    await new Promise((r) => setTimeout(r, 100)); // a rethrow from a timer would have come by now
    assert.deepEqual(got, [a.seq, b.seq]);
    assert.deepEqual(reported.sort(), ["bug in a callback", "bug in an async callback", "bug in an async event listener",
      "bug in an async event listener", "bug in an event listener", "bug in an event listener"]);
    assert.equal(client.state, "open");
  } finally {
    client.close();
    console.error = consoleError;
  }
});

for (const headerAuth of [false, true]) {
  test(`an event in flight before the first one arrived is not lost (${headerAuth ? "new session" : "resumed"})`,
    { timeout: 30000 }, async () => {
      // No event seen yet: the resume (or the re-subscribe of a new session) asks `since` the
      // position of the `subscribed` reply, so the event the dead link swallowed is replayed;
      // also after a first reconnect that had nothing to replay.
      const ws = `js-inflight-${headerAuth}`;
      const proxy = await startProxy();
      const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), headerAuth, ...fast });
      const { events, opens } = collect(client);
      try {
        await client.subscribe("events:a").ready;
        proxy.cut();
        await waitFor(() => client.state === "open" && opens.length === 2, 5000, "reconnect");
        await waitFor(() => client.catchup === null, 5000, "the end of the catch-up, if any");
        proxy.frozen = true; // the gateway writes the event into a link that carries nothing
        const e = await publish(ws, "a", {});
        proxy.frozen = false;
        proxy.cut();
        await waitFor(() => client.state === "open" && opens.length === 3, 5000, "reconnect");
        assert.deepEqual(opens.map((o) => o.resumed), [false, !headerAuth, !headerAuth]);
        const live = await publish(ws, "a", {});
        await waitFor(() => events.some((x) => x.seq === live.seq), 5000, "the live event");
        assert.deepEqual(events.map((x) => x.seq), [e.seq, live.seq]);
      } finally {
        client.close();
        await proxy.close();
      }
    });
}

for (const headerAuth of [false, true]) {
  test(`a quiet subscription in a busy workspace reconnects without a gap (${headerAuth ? "new session" : "resumed"})`,
    { timeout: 60000 }, async () => {
      // The subscription gets no event while the workspace's other topics outrun the history
      // (500 events on this gateway): its `since` follows the pongs of the keepalive pings, so
      // the reconnect asks for what the history holds instead of getting a history_gap.
      const ws = `js-quiet-${headerAuth}`;
      const proxy = await startProxy();
      const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), headerAuth,
        pingIntervalMs: 100, ...fast });
      const { events, gaps } = collect(client);
      try {
        await client.subscribe("events:quiet").ready;
        let last = null;
        for (let i = 0; i < 600; i++) last = await publish(ws, "busy", { i });
        await waitFor(() => client.floor !== null && client.floor >= last.seq, 5000, "a pong after the busy events");
        proxy.frozen = true;
        const e = await publish(ws, "quiet", {});
        proxy.frozen = false;
        proxy.cut();
        await waitFor(() => events.some((x) => x.seq === e.seq), 5000, "the event of the outage");
        assert.deepEqual(events.map((x) => x.seq), [e.seq]);
        assert.deepEqual(gaps, []);
      } finally {
        client.close();
        await proxy.close();
      }
    });
}

for (const headerAuth of [false, true]) {
  test(`a subscription made or changed while disconnected gets the events of the outage (${headerAuth ? "new session" : "resumed"})`,
    { timeout: 30000 }, async () => {
      const ws = `js-sub-down-${headerAuth}`;
      const proxy = await startProxy();
      const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), headerAuth, ...fast });
      const { opens } = collect(client);
      const got = [];
      const onEvent = (e) => got.push(e.seq);
      try {
        await client.subscribe("events:orders", { predicates: { status: "new" } }, onEvent).ready;
        const e0 = await publish(ws, "orders", { status: "new" });
        await waitFor(() => got.length === 1, 5000, "first event");
        proxy.hold = true;
        proxy.cut();
        await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
        const changed = client.subscribe("events:orders", { predicates: { status: "paid" } }, onEvent);
        const added = client.subscribe("events:invoices", onEvent);
        const e1 = await publish(ws, "orders", { status: "paid" });
        await publish(ws, "orders", { status: "new" }); // the old filter's only: not the app's any more
        const e2 = await publish(ws, "invoices", {});
        proxy.hold = false;
        await within(Promise.all([changed.ready, added.ready]), 10000);
        const e3 = await publish(ws, "orders", { status: "paid" });
        const e4 = await publish(ws, "invoices", {});
        await waitFor(() => got.length >= 5, 5000, "the outage's events and the live ones");
        await new Promise((r) => setTimeout(r, 200));
        assert.deepEqual(got, [e0, e1, e2, e3, e4].map((e) => e.seq));
        // A resumed session would replay events:orders with the old filter before the new one
        // arrived: the filter changed offline makes it a fresh session, every channel since e0.
        assert.deepEqual(opens.map((o) => o.resumed), [false, false]);
      } finally {
        client.close();
        await proxy.close();
      }
    });
}

test("a filter unacknowledged when the link died is not resumed with the old one", { timeout: 30000 }, async () => {
  // A replacing subscribe sent just before a link loss, its answer lost with the link: the
  // gateway's session may hold either filter, so the client starts a fresh session. Resumed,
  // the old filter's replay of the outage reached the new handler. A session whose
  // subscriptions are all acknowledged (one added offline too) still resumes.
  const ws = "js-unacked-filter";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), ...fast });
  const { opens } = collect(client);
  const got = [];
  try {
    await client.subscribe("events:t", { predicates: { k: 1 } }, (e) => got.push(e.seq)).ready;
    proxy.cut();
    await waitFor(() => opens.length === 2 && client.state === "open", 5000, "a resume");
    assert.deepEqual(opens.map((o) => o.resumed), [false, true]);
    proxy.frozen = true; // the subscribe leaves, its answer does not come back
    const changed = client.subscribe("events:t", { predicates: { k: 2 } }, (e) => got.push(e.seq));
    await new Promise((r) => setTimeout(r, 200));
    await publish(ws, "t", { k: 1, i: 1 });
    const e2 = await publish(ws, "t", { k: 2, i: 2 });
    proxy.frozen = false;
    proxy.cut();
    await within(changed.ready, 10000, "the changed subscription");
    await waitFor(() => opens.length === 3 && client.state === "open", 10000, "a reconnect");
    const e3 = await publish(ws, "t", { k: 2, i: 3 });
    await waitFor(() => got.length >= 2, 5000, "the outage's event and the live one");
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(got, [e2.seq, e3.seq]);
    assert.deepEqual(opens.map((o) => o.resumed), [false, true, false]);
    await client.subscribe("events:u").ready;
    proxy.cut();
    await waitFor(() => opens.length === 4 && client.state === "open", 10000, "a resume");
    assert.equal(opens[3].resumed, true);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a connection attempt that never opens times out and backs off", { timeout: 30000 }, async () => {
  // A peer that accepts TCP but never answers the upgrade (a stuck load balancer).
  const sockets = new Set();
  const server = net.createServer((s) => { sockets.add(s); s.on("error", () => {}); });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const client = connect({ url: wsUrl("js-stuck", server.address().port), getToken: () => token({ workspace: "js-stuck" }),
    openTimeoutMs: 300, ...fast });
  const { closes } = collect(client);
  const errors = [];
  client.on("error", (e) => errors.push(e));
  try {
    await waitFor(() => closes.length >= 3, 5000, "three timed-out attempts");
    assert.ok(closes.every((c) => c.code === 1006 && /timed out/.test(c.reason)), JSON.stringify(closes));
    // Reported once, as the Python client does (it said nothing: a stuck proxy looked like a slow start).
    assert.deepEqual(described(errors), [[0, "connect_failed", false]]);
    assert.match(errors[0].message, /^cannot connect to ws:\/\/127\.0\.0\.1:\d+\/.*timed out.*; retrying$/);
    assert.equal(client.state, "reconnecting");
    assert.ok(client.attempt >= 3);
  } finally {
    client.close();
    for (const s of sockets) s.destroy();
    await new Promise((r) => server.close(r));
  }
});

test("subscribe() and events() after close() or a terminal error reject", { timeout: 30000 }, async () => {
  const client = connect({ url: wsUrl("js-after-close"), getToken: () => token({ workspace: "js-after-close" }) });
  await client.ready;
  client.close();
  await assert.rejects(within(client.subscribe("events:x").ready), (err) => err instanceof RealtimeError && err.code === 1000);
  await assert.rejects(within(client.events().next()), (err) => err instanceof RealtimeError && err.code === 1000);

  const denied = connect({ url: wsUrl("js-after-close"), getToken: () => token({ workspace: "elsewhere" }), ...fast });
  await assert.rejects(denied.ready, (err) => err.code === 4003);
  await assert.rejects(within(denied.subscribe("events:x").ready), (err) => err instanceof RealtimeError && err.code === 4003 && err.terminal);
  await assert.rejects(within(denied.events().next()), (err) => err instanceof RealtimeError && err.code === 4003);
  denied.close();
});

test("the README's Node.js example runs as written and misses no event", { timeout: 30000 }, async () => {
  // The gateway's answer to the subscribe and the first events reach the client in one read:
  // an events() iterator created after awaiting the subscription would miss those events.
  const readme = readFileSync(new URL("../README.md", import.meta.url), "utf8");
  const code = readme.split("## Node.js")[1].match(/```js\n([\s\S]*?)```/)[1];
  const ws = "js-readme";
  const proxy = await startProxy();
  // Inside the package, so that `import "@rtserver/client"` resolves to it as it would for a user.
  const file = fileURLToPath(new URL(`./.readme-example-${process.pid}.mjs`, import.meta.url));
  writeFileSync(file, code);
  const child = spawn(process.execPath, [file], {
    env: { ...process.env, RT_URL: wsUrl(ws, proxy.port), RT_TOKEN: token({ workspace: ws }) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout.on("data", (d) => { out += d; });
  child.stderr.on("data", (d) => { out += d; });
  try {
    await waitFor(() => proxy.downstream.includes("auth_ok"), 5000, "auth_ok");
    proxy.corked = true; // from here on the client gets nothing until uncork()
    await waitFor(() => proxy.downstream.includes('"subscribed"'), 5000, "the subscription");
    const seqs = [];
    for (let i = 0; i < 3; i++) seqs.push((await publish(ws, "orders", { status: "paid", i })).seq);
    await waitFor(() => (proxy.downstream.match(/"type":"event"/g) || []).length === 3, 5000, "three events");
    proxy.uncork();
    await waitFor(() => out.trim().split("\n").length >= 3, 5000, `three lines from the example, got: ${JSON.stringify(out)}`);
    assert.deepEqual(out.trim().split("\n").map((line) => Number(line.split(" ")[0])), seqs);
  } finally {
    child.kill();
    unlinkSync(file);
    await proxy.close();
  }
});

test("close() from a close or state listener stops the client for good, also on 4001", { timeout: 30000 }, async () => {
  // "Stop when the token expires" (a user who logged out): close() in the close listener of a
  // 4001 must not be followed by the at-once reconnect with a new token.
  const ws = "js-close-in-listener";
  let calls = 0;
  const getToken = () => { calls++; return token({ workspace: ws, ttl: calls === 1 ? 2 : 3600 }); };
  const client = connect({ url: wsUrl(ws), getToken, proactiveRefresh: false });
  const closes = [];
  client.on("close", (c) => { closes.push(c.code); client.close(); });
  try {
    await client.subscribe("events:x").ready;
    await client.closed;
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(closes, [4001]);
    assert.equal(client.state, "closed");
    assert.equal(calls, 1, "getToken called again after close()");
  } finally {
    client.close();
  }

  // close() in a state listener ("give up after a few attempts", or on "open"): no retry or
  // refresh timer is left behind to keep a Node.js process alive (up to backoffMaxMs, or until
  // the token's refresh) and call getToken() after close().
  const script = `
    import { connect } from ${JSON.stringify(new URL("../src/index.js", import.meta.url).href)};
    for (const [url, at] of [["ws://127.0.0.1:1/workspaces/w/realtime/connect", "reconnecting"], [process.env.RT_URL, "open"]]) {
      const client = connect({ url, getToken: () => process.env.RT_TOKEN, backoffInitialMs: 600000, backoffMaxMs: 600000 });
      client.on("state", (s) => { if (s === at) client.close(); });
      await client.closed;
      console.log("closed on", at);
    }`;
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], {
    env: { ...process.env, RT_URL: wsUrl(ws), RT_TOKEN: token({ workspace: ws }) },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let exited = false;
  child.stdout.on("data", (d) => { out += d; });
  child.stderr.on("data", (d) => { out += d; });
  child.on("exit", () => { exited = true; });
  try {
    await waitFor(() => exited, 10000, "the process to exit after close()");
    assert.equal(out.trim(), "closed on reconnecting\nclosed on open");
  } finally {
    child.kill();
  }
});

test("a refused replacement filter leaves the channel unsubscribed at the gateway too", { timeout: 30000 }, async () => {
  // The gateway keeps a subscription whose replacement it refuses; the client dropped it (its
  // ready rejected), so the gateway went on sending its events for nothing (and it held a slot
  // of the subscription quota).
  const ws = "js-refused-replacement";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }) });
  const { events } = collect(client);
  try {
    await client.subscribe("events:orders").ready;
    await assert.rejects(within(client.subscribe("events:orders", { bogus: 1 }).ready, 5000), (err) => err.code === 4000);
    await client.subscribe("events:other").ready;
    const dropped = await publish(ws, "orders", {});
    const e = await publish(ws, "other", {});
    await waitFor(() => events.length === 1, 5000, "the event on events:other");
    assert.equal(events[0].seq, e.seq);
    assert.ok(!proxy.downstream.includes(`"seq":${dropped.seq}`), "the gateway still sent events:orders");
  } finally {
    client.close();
    await proxy.close();
  }
});

test("return() on an events() iterator ends a next() pending on it", { timeout: 30000 }, async () => {
  // Stopping a consumer loop from outside (a component unmounting, an abort): the loop's pending
  // next() stayed pending for good, also after client.close(), which no longer saw the iterator.
  const ws = "js-iterator-return";
  const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }) });
  const events = client.events();
  try {
    await client.subscribe("events:x").ready;
    const e = await publish(ws, "x", {});
    assert.equal((await within(events.next(), 5000)).value.seq, e.seq);
    const pending = events.next();
    assert.deepEqual(await events.return(), { value: undefined, done: true });
    assert.deepEqual(await within(pending), { value: undefined, done: true });
    await publish(ws, "x", {});
    assert.deepEqual(await within(events.next()), { value: undefined, done: true });
  } finally {
    client.close();
  }
});

test("a filter with NaN or Infinity throws instead of matching nothing", { timeout: 30000 }, async () => {
  // JSON.stringify writes them as null: {"$lt": null} compares with no number, so the
  // subscription was confirmed and never got an event, without a word.
  const ws = "js-infinite-filter";
  const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }) });
  const { events } = collect(client);
  try {
    for (const value of [Infinity, -Infinity, NaN]) {
      assert.throws(() => client.subscribe("events:x", { predicates: { price: { $lt: value } } }), TypeError);
    }
    await client.subscribe("events:y").ready;
    await publish(ws, "x", { price: 1 });
    const e = await publish(ws, "y", {});
    await waitFor(() => events.length === 1, 5000, "the event on events:y");
    assert.deepEqual(events.map((ev) => ev.seq), [e.seq]);
  } finally {
    client.close();
  }
});

test("a filter changed by the application after subscribe() is not what a reconnect sends", { timeout: 30000 }, async () => {
  // The client kept the application's object: one built from a template and changed for the
  // next subscribe changed the first subscription too, silently, at the next new session.
  const ws = "js-filter-copy";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), headerAuth: true, ...fast });
  const { events, opens } = collect(client);
  try {
    const template = { predicates: { status: "paid" } };
    await client.subscribe("events:orders", template).ready;
    template.predicates.status = "refunded";
    await client.subscribe("events:refunds", template).ready;
    proxy.cut();
    await waitFor(() => client.state === "open" && opens.length === 2, 5000, "a new session");
    const e = await publish(ws, "orders", { status: "paid" });
    await waitFor(() => events.length === 1, 5000, "the paid order");
    assert.equal(events[0].seq, e.seq);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("concurrent next() calls on an events() iterator each get an item", { timeout: 30000 }, async () => {
  // Allowed by the async iterator protocol (a prefetching consumer, two workers sharing one
  // iterator): the second call took over the first one's wake-up, which then never came.
  const ws = "js-iterator-concurrent";
  const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }) });
  const events = client.events();
  try {
    await client.subscribe("events:x").ready;
    const first = events.next();
    const second = events.next();
    const a = await publish(ws, "x", {});
    const b = await publish(ws, "x", {});
    const got = await within(Promise.all([first, second]), 5000);
    assert.deepEqual(got.map((r) => r.value.seq).sort(), [a.seq, b.seq].sort());
    const third = events.next();
    client.close();
    assert.deepEqual(await within(third), { value: undefined, done: true });
  } finally {
    client.close();
  }
});

test("a device clock ahead of the issuer's does not refresh the token in a loop",
  { timeout: 30000, skip: GATEWAY_SKEWED ? false : "RT_TEST_GATEWAY_SKEWED is not set" }, async () => {
  // A device whose clock is 400 s fast, 300 s tokens: every fresh token looks 100 s expired to
  // it. The gateway (and the issuer) run 400 s behind instead, which the client cannot tell
  // apart. It refreshed as fast as the gateway answered (a token request and an audit record
  // each), for good.
  const ws = "js-skew";
  const url = wsUrl(ws, new URL(GATEWAY_SKEWED).port);
  let calls = 0;
  const client = connect({ url, getToken: () => { calls++; return token({ workspace: ws, ttl: 300, clockOffset: SKEWED_OFFSET }); } });
  const { closes } = collect(client);
  try {
    await client.ready;
    await new Promise((r) => setTimeout(r, 5000));
    assert.equal(client.state, "open");
    assert.deepEqual(closes, []);
    assert.ok(calls <= 3, `getToken called ${calls} times in 5 s`);
  } finally {
    client.close();
  }
  // Short tokens on that device are still refreshed before they expire at the gateway.
  let short = 0;
  const other = connect({ url, getToken: () => { short++; return token({ workspace: ws, ttl: 6, clockOffset: SKEWED_OFFSET }); } });
  const seen = collect(other);
  try {
    await other.ready;
    await new Promise((r) => setTimeout(r, 9000)); // past the first token's exp at the gateway
    assert.equal(other.state, "open");
    assert.deepEqual(seen.closes, []);
    assert.ok(short >= 3, `getToken called ${short} times`);
  } finally {
    other.close();
  }
});

test("a device clock ahead of the issuer's still reconnects at once after 4001",
  { timeout: 30000, skip: GATEWAY_SKEWED ? false : "RT_TEST_GATEWAY_SKEWED is not set" }, async () => {
  // The fresh 300 s token looks 100 s expired to a device 400 s fast (the gateway runs 400 s
  // behind here): it was taken for a stale one, and the client backed off after every 4001.
  const ws = "js-skew-4001";
  let calls = 0;
  const getToken = () => token({ workspace: ws, ttl: calls++ === 0 ? 2 : 300, clockOffset: SKEWED_OFFSET });
  // A backoff of >= 10 s would show: the reconnect after 4001 must not wait for it.
  const client = connect({ url: wsUrl(ws, new URL(GATEWAY_SKEWED).port), getToken, proactiveRefresh: false,
    backoffInitialMs: 10000 });
  const { opens, closes } = collect(client);
  try {
    await client.ready;
    await waitFor(() => closes.length === 1, 8000, "the 4001 close");
    assert.equal(closes[0].code, 4001);
    await waitFor(() => opens.length === 2, 3000, "reconnect after 4001");
    assert.equal(opens[1].resumed, true);
    assert.equal(calls, 2);
  } finally {
    client.close();
  }
});

for (const path of ["/workspaces/bad.id/realtime/connect", "/realtime/connect"]) {
  test(`a 404 to the upgrade is terminal (${path})`, { timeout: 30000 }, async () => {
    // A wrong URL: the gateway answers a malformed workspace id and any other path with HTTP 404
    // before the upgrade. It was retried for good and reported only as closes with 1006.
    let calls = 0;
    const client = connect({ url: `ws://127.0.0.1:${new URL(process.env.RT_TEST_GATEWAY).port}${path}`,
      getToken: () => { calls++; return token(); }, headerAuth: true, ...fast });
    const errors = [];
    client.on("error", (e) => errors.push(e));
    try {
      await assert.rejects(client.ready, (err) => err instanceof RealtimeError && err.code === 404 && err.terminal
        && err.codeName === "upgrade_refused" && err.message.includes("HTTP 404") && err.message.includes(path));
      await assert.rejects(client.closed, (err) => err.code === 404);
      assert.equal(client.state, "closed");
      assert.deepEqual(errors.map((e) => e.code), [404]);
      await new Promise((r) => setTimeout(r, 500)); // several backoff periods: no retry
      assert.equal(calls, 1);
    } finally {
      client.close();
    }
  });
}

test("an auth timeout is retried, not the end",
  { timeout: 30000, skip: GATEWAY_HASTY ? false : "RT_TEST_GATEWAY_HASTY is not set" }, async () => {
  // A 4002 after the error "auth timeout" says the auth message came too late (a tab frozen in
  // the background, a stalled link), not that the token is bad: it was terminal, the client
  // stopped for good. Here what the client sends reaches the gateway 1 s late, well past its 0.2 s.
  const proxy = await startProxy({ gateway: GATEWAY_HASTY });
  proxy.upstreamDelay = 1000;
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token(), ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const { closes } = collect(client);
  try {
    await waitFor(() => closes.filter((c) => c.code === 4002).length >= 2, 10000, "timed-out attempts");
    assert.equal(client.state, "reconnecting");
    // Once across the attempts, as a retried close, with the gateway's reason.
    assert.deepEqual(errors.map((e) => `${e.code} ${e.message}`), ["4002 connection closed: token_invalid: auth timeout; retrying"]);
    proxy.upstreamDelay = 0;
    await client.ready;
    assert.equal(client.state, "open");
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a gateway that cannot be reached is reported once and retried", { timeout: 30000 }, async () => {
  // No WebSocket at all (every connection dropped at once, as by a gateway that is down): the
  // client retried for good without a word on "error". Now once, not at every attempt, and
  // it gets in when the gateway answers.
  const proxy = await startProxy();
  proxy.hold = true;
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token(), ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  try {
    await waitFor(() => proxy.accepted >= 4, 5000, "failed attempts");
    assert.equal(client.state, "reconnecting");
    assert.deepEqual(errors.map((e) => [e.code, e.codeName, e.terminal]), [[0, "connect_failed", false]]);
    assert.ok(errors[0].message.startsWith(`cannot connect to ws://127.0.0.1:${proxy.port}/`), errors[0].message);
    proxy.hold = false;
    await client.ready;
    assert.equal(client.state, "open");
    assert.equal(errors.length, 1);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a 404 once connected is retried and reported once", { timeout: 30000 }, async () => {
  // Once a connection has succeeded the URL is right: a 404 then is a proxy's or a load
  // balancer's during a deploy, retried with the backoff (and reported once), not the end.
  const proxy = await startProxy();
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token(), headerAuth: true, ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  try {
    await client.ready;
    proxy.answer = "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nno route!";
    const refused = proxy.accepted;
    proxy.cut();
    await waitFor(() => proxy.accepted - refused >= 3, 5000, "refused attempts");
    assert.equal(client.state, "reconnecting");
    // The lost link (a connection had succeeded), then the 404, each once.
    assert.deepEqual(errors.map((e) => [e.code, e.codeName, e.terminal]),
      [[1006, "abnormal_closure", false], [404, "upgrade_refused", false]]);
    proxy.answer = null;
    await waitFor(() => client.state === "open", 5000, "the connection back");
    assert.equal(errors.length, 2);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a 503 to the upgrade is retried and reported once",
  { timeout: 30000, skip: GATEWAY_ONE_CONNECTION ? false : "RT_TEST_GATEWAY_ONE_CONNECTION is not set" }, async () => {
  // A gateway at its connection limit answers HTTP 503 before the upgrade: retried with the
  // backoff (it may have room later), but it never reached on("error"). Now once, not at every
  // attempt.
  const url = wsUrl("w1", new URL(GATEWAY_ONE_CONNECTION).port);
  const holder = connect({ url, getToken: () => token() });
  await holder.ready;
  const client = connect({ url, getToken: () => token(), headerAuth: true, ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const { closes } = collect(client);
  try {
    await waitFor(() => closes.length >= 4, 5000, "refused attempts");
    assert.equal(client.state, "reconnecting");
    assert.deepEqual(errors.map((e) => [e.code, e.codeName, e.terminal]), [[503, "upgrade_refused", false]]);
    assert.ok(errors[0].message.includes("HTTP 503") && errors[0].message.includes("limit of 1 connections"), errors[0].message);
    assert.ok(!errors[0].message.includes('"error"'), errors[0].message); // what the JSON says, not the JSON
    holder.close(); // room again: the retry gets in
    await client.ready;
    assert.equal(client.state, "open");
    assert.equal(errors.length, 1);
  } finally {
    holder.close();
    client.close();
  }
});


test("a quota close is reported once per outage, with its reason",
  { timeout: 30000, skip: GATEWAY_QUOTA ? false : "RT_TEST_GATEWAY_QUOTA is not set" }, async () => {
  // Connections per workspace over the limit: the gateway sends the error (why), then closes
  // with 4008. The client retries, and "error" heard the gateway's error at every attempt (a
  // flood while the quota holds); a link lost after a success (1006) it did not hear at all.
  // Now each retried close is reported once per code until a connection succeeds again.
  const port = new URL(GATEWAY_QUOTA).port;
  const proxy = await startProxy({ gateway: GATEWAY_QUOTA });
  let holder = connect({ url: wsUrl("w1", port), getToken: () => token({ sub: "holder" }), ...fast });
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token(), ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const { closes } = collect(client);
  const refusals = () => closes.filter((c) => c.code === 4008).length;
  try {
    await within(holder.ready, 10000, "the holder's connection");
    await waitFor(() => refusals() >= 3, 5000, "refused attempts");
    assert.equal(client.state, "reconnecting");
    assert.deepEqual(described(errors), [[4008, "quota_exceeded", false]]);
    assert.ok(errors[0].message.includes("quota_exceeded") && errors[0].message.includes("limit of 1 connections"),
      errors[0].message);
    holder.close(); // room again: the retry gets in
    await within(client.ready, 10000, "the client's connection once the holder left");
    // The link dies (reported: a connection had succeeded), and while the client cannot get
    // through another takes the slot: the 4008 is reported again, once.
    proxy.hold = true;
    const before = proxy.accepted;
    proxy.cut();
    await waitFor(() => proxy.accepted > before, 5000, "an attempt while held");
    holder = connect({ url: wsUrl("w1", port), getToken: () => token({ sub: "holder" }), ...fast });
    await within(holder.ready, 10000, "a second holder's connection once the client's link was cut");
    const refused = refusals();
    proxy.hold = false;
    await waitFor(() => refusals() >= refused + 3, 5000, "refused attempts again");
    assert.deepEqual(described(errors), [[4008, "quota_exceeded", false], [1006, "abnormal_closure", false],
      [0, "connect_failed", false], [4008, "quota_exceeded", false]]);
    assert.ok(errors[3].message.includes("limit of 1 connections"), errors[3].message);
  } finally {
    client.close();
    holder.close();
    await proxy.close();
  }
});

test("failures that alternate are each reported once per outage",
  { timeout: 30000, skip: GATEWAY_QUOTA ? false : "RT_TEST_GATEWAY_QUOTA is not set" }, async () => {
  // "Once per distinct close code (status) until a connection succeeds": the client kept the
  // last kind reported only, so a quota close and a 503 taking turns (two nodes behind a load
  // balancer, one at its quota, one at its connection limit) reached "error" at every attempt.
  const port = new URL(GATEWAY_QUOTA).port;
  const proxy = await startProxy({ gateway: GATEWAY_QUOTA });
  proxy.answer = (n) => (n % 2 ? null : "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfull");
  const holder = connect({ url: wsUrl("w1", port), getToken: () => token({ sub: "holder" }), ...fast });
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token(), ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const { closes } = collect(client);
  try {
    await within(holder.ready, 10000, "the holder's connection");
    await waitFor(() => closes.filter((c) => c.code === 4008).length >= 3 && proxy.accepted >= 6, 10000,
      "alternating attempts");
    assert.equal(client.state, "reconnecting");
    assert.deepEqual(described(errors), [[4008, "quota_exceeded", false], [503, "upgrade_refused", false]]);
    holder.close(); // room again: a retry that reaches the gateway gets in
    await within(client.ready, 10000, "the client's connection once the holder left");
    assert.equal(errors.length, 2);
  } finally {
    client.close();
    holder.close();
    await proxy.close();
  }
});

test("getToken resolving the token endpoint's answer instead of its token is reported at once, and retried", { timeout: 30000 }, async () => {
  // A common slip: getToken resolves to `{ access_token: ... }`. Sent as it was, the gateway
  // answered the auth message with 4000 (its `token` is not a string) and the auth timeout closed
  // the connection, at every attempt. It is refused before any connection now, as
  // token_unavailable naming what came instead (never the token), and retried with the backoff.
  const client = connect({ url: wsUrl("w1"), getToken: () => ({ access_token: token() }), ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const { closes } = collect(client);
  try {
    await waitFor(() => errors.length >= 1, 5000, "the report");
    await new Promise((r) => setTimeout(r, 500)); // several attempts at backoffMaxMs 400
    assert.equal(client.state, "reconnecting");
    assert.ok(errors.length >= 2, "not retried"); // reported at each attempt, as any failing getToken
    assert.ok(errors.every((e) => e.codeName === "token_unavailable" && !e.terminal), JSON.stringify(errors.map((e) => e.message)));
    assert.ok(errors[0].message.includes("object"), errors[0].message);
    assert.ok(!errors[0].message.includes(token().split(".")[2].slice(0, 10)), "the token is in the error");
    assert.deepEqual(closes, []); // no connection was opened for it
  } finally {
    client.close();
  }
});

test("why an auth message too big was refused reaches the error listener", { timeout: 30000 }, async () => {
  // A token larger than the gateway's message limit (64 KiB by default): the gateway says so in
  // an error 4000, then closes with 1009, terminal. The 4000, held as the connection's refusal,
  // was dropped for not matching the close's code: "error" heard "connection closed:
  // message_too_big" only, not which message or what limit.
  const client = connect({ url: wsUrl("w1"), getToken: () => token() + "x".repeat(70000), ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  await assert.rejects(client.ready, (e) => e.code === 1009 && e.terminal);
  assert.deepEqual(errors.map((e) => [e.code, e.terminal]), [[4000, false], [1009, true]]);
  assert.ok(errors[0].message.includes("65536-byte limit"), errors[0].message);
  assert.ok(errors[1].message.includes("65536-byte limit"), errors[1].message); // the terminal report says it too
  // Authenticated, a subscribe over the limit: the terminal 1009 said "message_too_big" only.
  // (The client refuses such a subscribe itself at its maxMessageBytes; one set above the
  // gateway's limit, as when the two disagree, sends it.)
  const other = connect({ url: wsUrl("w1"), getToken: () => token(), maxMessageBytes: 1 << 20, ...fast });
  const more = [];
  other.on("error", (e) => more.push(e));
  try {
    await other.ready;
    const values = Array.from({ length: 8000 }, (_, i) => `value-${i}`);
    await assert.rejects(other.subscribe("events:big", { predicates: { id: { $in: values } } }).ready,
      (e) => e.code === 1009 && e.terminal && e.message.includes("65536-byte limit"));
    assert.deepEqual(more.map((e) => [e.code, e.terminal]), [[4000, false], [1009, true]]);
  } finally {
    other.close();
  }
});

test("an identity provider out of reach is reported once as 1011",
  { timeout: 30000, skip: GATEWAY_NO_IDP ? false : "RT_TEST_GATEWAY_NO_IDP is not set" }, async () => {
  // The gateway cannot fetch the key set that verifies the token: it closes with 1011 (not
  // 4002: the token may be fine), and the client retries. "error" heard nothing, only a state
  // change: an application could not say "authentication service unavailable".
  const proxy = await startProxy({ gateway: GATEWAY_NO_IDP });
  let current = unverifiableToken();
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => current, ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const { closes } = collect(client);
  const refusals = () => closes.filter((c) => c.code === 1011).length;
  try {
    await waitFor(() => refusals() >= 3, 5000, "refused attempts");
    assert.equal(client.state, "reconnecting");
    assert.deepEqual(described(errors), [[1011, "internal_error", false]]);
    // The gateway's error before the close says why (the identity provider out of reach).
    assert.equal(errors[0].message, "connection closed: internal_error: no signing keys available (JWKS not loaded): "
      + "the identity provider's key set could not be fetched; retrying");
    current = token(); // one the gateway can check (HS256)
    await client.ready;
    current = unverifiableToken();
    proxy.cut();
    await waitFor(() => refusals() >= 6, 5000, "refused attempts again");
    assert.deepEqual(described(errors), [[1011, "internal_error", false], [1006, "abnormal_closure", false],
      [1011, "internal_error", false]]);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("an idle close after each success is reported each time",
  { timeout: 30000, skip: GATEWAY_IDLE ? false : "RT_TEST_GATEWAY_IDLE is not set" }, async () => {
  // The gateway closes a silent connection with 1001 going_away (here the client's ping comes
  // later than the idle timeout). "error" heard nothing; now each such close is reported, as
  // each follows a connection that succeeded.
  const client = connect({ url: wsUrl("w1", new URL(GATEWAY_IDLE).port), getToken: () => token(), pingIntervalMs: 60000,
    ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const { opens, closes } = collect(client);
  const idle = () => closes.filter((c) => c.code === 1001).length;
  try {
    await waitFor(() => idle() >= 2, 5000, "two idle closes");
    assert.ok(opens.length >= 2);
    assert.deepEqual(described(errors), Array(idle()).fill([1001, "going_away", false]));
    assert.equal(errors[0].message, "connection closed: going_away; retrying");
  } finally {
    client.close();
  }
});

test("a slow reader close is reported each time it recurs",
  { timeout: 30000, skip: GATEWAY_SMALL_BUFFER ? false : "RT_TEST_GATEWAY_SMALL_BUFFER is not set" }, async () => {
  // The client's reading stalls (here the network in front of it): past its send buffer the
  // gateway closes with 1013 try_again_later and the client resumes. "error" heard nothing; now
  // it hears the 1013, again after a connection succeeded in between.
  const proxy = await startProxy({ gateway: GATEWAY_SMALL_BUFFER });
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token(), ...fast });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const { opens, closes } = collect(client);
  const big = { blob: "x".repeat(60000) };
  const drops = async () => { // the connections the gateway closed with 1013 (its rt_drops_total)
    const text = await (await fetch(`${GATEWAY_SMALL_BUFFER}/metrics`)).text();
    return Number(/^rt_drops_total\{reason="slow_reader"\} (\d+)$/m.exec(text)[1]);
  };
  const slow = () => closes.filter((c) => c.code === 1013).length;
  try {
    await client.subscribe("events:big").ready;
    for (const round of [1, 2]) {
      proxy.pause();
      // Until the gateway closes it: how much the kernel's socket buffers absorb first depends
      // on their autotuning (a fixed 200 events was sometimes not enough). Read again at once:
      // a reader that has not read its close within 5 s is cut off (1006, not 1013).
      for (let i = 0; i < 2000; i++) {
        await publish("w1", "big", { ...big, i }, GATEWAY_SMALL_BUFFER);
        if (await drops() === round) break;
      }
      proxy.resume();
      await waitFor(() => slow() === round, 10000, "the 1013 close");
      await waitFor(() => client.state === "open" && opens.length === round + 1, 10000, "the resume");
    }
    assert.deepEqual(described(errors), [[1013, "try_again_later", false], [1013, "try_again_later", false]]);
    assert.equal(errors[0].message, "connection closed: try_again_later; retrying");
  } finally {
    client.close();
    await proxy.close();
  }
});

test("postgres: a public table in either spelling is one subscription",
  { timeout: 30000, skip: PG_DSN ? false : "RT_TEST_PG_DSN is not set" }, async () => {
  // The gateway keeps one subscription for postgres:orders and postgres:public.orders (§3).
  // The client kept one per spelling: the replaced one's handler still got the table's events,
  // and an unsubscribe in the other spelling left the first registered, so the next session
  // subscribed it again while the application thought it had left.
  // Tables orders (id int, big boolean) and marks (id int), made before the gateway started.
  const proxy = await startProxy();
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token(), headerAuth: true, ...fast });
  const { opens } = collect(client);
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const short = [];
  const long = [];
  const marks = [];
  try {
    await client.subscribe("postgres:orders", (e) => short.push(e.record.id)).ready;
    await client.subscribe("postgres:public.orders", { predicates: { big: true } }, (e) => long.push(e.record.id)).ready;
    await client.subscribe("postgres:marks", (e) => marks.push(e.record.id)).ready;
    psql("INSERT INTO orders VALUES (1, false), (2, true)");
    await waitFor(() => long.length === 1, 15000, "the event of the replacing filter");
    assert.deepEqual([long, short], [[2], []]);
    client.unsubscribe("postgres:orders"); // the other spelling ends it, as at the gateway
    proxy.cut(); // a new session (header auth): what the client still has is subscribed again
    await waitFor(() => client.state === "open" && opens.length === 2, 5000, "the new session");
    psql("INSERT INTO orders VALUES (3, true)");
    psql("INSERT INTO marks VALUES (1)"); // committed after it: comes after it
    await waitFor(() => marks.length === 1, 15000, "the mark");
    assert.deepEqual([long, short], [[2], []]);
    assert.deepEqual(errors.map((e) => e.code).filter((c) => c !== 1006), []); // the cut link, nothing else
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a subscription dropped on resume is reported once, also when changed while disconnected",
  { timeout: 30000, skip: GATEWAY_CHANNEL_PERMISSIONS ? false : "RT_TEST_GATEWAY_CHANNEL_PERMISSIONS is not set" }, async () => {
  // The resume drops a subscription its new token no longer grants (4003 naming the channel);
  // one the application changed while disconnected was subscribed again at the same time and
  // refused again: "error" heard of the one channel twice.
  const proxy = await startProxy({ gateway: GATEWAY_CHANNEL_PERMISSIONS });
  let channels = ["events:a", "events:b"];
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token({ channels }), ...fast });
  const { opens } = collect(client);
  const errors = [];
  client.on("error", (e) => errors.push(e));
  const got = [];
  try {
    await client.subscribe("events:a").ready;
    await client.subscribe("events:b", (e) => got.push(e.seq)).ready;
    channels = ["events:b"];
    proxy.hold = true;
    proxy.cut();
    await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
    const again = client.subscribe("events:a", { operations: ["PUBLISH"] });
    proxy.hold = false;
    await assert.rejects(within(again.ready, 5000), (e) => e.code === 4003 && e.channel === "events:a");
    assert.deepEqual(opens.map((o) => o.resumed), [false, false]); // changed while away: a fresh session
    const b = await publish("w1", "b", {}, GATEWAY_CHANNEL_PERMISSIONS); // after every answer to the session's messages
    await waitFor(() => got.length === 1, 5000, "the event on events:b");
    assert.deepEqual(got, [b.seq]);
    assert.deepEqual(errors.filter((e) => e.code !== 1006).map((e) => [e.code, e.channel]), [[4003, "events:a"]]);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("postgres: a source's loss told live is not told again by the next resume",
  { timeout: 30000, skip: PG_DSN ? false : "RT_TEST_PG_DSN is not set" }, async () => {
  // A source's loss reaches its channels' subscribers at once (a 4011 whose `oldest` is the
  // history's first event, before what the client has) and, later, any session resumed from
  // before the loss (§7). The client resumed from its last event, before the loss: each
  // reconnect until the next event or keepalive ping told the application the loss again.
  const proxy = await startProxy();
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: () => token(), ...fast });
  const other = connect({ url: wsUrl("w1"), getToken: () => token({ sub: "other" }) });
  const { opens, gaps } = collect(client);
  const got = [];
  const marks = [];
  try {
    await client.subscribe("postgres:orders", (e) => got.push(e.seq)).ready;
    await client.subscribe("events:mark", (e) => marks.push(e.seq)).ready;
    psql("INSERT INTO orders VALUES (100, false)");
    await waitFor(() => got.length === 1, 15000, "the first event");
    // Rows written to a table before the gateway's publication holds it are lost; a subscribe
    // to it makes the gateway add it and find the loss. One transaction: with two psql calls,
    // the gateway's publication sync (every 2 s) could add the table between them, and the
    // row was captured (no loss to tell; seen on a loaded machine).
    psql("CREATE TABLE fresh (id int PRIMARY KEY); INSERT INTO fresh VALUES (1)");
    await within(other.subscribe("postgres:fresh").ready, 15000);
    await waitFor(() => gaps.length === 1, 15000, "the loss, told live");
    assert.equal(gaps[0].channel, "postgres:orders");
    // A round trip that moves no position (a refused subscribe: no seq) after the gap, so the
    // link is cut after what the client sent on it had its answer.
    await assert.rejects(within(client.subscribe("nosuch:x").ready, 5000), (e) => e.code === 4010);
    for (let n = 0; n < 2; n++) {
      proxy.cut();
      await waitFor(() => client.state === "open" && opens.length === n + 2, 5000, "the resume");
      const mark = await publish("w1", "mark", {});
      await waitFor(() => marks.at(-1) === mark.seq, 5000, "the mark");
    }
    assert.deepEqual(opens.map((o) => o.resumed), [false, true, true]);
    assert.equal(gaps.length, 1, JSON.stringify(gaps));
  } finally {
    client.close();
    other.close();
    await proxy.close();
  }
});

// ---- from a black-box audit of the client (2 Dec) ----------------------------------------------

test("a filter changed while the resume is under way is not replayed with the old filter", { timeout: 30000 }, async () => {
  const ws = "ac-midresume";
  const proxy = await startProxy();
  const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), ...fast });
  const oldGot = [];
  const newGot = [];
  try {
    await client.subscribe("events:orders", { predicates: { status: "new" } }, (e) => oldGot.push(e.seq)).ready;
    const e0 = await publish(ws, "orders", { status: "new" });
    await waitFor(() => oldGot.length === 1, 5000, "first event");
    proxy.hold = true;
    proxy.cut();
    await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
    await publish(ws, "orders", { status: "new" }); // the old filter's only
    const e2 = await publish(ws, "orders", { status: "paid" });
    proxy.upstreamDelay = 500; // the auth (resume) message takes a while to reach the gateway
    proxy.hold = false;
    // The socket is open and the resume sent, its auth_ok not yet here: the app changes the filter.
    await waitFor(() => client.opened && client.state === "reconnecting", 10000, "the resume under way");
    const changed = client.subscribe("events:orders", { predicates: { status: "paid" } }, (e) => newGot.push(e.seq));
    await changed.ready;
    proxy.upstreamDelay = 0;
    const e3 = await publish(ws, "orders", { status: "paid" });
    await waitFor(() => newGot.includes(e3.seq), 5000, "the live event");
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(oldGot, [e0.seq]);
    // What the new filter takes, from the outage and live; not the old filter's event.
    assert.deepEqual(newGot, [e2.seq, e3.seq]);
  } finally {
    client.close();
    await proxy.close();
  }
});

test("an events() iterator dropped after a next() stops buffering once garbage-collected", { timeout: 30000 }, async () => {
  // "wait for the next event" as `await client.events().next()`: the iterator is dropped after
  // one item. Held for good, it buffered every later event (maxBufferedEvents of them) forever.
  const ws = "ac-iter-next";
  const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }) });
  const got = [];
  try {
    await client.subscribe("events:t", (e) => got.push(e.seq)).ready;
    for (let i = 0; i < 3; i++) {
      const first = client.events().next();
      const e = await publish(ws, "t", { i });
      assert.equal((await first).value.seq, e.seq);
    }
    await new Promise((r) => setTimeout(r, 0)); // WeakRef targets live until the job ends
    gc();
    await publish(ws, "t", { i: 3 });
    await waitFor(() => got.length === 4, 5000, "the events");
    assert.equal(client._liveIterators().length, 0, "iterators dropped after next() still buffer events");
  } finally {
    client.close();
  }
});

test("close() on a dead link lets a Node.js process exit at once", { timeout: 30000 }, async () => {
  // The app shuts down (SIGTERM) while the network is gone: close() must not hold the process
  // for the `ws` package's 30 s close handshake timeout (or, with Node's global WebSocket, until
  // the peer closes the TCP connection).
  const ws = "ac-close-dead";
  const proxy = await startProxy();
  const code = `
    import { connect } from ${JSON.stringify(new URL("../src/index.js", import.meta.url).href)};
    const client = connect({ url: ${JSON.stringify(wsUrl(ws, proxy.port))}, getToken: () => ${JSON.stringify(token({ workspace: ws }))} });
    await client.subscribe("events:a").ready;
    process.on("SIGUSR2", () => { client.close(); });
    console.log("ready");`;
  const child = spawn(process.execPath, ["--input-type=module", "-e", code], { stdio: ["ignore", "pipe", "inherit"] });
  try {
    let out = "";
    child.stdout.on("data", (d) => { out += d; });
    const exited = new Promise((r) => child.on("exit", r));
    await waitFor(() => out.includes("ready"), 10000, "the child's subscription");
    proxy.frozen = true; // the link is dead: nothing goes through any more
    const t0 = Date.now();
    child.kill("SIGUSR2");
    const outcome = await Promise.race([exited.then(() => "exited"), new Promise((r) => setTimeout(r, 5000, "alive"))]);
    assert.equal(outcome, "exited", "the process was still alive 5 s after close()");
    assert.ok(Date.now() - t0 < 5000);
  } finally {
    child.kill("SIGKILL");
    await proxy.close();
  }
});

for (const headerAuth of [false, true]) {
  test(`a filter changed as the connection comes back gets the outage's events (${headerAuth ? "new session" : "resumed"})`,
    { timeout: 30000 }, async () => {
      // The app changes the filter when it learns the connection is back ("open"), while the
      // outage's replay (resume, or re-subscribe with since) is still to come.
      const ws = `ac-open-change-${headerAuth}`;
      const proxy = await startProxy();
      const client = connect({ url: wsUrl(ws, proxy.port), getToken: () => token({ workspace: ws }), headerAuth, ...fast });
      const oldGot = [];
      const newGot = [];
      let changed = null;
      try {
        await client.subscribe("events:orders", { predicates: { status: "new" } }, (e) => oldGot.push(e.seq)).ready;
        const e0 = await publish(ws, "orders", { status: "new" });
        await waitFor(() => oldGot.length === 1, 5000, "first event");
        proxy.hold = true;
        proxy.cut();
        await waitFor(() => client.state === "reconnecting", 5000, "reconnecting");
        await publish(ws, "orders", { status: "new" }); // the old filter's only
        const e2 = await publish(ws, "orders", { status: "paid" });
        client.on("open", () => {
          changed ??= client.subscribe("events:orders", { predicates: { status: "paid" } }, (e) => newGot.push(e.seq));
        });
        proxy.hold = false;
        await waitFor(() => changed !== null, 10000, "the reconnect");
        await changed.ready;
        const e3 = await publish(ws, "orders", { status: "paid" });
        await waitFor(() => newGot.includes(e3.seq), 5000, "the live event");
        await new Promise((r) => setTimeout(r, 200));
        // The new filter's event of the outage arrives (it was lost), each event once. (An event of
        // the old filter's replay, already under way at the gateway, may precede the change.)
        assert.ok(newGot.includes(e2.seq), `the outage's event for the new filter was lost: ${newGot} lacks ${e2.seq}`);
        assert.equal(new Set(newGot).size, newGot.length, "an event delivered twice");
        assert.ok(!newGot.includes(e0.seq));
      } finally {
        client.close();
        await proxy.close();
      }
    });
}

test("nothing reaches a subscription's callback once unsubscribe() is called, also within one event", { timeout: 30000 }, async () => {
  // events:* and events:orders both match an event; the first callback to run unsubscribes the
  // other (the user navigated away): the other must not get that event any more.
  const ws = "ac-unsub-in-callback";
  const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }) });
  const late = [];
  try {
    const stopOrders = client.subscribe("events:orders", (e) => late.push(e.seq));
    await stopOrders.ready;
    await client.subscribe("events:*", () => stopOrders()).ready;
    // registered in this order, events:orders runs first: re-register it after events:*
    client.unsubscribe("events:orders");
    const stop2 = client.subscribe("events:orders", (e) => late.push(e.seq));
    await stop2.ready;
    client.subscribe("events:*", () => stop2());
    await publish(ws, "orders", {});
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(late, []);
  } finally {
    client.close();
  }
});

test("a subscribe larger than the gateway takes is refused alone, the client and its other subscriptions carry on", { timeout: 30000 }, async () => {
  // Protocol §4 allows 1000 values in an `$in`; 1000 long ids make a subscribe over the gateway's
  // 64 KiB message limit, which it answers 4000 and a close 1009: terminal, the client was closed
  // for good with every other subscription.
  const ws = "ac-too-big";
  const errors = [];
  const got = [];
  const client = connect({ url: wsUrl(ws), getToken: () => token({ workspace: ws }), ...fast });
  client.on("error", (e) => errors.push(e));
  try {
    await client.subscribe("events:ok", (e) => got.push(e.seq)).ready;
    const big = { predicates: { customer: { $in: Array.from({ length: 1000 }, (_, i) => `customer-${String(i).padStart(60, "0")}`) } } };
    const stop = client.subscribe("events:customers", big);
    await assert.rejects(stop.ready, (e) => e instanceof RealtimeError && e.codeName === "message_too_big" && e.code === 1009
      && e.channel === "events:customers" && !e.terminal);
    const e1 = await publish(ws, "ok", { n: 1 });
    await waitFor(() => got.includes(e1.seq), 5000, "the other subscription's event");
    assert.equal(client.state, "open");
    assert.deepEqual(errors, []);
  } finally {
    client.close();
  }
});

// ---- from a parity audit of the two clients (2 Dec) -------------------------------------------
// README "Clients": "a connection attempt ... counts as failed, and so does a failing `getToken`";
// clients/js/README.md: a failing getToken is reported "as a RealtimeError with codeName
// "token_unavailable" ... then retries with backoff, as the Python client does"; the Python client
// refuses a get_token returning None, and with header auth a token a header cannot carry (a
// trailing newline from a file), as "token_unavailable", retried.
for (const [what, bad] of [["undefined", undefined], ["null", null], ["a token ending in a newline", `${token()}\n`]]) {
  test(`headerAuth: getToken resolving ${what} is token_unavailable and retried, not the end`, { timeout: 20000 }, async () => {
    let calls = 0;
    const errors = [];
    const client = connect({ url: wsUrl("w1"), headerAuth: true, backoffInitialMs: 50, backoffMaxMs: 200,
      getToken: async () => (++calls === 1 ? bad : token()) });
    client.on("error", (e) => errors.push(e));
    try {
      await waitFor(() => client.state === "open" || client.state === "closed", 5000, "open or closed");
      const seen = errors.map((e) => [e.codeName, e.terminal]);
      assert.equal(client.state, "open", `stopped for good: ${JSON.stringify(seen)} ${errors[0]?.message}`);
      assert.deepEqual(seen, [["token_unavailable", false]]);
      const signature = token().split(".")[2].slice(0, 10);
      assert.ok(!errors[0].message.includes(signature), "the token is in the error");
    } finally {
      client.close();
    }
  });
}

test("message auth: getToken resolving undefined is token_unavailable, retried with the backoff (not a 10 s auth timeout)",
  { timeout: 20000 }, async () => {
    let calls = 0;
    const errors = [];
    const t0 = Date.now();
    const client = connect({ url: wsUrl("w1"), backoffInitialMs: 50, backoffMaxMs: 200,
      getToken: async () => (++calls === 1 ? undefined : token()) });
    client.on("error", (e) => errors.push(e));
    try {
      await client.ready.catch(() => {});
      const seen = errors.map((e) => e.codeName);
      assert.deepEqual(seen, ["token_unavailable"], `errors: ${errors.map((e) => e.message).join(" | ")}`);
      assert.ok(Date.now() - t0 < 3000, `open after ${Date.now() - t0} ms`);
    } finally {
      client.close();
    }
  });

test("a refresh whose getToken resolves undefined is token_unavailable (retried), not an auth message without a token",
  { timeout: 20000 }, async () => {
    let calls = 0;
    const errors = [];
    // A 4 s token: the in-band refresh is due after 3 s (75% of the time left).
    const client = connect({ url: wsUrl("w1"), backoffInitialMs: 200,
      getToken: async () => (++calls === 1 ? token({ ttl: 4 }) : undefined) });
    client.on("error", (e) => errors.push(e));
    try {
      await client.ready;
      await waitFor(() => errors.length > 0, 6000, "an error");
      assert.deepEqual(errors.map((e) => e.codeName).slice(0, 1), ["token_unavailable"],
        `errors: ${errors.map((e) => `${e.codeName}: ${e.message}`).join(" | ")}`);
    } finally {
      client.close();
    }
  });

// README "Clients": a retried close is reported "named as in the protocol's code table"; the
// table (docs/protocol.md §6) names 1002 protocol_error, as the Python client does.
test("a close 1002 from the gateway is reported as protocol_error", { timeout: 20000 }, async () => {
  const target = new URL(GATEWAY);
  // A TCP relay that, once the upgrade is answered, slips a masked text frame with RSV1 set in
  // front of what the client sends: the real gateway closes with 1002 (§6).
  const sockets = new Set();
  let injected = false;
  const relay = net.createServer((down) => {
    const up = net.connect(Number(target.port), target.hostname);
    sockets.add(down); sockets.add(up);
    up.on("data", (chunk) => {
      down.write(chunk);
      if (!injected && chunk.toString("latin1").startsWith("HTTP/1.1 101")) {
        injected = true;
        up.write(Buffer.from([0xc1, 0x80, 1, 2, 3, 4])); // FIN+RSV1, text, masked, empty
      }
    });
    down.on("data", (chunk) => up.write(chunk));
    const end = () => { down.destroy(); up.destroy(); };
    down.on("error", end); up.on("error", end); down.on("close", end); up.on("close", end);
  });
  await new Promise((r) => relay.listen(0, "127.0.0.1", r));
  const errors = [];
  const client = connect({ url: wsUrl("w1", relay.address().port), getToken: async () => token(), backoffInitialMs: 50 });
  client.on("error", (e) => errors.push(e));
  try {
    await waitFor(() => errors.some((e) => e.code === 1002), 5000, "the 1002 reported");
    const e = errors.find((x) => x.code === 1002);
    assert.equal(e.codeName, "protocol_error", e.message);
  } finally {
    client.close();
    for (const s of sockets) s.destroy();
    relay.close();
  }
});

// The Python client hands an event to no further handler once one of its handlers has closed
// the client (rtserver/client.py _on_event: "a handler of this event closed the client";
// tests/test_python_client.py test_no_event_reaches_a_handler_after_close_returned). The JS
// client went on: the other subscriptions' callbacks and the "event" listeners got it, state "closed".
test("a handler that closes the client: the event reaches no other handler after close()", { timeout: 20000 }, async () => {
  const calls = [];
  const client = connect({ url: wsUrl("w1"), getToken: async () => token() });
  const first = client.subscribe("events:stopper", () => { calls.push(["first", client.state]); client.close(); });
  const second = client.subscribe("events:*", () => calls.push(["second", client.state]));
  client.on("event", () => calls.push(["listener", client.state]));
  try {
    await first.ready;
    await second.ready;
    await publish("w1", "stopper", { n: 0 });
    await waitFor(() => calls.length > 0, 5000, "the event");
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(calls, [["first", "open"]]);
  } finally {
    client.close();
  }
});

test("pingIntervalMs 0 turns the pings off (as position_interval=0 in the Python client)", { timeout: 20000 }, async () => {
  // Armed again at every message, a 0 ms interval sent a ping for each pong: hundreds a second.
  const proxy = await startProxy();
  const client = connect({ url: wsUrl("w1", proxy.port), getToken: async () => token(), pingIntervalMs: 0 });
  try {
    await client.subscribe("events:quiet").ready;
    await new Promise((r) => setTimeout(r, 500));
    const pongs = proxy.downstream.split('"type":"pong"').length - 1;
    assert.equal(pongs, 0, `${pongs} pongs in 0.5 s`);
    assert.equal(client.state, "open");
  } finally {
    client.close();
    await proxy.close();
  }
});

test("a 4001 at the very first connect reports connecting then open, as the Python client does", { timeout: 20000 }, async () => {
  // A cached token that has expired: the gateway closes 4001 and the client comes back at once
  // with a fresh one. The states went connecting, reconnecting, connecting, open.
  let calls = 0;
  const states = [];
  const client = new RealtimeClient({ url: wsUrl("w1"), getToken: async () => (++calls === 1 ? token({ ttl: -60 }) : token()),
    ...fast });
  client.on("state", (s) => states.push(s));
  try {
    await client.subscribe("events:first").ready; // starts it, the listener in place
    assert.equal(calls, 2);
    assert.deepEqual(states, ["connecting", "open"]);
  } finally {
    client.close();
  }
});

test("a channel that is no string is refused by name", { timeout: 20000 }, async () => {
  // subscribe(undefined) (a channel read from a missing setting) threw "Cannot read properties of
  // undefined (reading 'indexOf')", naming no argument.
  const client = connect({ url: wsUrl("w1"), getToken: async () => token(), ...fast });
  try {
    for (const bad of [undefined, null, 42]) {
      assert.throws(() => client.subscribe(bad), /channel must be a string such as "events:orders", not /);
    }
    await client.subscribe("events:x").ready; // the client carries on
  } finally {
    client.close();
  }
});
