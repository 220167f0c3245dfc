// The demo page at `/` in headless Chromium, over plain HTTP: on WebSocket, on LongPoll, and
// falling back to LongPoll by itself when the server has WebSockets switched off, and showing who
// is here on a presence topic (demo-page.js
// drives the browser and the page; tests/acme.rs runs the same page at the TLS edge over HTTP/2
// through edge-browser.js). Screenshots go to tests/js/artifacts/ (git-ignored).
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, it } from "node:test";
import { UI_TIMEOUT_MS, launchBrowser, openDemo, publishThroughForm, waitForMessage, waitForTransport } from "./demo-page.js";
import { PUBLISH_TOKEN, metric, publish, startServer, waitFor } from "./support.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.join(HERE, "artifacts");
const TEST_TIMEOUT_MS = 30_000;

describe("demo page in headless Chromium", () => {
  let server;
  let browser = null;

  before(async () => {
    mkdirSync(ARTIFACTS, { recursive: true });
    server = await startServer({ env: { PUSHGATE_LONGPOLL_WINDOW_MS: "1000" } });
  });

  // Launched on first use: each test calls this, so that a missing Chromium fails every test
  // with a clear message (a failing `before` hook would only cancel them).
  let launching = null;
  function browserOnce() {
    launching ??= launchBrowser(new URL(server.url).origin).then((b) => (browser = b));
    return launching;
  }

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  for (const { name, query, transport, metricName } of [
    { name: "default", query: "", transport: "websocket", metricName: 'pushgate_connections{transport="websocket"}' },
    { name: "?transport=longpoll", query: "?transport=longpoll", transport: "longpoll", metricName: 'pushgate_connections{transport="longpoll"}' },
  ]) {
    it(`${name}: connects over ${transport}, shows API and form publishes`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const b = await browserOnce();
      const cdnBefore = b.cdnRequests.length;
      const before = await metric(server, metricName);
      const demo = await openDemo(b, `${server.url}/${query}`);
      try {
        await waitForTransport(demo, transport);
        assert.ok(b.cdnRequests.length > cdnBefore, "the page loaded phoenix.min.js from demo.phoenix_js_url");
        assert.ok((await metric(server, metricName)) >= before + 1, `${metricName} went up`);

        const fromNode = `from node over ${transport} ${Math.random().toString(36).slice(2, 8)}`;
        const { position } = await publish(server, "room:lobby", "new_msg", { body: fromNode });
        await waitForMessage(demo, fromNode);
        const shown = await demo.page.locator("#messages li.message", { hasText: fromNode }).first().innerText();
        assert.ok(shown.startsWith(position), `the message shows its position ${position}: "${shown}"`);

        const fromForm = `from the form over ${transport} ${Math.random().toString(36).slice(2, 8)}`;
        await publishThroughForm(demo, fromForm, PUBLISH_TOKEN);
        await waitForMessage(demo, fromForm);

        // The page is still on the same transport (no fallback, no reconnect).
        assert.equal(await demo.page.locator("#transport").textContent(), transport);
        assert.equal(await demo.page.locator("#socket-state").textContent(), "open");
        const errors = demo.log.filter((line) => line.startsWith("pageerror"));
        assert.deepEqual(errors, [], demo.describe());
      } finally {
        await demo.page
          .screenshot({ path: path.join(ARTIFACTS, `demo-${transport}.png`), fullPage: true })
          .catch(() => {});
        await demo.page.close();
      }
    });
  }
});

describe("demo page in headless Chromium, WebSockets switched off at the server", () => {
  let server;
  let browser = null;

  before(async () => {
    server = await startServer({ env: { PUSHGATE_WEBSOCKET_ENABLED: "false" } });
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it("falls back to LongPoll by itself (longPollFallbackMs), publishes and receives", { timeout: TEST_TIMEOUT_MS }, async () => {
    browser = await launchBrowser(new URL(server.url).origin);
    const demo = await openDemo(browser, `${server.url}/`);
    try {
      await waitForTransport(demo, "longpoll");
      const body = `after the fallback ${Math.random().toString(36).slice(2, 8)}`;
      await publishThroughForm(demo, body, PUBLISH_TOKEN);
      await waitForMessage(demo, body);
      assert.equal(await metric(server, 'pushgate_connections{transport="longpoll"}'), 1);
      const errors = demo.log.filter((line) => line.startsWith("pageerror"));
      assert.deepEqual(errors, [], demo.describe());
    } finally {
      await demo.page
        .screenshot({ path: path.join(ARTIFACTS, "demo-fallback.png"), fullPage: true })
        .catch(() => {});
      await demo.page.close();
    }
  });
});

describe("demo page in headless Chromium, presence on its topic", () => {
  let server;
  let browser = null;

  before(async () => {
    // A closed tab's LongPoll session expires within seconds.
    server = await startServer({
      env: {
        PUSHGATE_PRESENCE_TOPICS: "room:*",
        PUSHGATE_LONGPOLL_WINDOW_MS: "1000",
        PUSHGATE_LONGPOLL_SESSION_TIMEOUT_MS: "2500",
      },
    });
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  /** Waits until the page's presence line counts `n` (phoenix.js's Presence, synced). */
  async function waitForPresence(demo, n) {
    const shown = demo.page.locator("#presence");
    await waitFor(
      async () => (await demo.page.evaluate(() => document.body.dataset.presence)) === String(n),
      UI_TIMEOUT_MS,
      async () => `presence ${n}, shown "${await shown.textContent()}"${demo.describe()}`,
    );
  }

  it("tabs over WebSocket and LongPoll see each other come and go", { timeout: TEST_TIMEOUT_MS }, async () => {
    browser = await launchBrowser(new URL(server.url).origin);
    const ws = await openDemo(browser, `${server.url}/`);
    const lp = await openDemo(browser, `${server.url}/?transport=longpoll`);
    try {
      await waitForTransport(ws, "websocket");
      await waitForTransport(lp, "longpoll");
      await waitForPresence(ws, 2);
      await waitForPresence(lp, 2);
      assert.match(await ws.page.locator("#presence").textContent(), /^2 \(anonymous, anonymous\)$/);
      // Presence diffs are not shown as messages; a published message still is.
      const body = `with presence ${Math.random().toString(36).slice(2, 8)}`;
      await publish(server, "room:lobby", "new_msg", { body });
      await waitForMessage(ws, body);
      assert.equal(await ws.page.locator("#messages li.message").count(), 1, await ws.page.locator("#messages").innerText());
      await lp.page.close();
      // The closed tab's LongPoll session expires and the other tab sees it go.
      await waitForPresence(ws, 1);
      const errors = ws.log.filter((line) => line.startsWith("pageerror"));
      assert.deepEqual(errors, [], ws.describe());
    } finally {
      await ws.page
        .screenshot({ path: path.join(ARTIFACTS, "demo-presence.png"), fullPage: true })
        .catch(() => {});
      await ws.page.close();
      await lp.page.close().catch(() => {});
    }
  });
});
