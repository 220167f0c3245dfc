// Several containers of the image without sticky sessions, as App Runner and App Platform run
// them: three containers, one Redis, a round-robin nginx in front (every request may land on any
// container), the official client (1.8.17 and 1.7.23) over LongPoll. The containers are replaced
// one by one, as a deploy does (a new one starts, the router moves to it, the old one gets
// SIGTERM), while a publisher keeps publishing: every subscriber must get every message, in
// order, exactly once.
//
// Run by scripts/test-container.sh, which builds the image and sets PUSHGATE_IMAGE.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { CLIENTS, makeLongPollSocket, publish, showExchanges, uniqueTopic, waitFor } from "../support.js";
import { DEADLINE_MS, requireImage, resources, startContainer, startNginx, startRedis } from "./podman.js";

const CONTAINERS = 3;
/** Grace given to each replaced container (App Platform's default is 120 s, Fly's 5 s). */
const STOP_GRACE_S = 5;

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A LongPoll subscriber that rejoins with the last position it saw. */
function subscriber(client, nginx, topic) {
  const sub = { label: `phoenix ${client.version} over LongPoll`, received: [], joins: [], last: null };
  const made = makeLongPollSocket(client, nginx);
  sub.made = made;
  const channel = made.socket.channel(topic, () => (sub.last ? { since: sub.last } : {}));
  channel.on("seq", (payload, ref) => {
    sub.received.push(payload.seq);
    sub.last = ref;
  });
  channel.join().receive("ok", (reply) => {
    sub.joins.push(reply);
    sub.last ??= reply.position;
  });
  made.socket.connect();
  return sub;
}

describe("containers behind a round-robin proxy", { timeout: 240_000 }, () => {
  it(`${CONTAINERS} containers, one Redis, LongPoll clients: nothing lost across a rolling replacement`, async (t) => {
    requireImage();
    const res = resources(t);
    const redis = await startRedis(res);
    const env = { PUSHGATE_REDIS_URL: redis.urlFromContainers };
    let live = [];
    for (let i = 0; i < CONTAINERS; i++) live.push(await startContainer(res, { env, hostLoopback: true }));
    const upstreams = () => live.map((c) => `127.0.0.1:${c.port}`);
    const nginx = await startNginx(res, upstreams());

    const topic = uniqueTopic();
    const subs = CLIENTS.map((client) => subscriber(client, nginx, topic));
    for (const s of subs) res.sockets.push(s.made.socket);
    await waitFor(() => subs.every((s) => s.joins.length >= 1), DEADLINE_MS, "both subscribers joined");

    // The publisher: one message every 20 ms through the proxy, each retried until accepted.
    let seq = 0;
    let publishing = true;
    const failures = [];
    const publisher = (async () => {
      while (publishing) {
        const n = ++seq;
        for (;;) {
          try {
            await publish(nginx, topic, "seq", { seq: n });
            break;
          } catch (e) {
            failures.push(`${n}: ${e.message}`);
            await delay(50);
          }
        }
        await delay(20);
      }
    })();

    const replaced = [];
    for (let i = 0; i < CONTAINERS; i++) {
      const old = live[0];
      const fresh = await startContainer(res, { env, hostLoopback: true });
      live = [...live.slice(1), fresh];
      await nginx.route(upstreams());
      const ms = await old.stop(STOP_GRACE_S);
      const state = await old.state();
      replaced.push(`${old.name}: ${Math.round(ms)} ms, exit ${state.ExitCode}`);
      assert.equal(state.ExitCode, 0, `${old.name} did not drain in ${STOP_GRACE_S} s\n${await old.logs()}`);
    }
    publishing = false;
    await publisher;
    t.diagnostic(`replaced: ${replaced.join("; ")}; published ${seq}; retried publishes: ${failures.length}`);
    await waitFor(() => subs.every((s) => s.received.length >= seq), DEADLINE_MS, "every message delivered").catch(() => {});
    for (const s of subs) t.diagnostic(`${s.label}: ${s.received.length} of ${seq}, joins ${JSON.stringify(s.joins)}`);

    const want = Array.from({ length: seq }, (_, i) => i + 1);
    for (const s of subs) {
      await waitFor(
        () => s.received.length >= seq,
        DEADLINE_MS,
        () => `${s.label}: ${s.received.length} of ${seq}; joins ${JSON.stringify(s.joins)}\n${showExchanges(s.made.exchanges)}`,
      );
      assert.deepEqual(s.received, want, `${s.label}: every message once, in order`);
      // Every container it started on was replaced: its session went with one, so it rejoined.
      assert.ok(s.joins.length >= 2, `${s.label}: never rejoined: ${JSON.stringify(s.joins)}`);
      assert.ok(s.joins.every((j, i) => i === 0 || j.recovered === true), `${s.label}: rejoins ${JSON.stringify(s.joins)}`);
    }
  });
});
