// Test helpers: HS256 tokens, publishing over HTTP and a TCP proxy whose connections the test
// can cut. The gateway itself is started by tests/test_js_client.py, which passes
// RT_TEST_GATEWAY (http://host:port) and RT_TEST_SECRET.
import { createHmac } from "node:crypto";
import net from "node:net";

export const GATEWAY = process.env.RT_TEST_GATEWAY;
export const SECRET = process.env.RT_TEST_SECRET;
if (!GATEWAY || !SECRET) {
  throw new Error("RT_TEST_GATEWAY and RT_TEST_SECRET must be set (run tests/test_js_client.py)");
}
const gatewayUrl = new URL(GATEWAY);

const b64url = (buf) => Buffer.from(buf).toString("base64url");

export function token({ workspace = "w1", sub = "js-user", ttl = 3600, publish = false, secret = SECRET } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const payload = { sub, iat: now, exp: now + ttl, workspaces: [workspace] };
  if (publish) payload.realtime_publish = true;
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(payload));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

export function wsUrl(workspace, port = gatewayUrl.port) {
  return `ws://127.0.0.1:${port}/workspaces/${workspace}/realtime/connect`;
}

export async function publish(workspace, topic, payload) {
  const res = await fetch(`${GATEWAY}/workspaces/${workspace}/realtime/events/${topic}`, {
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
 * A TCP proxy to the gateway. `cut()` destroys every open connection (a network loss as the
 * client sees it); while `hold` is true new connections are dropped at once.
 */
export async function startProxy() {
  const sockets = new Set();
  const proxy = {
    hold: false,
    accepted: 0,
    port: 0,
    cut() {
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    close() {
      proxy.cut();
      return new Promise((r) => server.close(r));
    },
  };
  const server = net.createServer((client) => {
    proxy.accepted += 1;
    if (proxy.hold) { client.destroy(); return; }
    const upstream = net.connect(Number(gatewayUrl.port), gatewayUrl.hostname);
    sockets.add(client); sockets.add(upstream);
    const drop = () => { client.destroy(); upstream.destroy(); sockets.delete(client); sockets.delete(upstream); };
    client.on("error", drop); upstream.on("error", drop);
    client.on("close", drop); upstream.on("close", drop);
    client.pipe(upstream); upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  proxy.port = server.address().port;
  return proxy;
}
