// Client pushes forwarded to the application ([forward], src/forward.rs) with the official
// phoenix client (1.8.17 and 1.7.23) over WebSocket and LongPoll: `channel.push(...)` reaches
// the app (a Node HTTP server here) in order, and the app's answer is what `receive` gets.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  CLIENTS,
  PUBLISH_TOKEN,
  disconnect,
  makeLongPollSocket,
  makeSocket,
  replyTo,
  showFrames,
  startPushApp,
  startServer,
  uniqueTopic,
} from "./support.js";

const TEST_TIMEOUT_MS = 20_000;
const PUSH_TIMEOUT_MS = 5000;

describe("client pushes forwarded to the app", () => {
  let app;
  let server;

  before(async () => {
    app = await startPushApp();
    server = await startServer({
      env: {
        PUSHGATE_FORWARD_URL: app.url,
        PUSHGATE_FORWARD_TOPICS: "chat:*",
      },
    });
  });

  after(async () => {
    await server?.stop();
    app?.server.close();
  });

  for (const client of CLIENTS) {
    for (const [transport, make] of [
      ["WebSocket", (opts) => makeSocket(client, server, opts)],
      ["LongPoll", (opts) => makeLongPollSocket(client, server, opts)],
    ]) {
      it(`phoenix ${client.version} over ${transport}: pushes reach the app in order, its answers come back`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const { socket, frames } = make({ params: { token: "user-42" } });
        socket.connect();
        const topic = uniqueTopic("chat");
        const channel = socket.channel(topic, {});
        const joined = await replyTo(channel.join(PUSH_TIMEOUT_MS));
        assert.equal(joined.status, "ok", `${JSON.stringify(joined)}\n${showFrames(frames)}`);

        const bodies = ["one", "two", "three", "four", "five"];
        const replies = await Promise.all(bodies.map((body) => replyTo(channel.push("say", { body }, PUSH_TIMEOUT_MS))));
        assert.deepEqual(
          replies,
          bodies.map((body) => ({ status: "ok", response: { said: body } })),
          showFrames(frames),
        );
        const refused = await replyTo(channel.push("shout", {}, PUSH_TIMEOUT_MS));
        assert.deepEqual(refused, { status: "error", response: { reason: "nope" } });

        const mine = app.seen.filter((p) => p.topic === topic);
        assert.deepEqual(mine.map((p) => p.payload.body ?? p.event), [...bodies, "shout"]);
        for (const p of mine) {
          assert.equal(p.authorization, `Bearer ${PUBLISH_TOKEN}`);
          assert.equal(p.token, "user-42");
        }
        await disconnect(socket);
      });
    }
  }
});
