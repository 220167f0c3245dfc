// Client pushes forwarded to the application ([forward], src/forward.rs) with the official
// phoenix client (1.8.17 and 1.7.23) over WebSocket and LongPoll: `channel.push(...)` reaches
// the app (a Node HTTP server here) in order, and the app's answer is what `receive` gets.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import http from "node:http";
import { after, before, describe, it } from "node:test";
import {
  CLIENTS,
  PUBLISH_TOKEN,
  disconnect,
  makeLongPollSocket,
  makeSocket,
  replyTo,
  showFrames,
  startServer,
  uniqueTopic,
} from "./support.js";

const TEST_TIMEOUT_MS = 20_000;
const PUSH_TIMEOUT_MS = 5000;

/** The app: answers "say" with 200 {"said": body}, "refuse" with 422 {"reason": "nope"}. */
function startApp() {
  const seen = [];
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      const push = JSON.parse(body);
      seen.push({ authorization: req.headers.authorization, ...push });
      const [status, answer] =
        push.event === "say" ? [200, { said: push.payload.body }] : [422, { reason: "nope" }];
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(answer));
    });
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => resolve({ server, seen, port: server.address().port }));
  });
}

describe("client pushes forwarded to the app", () => {
  let app;
  let server;

  before(async () => {
    app = await startApp();
    server = await startServer({
      env: {
        PUSHGATE_FORWARD_URL: `http://127.0.0.1:${app.port}/pushgate/push`,
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
