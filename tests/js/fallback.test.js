// The official phoenix client's automatic WebSocket→LongPoll fallback (`longPollFallbackMs`,
// PHOENIX-PROTOCOL.md §3) against pushgate, for 1.8.17 and 1.7.23: with WebSockets switched off
// (`websocket.enabled = false`, upgrades answered 404) the client falls back to LongPoll and
// works; with a healthy server it stays on WebSocket, because heartbeats are answered at once.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import WebSocket from "ws";
import {
  CLIENTS,
  disconnect,
  makeSocket,
  memoryStorage,
  metric,
  publish,
  quietPeriod,
  replyTo,
  showFrames,
  startServer,
  uniqueTopic,
  waitFor,
} from "./support.js";

const TEST_TIMEOUT_MS = 20_000;
const PUSH_TIMEOUT_MS = 3000;
const FALLBACK_MS = 300;
const FALLBACK_KEY = "phx:fallback:LongPoll";
const WEBSOCKETS = 'pushgate_connections{transport="websocket"}';
const LONGPOLLS = 'pushgate_connections{transport="longpoll"}';
// longpoll.session_timeout_ms of the fallback servers: the least longpoll.window_ms (500) allows.
const SESSION_TIMEOUT_MS = 1500;

/** Resolves with the HTTP status a WebSocket upgrade to `url` gets (101 when it opens). */
function upgradeStatus(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error(`no answer to the upgrade of ${url}`));
    }, 5000);
    ws.on("unexpected-response", (_req, res) => {
      clearTimeout(timer);
      res.resume();
      ws.terminate();
      resolve(res.statusCode);
    });
    ws.on("open", () => {
      clearTimeout(timer);
      ws.close();
      resolve(101);
    });
    ws.on("error", () => {}); // reported through unexpected-response or the timer
  });
}

/** A socket with the fallback enabled and its own in-memory sessionStorage. */
function fallbackSocket(client, server, storage, opts = {}) {
  const made = makeSocket(client, server, { longPollFallbackMs: FALLBACK_MS, sessionStorage: storage, ...opts });
  const transports = [];
  made.socket.onOpen(() => transports.push(made.socket.conn?.constructor));
  return { ...made, transports };
}

async function join(channel, frames) {
  const { status, response } = await replyTo(channel.join(PUSH_TIMEOUT_MS));
  assert.equal(status, "ok", `join ${channel.topic}: ${status} ${JSON.stringify(response)}\n${showFrames(frames)}`);
  return response;
}

for (const client of CLIENTS) {
  describe(`fallback to LongPoll with phoenix ${client.version} when WebSockets are disabled`, () => {
    let server;
    const sockets = [];

    before(async () => {
      server = await startServer({
        env: {
          PUSHGATE_WEBSOCKET_ENABLED: "false",
          PUSHGATE_LONGPOLL_WINDOW_MS: "500",
          PUSHGATE_LONGPOLL_SESSION_TIMEOUT_MS: String(SESSION_TIMEOUT_MS),
        },
      });
    });

    after(async () => {
      for (const socket of sockets) socket.disconnect();
      await server?.stop();
    });

    it("the WebSocket route answers 404", { timeout: TEST_TIMEOUT_MS }, async () => {
      assert.equal(await upgradeStatus(`${server.url.replace(/^http/, "ws")}/socket/websocket?vsn=2.0.0`), 404);
    });

    it("falls back to LongPoll, joins and receives broadcasts", { timeout: TEST_TIMEOUT_MS }, async () => {
      const storage = memoryStorage();
      const { socket, frames, transports } = fallbackSocket(client, server, storage);
      sockets.push(socket);
      const primary = socket.transport;
      assert.notEqual(primary, client.LongPoll);
      const topic = uniqueTopic();
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload, ref) => received.push({ payload, ref }));
      const joined = replyTo(channel.join(PUSH_TIMEOUT_MS * 2));
      const started = Date.now();
      socket.connect();

      const { status, response } = await joined;
      assert.equal(status, "ok", `join after fallback: ${status} ${JSON.stringify(response)}`);
      const elapsed = Date.now() - started;
      assert.ok(socket.transport === client.LongPoll, `the socket's transport is ${socket.transport?.name}`);
      assert.ok(socket.conn instanceof client.LongPoll, `the connection is a ${socket.conn?.constructor?.name}`);
      assert.deepEqual(transports, [client.LongPoll], "the socket opened once, over LongPoll");
      assert.equal(storage.getItem(FALLBACK_KEY), "true", "the fallback is remembered for the session");
      assert.ok(elapsed < 3000, `the fallback took ${elapsed} ms`);
      assert.deepEqual(frames, [], "nothing went over a WebSocket");
      // One session in the end. phoenix 1.7.23 may open a second one on the way: the failed
      // upgrade's error event starts the fallback (LongPoll #1, whose first GET makes a session),
      // then the same WebSocket's close event (1006) still reaches the socket's onConnClose, which
      // schedules a reconnect, which drops #1 and opens #2. #1's session, never polled again,
      // ends after longpoll.session_timeout_ms; whether #1's GET got there first depends on timing
      // (under load it often does). So wait for that, with a deadline, rather than read the
      // count at one moment.
      await waitFor(
        async () => (await metric(server, LONGPOLLS)) === 1,
        SESSION_TIMEOUT_MS + 5000,
        async () => `one LongPoll session, have ${await metric(server, LONGPOLLS)}`,
      );
      assert.equal(await metric(server, WEBSOCKETS), 0);

      const { position } = await publish(server, topic, "new_msg", { n: 1 });
      await waitFor(() => received.length === 1, 5000, "the broadcast over LongPoll");
      assert.deepEqual(received, [{ payload: { n: 1 }, ref: position }]);
    });

    it("goes straight to LongPoll once the fallback is remembered", { timeout: TEST_TIMEOUT_MS }, async () => {
      const storage = memoryStorage();
      storage.setItem(FALLBACK_KEY, "true");
      const { socket, frames, transports } = fallbackSocket(client, server, storage);
      sockets.push(socket);
      const topic = uniqueTopic();
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload) => received.push(payload));
      socket.connect();
      assert.ok(socket.transport === client.LongPoll, "connect() picked LongPoll at once");
      await join(channel, frames);
      assert.deepEqual(transports, [client.LongPoll]);
      await publish(server, topic, "new_msg", { n: 1 });
      await waitFor(() => received.length === 1, 5000, "the broadcast over LongPoll");
    });
  });

  describe(`no fallback with phoenix ${client.version} when WebSockets work`, () => {
    let server;
    let socket;

    before(async () => {
      server = await startServer();
    });

    after(async () => {
      socket?.disconnect();
      await server?.stop();
    });

    it("passes the health check and stays on WebSocket", { timeout: TEST_TIMEOUT_MS }, async () => {
      const storage = memoryStorage();
      const made = fallbackSocket(client, server, storage);
      socket = made.socket;
      const { frames, transports } = made;
      const primary = socket.transport;
      let closes = 0;
      socket.onClose(() => closes++);
      const topic = uniqueTopic();
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload, ref) => received.push({ payload, ref }));
      socket.connect();
      await join(channel, frames);

      // The health check is a heartbeat sent on open; its reply must come within FALLBACK_MS.
      const decoded = (dir) => frames.filter(([d]) => d === dir).map(([, text]) => JSON.parse(text));
      await waitFor(() => {
        const pings = new Set(decoded("out").filter((f) => f[2] === "phoenix" && f[3] === "heartbeat").map((f) => f[1]));
        return decoded("in").some((f) => f[2] === "phoenix" && f[3] === "phx_reply" && pings.has(f[1]) && f[4].status === "ok");
      }, 5000, () => `the heartbeat reply\n${showFrames(frames)}`);

      // Longer than the fallback period several times over: a late reply would have switched it.
      await quietPeriod(FALLBACK_MS * 4);
      assert.ok(socket.transport === primary, `the socket's transport is ${socket.transport?.name}\n${showFrames(frames)}`);
      assert.ok(socket.conn instanceof WebSocket, `the connection is a ${socket.conn?.constructor?.name}`);
      assert.deepEqual(transports, [primary], "the socket opened once, over WebSocket");
      assert.equal(closes, 0, `the socket closed\n${showFrames(frames)}`);
      assert.equal(storage.getItem(FALLBACK_KEY), null, "no fallback remembered");
      assert.equal(await metric(server, WEBSOCKETS), 1);
      assert.equal(await metric(server, LONGPOLLS), 0);

      const { position } = await publish(server, topic, "new_msg", { n: 1 });
      await waitFor(() => received.length === 1, 5000, () => `the broadcast over WebSocket\n${showFrames(frames)}`);
      assert.deepEqual(received, [{ payload: { n: 1 }, ref: position }]);
      assert.ok(frames.some(([dir, text]) => dir === "in" && text.includes('"new_msg"')), "it came over the WebSocket");
      await disconnect(socket);
    });
  });
}
