// Test helpers: HS256 tokens, publishing over HTTP and a TCP proxy whose connections the test
// can cut. The gateway itself is started by tests/test_js_client.py, which passes
// RT_TEST_GATEWAY (http://host:port) and RT_TEST_SECRET, and RT_TEST_GATEWAY_WIDE: a second
// gateway with the default history of 10000 events (RT_TEST_GATEWAY keeps only 500).
import { execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import net from "node:net";

export const GATEWAY = process.env.RT_TEST_GATEWAY;
export const SECRET = process.env.RT_TEST_SECRET;
if (!GATEWAY || !SECRET) {
  throw new Error("RT_TEST_GATEWAY and RT_TEST_SECRET must be set (run tests/test_js_client.py)");
}
const gatewayUrl = new URL(GATEWAY);
export const GATEWAY_WIDE = process.env.RT_TEST_GATEWAY_WIDE || null;
// A gateway whose wall clock runs RT_TEST_SKEWED_OFFSET seconds off (-400: behind), and its
// token issuer with it: to the client, as if its own clock ran that much off the other way.
export const GATEWAY_SKEWED = process.env.RT_TEST_GATEWAY_SKEWED || null;
export const SKEWED_OFFSET = Number(process.env.RT_TEST_SKEWED_OFFSET || 0);
// A gateway that holds one WebSocket connection at most (RT_MAX_NODE_CONNECTIONS=1).
export const GATEWAY_ONE_CONNECTION = process.env.RT_TEST_GATEWAY_ONE_CONNECTION || null;
// A gateway that waits 0.2 s for the auth message (RT_AUTH_TIMEOUT=0.2).
export const GATEWAY_HASTY = process.env.RT_TEST_GATEWAY_HASTY || null;
// A gateway that holds one connection per workspace at most (RT_MAX_CONNECTIONS=1: close 4008).
export const GATEWAY_QUOTA = process.env.RT_TEST_GATEWAY_QUOTA || null;
// A gateway whose JWKS URL answers nothing: an RS256 token cannot be checked (close 1011).
export const GATEWAY_NO_IDP = process.env.RT_TEST_GATEWAY_NO_IDP || null;
// A gateway that closes a connection silent for 0.5 s with 1001 (RT_IDLE_TIMEOUT=0.5).
export const GATEWAY_IDLE = process.env.RT_TEST_GATEWAY_IDLE || null;
// A gateway with a 256 KiB send buffer per connection (RT_SEND_BUFFER_BYTES): a slow reader gets 1013.
export const GATEWAY_SMALL_BUFFER = process.env.RT_TEST_GATEWAY_SMALL_BUFFER || null;
// A gateway with channel permissions on (RT_AUTH_CHANNEL_PERMISSIONS): token({ channels }) grants them.
export const GATEWAY_CHANNEL_PERMISSIONS = process.env.RT_TEST_GATEWAY_CHANNEL_PERMISSIONS || null;
// The DSN of the PostgreSQL database whose changes RT_TEST_GATEWAY streams (only for the tests
// tests/test_js_client.py runs against such a gateway; the others skip those).
export const PG_DSN = process.env.RT_TEST_PG_DSN || null;

const b64url = (buf) => Buffer.from(buf).toString("base64url");

export function token({ workspace = "w1", sub = "js-user", ttl = 3600, publish = false, secret = SECRET, clockOffset = 0,
  channels = undefined } = {}) {
  const now = Math.floor(Date.now() / 1000 + clockOffset); // the issuer's clock
  const payload = { sub, iat: now, exp: now + ttl, workspaces: [workspace] };
  if (publish) payload.realtime_publish = true;
  if (channels !== undefined) payload.realtime_channels = channels; // for GATEWAY_CHANNEL_PERMISSIONS
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(payload));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

// An RS256 token whose key only the JWKS URL can give: the gateway looks the key up before it
// checks anything else, so the signature does not matter.
export function unverifiableToken({ workspace = "w1", sub = "js-user" } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "RS256", kid: "k1", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub, iat: now, exp: now + 3600, workspaces: [workspace] }));
  return `${head}.${body}.c2ln`;
}

export function wsUrl(workspace, port = gatewayUrl.port) {
  return `ws://127.0.0.1:${port}/workspaces/${workspace}/realtime/connect`;
}

/** Runs `sql` on the database of PG_DSN (psql: the tests need no PostgreSQL driver). */
export function psql(sql) {
  execFileSync("psql", [PG_DSN, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql], { stdio: ["ignore", "ignore", "inherit"] });
}

export async function publish(workspace, topic, payload, gateway = GATEWAY) {
  const res = await fetch(`${gateway}/workspaces/${workspace}/realtime/events/${topic}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token({ workspace, publish: true })}`, "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
  if (res.status !== 202) throw new Error(`publish: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

/** Resolves when `predicate()` holds, polling; rejects after `ms`. */
export async function waitFor(predicate, ms = 5000, what = "condition") {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * A TCP proxy to the gateway (or to `gateway`). `cut()` destroys every open connection (a
 * network loss as the client sees it); while `hold` is true new connections are dropped at
 * once; while `frozen` is true bytes are dropped both ways (a half-dead link: writes succeed,
 * nothing arrives); while `corked` is true what the gateway sends is held back, and `uncork()`
 * hands it to the client in one write. `downstream` is everything the gateway sent so far.
 * While `answer` is set, a new connection gets that text (an HTTP answer, say a load balancer's
 * 404 during a deploy) once its request head is in, and is closed. `upstreamDelay` (ms) holds
 * what the client sends that long before it goes on: a client frozen for a while (a background
 * tab) as the gateway sees it. `pause()` stops reading what the gateway sends (nothing is lost:
 * TCP's flow control pushes back on the gateway, a slow reader as it sees one) until `resume()`.
 */
export async function startProxy({ gateway = GATEWAY } = {}) {
  const target = new URL(gateway);
  const sockets = new Set();
  const upstreams = new Set();
  const held = [];
  const proxy = {
    paused: false,
    hold: false,
    frozen: false,
    corked: false,
    answer: null,
    upstreamDelay: 0,
    accepted: 0,
    port: 0,
    downstream: "",
    cut() {
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    pause() {
      proxy.paused = true;
      for (const s of upstreams) s.pause();
    },
    resume() {
      proxy.paused = false;
      for (const s of upstreams) s.resume();
    },
    uncork() {
      proxy.corked = false;
      for (const [client, chunks] of held.splice(0)) client.write(Buffer.concat(chunks));
    },
    close() {
      proxy.cut();
      return new Promise((r) => server.close(r));
    },
  };
  const server = net.createServer((client) => {
    proxy.accepted += 1;
    if (proxy.hold) { client.destroy(); return; }
    // `answer` may also be a function of the connection's number: null passes it on.
    const answer = typeof proxy.answer === "function" ? proxy.answer(proxy.accepted) : proxy.answer;
    if (answer !== null) {
      let head = "";
      client.on("error", () => {});
      client.on("data", (data) => {
        head += data.toString("latin1");
        if (head.includes("\r\n\r\n")) client.end(answer);
      });
      return;
    }
    const upstream = net.connect(Number(target.port), target.hostname);
    sockets.add(client); sockets.add(upstream);
    upstreams.add(upstream);
    const drop = () => {
      client.destroy(); upstream.destroy(); sockets.delete(client); sockets.delete(upstream); upstreams.delete(upstream);
    };
    client.on("error", drop); upstream.on("error", drop);
    client.on("close", drop); upstream.on("close", drop);
    client.on("data", (data) => {
      if (proxy.frozen) return;
      if (proxy.upstreamDelay) setTimeout(() => upstream.write(data), proxy.upstreamDelay);
      else upstream.write(data);
    });
    upstream.on("data", (data) => {
      if (proxy.frozen) return;
      proxy.downstream += data.toString("latin1");
      if (!proxy.corked) { client.write(data); return; }
      let entry = held.find(([c]) => c === client);
      if (!entry) held.push(entry = [client, []]);
      entry[1].push(data);
    });
    if (proxy.paused) upstream.pause();
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  proxy.port = server.address().port;
  return proxy;
}
