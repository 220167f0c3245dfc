// The official phoenix client (1.8.17 and 1.7.23) against pushgate over LongPoll
// (/socket/longpoll). 1.8.x makes its requests with fetch here; 1.7.x needs XMLHttpRequest,
// which support.js provides from the `xhr2` package for 1.7 sockets only.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  CLIENTS,
  disconnect,
  makeLongPollSocket,
  metric,
  publish,
  publishBatch,
  quietPeriod,
  replyTo,
  showExchanges,
  showFrames,
  startServer,
  uniqueTopic,
  waitFor,
  leaveAcknowledged,
} from "./support.js";

const POSITION = /^[^:]+:\d+$/;
const SESSION_TOKEN = /^lp[0-9a-f]{32}$/;
/** A poll answer's token: the session's, then the number of the last frame answered (8 hex digits). */
const ANSWER_TOKEN = /^lp[0-9a-f]{32}([0-9a-f]{8})?$/;
const TEST_TIMEOUT_MS = 20_000;
const PUSH_TIMEOUT_MS = 3000;
// A short poll window keeps the tests fast; sessions expire quickly so that "long" disconnects
// (longer than the session lifetime) take about two seconds.
const WINDOW_MS = 500;
const SESSION_TIMEOUT_MS = 1600;
const LONGPOLL_ENV = {
  PUSHGATE_LONGPOLL_WINDOW_MS: String(WINDOW_MS),
  PUSHGATE_LONGPOLL_SESSION_TIMEOUT_MS: String(SESSION_TIMEOUT_MS),
};
const LONGPOLL_SESSIONS = 'pushgate_connections{transport="longpoll"}';
const SESSIONS_EXPIRED = "pushgate_longpoll_sessions_expired_total";

/** Decoded frames of one direction, as `[join_ref, ref, topic, event, payload]`. */
function decoded(frames, direction) {
  return frames.filter(([dir]) => dir === direction).map(([, text]) => JSON.parse(text));
}

/** Frames and HTTP exchanges of one recorded socket, for assertion messages. */
function evidence({ frames, exchanges }) {
  return `frames:\n${showFrames(frames)}\nexchanges:\n${showExchanges(exchanges)}`;
}

/** Joins `channel` and resolves with the join reply's response; fails the test on anything but "ok". */
async function join(channel, made) {
  const { status, response } = await replyTo(channel.join(PUSH_TIMEOUT_MS));
  assert.equal(status, "ok", `join ${channel.topic}: ${status} ${JSON.stringify(response)}\n${evidence(made)}`);
  return response;
}

/** A channel whose params ask for what was missed since the last broadcast seen (`{since}`). */
function recoveringChannel(socket, topic) {
  const state = { lastPosition: null, received: [], joins: [] };
  state.channel = socket.channel(topic, () => (state.lastPosition ? { since: state.lastPosition } : {}));
  state.channel.on("new_msg", (payload, ref) => {
    state.received.push({ n: payload.n, ref });
    state.lastPosition = ref;
  });
  state.channel.join(PUSH_TIMEOUT_MS).receive("ok", (response) => state.joins.push(response));
  return state;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

for (const client of CLIENTS) {
  describe(`LongPoll with phoenix ${client.version}`, () => {
    let server;
    const sockets = [];

    before(async () => {
      server = await startServer({ env: LONGPOLL_ENV });
    });

    after(async () => {
      for (const socket of sockets) socket.disconnect();
      await server?.stop();
    });

    /** A connected LongPoll socket that is disconnected when the suite ends. */
    function connect(opts = {}) {
      const made = makeLongPollSocket(client, server, opts);
      sockets.push(made.socket);
      made.socket.connect();
      return made;
    }

    it("opens a session, joins room:lobby and gets the topic position", { timeout: TEST_TIMEOUT_MS }, async () => {
      const made = connect();
      const { socket, frames, exchanges } = made;
      assert.ok(socket.transport === made.Transport, "the socket uses the LongPoll transport");
      const channel = socket.channel("room:lobby", {});
      const response = await join(channel, made);

      assert.equal(typeof response.position, "string", `join response: ${JSON.stringify(response)}`);
      assert.match(response.position, POSITION);

      // The first GET has no session token (a bare trailing "&") and gets 410 with a new one.
      const first = exchanges[0];
      assert.equal(first.method, "GET", evidence(made));
      assert.match(first.url, /\/socket\/longpoll\?vsn=2\.0\.0&?$/, evidence(made));
      assert.equal(first.answer?.status, 410, evidence(made));
      assert.match(first.answer.token, SESSION_TOKEN, evidence(made));
      assert.deepEqual(first.answer.messages, [], evidence(made));
      // Later requests carry that token, with the acknowledgement of the last answer received
      // (the token that answer carried) once there is one.
      let expected = first.answer.token;
      for (const exchange of exchanges.slice(1)) {
        // (A POST sent while a GET is out carries the token from before that GET's answer.)
        const token = exchange.method === "GET" ? expected : first.answer.token;
        assert.ok(
          exchange.method === "GET" ? exchange.url.endsWith(`&token=${token}`) : exchange.url.includes(`&token=${token}`),
          `request without the token ${token}\n${evidence(made)}`,
        );
        if (exchange.method === "GET" && exchange.answer?.token) {
          assert.match(exchange.answer.token, ANSWER_TOKEN, evidence(made));
          assert.ok(exchange.answer.token.startsWith(first.answer.token), evidence(made));
          expected = exchange.answer.token;
        }
      }

      // The reply echoes the join's ref and join_ref as the same strings.
      const [joinFrame] = decoded(frames, "out").filter((f) => f[3] === "phx_join");
      const [replyFrame] = decoded(frames, "in").filter((f) => f[3] === "phx_reply" && f[1] === joinFrame[1]);
      assert.deepEqual(replyFrame?.slice(0, 3), [joinFrame[0], joinFrame[1], "room:lobby"], evidence(made));
    });

    it("holds an idle poll for the window, answers 204 and stays connected", { timeout: TEST_TIMEOUT_MS }, async () => {
      const made = connect();
      const { socket, exchanges } = made;
      let opens = 0;
      let closes = 0;
      socket.onOpen(() => opens++);
      socket.onClose(() => closes++);
      const topic = uniqueTopic();
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload) => received.push(payload));
      await join(channel, made);

      const idle = () => exchanges.filter((e) => e.method === "GET" && e.answer?.status === 204);
      await waitFor(() => idle().length >= 3, 5000, () => `3 idle polls answered 204\n${evidence(made)}`);
      for (const { answer } of idle()) {
        assert.match(answer.token, ANSWER_TOKEN, evidence(made));
        assert.deepEqual(answer.messages, [], evidence(made));
      }
      // Three idle windows took about three windows: polls are neither answered early nor late.
      const started = Date.now();
      const before = idle().length;
      await waitFor(() => idle().length >= before + 2, 5000, () => `2 more idle polls\n${evidence(made)}`);
      const elapsed = Date.now() - started;
      assert.ok(elapsed >= WINDOW_MS * 0.8, `2 idle polls took only ${elapsed} ms (window ${WINDOW_MS} ms)\n${evidence(made)}`);

      await publish(server, topic, "new_msg", { n: 1 });
      await waitFor(() => received.length === 1, 5000, () => `the broadcast after idle polls\n${evidence(made)}`);
      assert.equal(opens, 1, "the socket opened more than once");
      assert.equal(closes, 0, `the socket closed\n${evidence(made)}`);
      assert.equal(channel.state, "joined");
    });

    it("delivers published broadcasts with the position as ref", { timeout: TEST_TIMEOUT_MS }, async () => {
      const topic = uniqueTopic();
      const made = connect();
      const { socket, frames } = made;
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload, ref) => received.push({ payload, ref }));
      await join(channel, made);

      const positions = [];
      for (let n = 1; n <= 3; n++) {
        const answer = await publish(server, topic, "new_msg", { n, body: `hello ${n}` });
        assert.match(answer.position, POSITION);
        positions.push(answer.position);
      }

      await waitFor(() => received.length >= 3, 5000, () => `3 broadcasts, got ${received.length}\n${evidence(made)}`);
      await quietPeriod(100); // duplicates would show up here
      assert.deepEqual(
        received,
        positions.map((ref, i) => ({ payload: { n: i + 1, body: `hello ${i + 1}` }, ref })),
      );
      for (const frame of decoded(frames, "in").filter((f) => f[3] === "new_msg")) {
        assert.equal(frame[0], null, `broadcast frame ${JSON.stringify(frame)}`);
      }
    });

    it("answers a refused client push with an error reply", { timeout: TEST_TIMEOUT_MS }, async () => {
      const made = connect();
      const channel = made.socket.channel(uniqueTopic(), {});
      await join(channel, made);

      const { status, response } = await replyTo(channel.push("shout", { a: 1 }, PUSH_TIMEOUT_MS));
      assert.equal(status, "error", `push reply ${status} ${JSON.stringify(response)}\n${evidence(made)}`);
      assert.equal(typeof response.reason, "string", `error response: ${JSON.stringify(response)}`);
      // The POST carrying the push got {"status":200}; the reply came through a GET.
      const post = made.exchanges.find((e) => e.method === "POST" && e.body?.includes('"shout"'));
      assert.deepEqual(post?.answer, { status: 200 }, evidence(made));
    });

    it("leaves a channel and stops delivering its broadcasts", { timeout: TEST_TIMEOUT_MS }, async () => {
      const leftTopic = uniqueTopic();
      const controlTopic = uniqueTopic();
      const made = connect();
      const { socket, frames } = made;
      const left = socket.channel(leftTopic, {});
      const control = socket.channel(controlTopic, {});
      const controlReceived = [];
      control.on("new_msg", (payload) => controlReceived.push(payload));
      await join(left, made);
      await join(control, made);

      const { status, response } = await replyTo(left.leave(PUSH_TIMEOUT_MS));
      assert.equal(status, "ok", `leave reply ${status} ${JSON.stringify(response)}\n${evidence(made)}`);
      // phoenix resolves leave() with "ok" locally as soon as it sends phx_leave; over LongPoll
      // that is before the POST reaches the server. Wait for the server's own reply and close.
      await waitFor(
        () => leaveAcknowledged(frames, leftTopic),
        5000,
        () => `the server's leave reply and phx_close\n${evidence(made)}`,
      );

      // The client drops messages for topics it left, so look at the raw frames.
      await publish(server, leftTopic, "new_msg", { n: 1 });
      await publish(server, controlTopic, "new_msg", { n: 2 });
      await waitFor(() => controlReceived.length === 1, 5000, "the broadcast on the channel still joined");
      await quietPeriod(200);
      const leaked = decoded(frames, "in").filter((f) => f[2] === leftTopic && f[3] === "new_msg");
      assert.deepEqual(leaked, [], `broadcasts after leave\n${evidence(made)}`);
    });

    it("delivers a burst of 200 batch-published broadcasts in order, exactly once", { timeout: TEST_TIMEOUT_MS }, async () => {
      const topic = uniqueTopic();
      const made = connect();
      const { socket } = made;
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("new_msg", (payload, ref) => received.push({ n: payload.n, ref }));
      await join(channel, made);

      const items = range(1, 200).map((n) => ({ topic, event: "new_msg", payload: { n, pad: "x".repeat(50) } }));
      const positions = await publishBatch(server, items);
      for (const position of positions) assert.match(position, POSITION);

      await waitFor(() => received.length >= 200, 10_000, () => `200 broadcasts, got ${received.length}\n${evidence(made)}`);
      await quietPeriod(WINDOW_MS); // duplicates would show up here
      assert.deepEqual(received.map((m) => m.n), range(1, 200), "every message exactly once, in order");
      assert.deepEqual(received.map((m) => m.ref), positions, "each broadcast's ref is its published position");
    });
  });

  describe(`LongPoll recovery with phoenix ${client.version}`, () => {
    const servers = [];
    const sockets = [];

    after(async () => {
      for (const socket of sockets) socket.disconnect();
      for (const server of servers) await server.stop();
    });

    async function freshServer(env = LONGPOLL_ENV, listen = undefined) {
      const server = await startServer({ env, listen });
      servers.push(server);
      return server;
    }

    function newSocket(server, opts = {}) {
      const made = makeLongPollSocket(client, server, opts);
      sockets.push(made.socket);
      return made;
    }

    it("drops the session of a client that disconnected in the middle of a poll", { timeout: TEST_TIMEOUT_MS }, async () => {
      const server = await freshServer();
      const made = newSocket(server);
      const { socket, exchanges } = made;
      const channel = socket.channel(uniqueTopic(), {});
      socket.connect();
      await join(channel, made);
      // The client always has a poll outstanding; disconnect() aborts it.
      await waitFor(() => exchanges.at(-1)?.method === "GET" && exchanges.at(-1).answer === undefined, 5000, "a pending poll");
      assert.equal(await metric(server, LONGPOLL_SESSIONS), 1);
      await disconnect(socket);

      const deadline = SESSION_TIMEOUT_MS * 2 + WINDOW_MS + 2000;
      await waitFor(
        async () => (await metric(server, LONGPOLL_SESSIONS)) === 0,
        deadline,
        async () => `the abandoned session to expire (longpoll.session_timeout_ms ${SESSION_TIMEOUT_MS}); ` +
          `${LONGPOLL_SESSIONS} is still ${await metric(server, LONGPOLL_SESSIONS).catch((e) => e.message)}`,
      );
      assert.equal(await metric(server, SESSIONS_EXPIRED), 1);
    });

    it("recovers missed broadcasts with `since` after a disconnect", { timeout: TEST_TIMEOUT_MS }, async () => {
      const server = await freshServer();
      const topic = uniqueTopic();
      const made = newSocket(server);
      const { socket, frames } = made;
      const state = recoveringChannel(socket, topic);
      socket.connect();
      await waitFor(() => state.joins.length === 1, 5000, () => `the first join\n${evidence(made)}`);

      const positions = [];
      for (let n = 1; n <= 3; n++) positions.push((await publish(server, topic, "new_msg", { n })).position);
      await waitFor(() => state.received.length === 3, 5000, () => `3 live broadcasts\n${evidence(made)}`);

      await disconnect(socket);
      const missed = range(4, 53).map((n) => ({ topic, event: "new_msg", payload: { n } }));
      positions.push(...(await publishBatch(server, missed)));
      const requestsBefore = made.exchanges.length;
      socket.connect();

      await waitFor(() => state.joins.length === 2, 5000, () => `the rejoin\n${evidence(made)}`);
      assert.equal(state.joins[1].recovered, true, `rejoin response ${JSON.stringify(state.joins[1])}`);
      // A new session: the reconnect starts without a token.
      assert.equal(made.exchanges[requestsBefore]?.answer?.status, 410, evidence(made));
      const rejoin = decoded(frames, "out").filter((f) => f[3] === "phx_join").at(-1);
      assert.deepEqual(rejoin[4], { since: positions[2] }, "the rejoin carries the last position seen");

      await waitFor(() => state.received.length >= 53, 5000, () => `53 broadcasts, got ${state.received.length}\n${evidence(made)}`);
      // The missed messages follow the rejoin reply.
      const inbound = decoded(frames, "in");
      const rejoinReply = inbound.findIndex((f) => f[3] === "phx_reply" && f[1] === rejoin[1]);
      const firstReplayed = inbound.findIndex((f) => f[3] === "new_msg" && f[4].n === 4);
      assert.ok(rejoinReply !== -1 && rejoinReply < firstReplayed, `replay order\n${evidence(made)}`);

      for (let n = 54; n <= 56; n++) positions.push((await publish(server, topic, "new_msg", { n })).position);
      await waitFor(() => state.received.length >= 56, 5000, () => `56 broadcasts, got ${state.received.length}\n${evidence(made)}`);
      await quietPeriod(WINDOW_MS); // duplicates would show up here
      assert.deepEqual(state.received.map((m) => m.n), range(1, 56), "every message exactly once, in order");
      assert.deepEqual(state.received.map((m) => m.ref), positions, "each broadcast's ref is its published position");
    });

    it("reconnects and rejoins with `since` when its session expired while it was not polling", { timeout: TEST_TIMEOUT_MS }, async () => {
      const server = await freshServer({
        PUSHGATE_LONGPOLL_WINDOW_MS: "300",
        PUSHGATE_LONGPOLL_SESSION_TIMEOUT_MS: "1500",
      });
      const topic = uniqueTopic();
      const made = newSocket(server, { reconnectAfterMs: () => 50 });
      const { socket, frames, exchanges, gate } = made;
      let opens = 0;
      const errors = [];
      socket.onOpen(() => opens++);
      socket.onError((error) => errors.push(error));
      const state = recoveringChannel(socket, topic);
      socket.connect();
      await waitFor(() => state.joins.length === 1, 5000, () => `the first join\n${evidence(made)}`);
      const oldToken = exchanges[0].answer?.token;
      assert.match(oldToken ?? "", SESSION_TOKEN, evidence(made));

      const positions = [(await publish(server, topic, "new_msg", { n: 1 })).position];
      await waitFor(() => state.received.length === 1, 5000, () => `the live broadcast\n${evidence(made)}`);

      // The client stops polling without noticing: its next request is held back (as if the
      // machine slept), so the server sees no poll and drops the session.
      gate.pause();
      await waitFor(() => gate.held.length >= 1, 5000, () => `a poll to hold\n${evidence(made)}`);
      for (let n = 2; n <= 6; n++) positions.push((await publish(server, topic, "new_msg", { n })).position);
      await waitFor(async () => (await metric(server, SESSIONS_EXPIRED)) === 1, 10_000, "the session to expire");
      assert.equal(state.received.length, 1, "nothing arrives while the client is not polling");
      assert.equal(opens, 1);

      const requestsBefore = exchanges.length;
      gate.resume();

      // The held poll carries the dead session's token and is told to reconnect (500); the
      // client reconnects, starts a new session and rejoins from its last position.
      await waitFor(() => state.joins.length === 2, 10_000, () => `the rejoin\n${evidence(made)}`);
      const resumed = exchanges[requestsBefore];
      assert.equal(resumed?.method, "GET", evidence(made));
      assert.ok(resumed.url.includes(`&token=${oldToken}`), evidence(made));
      assert.deepEqual(resumed.answer, { status: 500 }, `the expired session's poll\n${evidence(made)}`);
      assert.ok(errors.length >= 1, "the client saw an error");
      assert.ok(opens >= 2, `onOpen calls: ${opens}`);
      const newSession = exchanges.slice(requestsBefore).find((e) => e.answer?.status === 410);
      assert.ok(newSession && newSession.answer.token !== oldToken, `a new session\n${evidence(made)}`);
      assert.equal(state.joins[1].recovered, true, `rejoin response ${JSON.stringify(state.joins[1])}`);
      const rejoin = decoded(frames, "out").filter((f) => f[3] === "phx_join").at(-1);
      assert.deepEqual(rejoin[4], { since: positions[0] }, "the rejoin carries the last position seen");

      await waitFor(() => state.received.length >= 6, 5000, () => `6 broadcasts, got ${state.received.length}\n${evidence(made)}`);
      positions.push((await publish(server, topic, "new_msg", { n: 7 })).position);
      await waitFor(() => state.received.length >= 7, 5000, () => `7 broadcasts, got ${state.received.length}\n${evidence(made)}`);
      await quietPeriod(300); // duplicates would show up here
      assert.deepEqual(state.received.map((m) => m.n), range(1, 7), "every message exactly once, in order");
      assert.deepEqual(state.received.map((m) => m.ref), positions);
    });

    it("reconnects and rejoins when the server restarted and no longer knows its session", { timeout: TEST_TIMEOUT_MS }, async () => {
      const first = await freshServer();
      const topic = uniqueTopic();
      const made = newSocket(first, { reconnectAfterMs: () => 50 });
      const { socket, frames, exchanges, gate } = made;
      const state = recoveringChannel(socket, topic);
      socket.connect();
      await waitFor(() => state.joins.length === 1, 5000, () => `the first join\n${evidence(made)}`);
      const oldToken = exchanges[0].answer?.token;
      await publish(first, topic, "new_msg", { n: 1 });
      await waitFor(() => state.received.length === 1, 5000, () => `the live broadcast\n${evidence(made)}`);

      // Hold the client's next poll while the server restarts on the same port.
      gate.pause();
      await waitFor(() => gate.held.length >= 1, 5000, () => `a poll to hold\n${evidence(made)}`);
      await first.stop();
      const second = await freshServer(LONGPOLL_ENV, `127.0.0.1:${first.port}`);
      const requestsBefore = exchanges.length;
      gate.resume();

      await waitFor(() => state.joins.length === 2, 10_000, () => `the rejoin\n${evidence(made)}`);
      const resumed = exchanges[requestsBefore];
      assert.ok(resumed?.url.includes(`&token=${oldToken}`), evidence(made));
      assert.deepEqual(resumed.answer, { status: 500 }, `the unknown session's poll\n${evidence(made)}`);
      // The new server has a new history epoch, so the old position cannot be resumed.
      assert.equal(state.joins[1].recovered, false, `rejoin response ${JSON.stringify(state.joins[1])}`);
      const rejoin = decoded(frames, "out").filter((f) => f[3] === "phx_join").at(-1);
      assert.ok(rejoin[4].since, `the rejoin carries a position: ${JSON.stringify(rejoin)}`);

      await publish(second, topic, "new_msg", { n: 2 });
      await waitFor(() => state.received.length === 2, 5000, () => `the broadcast from the new server\n${evidence(made)}`);
      assert.deepEqual(state.received.map((m) => m.n), [1, 2]);
    });
  });
}
