// server.allowed_origins (src/origin.rs) with the official phoenix client (1.8.17 and 1.7.23):
// a page from a listed origin (exact or `https://*.` subdomain) joins and receives a message over
// WebSocket and LongPoll; one from another origin never connects and is counted as a refusal.
// Node sends no Origin by itself, so the transports here add the header a browser would; then
// headless Chromium, whose CORS rules decide for real: a page on a listed origin (another port of
// localhost than pushgate's 127.0.0.1) gets through the preflight with the fixed header list and
// receives a message over LongPoll and WebSocket; a page on another origin does not.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import WebSocket from "ws";
import { launchBrowser } from "./demo-page.js";
import { CLIENTS, disconnect, metric, publish, startServer, uniqueTopic, waitFor } from "./support.js";

const TEST_TIMEOUT_MS = 20_000;
const REFUSALS = 'pushgate_refusals_total{cause="origin"}';

/** A WebSocket transport that sends `origin` in the handshake, as a browser on that page would. */
function webSocketFrom(origin) {
  return class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, { origin });
    }
  };
}

/** A LongPoll transport (1.8.x: headers are an object) that sends `origin` with every request. */
function longPollFrom(client, origin) {
  return class extends client.LongPoll {
    ajax(method, headers, body, onCallerTimeout, callback) {
      super.ajax(method, { ...headers, Origin: origin }, body, onCallerTimeout, callback);
    }
  };
}

/** Connects, joins a fresh topic, publishes to it; resolves with the payload received. */
async function receivesFrom(client, server, transport) {
  const socket = new client.Socket(`${server.url}/socket`, { transport });
  try {
    socket.connect();
    const topic = uniqueTopic("origins");
    const channel = socket.channel(topic, {});
    const got = [];
    channel.on("hello", (payload) => got.push(payload));
    await new Promise((resolve, reject) => {
      channel.join().receive("ok", resolve).receive("error", reject).receive("timeout", reject);
    });
    await publish(server.url, topic, "hello", { n: 1 });
    await waitFor(() => got.length > 0, 5000, "the published message");
    return got[0];
  } finally {
    await disconnect(socket);
  }
}

for (const client of CLIENTS) {
  describe(`server.allowed_origins with phoenix ${client.version}`, () => {
    let server;

    before(async () => {
      server = await startServer({
        env: { PUSHGATE_SERVER_ALLOWED_ORIGINS: "https://app.example.com,https://*.example.org" },
      });
    });

    after(async () => {
      await server?.stop();
    });

    for (const origin of ["https://app.example.com", "https://chat.example.org"]) {
      it(`WebSocket from ${origin} receives messages`, { timeout: TEST_TIMEOUT_MS }, async () => {
        assert.deepEqual(await receivesFrom(client, server, webSocketFrom(origin)), { n: 1 });
      });
      if (client.version.startsWith("1.8")) {
        it(`LongPoll from ${origin} receives messages`, { timeout: TEST_TIMEOUT_MS }, async () => {
          assert.deepEqual(await receivesFrom(client, server, longPollFrom(client, origin)), { n: 1 });
        });
      }
    }

    const refused = [["WebSocket", () => webSocketFrom("https://evil.example.net")]];
    if (client.version.startsWith("1.8")) {
      refused.push(["LongPoll", () => longPollFrom(client, "https://evil.example.net")]);
    }
    for (const [name, transport] of refused) it(`a ${name} from another origin never opens and is counted`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const before = await metric(server, REFUSALS);
      const socket = new client.Socket(`${server.url}/socket`, {
        transport: transport(),
        reconnectAfterMs: () => 50,
      });
      let opened = false;
      socket.onOpen(() => {
        opened = true;
      });
      socket.connect();
      try {
        await waitFor(async () => (await metric(server, REFUSALS)) >= before + 2, 5000, "two refused handshakes");
        assert.equal(opened, false);
      } finally {
        await disconnect(socket);
      }
    });
  });
}

/** The page: phoenix.js (1.8, the npm package's build) connecting to `socketUrl` with `transport`. */
function page(socketUrl, transport) {
  return `<!doctype html><meta charset="utf-8"><title>origins</title>
<script src="/phoenix.min.js"></script>
<script>
  window.state = { joined: false, errors: 0, events: [] };
  const socket = new Phoenix.Socket(${JSON.stringify(socketUrl)}, {
    transport: ${transport === "longpoll" ? "Phoenix.LongPoll" : "WebSocket"},
    reconnectAfterMs: () => 200,
  });
  socket.onError(() => { window.state.errors += 1; });
  socket.connect();
  const channel = socket.channel("room:browser-origins", {});
  channel.on("hello", (payload) => window.state.events.push(payload));
  channel.join().receive("ok", () => { window.state.joined = true; });
</script>`;
}

describe("server.allowed_origins in headless Chromium (phoenix 1.8.17)", () => {
  const require = createRequire(import.meta.url);
  const phoenixJs = readFileSync(path.resolve(require.resolve("phoenix"), "../phoenix.min.js"));
  let pushgate;
  let pages; // two listeners: the listed origin's page and another origin's
  let browser = null;

  before(async () => {
    pages = [];
    for (let i = 0; i < 2; i++) {
      const server = http.createServer((req, res) => {
        const url = new URL(req.url, "http://localhost");
        if (url.pathname === "/phoenix.min.js") {
          res.writeHead(200, { "content-type": "application/javascript" }).end(phoenixJs);
        } else {
          const socketUrl = `ws://${pushgate.addr}/socket`;
          res.writeHead(200, { "content-type": "text/html" }).end(page(socketUrl, url.searchParams.get("transport")));
        }
      });
      await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
      pages.push({ server, origin: `http://localhost:${server.address().port}` });
    }
    pushgate = await startServer({
      env: { PUSHGATE_SERVER_ALLOWED_ORIGINS: pages[0].origin, PUSHGATE_LONGPOLL_WINDOW_MS: "1000" },
    });
  });

  // Launched on first use, so that a missing Chromium fails each test with its message.
  let launching = null;
  async function open(origin, transport) {
    launching ??= launchBrowser(new URL(pushgate.url).origin).then(async (b) => {
      // The page origins too (launchBrowser lets only pushgate's through; later routes win).
      for (const p of pages) await b.context.route(`${p.origin}/**`, (route) => route.continue());
      browser = b;
      return b;
    });
    const b = await launching;
    const tab = await b.context.newPage();
    const log = [];
    tab.on("console", (msg) => log.push(`console.${msg.type()}: ${msg.text()}`));
    tab.on("requestfailed", (req) => log.push(`requestfailed: ${req.method()} ${req.url()} ${req.failure()?.errorText}`));
    await tab.goto(`${origin}/?transport=${transport}`, { waitUntil: "load" });
    return { tab, log };
  }

  after(async () => {
    await browser?.close();
    await pushgate?.stop();
    for (const p of pages ?? []) p.server.close();
  });

  for (const transport of ["longpoll", "websocket"]) {
    it(`a page on the listed origin receives messages over ${transport}`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const { tab, log } = await open(pages[0].origin, transport);
      try {
        const state = () => tab.evaluate(() => window.state);
        await waitFor(async () => (await state()).joined, 10_000, async () => `the join; ${JSON.stringify(await state())}\n${log.join("\n")}`);
        const n = Math.random();
        await publish(pushgate, "room:browser-origins", "hello", { n });
        await waitFor(async () => (await state()).events.some((e) => e.n === n), 10_000, async () => `the message; ${JSON.stringify(await state())}\n${log.join("\n")}`);
      } finally {
        await tab.close();
      }
    });

    it(`a page on another origin is refused over ${transport}`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const before = await metric(pushgate, REFUSALS);
      const { tab, log } = await open(pages[1].origin, transport);
      try {
        const state = () => tab.evaluate(() => window.state);
        await waitFor(async () => (await metric(pushgate, REFUSALS)) >= before + 2 && (await state()).errors >= 2, 10_000,
          async () => `two refusals and errors; ${JSON.stringify(await state())}\n${log.join("\n")}`);
        assert.equal((await state()).joined, false);
      } finally {
        await tab.close();
      }
    });
  }
});
