// Driving the demo page at `/` in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; never `npx playwright install`). Shared by browser.test.js (plain HTTP) and
// edge-browser.js (HTTPS and HTTP/2 at the TLS edge, run by tests/acme.rs).
//
// The page loads the official client from the CDN URL in demo.phoenix_js_url; there is no
// network here, so that request is answered from the installed npm package
// (node_modules/phoenix/priv/static/phoenix.min.js), and any other origin than the server's fails
// at once instead of waiting for a network that is not there.

import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";
import { waitFor } from "./support.js";

const require = createRequire(import.meta.url);
export const CHROMIUM = process.env.PUSHGATE_CHROMIUM ?? "/usr/bin/chromium";
// The server's default demo.phoenix_js_url (config.rs DEFAULT_PHOENIX_JS_URL).
export const PHOENIX_CDN_URL = "https://cdn.jsdelivr.net/npm/phoenix@1.8.17/priv/static/phoenix.min.js";
const PHOENIX_MIN_JS = path.resolve(require.resolve("phoenix"), "../phoenix.min.js");
export const UI_TIMEOUT_MS = 10_000;

/**
 * Chromium with a fresh profile, allowed to reach `origin` only (and the CDN URL, answered
 * locally). `args`: extra command-line switches. Fails (never skips) without the browser:
 * scripts/test.sh installs it. Returns `{context, cdnRequests, blocked, close()}`.
 */
export async function launchBrowser(origin, args = []) {
  assert.ok(
    existsSync(CHROMIUM),
    `${CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; scripts/test.sh does it)`,
  );
  assert.ok(existsSync(PHOENIX_MIN_JS), `${PHOENIX_MIN_JS} is missing; run npm ci`);
  const userDataDir = mkdtempSync(path.join(os.tmpdir(), "pushgate-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
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
      ...args,
    ],
    timeout: 30_000,
  });
  const cdnRequests = [];
  const blocked = [];
  await context.route(PHOENIX_CDN_URL, (route) => {
    cdnRequests.push(route.request().url());
    return route.fulfill({ path: PHOENIX_MIN_JS, contentType: "application/javascript; charset=utf-8" });
  });
  await context.route(
    (url) => url.origin !== origin && url.href !== PHOENIX_CDN_URL,
    (route) => {
      blocked.push(route.request().url());
      return route.abort();
    },
  );
  return {
    context,
    cdnRequests,
    blocked,
    async close() {
      await context.close();
      rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/**
 * Opens `url` (the demo page) in a new page, collecting console output, page errors and failed
 * requests for failure messages. Returns `{page, log, describe()}`.
 */
export async function openDemo(browser, url) {
  const page = await browser.context.newPage();
  const log = [];
  page.on("console", (msg) => log.push(`console.${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (err) => log.push(`pageerror: ${err.message}`));
  page.on("requestfailed", (req) => log.push(`requestfailed: ${req.method()} ${req.url()} ${req.failure()?.errorText}`));
  const response = await page.goto(url, { waitUntil: "load", timeout: UI_TIMEOUT_MS });
  assert.equal(response?.status(), 200, `GET ${url}`);
  return {
    page,
    log,
    describe: () => `\npage log:\n  ${log.join("\n  ")}\nblocked: ${browser.blocked.join(", ")}`,
  };
}

/** Waits until the page shows `expected` as its transport and has joined room:lobby. */
export async function waitForTransport(demo, expected) {
  const transport = demo.page.locator("#transport");
  await waitFor(
    async () => (await transport.textContent()) === expected && (await demo.page.locator("#channel-state").textContent()) === "joined room:lobby",
    UI_TIMEOUT_MS,
    async () => `#transport "${expected}" and the channel joined; #transport is "${await transport.textContent()}", ` +
      `#channel-state "${await demo.page.locator("#channel-state").textContent()}"${demo.describe()}`,
  );
  assert.equal(await demo.page.evaluate(() => document.body.dataset.transport), expected);
}

/** Waits until an `li.message` in #messages contains `text`. */
export async function waitForMessage(demo, text) {
  await demo.page
    .locator("#messages li.message", { hasText: text })
    .first()
    .waitFor({ state: "visible", timeout: UI_TIMEOUT_MS })
    .catch(async (err) => {
      const shown = await demo.page.locator("#messages").innerText().catch(() => "?");
      throw new Error(`message "${text}" not shown: ${err.message}\n#messages:\n${shown}${demo.describe()}`);
    });
}

/** Publishes through the page's own form, with `token` typed in. */
export async function publishThroughForm(demo, body, token) {
  const { page } = demo;
  await page.fill("#token", token);
  await page.fill("#event", "new_msg");
  await page.fill("#payload", JSON.stringify({ body }));
  await page.click("#publish-form button[type=submit]");
  await waitFor(
    async () => /^published at \S+:\d+$/.test((await page.locator("#publish-result").textContent()) ?? ""),
    UI_TIMEOUT_MS,
    async () => `#publish-result "published at …", got "${await page.locator("#publish-result").textContent()}"${demo.describe()}`,
  );
}
