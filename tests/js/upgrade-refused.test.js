// Time from page load to the first message in Chromium (the demo page, phoenix 1.8.17 with
// `longPollFallbackMs: 2500`) when a proxy in front refuses WebSocket upgrades, in each way a
// platform's proxy can:
//   - refused:  the upgrade never reaches pushgate (the proxy answers 403 itself);
//   - stripped: it reaches pushgate without its Upgrade header (a plain GET: pushgate answers
//               400 at once; 404 with websocket.enabled = false);
//   - cut:      the proxy passes the 101 and then closes the connection.
// and, for comparison, a proxy that passes WebSockets, and the page told to use LongPoll from the
// start (`?transport=longpoll`, what README recommends where WebSockets never pass).
// A publisher sends a message every 50 ms, so the first message measures the connection.
// Timings are printed as test diagnostics. Run with `npm test`.

import assert from "node:assert/strict";
import http from "node:http";
import net from "node:net";
import { after, before, describe, it } from "node:test";
import { launchBrowser, openDemo } from "./demo-page.js";
import { publish, startServer } from "./support.js";

const FALLBACK_MS = 2500; // the demo page's longPollFallbackMs
const TEST_TIMEOUT_MS = 40_000;
const FIRST_MESSAGE_DEADLINE_MS = 20_000;

/** An HTTP proxy to `target` (host:port) whose handling of upgrades is `proxy.mode`. */
function startProxy(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(":")), Number(target.slice(target.lastIndexOf(":") + 1))];
  const proxy = { mode: "pass", upgrades: [] };
  const server = http.createServer((req, res) => {
    const upstream = http.request({ host, port, method: req.method, path: req.url, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode, up.headers);
      up.pipe(res);
    });
    upstream.on("error", () => res.destroy());
    req.pipe(upstream);
  });
  server.on("upgrade", (req, socket, head) => {
    proxy.upgrades.push(proxy.mode);
    socket.on("error", () => {});
    if (proxy.mode === "refused") {
      socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
      return;
    }
    if (proxy.mode === "stripped") {
      // A proxy that speaks plain HTTP/1.1 upstream: hop-by-hop Upgrade and Connection dropped.
      const headers = { ...req.headers };
      delete headers.upgrade;
      delete headers.connection;
      const upstream = http.request({ host, port, method: req.method, path: req.url, headers }, (up) => {
        let text = `HTTP/1.1 ${up.statusCode} ${up.statusMessage}\r\n`;
        for (const [k, v] of Object.entries(up.headers)) if (k !== "connection") text += `${k}: ${v}\r\n`;
        socket.write(`${text}connection: close\r\n\r\n`);
        up.pipe(socket);
      });
      upstream.on("error", () => socket.destroy());
      upstream.end();
      return;
    }
    // pass, cut: relay the upgrade as it is.
    const upstream = net.connect(port, host, () => {
      let text = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) text += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      upstream.write(`${text}\r\n`);
      if (head.length) upstream.write(head);
      if (proxy.mode === "cut") {
        // Pass the answer's head (the 101), then close both sides.
        upstream.once("data", (chunk) => {
          const end = chunk.indexOf("\r\n\r\n");
          socket.write(end >= 0 ? chunk.subarray(0, end + 4) : chunk);
          setImmediate(() => {
            socket.destroy();
            upstream.destroy();
          });
        });
        return;
      }
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    upstream.on("error", () => socket.destroy());
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      proxy.url = `http://127.0.0.1:${server.address().port}`;
      proxy.close = () => {
        server.closeAllConnections?.();
        return new Promise((r) => server.close(() => r()));
      };
      resolve(proxy);
    });
  });
}

describe("page load to first message with WebSocket upgrades refused by a proxy (Chromium)", () => {
  let server;
  let proxy;
  let browser;
  let publishing = true;
  let publisher;
  const results = [];

  before(async () => {
    server = await startServer({ env: { PUSHGATE_LONGPOLL_WINDOW_MS: "1000" } });
    proxy = await startProxy(server.addr);
    browser = await launchBrowser(proxy.url);
    publisher = (async () => {
      let n = 0;
      while (publishing) {
        await publish(server, "room:lobby", "new_msg", { body: `tick ${++n}` }).catch(() => {});
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
  });

  after(async () => {
    publishing = false;
    await publisher;
    console.log(`page load -> first message:\n  ${results.join("\n  ")}`);
    await browser?.close();
    await proxy?.close();
    await server?.stop();
  });

  /** Opens the demo page through the proxy; resolves with {ms, transport} of the first message. */
  async function firstMessage(query = "") {
    // Each page is a new tab: its own sessionStorage, so no fallback is remembered.
    await browser.context.addInitScript(() => {
      document.addEventListener("DOMContentLoaded", () => {
        const list = document.getElementById("messages");
        new MutationObserver(() => {
          if (window.__firstMessageAt === undefined && list.querySelector("li.message")) {
            window.__firstMessageAt = performance.now();
          }
        }).observe(list, { childList: true });
      });
    });
    const demo = await openDemo(browser, `${proxy.url}/${query}`);
    try {
      await demo.page.waitForFunction(() => window.__firstMessageAt !== undefined, null, { timeout: FIRST_MESSAGE_DEADLINE_MS });
      const ms = Math.round(await demo.page.evaluate(() => window.__firstMessageAt));
      const transport = await demo.page.evaluate(() => document.body.dataset.transport);
      return { ms, transport };
    } catch (e) {
      throw new Error(`no message within ${FIRST_MESSAGE_DEADLINE_MS} ms: ${e.message}${demo.describe()}`);
    } finally {
      await demo.page.close();
    }
  }

  for (const { mode, query = "", transport, within } of [
    { mode: "pass", transport: "websocket", within: FALLBACK_MS },
    { mode: "refused", transport: "longpoll", within: FALLBACK_MS },
    { mode: "stripped", transport: "longpoll", within: FALLBACK_MS },
    { mode: "cut", transport: "longpoll", within: FIRST_MESSAGE_DEADLINE_MS },
    { mode: "refused", query: "?transport=longpoll", transport: "longpoll", within: FALLBACK_MS },
  ]) {
    it(`${mode}${query}: first message over ${transport}`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
      proxy.mode = mode;
      const got = await firstMessage(query);
      const line = `${mode}${query}: ${got.ms} ms over ${got.transport}`;
      results.push(line);
      t.diagnostic(line);
      assert.equal(got.transport, transport, line);
      assert.ok(got.ms < within, `${line}: expected under ${within} ms`);
    });
  }
});
