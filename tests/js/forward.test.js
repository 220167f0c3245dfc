// Client pushes forwarded to the application ([forward], src/forward.rs) with the official
// phoenix client (1.8.17 and 1.7.23) over WebSocket and LongPoll: `channel.push(...)` reaches
// the app (a Node HTTP server here) in order, and the app's answer is what `receive` gets; the
// app can publish to everyone but the pusher ("send to others", the publish's `exclude`).
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  CLIENTS,
  PUBLISH_TOKEN,
  disconnect,
  makeLongPollSocket,
  makeSocket,
  publish,
  replyTo,
  showFrames,
  startPushApp,
  startServer,
  uniqueTopic,
  waitFor,
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

      it(`phoenix ${client.version} over ${transport}: the app sends a push to the others, not to the pusher`, { timeout: TEST_TIMEOUT_MS }, async () => {
        app.publishTo = server;
        const topic = uniqueTopic("chat");
        const pusher = make({});
        const other = makeSocket(client, server, {});
        const received = { pusher: [], other: [] };
        const channels = {};
        for (const [name, { socket, frames }] of [["pusher", pusher], ["other", other]]) {
          socket.connect();
          const channel = socket.channel(topic, {});
          channel.on("said", (payload) => received[name].push(payload.body));
          channel.on("after", () => received[name].push("after"));
          const joined = await replyTo(channel.join(PUSH_TIMEOUT_MS));
          assert.equal(joined.status, "ok", `${JSON.stringify(joined)}\n${showFrames(frames)}`);
          channels[name] = channel;
        }
        const answer = await replyTo(channels.pusher.push("tell-others", { body: "hi all" }, PUSH_TIMEOUT_MS));
        assert.equal(answer.status, "ok", `${JSON.stringify(answer)}\n${showFrames(pusher.frames)}`);
        const sender = app.seen.filter((p) => p.topic === topic).at(-1).sender;
        assert.match(sender, /^[0-9a-f]+\.\d+$/);
        // A message for everyone after it: once the pusher has it, the "said" it never got
        // would have come first.
        await publish(server, topic, "after", {});
        await waitFor(() => received.pusher.length > 0 && received.other.length > 1, PUSH_TIMEOUT_MS, () =>
          `pusher ${JSON.stringify(received.pusher)}, other ${JSON.stringify(received.other)}\n${showFrames(pusher.frames)}`);
        assert.deepEqual(received.pusher, ["after"], showFrames(pusher.frames));
        assert.deepEqual(received.other, ["hi all", "after"], showFrames(other.frames));
        await disconnect(pusher.socket);
        await disconnect(other.socket);
      });
    }
  }
});
