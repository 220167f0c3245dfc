// The official phoenix client (1.8.17 and 1.7.23) over LongPoll when the node's slots
// (server.max_connections: connections plus LongPoll sessions) are all taken by sessions nobody
// polls (a flood of session-creating GETs): the client is refused with {"status":500}, retries
// with its backoff, and gets a session, its join and its messages once the never-polled
// sessions are dropped (within seconds, not longpoll.session_timeout_ms).
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  CLIENTS,
  makeLongPollSocket,
  metric,
  publish,
  showExchanges,
  startServer,
  uniqueTopic,
  waitFor,
} from "./support.js";

const TEST_TIMEOUT_MS = 30_000;
const SESSION_CAP_REFUSALS = 'pushgate_refusals_total{cause="session_cap"}';

/** Session-creating GETs, one after another, until one is refused; returns how many got a session. */
async function fillSessions(server) {
  let created = 0;
  for (let i = 0; i < 100; i++) {
    const answer = await (await fetch(`${server.url}/socket/longpoll?vsn=2.0.0&`)).json();
    if (answer.status === 500) return created;
    assert.equal(answer.status, 410, JSON.stringify(answer));
    created += 1;
  }
  throw new Error("100 sessions and no refusal: server.max_connections is not applied to sessions");
}

for (const client of CLIENTS) {
  describe(`LongPoll sessions at server.max_connections with phoenix ${client.version}`, () => {
    let server;
    const sockets = [];

    before(async () => {
      server = await startServer({
        env: { PUSHGATE_SERVER_MAX_CONNECTIONS: "6", PUSHGATE_LONGPOLL_WINDOW_MS: "500" },
      });
    });

    after(async () => {
      for (const socket of sockets) socket.disconnect();
      await server?.stop();
    });

    it("is refused with 500 while the slots are taken, retries, then joins and receives", { timeout: TEST_TIMEOUT_MS }, async () => {
      const created = await fillSessions(server);
      assert.ok(created >= 1, "the flood got sessions before the refusal");

      const made = makeLongPollSocket(client, server);
      const { socket, exchanges } = made;
      sockets.push(socket);
      const topic = uniqueTopic();
      const channel = socket.channel(topic, {});
      const received = [];
      channel.on("news", (payload) => received.push(payload));
      channel.join(3000);
      socket.connect();

      const evidence = () => `exchanges:\n${showExchanges(exchanges)}`;
      await waitFor(() => channel.state === "joined", 20_000, () => `the channel joined\n${evidence()}`);
      const answers = exchanges.map((e) => e.answer?.status);
      const firstSession = answers.indexOf(410);
      assert.ok(answers.slice(0, firstSession).includes(500), `refused with 500 before the session\n${evidence()}`);
      const refused = exchanges.find((e) => e.answer?.status === 500);
      assert.match(refused.answer.reason, /server\.max_connections/, evidence());
      assert.ok((await metric(server, SESSION_CAP_REFUSALS)) >= 2, "refusals are counted");

      await publish(server.url, topic, "news", { n: 1 });
      await waitFor(() => received.length === 1, 5000, () => `the message arrived\n${evidence()}`);
      assert.deepEqual(received, [{ n: 1 }]);
    });
  });
}
