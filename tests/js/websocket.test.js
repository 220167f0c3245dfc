// The official phoenix client (1.8.17 and 1.7.23) against pushgate over WebSocket.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  CLIENTS,
  disconnect,
  makeSocket,
  publish,
  quietPeriod,
  replyTo,
  showFrames,
  startServer,
  uniqueTopic,
  waitFor,
  leaveAcknowledged,
} from "./support.js";

const POSITION = /^[^:]+:\d+$/;
const TEST_TIMEOUT_MS = 20_000;
const PUSH_TIMEOUT_MS = 3000;

/** Decoded frames of one direction, as `[join_ref, ref, topic, event, payload]`. */
function decoded(frames, direction) {
  return frames.filter(([dir]) => dir === direction).map(([, text]) => JSON.parse(text));
}

/** Joins `channel` and resolves with the join reply's response; fails the test on anything but "ok". */
async function join(channel, frames) {
  const { status, response } = await replyTo(channel.join(PUSH_TIMEOUT_MS));
  assert.equal(status, "ok", `join ${channel.topic}: ${status} ${JSON.stringify(response)}\n${showFrames(frames)}`);
  return response;
}

for (const client of CLIENTS) {
  describe(`WebSocket with phoenix ${client.version}`, () => {
    let server;
    const sockets = [];

    before(async () => {
      server = await startServer();
    });

    after(async () => {
      for (const socket of sockets) socket.disconnect();
      await server?.stop();
    });

    /** A connected socket that is disconnected when the suite ends. */
    function connect(opts = {}) {
      const made = makeSocket(client, server, opts);
      sockets.push(made.socket);
      made.socket.connect();
      return made;
    }

    it("joins room:lobby and gets the topic position", { timeout: TEST_TIMEOUT_MS }, async () => {
      const { socket, frames } = connect();
      const channel = socket.channel("room:lobby", {});
      const response = await join(channel, frames);

      assert.equal(typeof response.position, "string", `join response: ${JSON.stringify(response)}`);
      assert.match(response.position, POSITION);

      // The reply echoes the join's ref and join_ref as the same strings.
      const [joinFrame] = decoded(frames, "out").filter((f) => f[3] === "phx_join");
      const [replyFrame] = decoded(frames, "in").filter((f) => f[3] === "phx_reply" && f[1] === joinFrame[1]);
      assert.deepEqual(replyFrame.slice(0, 3), [joinFrame[0], joinFrame[1], "room:lobby"], showFrames(frames));
    });

    it("delivers published broadcasts with the position as ref", { timeout: TEST_TIMEOUT_MS }, async () => {
      const topic = uniqueTopic();
      const { socket, frames } = connect();
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload, ref) => received.push({ payload, ref }));
      await join(channel, frames);

      const positions = [];
      for (let n = 1; n <= 3; n++) {
        const answer = await publish(server, topic, "new_msg", { n, body: `hello ${n}` });
        assert.match(answer.position, POSITION);
        positions.push(answer.position);
      }

      await waitFor(() => received.length >= 3, 5000, () => `3 broadcasts, got ${received.length}\n${showFrames(frames)}`);
      assert.deepEqual(
        received,
        positions.map((ref, i) => ({ payload: { n: i + 1, body: `hello ${i + 1}` }, ref })),
      );
      // Broadcasts carry no join_ref.
      for (const frame of decoded(frames, "in").filter((f) => f[3] === "new_msg")) {
        assert.equal(frame[0], null, `broadcast frame ${JSON.stringify(frame)}`);
      }
    });

    it("answers a refused client push with an error reply", { timeout: TEST_TIMEOUT_MS }, async () => {
      const { socket, frames } = connect();
      const channel = socket.channel(uniqueTopic(), {});
      await join(channel, frames);

      const { status, response } = await replyTo(channel.push("shout", { a: 1 }, PUSH_TIMEOUT_MS));
      assert.equal(status, "error", `push reply ${status} ${JSON.stringify(response)}\n${showFrames(frames)}`);
      assert.equal(typeof response.reason, "string", `error response: ${JSON.stringify(response)}`);
    });

    it("leaves a channel and stops delivering its broadcasts", { timeout: TEST_TIMEOUT_MS }, async () => {
      const leftTopic = uniqueTopic();
      const controlTopic = uniqueTopic();
      const { socket, frames } = connect();
      const left = socket.channel(leftTopic, {});
      const control = socket.channel(controlTopic, {});
      const controlReceived = [];
      control.on("new_msg", (payload) => controlReceived.push(payload));
      await join(left, frames);
      await join(control, frames);

      const { status, response } = await replyTo(left.leave(PUSH_TIMEOUT_MS));
      assert.equal(status, "ok", `leave reply ${status} ${JSON.stringify(response)}\n${showFrames(frames)}`);
      // phoenix resolves leave() with "ok" locally as soon as it sends phx_leave, before the
      // server has read it: a publish now could rightly reach the channel still joined. Wait for
      // the server's own reply and close.
      await waitFor(
        () => leaveAcknowledged(frames, leftTopic),
        5000,
        () => `the server's leave reply and phx_close\n${showFrames(frames)}`,
      );

      // The client drops messages for topics it left, so look at the raw frames.
      await publish(server, leftTopic, "new_msg", { n: 1 });
      await publish(server, controlTopic, "new_msg", { n: 2 });
      await waitFor(() => controlReceived.length === 1, 5000, "the broadcast on the channel still joined");
      await quietPeriod(200);
      const leaked = decoded(frames, "in").filter((f) => f[2] === leftTopic && f[3] === "new_msg");
      assert.deepEqual(leaked, [], `broadcasts after leave\n${showFrames(frames)}`);
    });

    it("keeps the connection over several heartbeats", { timeout: TEST_TIMEOUT_MS }, async () => {
      const topic = uniqueTopic();
      const { socket, frames } = connect({ heartbeatIntervalMs: 300 });
      let opens = 0;
      let closes = 0;
      socket.onOpen(() => opens++);
      socket.onClose(() => closes++);
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload) => received.push(payload));
      await join(channel, frames);

      const heartbeatReplies = () => {
        const sent = new Set(decoded(frames, "out").filter((f) => f[2] === "phoenix" && f[3] === "heartbeat").map((f) => f[1]));
        return decoded(frames, "in").filter((f) => f[2] === "phoenix" && f[3] === "phx_reply" && sent.has(f[1]));
      };
      // Heartbeats chain: each goes out 300 ms after the previous reply.
      await waitFor(() => heartbeatReplies().length >= 3, 5000, () => `3 heartbeat replies\n${showFrames(frames)}`);

      await publish(server, topic, "new_msg", { n: 1 });
      await waitFor(() => received.length === 1, 5000, () => `the broadcast after heartbeats\n${showFrames(frames)}`);
      assert.equal(opens, 1, "the socket opened more than once");
      assert.equal(closes, 0, `the socket closed\n${showFrames(frames)}`);
      assert.ok(channel.state === "joined", `channel state ${channel.state}`);
    });

    it("recovers missed broadcasts after a reconnect", { timeout: TEST_TIMEOUT_MS }, async () => {
      const topic = uniqueTopic();
      let lastPosition = null;
      const { socket, frames } = connect();
      const channel = socket.channel(topic, () => (lastPosition ? { since: lastPosition } : {}));
      const received = [];
      channel.on("new_msg", (payload, ref) => {
        received.push({ n: payload.n, ref });
        lastPosition = ref;
      });
      const joins = [];
      channel.join(PUSH_TIMEOUT_MS).receive("ok", (response) => joins.push(response));
      await waitFor(() => joins.length === 1, 5000, () => `the first join\n${showFrames(frames)}`);

      const positions = [];
      const publishNext = async () => {
        const { position } = await publish(server, topic, "new_msg", { n: positions.length + 1 });
        positions.push(position);
      };
      for (let i = 0; i < 3; i++) await publishNext();
      await waitFor(() => received.length === 3, 5000, () => `3 live broadcasts\n${showFrames(frames)}`);

      await disconnect(socket);
      for (let i = 0; i < 50; i++) await publishNext();
      socket.connect();

      await waitFor(() => joins.length === 2, 5000, () => `the rejoin\n${showFrames(frames)}`);
      assert.equal(joins[1].recovered, true, `rejoin response ${JSON.stringify(joins[1])}`);
      const rejoin = decoded(frames, "out").filter((f) => f[3] === "phx_join").at(-1);
      assert.deepEqual(rejoin[4], { since: positions[2] }, "the rejoin carries the last position seen");

      await waitFor(() => received.length >= 53, 5000, () => `53 broadcasts, got ${received.length}\n${showFrames(frames)}`);
      // The missed messages follow the rejoin reply; none arrives before it.
      const inbound = decoded(frames, "in");
      const rejoinReply = inbound.findIndex((f) => f[3] === "phx_reply" && f[1] === rejoin[1]);
      const firstReplayed = inbound.findIndex((f) => f[3] === "new_msg" && f[4].n === 4);
      assert.ok(rejoinReply !== -1 && rejoinReply < firstReplayed, `replay order\n${showFrames(frames, 60)}`);
      for (let i = 0; i < 5; i++) await publishNext();
      await waitFor(() => received.length >= 58, 5000, () => `58 broadcasts, got ${received.length}\n${showFrames(frames)}`);
      await quietPeriod(200); // duplicates would show up here

      assert.deepEqual(
        received.map((m) => m.n),
        Array.from({ length: 58 }, (_, i) => i + 1),
        "every message exactly once, in order",
      );
      assert.deepEqual(received.map((m) => m.ref), positions, "each broadcast's ref is its published position");
    });

    it("answers a join from an unknown epoch with recovered: false", { timeout: TEST_TIMEOUT_MS }, async () => {
      const topic = uniqueTopic();
      await publish(server, topic, "new_msg", { n: 1 });
      const { socket, frames } = connect();
      const channel = socket.channel(topic, { since: "nope:5" });
      const response = await join(channel, frames);
      assert.equal(response.recovered, false, `join response ${JSON.stringify(response)}`);
    });
  });

  describe(`WebSocket restart with phoenix ${client.version}`, () => {
    const servers = [];
    let socket;

    after(async () => {
      socket?.disconnect();
      for (const server of servers) await server.stop();
    });

    it("reconnects and rejoins after the server restarts", { timeout: TEST_TIMEOUT_MS }, async () => {
      const first = await startServer();
      servers.push(first);
      const topic = uniqueTopic();
      const made = makeSocket(client, first, { reconnectAfterMs: () => 50 });
      socket = made.socket;
      const { frames } = made;
      const closeCodes = [];
      let opens = 0;
      socket.onOpen(() => opens++);
      socket.onClose((event) => closeCodes.push(event?.code));
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload) => received.push(payload));
      const joins = [];
      channel.join(PUSH_TIMEOUT_MS).receive("ok", (response) => joins.push(response));
      socket.connect();
      await waitFor(() => joins.length === 1, 5000, () => `the first join\n${showFrames(frames)}`);

      await first.stop();
      await waitFor(() => closeCodes.length >= 1, 5000, "the close event");
      assert.equal(closeCodes[0], 1012, `close codes seen: ${closeCodes}`);

      // A new server on the same port; the old listener is gone, so it can bind.
      const second = await startServer({ listen: `127.0.0.1:${first.port}` });
      servers.push(second);
      await waitFor(() => joins.length === 2, 10_000, () => `the rejoin\n${showFrames(frames)}`);
      assert.ok(opens >= 2, `onOpen calls: ${opens}`);

      await publish(second, topic, "new_msg", { n: 1 });
      await waitFor(() => received.length === 1, 5000, () => `the broadcast from the new server\n${showFrames(frames)}`);
      assert.deepEqual(received, [{ n: 1 }]);
    });
  });
}
