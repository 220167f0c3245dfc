// The demo page at `/` in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; never `npx playwright install`). The page loads the official client from
// the CDN URL in demo.phoenix_js_url; there is no network here, so that request is answered
// from the installed npm package (node_modules/phoenix/priv/static/phoenix.min.js).
// Screenshots go to tests/js/artifacts/ (git-ignored).
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, it } from "node:test";
import { chromium } from "playwright-core";
import { PUBLISH_TOKEN, metric, publish, startServer, waitFor } from "./support.js";

const require = createRequire(import.meta.url);
const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.join(HERE, "artifacts");
const CHROMIUM = process.env.PUSHGATE_CHROMIUM ?? "/usr/bin/chromium";
// The server's default demo.phoenix_js_url (config.rs DEFAULT_PHOENIX_JS_URL).
const PHOENIX_CDN_URL = "https://cdn.jsdelivr.net/npm/phoenix@1.8.17/priv/static/phoenix.min.js";
const PHOENIX_MIN_JS = path.resolve(require.resolve("phoenix"), "../phoenix.min.js");
const TEST_TIMEOUT_MS = 30_000;
const UI_TIMEOUT_MS = 10_000;

describe("demo page in headless Chromium", () => {
  let server;
  let context;
  let userDataDir;
  const cdnRequests = [];
  const blocked = [];

  before(async () => {
    mkdirSync(ARTIFACTS, { recursive: true });
    server = await startServer({ env: { PUSHGATE_LONGPOLL_WINDOW_MS: "1000" } });
  });

  /**
   * The browser, launched on first use. Each test calls this, so that a missing Chromium fails
   * every test with a clear message (a failing `before` hook would only cancel them).
   */
  let launching = null;
  function browserContext() {
    launching ??= launch();
    return launching;
  }

  async function launch() {
    // Fail (not skip) without the browser: scripts/test.sh installs it.
    assert.ok(
      existsSync(CHROMIUM),
      `${CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; scripts/test.sh does it)`,
    );
    assert.ok(existsSync(PHOENIX_MIN_JS), `${PHOENIX_MIN_JS} is missing; run npm ci`);
    userDataDir = mkdtempSync(path.join(os.tmpdir(), "pushgate-chromium-"));
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      timeout: 30_000,
    });
    // The client from the npm package instead of the CDN; anything else off this server fails
    // at once instead of waiting for a network that is not there.
    await context.route(PHOENIX_CDN_URL, (route) => {
      cdnRequests.push(route.request().url());
      return route.fulfill({ path: PHOENIX_MIN_JS, contentType: "application/javascript; charset=utf-8" });
    });
    await context.route(
      (url) => url.origin !== new URL(server.url).origin && url.href !== PHOENIX_CDN_URL,
      (route) => {
        blocked.push(route.request().url());
        return route.abort();
      },
    );
    return context;
  }

  after(async () => {
    await context?.close();
    await server?.stop();
    if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
  });

  /** Opens the demo at `query`, collecting console output and page errors for failure messages. */
  async function openDemo(query) {
    const page = await (await browserContext()).newPage();
    const log = [];
    page.on("console", (msg) => log.push(`console.${msg.type()}: ${msg.text()}`));
    page.on("pageerror", (err) => log.push(`pageerror: ${err.message}`));
    page.on("requestfailed", (req) => log.push(`requestfailed: ${req.method()} ${req.url()} ${req.failure()?.errorText}`));
    const response = await page.goto(`${server.url}/${query}`, { waitUntil: "load", timeout: UI_TIMEOUT_MS });
    assert.equal(response?.status(), 200, `GET /${query}`);
    return { page, log, describe: () => `\npage log:\n  ${log.join("\n  ")}\nblocked: ${blocked.join(", ")}` };
  }

  /** Waits until an `li.message` in #messages contains `text`. */
  async function waitForMessage(demo, text) {
    await demo.page
      .locator("#messages li.message", { hasText: text })
      .first()
      .waitFor({ state: "visible", timeout: UI_TIMEOUT_MS })
      .catch(async (err) => {
        const shown = await demo.page.locator("#messages").innerText().catch(() => "?");
        throw new Error(`message "${text}" not shown: ${err.message}\n#messages:\n${shown}${demo.describe()}`);
      });
  }

  async function waitForTransport(demo, expected) {
    const transport = demo.page.locator("#transport");
    await waitFor(
      async () => (await transport.textContent()) === expected && (await demo.page.locator("#channel-state").textContent()) === "joined room:lobby",
      UI_TIMEOUT_MS,
      async () => `#transport "${expected}" and the channel joined; #transport is "${await transport.textContent()}", ` +
        `#channel-state "${await demo.page.locator("#channel-state").textContent()}"${demo.describe()}`,
    );
    assert.equal(await demo.page.evaluate(() => document.body.dataset.transport), expected);
  }

  /** Publishes through the page's own form, with the token typed in. */
  async function publishThroughForm(demo, body) {
    const { page } = demo;
    await page.fill("#token", PUBLISH_TOKEN);
    await page.fill("#event", "new_msg");
    await page.fill("#payload", JSON.stringify({ body }));
    await page.click("#publish-form button[type=submit]");
    await waitFor(
      async () => /^published at \S+:\d+$/.test((await page.locator("#publish-result").textContent()) ?? ""),
      UI_TIMEOUT_MS,
      async () => `#publish-result "published at …", got "${await page.locator("#publish-result").textContent()}"${demo.describe()}`,
    );
  }

  for (const { name, query, transport, metricName } of [
    { name: "default", query: "", transport: "websocket", metricName: 'pushgate_connections{transport="websocket"}' },
    { name: "?transport=longpoll", query: "?transport=longpoll", transport: "longpoll", metricName: 'pushgate_connections{transport="longpoll"}' },
  ]) {
    it(`${name}: connects over ${transport}, shows API and form publishes`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const cdnBefore = cdnRequests.length;
      const before = await metric(server, metricName);
      const demo = await openDemo(query);
      try {
        await waitForTransport(demo, transport);
        assert.ok(cdnRequests.length > cdnBefore, "the page loaded phoenix.min.js from demo.phoenix_js_url");
        assert.ok((await metric(server, metricName)) >= before + 1, `${metricName} went up`);

        const fromNode = `from node over ${transport} ${Math.random().toString(36).slice(2, 8)}`;
        const { position } = await publish(server, "room:lobby", "new_msg", { body: fromNode });
        await waitForMessage(demo, fromNode);
        const shown = await demo.page.locator("#messages li.message", { hasText: fromNode }).first().innerText();
        assert.ok(shown.startsWith(position), `the message shows its position ${position}: "${shown}"`);

        const fromForm = `from the form over ${transport} ${Math.random().toString(36).slice(2, 8)}`;
        await publishThroughForm(demo, fromForm);
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
