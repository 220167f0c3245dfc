// server.allowed_origins (src/origin.rs) with the official phoenix client (1.8.17 and 1.7.23):
// a page from a listed origin (exact or `https://*.` subdomain) joins and receives a message over
// WebSocket and LongPoll; one from another origin never connects and is counted as a refusal.
// Node sends no Origin by itself, so the transports here add the header a browser would.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import WebSocket from "ws";
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
