// Private topics ([auth], src/auth.rs) with the official phoenix client (1.8.17 and 1.7.23):
// a connect token (JWT, HS256, minted here with node:crypto as a backend would with any JWT
// library) passed as the `token` param (both versions) or as `authToken` (1.8+: the WebSocket
// subprotocol, the LongPoll X-Phoenix-AuthToken header), over WebSocket and over LongPoll.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, it } from "node:test";
import {
  AUTH_SECRET,
  CLIENTS,
  disconnect,
  makeLongPollSocket,
  makeSocket,
  publish,
  replyTo,
  showFrames,
  jwt,
  startServer,
  waitFor,
} from "./support.js";

const SECRET = AUTH_SECRET;
const TEST_TIMEOUT_MS = 20_000;
const PUSH_TIMEOUT_MS = 3000;

const inTenMinutes = () => Math.floor(Date.now() / 1000) + 600;

for (const client of CLIENTS) {
  describe(`private topics with phoenix ${client.version}`, () => {
    let server;
    const sockets = [];

    before(async () => {
      server = await startServer({
        env: { PUSHGATE_AUTH_SECRET: SECRET, PUSHGATE_AUTH_PRIVATE_TOPICS: "user:*" },
      });
    });

    after(async () => {
      for (const socket of sockets) await disconnect(socket);
      await server?.stop();
    });

    const transports = [
      ["WebSocket", (opts) => makeSocket(client, server, opts)],
      ["LongPoll", (opts) => makeLongPollSocket(client, server, opts)],
    ];
    const ways = [["the token param", (token) => ({ params: { token } })]];
    if (client.version.startsWith("1.8")) ways.push(["authToken", (token) => ({ authToken: token })]);

    for (const [transport, make] of transports) {
      for (const [way, options] of ways) {
        it(`${transport}, ${way}: joins the granted topic, is refused another`, { timeout: TEST_TIMEOUT_MS }, async () => {
          const user = `user:${randomUUID()}`;
          const { socket, frames } = make(options(jwt({ sub: user, exp: inTenMinutes(), channels: [user] })));
          sockets.push(socket);
          socket.connect();

          const mine = socket.channel(user, {});
          const joined = await replyTo(mine.join(PUSH_TIMEOUT_MS));
          assert.equal(joined.status, "ok", `${JSON.stringify(joined)}\n${showFrames(frames)}`);

          const other = socket.channel(`user:${randomUUID()}`, {});
          const refused = await replyTo(other.join(PUSH_TIMEOUT_MS));
          assert.equal(refused.status, "error", JSON.stringify(refused));
          assert.equal(refused.response.reason, "unauthorized");
          assert.match(refused.response.detail, /does not grant/);
          other.leave(); // phoenix.js would retry a refused join with backoff

          const got = [];
          mine.on("note", (payload) => got.push(payload));
          await publish(server, user, "note", { for: user });
          await waitFor(() => got.length === 1, 5000, () => `the note on ${user}\n${showFrames(frames)}`);
          assert.deepEqual(got, [{ for: user }]);
          await disconnect(socket);
        });
      }

      it(`${transport}: without a token, public topics only; a bad token is refused with its reason`, { timeout: TEST_TIMEOUT_MS }, async () => {
        for (const [token, detail] of [
          [undefined, /connect with a token/],
          [jwt({ exp: inTenMinutes() - 3600, channels: ["user:*"] }), /expired/],
          [jwt({ exp: inTenMinutes(), channels: ["user:*"] }, "not-the-secret-not-the-secret-xx"), /signature/],
        ]) {
          const { socket, frames } = make(token ? { params: { token } } : {});
          sockets.push(socket);
          socket.connect();
          const lobby = await replyTo(socket.channel("room:lobby", {}).join(PUSH_TIMEOUT_MS));
          assert.equal(lobby.status, "ok", `${JSON.stringify(lobby)}\n${showFrames(frames)}`);
          const channel = socket.channel("user:1", {});
          const refused = await replyTo(channel.join(PUSH_TIMEOUT_MS));
          assert.equal(refused.status, "error", JSON.stringify(refused));
          assert.equal(refused.response.reason, "unauthorized");
          assert.match(refused.response.detail, detail);
          channel.leave();
          await disconnect(socket);
        }
      });
    }
  });
}
