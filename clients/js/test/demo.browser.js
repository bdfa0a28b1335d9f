// Drives the gateway's demo page in headless Chromium (playwright-core, Debian's
// /usr/bin/chromium): connect, subscribe, receive a published event, lose the network
// (a proxy between the page and the gateway cuts every connection and refuses new ones for
// a while), publish meanwhile, and check that the page resumes and shows those events.
// Run by tests/test_browser.py with RT_TEST_GATEWAY, RT_TEST_SECRET and RT_ARTIFACTS set.
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

import { publish, startProxy, token } from "./helpers.js";

const artifacts = process.env.RT_ARTIFACTS || "test-artifacts";
const executablePath = process.env.RT_CHROMIUM || "/usr/bin/chromium";
const step = (msg) => console.log(`step: ${msg}`);

const proxy = await startProxy();
const profile = mkdtempSync(path.join(tmpdir(), "rt-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
let page;
try {
  page = context.pages()[0] || await context.newPage();
  page.on("console", (m) => console.log(`page console: ${m.text()}`));
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  const url = `http://127.0.0.1:${proxy.port}/demo/?token=${encodeURIComponent(token({ workspace: "w1", sub: "browser" }))}&workspace=w1`;
  await page.goto(url);
  step("page loaded");
  // The token is read into its field and taken out of the address bar (browser history).
  const address = await page.evaluate(() => location.href);
  const tokenField = await page.inputValue("#token");
  await page.fill("#channel", "events:demo");
  await page.click("#connect");
  await page.waitForSelector("#state[data-state=open]", { timeout: 10000 });
  await page.click("#subscribe");
  await page.waitForSelector("#subs li[data-subscribed=true]", { timeout: 10000 });
  step("connected and subscribed");

  const first = await publish("w1", "demo", { hello: "browser", n: 0 });
  await page.waitForSelector(`#events li[data-seq="${first.seq}"]`, { timeout: 10000 });
  step(`event ${first.seq} shown`);

  proxy.hold = true;
  proxy.cut();
  await page.waitForSelector("#state[data-state=reconnecting]", { timeout: 10000 });
  step("connection lost");
  const missed = [];
  for (let n = 1; n <= 3; n++) missed.push((await publish("w1", "demo", { while: "offline", n })).seq);
  proxy.hold = false;
  await page.waitForSelector("#state[data-state=open]", { timeout: 20000 });
  for (const seq of missed) await page.waitForSelector(`#events li[data-seq="${seq}"]`, { timeout: 10000 });
  step("resumed and showed the events published while offline");

  const live = await publish("w1", "demo", { after: "resume" });
  await page.waitForSelector(`#events li[data-seq="${live.seq}"]`, { timeout: 10000 });
  const shown = await page.$$eval("#events li.event", (lis) => lis.map((li) => Number(li.dataset.seq)));
  const resumed = await page.getAttribute("#status", "data-resumed");
  const gaps = await page.$$eval("#events li.gap", (lis) => lis.length);
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: path.join(artifacts, "demo-page.png"), fullPage: true });

  // A public table in either spelling is one subscription, so one entry in the list (refused
  // here, with no database: the entry stays, saying so).
  await page.fill("#channel", "postgres:orders");
  await page.click("#subscribe");
  await page.waitForSelector("#subs li[data-subscribed=false]", { timeout: 10000 });
  await page.fill("#channel", "postgres:public.orders");
  await page.click("#subscribe");
  await page.waitForFunction(() => [...document.querySelectorAll("#subs li")]
    .some((li) => li.textContent.startsWith("postgres:public.orders refused")), null, { timeout: 10000 });
  const listed = await page.$$eval("#subs li", (lis) => lis.map((li) => li.dataset.channel));
  step(`subscriptions listed: ${JSON.stringify(listed)}`);

  // headerAuth is for Node.js: in a browser the client stops at once with a terminal error
  // instead of retrying for good (there is no `ws` to import).
  const headerAuth = await page.evaluate(async (url) => {
    const { connect } = await import("/demo/rtclient.js");
    const client = connect({ url, getToken: () => "unused", headerAuth: true, backoffInitialMs: 10, backoffMaxMs: 20 });
    const states = [];
    client.on("state", (s) => states.push(s));
    const outcome = await Promise.race([
      client.ready.then(() => "open", (e) => ({ codeName: e.codeName, terminal: e.terminal })),
      new Promise((resolve) => setTimeout(() => resolve("still pending after 5 s"), 5000)),
    ]);
    client.close();
    return { outcome, retried: states.includes("reconnecting") };
  }, `ws://127.0.0.1:${proxy.port}/workspaces/w1/realtime/connect`);
  step(`headerAuth in the browser: ${JSON.stringify(headerAuth)}`);
  console.log("RESULT " + JSON.stringify({ shown, expected: [live.seq, ...missed.slice().reverse(), first.seq], resumed, gaps,
    headerAuth, listed, address, tokenFilled: tokenField.length > 100 }));
} catch (err) {
  if (page) {
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: path.join(artifacts, "demo-page-failure.png"), fullPage: true }).catch(() => {});
    console.log(`page text:\n${await page.innerText("body").catch(() => "")}`);
  }
  throw err;
} finally {
  await context.close();
  await proxy.close();
  rmSync(profile, { recursive: true, force: true });
}
