// The JS client against a real gateway (started by tests/test_js_client.py).
import { test } from "node:test";
import assert from "node:assert/strict";

import { connect, RealtimeError, tokenExpiry, channelMatches } from "../src/index.js";
import { publish, startProxy, token, waitFor, wsUrl } from "./helpers.js";

const fast = { backoffInitialMs: 50, backoffMaxMs: 400 };

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
    client.on("state", (s) => states.push(s));
    try {
      await assert.rejects(client.ready, (err) => err instanceof RealtimeError && err.code === code && err.terminal);
      await assert.rejects(client.closed, (err) => err.code === code);
      assert.equal(client.state, "closed");
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
});
