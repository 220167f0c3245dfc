// pushgate's Redis broker with several nodes, driven by the official phoenix client
// (1.8.17 and 1.7.23): cross-node fanout, recovery on another node, a Redis restart and killed
// pub/sub connections under a steady publisher, a restart from an older RDB snapshot (no position
// reused, nobody silently misses a message), and LongPoll through a real nginx round-robin
// upstream (no sticky sessions), client pushes forwarded to the app included, and Phoenix
// Presence across nodes (a killed node's entries expire, a stopped node's leave at once).
//
// Every test starts its own `redis-server` (on a free port, no persistence) and its own
// pushgate nodes, and stops them when it ends. Needs `redis-server`, `redis-cli` and `nginx`
// (REDIS_SERVER_BIN, REDIS_CLI_BIN, NGINX_BIN override the paths).

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import {
  AUTH_SECRET,
  CLIENTS,
  PUBLISH_TOKEN,
  jwt,
  makeLongPollSocket,
  makeSocket,
  presenceSummary,
  metric,
  publish,
  quietPeriod,
  replyTo,
  showExchanges,
  showFrames,
  startPushApp,
  startServer,
  uniqueTopic,
  waitFor,
  spawnChild,
  terminate,
  freePort,
  retryTakenPorts,
  waitListening,
} from "./support.js";

const REDIS_SERVER = process.env.REDIS_SERVER_BIN ?? "redis-server";
const REDIS_CLI = process.env.REDIS_CLI_BIN ?? "redis-cli";
const NGINX = process.env.NGINX_BIN ?? "/usr/sbin/nginx";

const TEST_TIMEOUT_MS = 30_000;
const DEADLINE_MS = 10_000;
const PUSH_TIMEOUT_MS = 3000;
const WINDOW_MS = 500;
// longpoll.session_timeout_ms where a test waits for an abandoned LongPoll session to end:
// short, with room for a slow poll under load (the least allowed is WINDOW_MS + 1000).
const SESSION_TIMEOUT_MS = 4000;

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const epochOf = (position) => position.slice(0, position.lastIndexOf(":"));
const offsetOf = (position) => Number(position.slice(position.lastIndexOf(":") + 1));

// ---------------------------------------------------------------------------
// Processes: redis-server, nginx (pushgate nodes come from support.js)
// ---------------------------------------------------------------------------


/** Runs a command; resolves with {code, stdout, stderr} (never rejects on a non-zero exit). */
function run(file, args, timeoutMs = 5000) {
  return new Promise((resolve) => {
    execFile(file, args, { timeout: timeoutMs }, (error, stdout, stderr) => {
      resolve({ code: error ? (error.code ?? -1) : 0, stdout: String(stdout), stderr: String(stderr), error });
    });
  });
}



/**
 * A redis-server of this test on a free port; `stop()` and `start()` (same port again) model a
 * restart. No persistence, so a restart loses every key.
 */
async function startRedis(dir = null, persistence = undefined) {
  return retryTakenPorts("redis-server", async () => {
    const redis = new RedisServer(await freePort(), dir, persistence);
    try {
      await redis.start();
      return redis;
    } catch (e) {
      await redis.stop();
      throw e;
    }
  });
}

class RedisServer {
  /**
   * `dir`: a data directory (RDB persistence: the test takes snapshots with SAVE);
   * `persistence`: the persistence arguments (default none: no snapshots, no AOF).
   */
  constructor(port, dir = null, persistence = ["--save", "", "--appendonly", "no"]) {
    this.port = port;
    this.url = `redis://127.0.0.1:${port}/`;
    this.child = null;
    this.dir = dir;
    this.persistence = persistence;
  }

  async start() {
    this.child = spawnChild(REDIS_SERVER, [
      "--port", String(this.port), "--bind", "127.0.0.1", ...this.persistence,
      ...(this.dir ? ["--dir", this.dir] : []),
    ]);
    const child = this.child;
    // Its own listener, not another process's on the same port ([PortTaken] when it lost it).
    await waitListening(child, [this.port], "redis-server");
    await waitFor(
      async () => {
        if (child.exit) throw new Error(`redis-server exited ${JSON.stringify(child.exit)}: ${child.output.join("")}`);
        const { stdout } = await this.cli("ping");
        return stdout.trim() === "PONG";
      },
      DEADLINE_MS,
      () => `redis-server on port ${this.port} to answer PING: ${child.output.join("").slice(-2000)}`,
    );
  }

  async stop() {
    await terminate(this.child);
  }

  /** SIGKILL: whatever the last snapshot does not hold is lost. */
  async kill() {
    if (!this.child || this.child.exit) return;
    this.child.proc.kill("SIGKILL");
    await this.child.exited;
  }

  /** redis-cli against this server; resolves with {code, stdout, stderr}. */
  cli(...args) {
    return run(REDIS_CLI, ["-p", String(this.port), ...args], 3000);
  }
}

// ---------------------------------------------------------------------------
// Per-test resources
// ---------------------------------------------------------------------------

/** Collects what a test starts and tears it all down (sockets, nginx, nodes, redis) in t.after. */
function resources(t) {
  const res = { sockets: [], nodes: [], nginx: [], redis: [], dirs: [] };
  t.after(async () => {
    for (const socket of res.sockets) {
      try {
        socket.disconnect();
      } catch {
        // already torn down
      }
    }
    for (const n of res.nginx) await terminate(n);
    await Promise.all(res.nodes.map((node) => node.stop()));
    for (const r of res.redis) await r.stop();
    for (const d of res.dirs) rmSync(d, { recursive: true, force: true });
  });
  return res;
}

async function redisFor(res) {
  const redis = await startRedis();
  res.redis.push(redis);
  return redis;
}

/** GET /readyz: {status, body}. */
async function readyz(node) {
  try {
    const r = await fetch(`${node.url}/readyz`, { signal: AbortSignal.timeout(2000) });
    return { status: r.status, body: await r.text() };
  } catch (e) {
    return { status: 0, body: String(e) };
  }
}

async function waitReady(node, status, label = node.url) {
  let last;
  await waitFor(
    async () => {
      last = await readyz(node);
      return last.status === status;
    },
    DEADLINE_MS,
    () => `${label} /readyz to answer ${status}; last: ${last?.status} ${last?.body}`,
  );
  return last;
}

/** Starts `count` pushgate nodes on `redis` and waits until each one's /readyz is 200. */
async function startNodes(res, redis, count, env = {}) {
  const nodes = await Promise.all(
    range(1, count).map(() => startServer({ env: { PUSHGATE_REDIS_URL: redis.url, ...env } })),
  );
  res.nodes.push(...nodes);
  nodes.forEach((node, i) => (node.label = `node ${"ABC"[i]} (${node.addr})`));
  await Promise.all(nodes.map((node) => waitReady(node, 200, node.label)));
  return nodes;
}

// ---------------------------------------------------------------------------
// Clients and checks
// ---------------------------------------------------------------------------

/** Decoded frames of one direction, as `[join_ref, ref, topic, event, payload]`. */
function decoded(frames, direction) {
  return frames.filter(([dir]) => dir === direction).map(([, text]) => JSON.parse(text));
}

/**
 * Receiving state for one logical subscriber of `topic`: `params` is the channel params function
 * asking for what was missed since the last broadcast seen (`{since}`), shared by every socket the
 * subscriber uses; `received` collects `{seq, ref}` of each `event` broadcast.
 */
function tracker(label, topic, event = "seq") {
  const tr = { label, topic, event, last: null, received: [], joins: [], joinedAt: [], joinErrors: [], frames: null };
  tr.params = () => (tr.last ? { since: tr.last } : {});
  return tr;
}

/** Joins `tr.topic` on `socket` with `tr.params`, recording broadcasts and join replies in `tr`. */
function attach(tr, socket) {
  const channel = socket.channel(tr.topic, tr.params);
  channel.on(tr.event, (payload, ref) => {
    tr.received.push({ seq: payload.seq, ref });
    tr.last = ref;
  });
  channel
    .join(PUSH_TIMEOUT_MS)
    .receive("ok", (response) => {
      tr.joins.push(response);
      tr.joinedAt.push(Date.now());
    })
    .receive("error", (response) => tr.joinErrors.push(response));
  return channel;
}

/** A WebSocket subscriber of `topic` on `node`, joined (waits for the join reply). */
async function wsSubscriber(res, client, node, topic, label) {
  const tr = tracker(`phoenix ${client.version} on ${label ?? node.label}`, topic);
  const { socket, frames } = makeSocket(client, node);
  res.sockets.push(socket);
  tr.socket = socket;
  tr.frames = frames;
  tr.opens = 0;
  socket.onOpen(() => tr.opens++);
  tr.channel = attach(tr, socket);
  socket.connect();
  await waitFor(() => tr.joins.length >= 1, DEADLINE_MS, () => `${tr.label}: the join reply\n${showFrames(frames)}`);
  return tr;
}

/** A LongPoll subscriber of `topic` on `node`, joined (waits for the join reply). */
async function lpSubscriber(res, client, node, topic, label) {
  const tr = tracker(`phoenix ${client.version} LongPoll on ${label ?? node.label}`, topic);
  const { socket, frames } = makeLongPollSocket(client, node);
  res.sockets.push(socket);
  tr.socket = socket;
  tr.frames = frames;
  tr.channel = attach(tr, socket);
  socket.connect();
  await waitFor(() => tr.joins.length >= 1, DEADLINE_MS, () => `${tr.label}: the join reply\n${showFrames(frames)}`);
  return tr;
}

/** "3-7, 12" for [3,4,5,6,7,12]. */
function ranges(numbers) {
  const out = [];
  for (let i = 0; i < numbers.length; ) {
    let j = i;
    while (j + 1 < numbers.length && numbers[j + 1] === numbers[j] + 1) j++;
    out.push(i === j ? `${numbers[i]}` : `${numbers[i]}-${numbers[j]}`);
    i = j + 1;
  }
  return out.join(", ") || "none";
}

/** What is wrong with a received sequence, for assertion messages. */
function diagnose(tr, positions) {
  const seqs = tr.received.map((m) => m.seq);
  const counts = new Map();
  for (const s of seqs) counts.set(s, (counts.get(s) ?? 0) + 1);
  const missing = range(0, positions.length - 1).filter((s) => !counts.has(s));
  const duplicated = [...counts].filter(([, n]) => n > 1).map(([s]) => s).sort((a, b) => a - b);
  const outOfOrder = seqs.findIndex((s, i) => i > 0 && s <= seqs[i - 1]);
  const missingPositions = missing.slice(0, 20).map((s) => `${s}@${positions[s]}`).join(" ");
  return (
    `${tr.label}: received ${seqs.length} of ${positions.length}; missing [${ranges(missing)}] ` +
    `(seq@position: ${missingPositions}); duplicated [${ranges(duplicated)}]; ` +
    `first out-of-order index ${outOfOrder}; joins ${JSON.stringify(tr.joins)}` +
    (tr.opens !== undefined ? `; socket opened ${tr.opens} time(s)` : "")
  );
}

/** Asserts `tr` received seq 0..positions.length-1 exactly once, in order, each with its position as ref. */
function assertComplete(tr, positions) {
  const why = diagnose(tr, positions);
  assert.deepEqual(tr.received.map((m) => m.seq), range(0, positions.length - 1), why);
  assert.deepEqual(tr.received.map((m) => m.ref), positions, `${why}\nrefs are not the published positions`);
}

/** POST /api/publish once: {ok, status, position, body, error}. Never throws. */
async function tryPublish(node, topic, event, payload) {
  try {
    const r = await fetch(`${node.url}/api/publish`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${PUBLISH_TOKEN}` },
      body: JSON.stringify({ topic, event, payload }),
      signal: AbortSignal.timeout(5000),
    });
    const body = await r.text();
    if (r.ok) return { ok: true, status: r.status, position: JSON.parse(body).position, body };
    return { ok: false, status: r.status, body };
  } catch (e) {
    return { ok: false, status: 0, error: String(e.cause ?? e) };
  }
}

/**
 * A steady publisher of `{seq}` for seq 0..count-1 on `topic`, alternating over `nodes`. Each seq
 * is retried (on a 503 or a connection error, 10 ms apart) until it succeeds, so each is published
 * exactly once; any other status stops it with an error. `positions[seq]` is each one's position,
 * `next` the next seq to publish, `failures` every failed attempt.
 */
function steadyPublisher(nodes, topic, count, paceMs = 2) {
  const pub = { next: 0, positions: [], publishedAt: [], sentAt: [], failures: [], done: false, error: null, stop: false };
  pub.finished = (async () => {
    for (let seq = 0; seq < count; seq++) {
      const deadline = Date.now() + 20_000;
      for (let attempt = 0; ; attempt++) {
        if (pub.stop) throw new Error(`publisher stopped at seq ${seq}`);
        const node = nodes[(seq + attempt) % nodes.length];
        const sentAt = Date.now();
        const r = await tryPublish(node, topic, "seq", { seq });
        if (r.ok) {
          pub.positions[seq] = r.position;
          pub.sentAt[seq] = sentAt;
          pub.publishedAt[seq] = new Date().toISOString();
          break;
        }
        pub.failures.push({ seq, node: node.label, status: r.status, body: r.body, error: r.error, at: Date.now() });
        if (r.status !== 503 && r.status !== 0) {
          throw new Error(`publish of seq ${seq} on ${node.label} answered ${r.status}: ${r.body}`);
        }
        if (Date.now() > deadline) throw new Error(`seq ${seq} not published within 20 s: ${JSON.stringify(r)}`);
        await delay(10);
      }
      pub.next = seq + 1;
      if (paceMs) await delay(paceMs);
    }
    pub.done = true;
  })().catch((e) => {
    pub.error = e;
  });
  return pub;
}

/**
 * Waits (one deadline for all) until every subscriber has at least `count` messages, then a
 * little longer so that duplicates would show up. Never throws: the caller's exact assertion
 * explains what is missing.
 */
async function settle(subs, count) {
  await waitFor(() => subs.every((sub) => sub.received.length >= count), DEADLINE_MS, "every subscriber").catch(() => {});
  await quietPeriod(300);
}

/** The Redis-related lines a node logged, for assertion messages. */
function redisLogLines(node, count = 15) {
  return node.logs
    .filter((l) => /redis/i.test(l))
    .slice(-count)
    .map((l) => `  ${l}`)
    .join("\n");
}

async function waitPublisher(pub, timeoutMs = 20_000) {
  await waitFor(() => pub.done || pub.error, timeoutMs, () => `the publisher to finish (at seq ${pub.next})`);
  assert.equal(pub.error, null, `publisher: ${pub.error?.stack}\nfailures: ${JSON.stringify(pub.failures.slice(-5))}`);
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

/** `serverParams`: added to each upstream `server` line (e.g. "max_fails=0"). */
function nginxConf(prefix, port, upstreams, serverParams = "") {
  const proxy = `
            proxy_pass http://pg;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_read_timeout 30s;`;
  return `
worker_processes 1;
pid ${prefix}/nginx.pid;
error_log ${prefix}/logs/error.log info;
events { worker_connections 256; }
http {
    log_format pg '$request_method $request_uri $status upstream=$upstream_addr rt=$request_time us=$upstream_status t=$msec';
    access_log ${prefix}/logs/access.log pg;
    client_body_temp_path ${prefix}/tmp/body;
    proxy_temp_path ${prefix}/tmp/proxy;
    fastcgi_temp_path ${prefix}/tmp/fastcgi;
    uwsgi_temp_path ${prefix}/tmp/uwsgi;
    scgi_temp_path ${prefix}/tmp/scgi;
    # Round robin, no ip_hash: consecutive requests of one client go to different nodes.
    upstream pg {
${upstreams.map((u) => `        server ${u} ${serverParams};`).join("\n")}
    }
    server {
        listen 127.0.0.1:${port};
        location /socket/ {${proxy}
        }
        location /api/ {${proxy}
        }
    }
}
`;
}

/** nginx in the foreground with a private prefix, round-robin over `upstreams`. */
async function startNginx(res, upstreams, serverParams = "") {
  const prefix = mkdtempSync(path.join(os.tmpdir(), "pushgate-redis-nginx-"));
  res.dirs.push(prefix);
  chmodSync(prefix, 0o755);
  for (const d of ["conf", "logs", "tmp"]) mkdirSync(path.join(prefix, d), { mode: 0o755 });
  // A port can be taken by another process between the pick and nginx's bind: a fresh one then.
  const { child, port } = await retryTakenPorts("nginx", async () => {
    const port = await freePort();
    writeFileSync(path.join(prefix, "conf/nginx.conf"), nginxConf(prefix, port, upstreams, serverParams));
    const child = spawnChild(NGINX, ["-p", prefix, "-e", `${prefix}/logs/error.log`, "-c", "conf/nginx.conf", "-g", "daemon off;"]);
    const errors = () => {
      try {
        return readFileSync(path.join(prefix, "logs/error.log"), "utf8");
      } catch {
        return "";
      }
    };
    try {
      await waitListening(child, [port], "nginx", errors);
    } catch (e) {
      await terminate(child);
      throw e;
    }
    return { child, port };
  });
  res.nginx.push(child);
  const nginx = {
    child,
    prefix,
    url: `http://127.0.0.1:${port}`,
    /** Parsed access log lines: {method, uri, status, upstream}. */
    accessLog() {
      let text = "";
      try {
        text = readFileSync(path.join(prefix, "logs/access.log"), "utf8");
      } catch {
        // nothing logged yet
      }
      return text
        .split("\n")
        .filter(Boolean)
        .map((line) => {
          const [method, uri, status] = line.split(" ");
          const upstream = /upstream=(.*) rt=/.exec(line)?.[1] ?? "";
          const seconds = Number(/rt=(\S+)/.exec(line)?.[1]);
          return { method, uri, status: Number(status), upstream, seconds, line };
        });
    },
    errorLog() {
      try {
        return readFileSync(path.join(prefix, "logs/error.log"), "utf8").split("\n").slice(-20).join("\n");
      } catch {
        return "(no error log)";
      }
    },
  };
  nginx.label = `nginx (${nginx.url})`;
  return nginx;
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

describe("Redis broker with several pushgate nodes", () => {
  it("fans out across three nodes to both clients on every node, in order, with positions as refs", { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const res = resources(t);
    const redis = await redisFor(res);
    const nodes = await startNodes(res, redis, 3);
    const topic = uniqueTopic("fanout");

    const subs = [];
    for (const node of nodes) {
      for (const client of CLIENTS) subs.push(await wsSubscriber(res, client, node, topic));
    }
    for (const sub of subs) {
      // The first join created the topic's epoch in Redis at offset 0; nothing was published yet.
      assert.match(sub.joins[0].position, /^[^:]+:0$/, `${sub.label}: ${JSON.stringify(sub.joins[0])}`);
    }
    assert.equal(new Set(subs.map((s) => epochOf(s.joins[0].position))).size, 1, "every node sees the same epoch");

    const positions = [];
    for (let seq = 0; seq < 30; seq++) {
      positions.push((await publish(nodes[seq % 3], topic, "seq", { seq })).position);
    }
    // Offsets are assigned in Redis: consecutive across the nodes that published them.
    assert.deepEqual(positions.map(offsetOf), range(1, 30), `positions ${positions}`);
    assert.equal(new Set(positions.map(epochOf)).size, 1, `positions ${positions}`);

    for (const sub of subs) {
      await waitFor(() => sub.received.length >= 30, DEADLINE_MS, () => `${diagnose(sub, positions)}\n${showFrames(sub.frames)}`);
    }
    await quietPeriod(200); // duplicates would show up here
    for (const sub of subs) assertComplete(sub, positions);
  });

  it("recovers on another node what a client missed, exactly once and in order, then goes on live", { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const res = resources(t);
    const redis = await redisFor(res);
    const [a, b] = await startNodes(res, redis, 2);

    await Promise.all(
      CLIENTS.map(async (client) => {
        const topic = uniqueTopic("recover");
        const tr = tracker(`phoenix ${client.version}`, topic);
        const positions = [];
        const publishOn = async (node, count) => {
          for (let i = 0; i < count; i++) {
            positions.push((await publish(node, topic, "seq", { seq: positions.length })).position);
          }
        };

        // On node A: join, receive three messages (published on both nodes), disconnect.
        const first = makeSocket(client, a);
        res.sockets.push(first.socket);
        attach(tr, first.socket);
        first.socket.connect();
        await waitFor(() => tr.joins.length === 1, DEADLINE_MS, () => `${tr.label}: join on A\n${showFrames(first.frames)}`);
        await publishOn(a, 2);
        await publishOn(b, 1);
        await waitFor(() => tr.received.length === 3, DEADLINE_MS, () => `${diagnose(tr, positions)}\n${showFrames(first.frames)}`);
        await new Promise((resolve) => first.socket.disconnect(resolve));

        // Missed: 50 messages published on node B while the client is away.
        await publishOn(b, 50);

        // A new socket to node B, same params function (so `since` is the last position seen).
        const second = makeSocket(client, b);
        res.sockets.push(second.socket);
        attach(tr, second.socket);
        second.socket.connect();
        await waitFor(() => tr.joins.length === 2, DEADLINE_MS, () => `${tr.label}: join on B\n${showFrames(second.frames)}`);
        assert.equal(tr.joins[1].recovered, true, `${tr.label}: join on B answered ${JSON.stringify(tr.joins[1])}`);
        const rejoin = decoded(second.frames, "out").find((f) => f[3] === "phx_join");
        assert.deepEqual(rejoin[4], { since: positions[2] }, `${tr.label}: the join on B carries the last position seen`);

        await waitFor(() => tr.received.length >= 53, DEADLINE_MS, () => `${diagnose(tr, positions)}\n${showFrames(second.frames)}`);
        // The replay follows the join reply.
        const inbound = decoded(second.frames, "in");
        const reply = inbound.findIndex((f) => f[3] === "phx_reply" && f[1] === rejoin[1]);
        const firstReplayed = inbound.findIndex((f) => f[3] === "seq");
        assert.ok(reply !== -1 && reply < firstReplayed, `${tr.label}: replay before the join reply\n${showFrames(second.frames, 60)}`);

        // Then live messages, published on both nodes.
        await publishOn(a, 3);
        await publishOn(b, 2);
        await waitFor(() => tr.received.length >= 58, DEADLINE_MS, () => `${diagnose(tr, positions)}\n${showFrames(second.frames)}`);
        await quietPeriod(200); // duplicates would show up here
        assertComplete(tr, positions);
      }),
    );
  });

  it("loses nothing for subscribers on two nodes when Redis restarts under a steady publisher", { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const res = resources(t);
    const redis = await redisFor(res);
    const nodes = await startNodes(res, redis, 2);
    const topic = uniqueTopic("restart");
    const subs = [];
    for (const node of nodes) {
      for (const client of CLIENTS) subs.push(await wsSubscriber(res, client, node, topic));
    }

    const COUNT = 300;
    const pub = steadyPublisher(nodes, topic, COUNT);
    await waitFor(() => pub.next >= 80 || pub.error, DEADLINE_MS, "80 messages published");
    assert.equal(pub.error, null, String(pub.error));

    await redis.stop();
    const stoppedAt = pub.next;
    // /readyz turns red on every node, with the reason; publishing fails loudly (503).
    for (const node of nodes) {
      const down = await waitReady(node, 503, node.label);
      const body = JSON.parse(down.body);
      assert.equal(body.status, "unavailable", down.body);
      assert.match(body.reason, /redis/, down.body);
    }
    await waitFor(() => pub.failures.some((f) => f.status === 503), DEADLINE_MS, () => `a publish answered 503; failures ${JSON.stringify(pub.failures.slice(-3))}`);
    assert.ok(stoppedAt < COUNT, `the publisher finished (${stoppedAt}) before Redis stopped`);

    await redis.start(); // same port, empty
    for (const node of nodes) await waitReady(node, 200, node.label);
    await waitPublisher(pub);

    // The restart really happened mid-stream: positions after it are in a new epoch.
    const epochs = [...new Set(pub.positions.map(epochOf))];
    assert.ok(epochs.length >= 2, `one epoch only: ${epochs}`);
    assert.ok(pub.next === COUNT && stoppedAt < COUNT);

    await settle(subs, COUNT);
    const incomplete = subs.filter((sub) => JSON.stringify(sub.received.map((m) => m.seq)) !== JSON.stringify(range(0, COUNT - 1)));
    const firstOfEpoch = epochs.map((e) => {
      const seq = pub.positions.findIndex((p) => epochOf(p) === e);
      return `seq ${seq}@${pub.positions[seq]} published at ${pub.publishedAt[seq]}`;
    });
    assert.deepEqual(
      incomplete.map((sub) => diagnose(sub, pub.positions)),
      [],
      `subscribers with gaps or duplicates (Redis stopped after seq ${stoppedAt - 1}; first message of each epoch: ` +
        `${firstOfEpoch.join(", ")}; publish failures: ${JSON.stringify(pub.failures)})\n` +
        `redis lines of the node logs:\n${nodes.map((n) => `${n.label}:\n${redisLogLines(n)}`).join("\n")}`,
    );
    for (const sub of subs) assertComplete(sub, pub.positions);
  });

  it("never reuses a position when Redis comes back from an older RDB snapshot (SIGKILL after unsnapshotted publishes): every client, WebSocket and LongPoll on both nodes, gets every acknowledged message once, in order, or recovered: false", { timeout: TEST_TIMEOUT_MS * 2 }, async (t) => {
    const res = resources(t);
    const dir = mkdtempSync(path.join(os.tmpdir(), "pushgate-js-rdb-"));
    res.dirs.push(dir);
    const redis = await startRedis(dir);
    res.redis.push(redis);
    const nodes = await startNodes(res, redis, 2);
    const topic = uniqueTopic("rdb");
    const subs = [];
    for (const node of nodes) {
      for (const client of CLIENTS) {
        subs.push(await wsSubscriber(res, client, node, topic));
        subs.push(await lpSubscriber(res, client, node, topic));
      }
    }

    const COUNT = 160;
    const pub = steadyPublisher(nodes, topic, COUNT, 20);
    await waitFor(() => pub.next >= 40 || pub.error, DEADLINE_MS, "40 messages published");
    assert.equal((await redis.cli("SAVE")).stdout.trim(), "OK");
    const savedAt = pub.next;
    await waitFor(() => pub.next >= savedAt + 30 || pub.error, DEADLINE_MS, "30 messages after the snapshot");
    await redis.kill();
    const killedAt = pub.next;
    const lastBefore = pub.positions[killedAt - 1];
    for (const node of nodes) await waitReady(node, 503, node.label);
    await redis.start(); // same port and directory: back at the snapshot
    for (const node of nodes) await waitReady(node, 200, node.label);
    await waitPublisher(pub);

    // Positions after the restart are in a new epoch: none was reused.
    const seen = new Map();
    pub.positions.forEach((p, seq) => {
      assert.ok(!seen.has(p), `position ${p} acknowledged for seq ${seen.get(p)} and again for ${seq}`);
      seen.set(p, seq);
    });
    assert.notEqual(epochOf(pub.positions[COUNT - 1]), epochOf(lastBefore), `the epoch survived the loss (${lastBefore})`);

    await settle(subs, COUNT);
    for (const sub of subs) {
      if (sub.joins.some((j) => j.recovered === false)) {
        const after = range(killedAt, COUNT - 1);
        assert.deepEqual(sub.received.map((m) => m.seq).slice(-after.length), after, diagnose(sub, pub.positions));
      } else {
        assertComplete(sub, pub.positions);
      }
    }
  });

  it("loses nothing when the pub/sub connections are killed (CLIENT KILL TYPE pubsub) under a steady publisher", { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const res = resources(t);
    const redis = await redisFor(res);
    const nodes = await startNodes(res, redis, 2);
    const topic = uniqueTopic("kill");
    const subs = [];
    for (const node of nodes) {
      for (const client of CLIENTS) subs.push(await wsSubscriber(res, client, node, topic));
    }
    const reconnects = (node) => metric(node, "pushgate_redis_reconnects_total");
    const connected = (node) => metric(node, "pushgate_redis_connected");

    const COUNT = 300;
    const pub = steadyPublisher(nodes, topic, COUNT);
    for (const [round, at] of [[1, 60], [2, 160]]) {
      await waitFor(() => pub.next >= at || pub.error, DEADLINE_MS, `${at} messages published`);
      const killed = await redis.cli("CLIENT", "KILL", "TYPE", "pubsub");
      // One subscriber connection per node.
      assert.ok(Number(killed.stdout.trim()) >= nodes.length, `CLIENT KILL TYPE pubsub: ${JSON.stringify(killed)}`);
      // Each node notices, reconnects and is connected again.
      for (const node of nodes) {
        await waitFor(
          async () => (await reconnects(node)) >= round && (await connected(node)) === 1,
          DEADLINE_MS,
          async () => `${node.label}: reconnect ${round}: reconnects ${await reconnects(node)}, connected ${await connected(node)}`,
        );
      }
      assert.ok(pub.next < COUNT, `the publisher finished before kill ${round}`);
    }
    await waitPublisher(pub);
    // The command connection is not a pub/sub one: publishing never failed.
    assert.deepEqual(pub.failures, [], "publishes failed");
    for (const node of nodes) {
      assert.ok((await metric(node, "pushgate_redis_resubscriptions_total")) >= 2, `${node.label}: resubscriptions`);
      await waitReady(node, 200, node.label);
    }

    await settle(subs, COUNT);
    for (const sub of subs) assertComplete(sub, pub.positions);
  });

  it("forwards LongPoll pushes to the app in order whichever node nginx picks for them", { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const res = resources(t);
    const app = await startPushApp();
    t.after(() => app.server.close());
    const redis = await redisFor(res);
    const nodes = await startNodes(res, redis, 2, {
      PUSHGATE_LONGPOLL_WINDOW_MS: String(WINDOW_MS),
      PUSHGATE_FORWARD_URL: app.url,
      PUSHGATE_FORWARD_TOPICS: "chat:*",
    });
    const nginx = await startNginx(res, nodes.map((n) => n.addr));
    const client = CLIENTS[0];
    const { socket, frames, exchanges } = makeLongPollSocket(client, nginx, { params: { token: "user-9" } });
    res.sockets.push(socket);
    socket.connect();
    const topic = uniqueTopic("chat");
    const channel = socket.channel(topic, {});
    const joined = await replyTo(channel.join(PUSH_TIMEOUT_MS));
    assert.equal(joined.status, "ok", `${JSON.stringify(joined)}\n${showFrames(frames)}`);
    const session = exchanges.find((e) => e.answer?.status === 410)?.answer.token;

    // One push at a time until the session's POSTs have reached both nodes (each push is a POST
    // and a GET; a request elsewhere in between shifts nginx's round-robin parity).
    const postedTo = () =>
      [...new Set(nginx.accessLog().filter((l) => l.method === "POST" && l.uri.includes(`token=${session}`)).map((l) => l.upstream))];
    const said = [];
    for (let i = 0; i < 12 && (i < 4 || postedTo().length < 2); i++) {
      const r = await replyTo(channel.push("say", { body: `m${i}` }, PUSH_TIMEOUT_MS));
      assert.equal(r.status, "ok", `push ${i}: ${JSON.stringify(r)}\n${showExchanges(exchanges)}`);
      said.push(r.response.said);
      if (i % 2 === 1) await publish(nginx, uniqueTopic("parity"), "x", {});
    }
    assert.deepEqual(said, range(0, said.length - 1).map((i) => `m${i}`));
    assert.deepEqual(app.seen.filter((p) => p.topic === topic).map((p) => p.payload.body), said);
    assert.ok(app.seen.every((p) => p.token === "user-9" && p.authorization === `Bearer ${PUBLISH_TOKEN}`));
    assert.deepEqual(postedTo().sort(), nodes.map((n) => n.addr).sort(), "the session's POSTs reached both nodes");
  });

  for (const client of CLIENTS) {
    it(`serves phoenix ${client.version} over LongPoll through an nginx round-robin upstream and survives losing the session's node`, { timeout: TEST_TIMEOUT_MS }, async (t) => {
      const res = resources(t);
      const redis = await redisFor(res);
      const nodes = await startNodes(res, redis, 2, {
        PUSHGATE_LONGPOLL_WINDOW_MS: String(WINDOW_MS),
        PUSHGATE_LONGPOLL_SESSION_TIMEOUT_MS: String(SESSION_TIMEOUT_MS),
      });
      const nginx = await startNginx(res, nodes.map((n) => n.addr));
      const topic = uniqueTopic("lp-nginx");

      const made = makeLongPollSocket(client, nginx);
      const { socket, frames, exchanges } = made;
      res.sockets.push(socket);
      let opens = 0;
      socket.onOpen(() => opens++);
      const tr = tracker(`phoenix ${client.version} LongPoll via nginx`, topic);
      const channel = attach(tr, socket);
      socket.connect();
      const evidence = () =>
        `frames:\n${showFrames(frames)}\nexchanges:\n${showExchanges(exchanges)}\nnginx access log:\n${nginx
          .accessLog()
          .slice(-25)
          .map((l) => `  ${l.line}`)
          .join("\n")}\nnginx error log:\n${nginx.errorLog()}`;

      await waitFor(() => tr.joins.length === 1 || tr.joinErrors.length, DEADLINE_MS, () => `the join\n${evidence()}`);
      assert.equal(tr.joins.length, 1, `join refused: ${JSON.stringify(tr.joinErrors)}\n${evidence()}`);
      assert.ok(socket.conn instanceof made.Transport, "not on LongPoll");
      // The session the client polls now. phoenix may have opened another one on the way (a
      // reconnect under load drops a LongPoll whose first GET already made a session); nobody
      // polls that one, and it ends after longpoll.session_timeout_ms.
      // (The token it polls with carries an acknowledgement suffix after the session's token.)
      const session = exchanges
        .filter((e) => e.answer?.status === 410)
        .map((e) => e.answer.token)
        .find((token) => socket.conn.token?.startsWith(token));
      assert.ok(session, `no session token\n${evidence()}`);

      // Which node owns the session (its registry holds it): exactly one of the two, once any
      // abandoned session has ended (so wait for that, with a deadline, rather than read the
      // counts at one moment).
      const sessionsOn = (node) => metric(node, 'pushgate_connections{transport="longpoll"}');
      let counts = [];
      await waitFor(
        async () => {
          counts = await Promise.all(nodes.map(sessionsOn));
          return counts.join() === "0,1" || counts.join() === "1,0";
        },
        SESSION_TIMEOUT_MS + DEADLINE_MS,
        () => `longpoll sessions per node [0, 1], have [${counts}]\n${evidence()}`,
      );
      const owner = nodes[counts.indexOf(1)];
      const other = nodes[counts.indexOf(0)];

      // A burst of 40 publishes through nginx (so spread over both nodes), all at once.
      const published = await Promise.all(
        range(0, 39).map((seq) => publish(nginx, topic, "seq", { seq }).then(({ position }) => ({ seq, position }))),
      );
      // Delivery order is position order.
      published.sort((x, y) => offsetOf(x.position) - offsetOf(y.position));
      let positions = published.map((p) => p.position);
      const burstOrder = published.map((p) => p.seq);
      await waitFor(() => tr.received.length >= 40, DEADLINE_MS, () => `40 broadcasts, got ${tr.received.length}\n${evidence()}`);
      await quietPeriod(200); // duplicates would show up here
      assert.deepEqual(tr.received.map((m) => m.ref), positions, `refs are not the positions in order\n${evidence()}`);
      assert.deepEqual(tr.received.map((m) => m.seq), burstOrder, "payloads do not match their positions");
      assert.deepEqual(positions.map(offsetOf), range(1, 40), "positions are consecutive across nodes");
      const publishers = new Set(nginx.accessLog().filter((l) => l.uri === "/api/publish").map((l) => l.upstream));
      assert.equal(publishers.size, 2, `publishes reached ${[...publishers]}`);

      // A client push is refused with an error reply (through whichever node nginx picks).
      const { status, response } = await replyTo(channel.push("shout", { a: 1 }, PUSH_TIMEOUT_MS));
      assert.equal(status, "error", `push reply ${status} ${JSON.stringify(response)}\n${evidence()}`);
      assert.equal(typeof response.reason, "string", JSON.stringify(response));

      // Prove there is no stickiness: the session's polls and posts reach the node that does not
      // own it (which forwards them through Redis). Each push is one POST and one GET; a request
      // to another path in between shifts the round-robin parity.
      const sessionRequests = () => nginx.accessLog().filter((l) => l.uri.includes(`token=${session}`));
      const servedByOther = (method) => sessionRequests().some((l) => l.method === method && l.upstream === other.addr);
      for (let i = 0; i < 8 && !(servedByOther("GET") && servedByOther("POST")); i++) {
        const r = await replyTo(channel.push("shout", { i }, PUSH_TIMEOUT_MS));
        assert.equal(r.status, "error", `push ${i}: ${r.status}\n${evidence()}`);
        if (i % 2 === 1) await publish(nginx, uniqueTopic("parity"), "x", {});
      }
      const upstreams = (method) => [...new Set(sessionRequests().filter((l) => l.method === method).map((l) => l.upstream))].sort();
      assert.deepEqual(upstreams("GET"), [owner.addr, other.addr].sort(), `session GETs went to ${upstreams("GET")}\n${evidence()}`);
      assert.ok(servedByOther("POST"), `no session POST reached the non-owner ${other.addr}\n${evidence()}`);
      for (const l of sessionRequests()) assert.equal(l.status, 200, `nginx answered ${l.line}\n${evidence()}`);
      assert.equal(opens, 1, `the socket reopened before any node stopped\n${evidence()}`);

      // Stop the owning node while the client's pending poll is one the other node has forwarded
      // to it through Redis. nginx (one worker, two equal servers) alternates strictly in the order
      // it dispatches requests, which is not the order its log lists them (a POST can finish before
      // the GET sent ahead of it). So count: with every other request finished and logged, the one
      // outstanding GET is dispatch number N+1, which goes where the first request went when N is
      // even, and to the other server when N is odd. The first request (the 410 GET) finished
      // before anything else was sent, so it is the first line of the log.
      const clientLines = () => nginx.accessLog().filter((l) => l.uri.startsWith("/socket/longpoll"));
      const servers = nodes.map((n) => n.addr);
      let loggedBeforeStop = 0;
      await waitFor(
        () => {
          const all = nginx.accessLog();
          const lines = clientLines();
          const done = exchanges.filter((e) => e.answer !== undefined);
          const pending = exchanges.filter((e) => e.answer === undefined);
          loggedBeforeStop = lines.length;
          if (lines.length !== done.length || pending.length !== 1 || pending[0].method !== "GET") return false;
          const first = all[0].upstream;
          const next = all.length % 2 === 0 ? first : servers.find((s) => s !== first);
          return next === other.addr;
        },
        DEADLINE_MS,
        () => `a poll forwarded by ${other.label}\n${evidence()}`,
      );
      const exchangesBefore = exchanges.length;
      const stoppedAt = Date.now();
      const exit = await owner.stop();
      assert.equal(exit.code, 0, `${owner.label} exit ${JSON.stringify(exit)}`);
      for (let seq = 40; seq < 50; seq++) positions.push((await publish(other, topic, "seq", { seq })).position);
      await waitFor(() => tr.joins.length >= 2, DEADLINE_MS, () => `the rejoin on ${other.label}\n${evidence()}`);
      const recoveredAfterMs = Date.now() - stoppedAt;
      assert.equal(tr.joins[1].recovered, true, `rejoin answered ${JSON.stringify(tr.joins[1])}\n${evidence()}`);
      const rejoin = decoded(frames, "out").filter((f) => f[3] === "phx_join").at(-1);
      assert.deepEqual(rejoin[4], { since: positions[39] }, "the rejoin carries the last position seen");
      const newSession = exchanges.slice(exchangesBefore).find((e) => e.answer?.status === 410)?.answer.token;
      assert.ok(newSession && newSession !== session, `no new session after the stop\n${evidence()}`);
      assert.equal(await sessionsOn(other), 1, `${other.label} does not hold the new session`);

      for (let seq = 50; seq < 60; seq++) positions.push((await publish(nginx, topic, "seq", { seq })).position);
      await waitFor(() => tr.received.length >= 60, DEADLINE_MS, () => `60 broadcasts, got ${tr.received.length}\n${evidence()}`);
      await quietPeriod(300); // duplicates would show up here
      assert.deepEqual(
        tr.received.map((m) => m.seq),
        [...burstOrder, ...range(40, 59)],
        `every message exactly once, in order (recovered ${recoveredAfterMs} ms after the stop)\n${evidence()}`,
      );
      assert.deepEqual(tr.received.map((m) => m.ref), positions, "refs are the published positions");
      // The poll pending at the stop was indeed the forwarded one, and nginx answered it.
      const pendingAtStop = clientLines()[loggedBeforeStop];
      assert.ok(pendingAtStop?.uri.includes(`token=${session}`), `${pendingAtStop?.line}\n${evidence()}`);
      assert.equal(pendingAtStop.upstream, other.addr, `the poll pending at the stop: ${pendingAtStop.line}\n${evidence()}`);
      // The new session's requests were all answered by the surviving node (nginx may have
      // tried the stopped one first: "$upstream_addr" then lists both).
      const newSessionLines = nginx.accessLog().filter((l) => l.uri.includes(`token=${newSession}`));
      assert.ok(newSessionLines.length > 0, evidence());
      for (const l of newSessionLines) {
        assert.equal(l.upstream.split(",").at(-1).trim(), other.addr, `${l.line}\n${evidence()}`);
        assert.equal(l.status, 200, `${l.line}\n${evidence()}`);
      }
      const perNode = (method) =>
        nodes.map((n) => `${n === owner ? "owner" : "other"} ${sessionRequests().filter((l) => l.method === method && l.upstream === n.addr).length}`).join(", ");
      t.diagnostic(`first session's requests via nginx: GET ${perNode("GET")}; POST ${perNode("POST")}`);
      t.diagnostic(`rejoined ${recoveredAfterMs} ms after ${owner.label} stopped; the forwarded poll answered ${JSON.stringify(exchanges[exchangesBefore - 1].answer)} after ${pendingAtStop.seconds} s`);
    });
  }
});

// ---------------------------------------------------------------------------
// LongPoll without sticky sessions, under faults (issue 17, item 4)
// ---------------------------------------------------------------------------

/**
 * Asserts what a subscriber may have seen after faults: every acknowledged message exactly once
 * and in order; or, if a join answered `recovered: false`, messages in order without duplicates
 * and every message published after that join (its request sent after the join reply arrived).
 */
function assertLosslessOrTold(tr, pub) {
  const why = diagnose(tr, pub.positions);
  const told = tr.joins.map((j, i) => (j.recovered === false ? tr.joinedAt[i] : null)).filter((at) => at !== null);
  if (told.length === 0) {
    assertComplete(tr, pub.positions);
    return;
  }
  const seqs = tr.received.map((m) => m.seq);
  const disorder = seqs.findIndex((s, i) => i > 0 && s <= seqs[i - 1]);
  assert.equal(disorder, -1, `told recovered:false, but out of order or duplicated at index ${disorder}: ${why}`);
  const lastTold = Math.max(...told);
  const got = new Set(seqs);
  const missedAfter = range(0, pub.positions.length - 1).filter((s) => pub.sentAt[s] > lastTold && !got.has(s));
  assert.deepEqual(missedAfter, [], `told recovered:false, then missed messages published after that join: ${why}`);
  for (const m of tr.received) assert.equal(m.ref, pub.positions[m.seq], `${why}\nref is not the published position`);
}

describe("LongPoll through a round-robin proxy, no sticky sessions, under faults", () => {
  for (const [count, word] of [[2, "two"], [3, "three"]]) {
  it(`20 LongPoll clients (1.8.17 and 1.7.23) through round-robin nginx over ${word} nodes lose nothing silently across a Redis restart, a node drain (SIGTERM, restart) and a node kill (SIGKILL, restart); each drain ends within shutdown.drain_ms + 1 s`, { timeout: 150_000 }, async (t) => {
    const res = resources(t);
    const dir = mkdtempSync(path.join(os.tmpdir(), "pushgate-js-aof-"));
    res.dirs.push(dir);
    // AOF with an fsync per write: a SIGKILLed Redis comes back with everything it acknowledged.
    const redis = await startRedis(dir, ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]);
    res.redis.push(redis);
    const DRAIN_MS = 1000;
    const env = {
      PUSHGATE_REDIS_URL: redis.url,
      PUSHGATE_SHUTDOWN_DRAIN_MS: String(DRAIN_MS),
      PUSHGATE_SHUTDOWN_GRACE_MS: "10000",
      PUSHGATE_LONGPOLL_WINDOW_MS: "10000",
      // Every client comes from 127.0.0.1 (nginx): no per-address limits.
      PUSHGATE_LIMITS_MAX_CONNECTIONS_PER_ADDRESS: "0",
      PUSHGATE_LIMITS_CONNECT_RATE_PER_ADDRESS: "0",
    };
    const labels = ["node A", "node B", "node C"].slice(0, count);
    const startNode = async (i, listen) => {
      const node = await startServer({ env, listen });
      node.label = `${labels[i]} (${node.addr})`;
      res.nodes.push(node);
      await waitReady(node, 200, node.label);
      return node;
    };
    const nodes = [];
    for (let i = 0; i < count; i++) nodes.push(await startNode(i));
    // Never marked down: a node that restarts is back in the rotation at once, and a request
    // that fails on one node (refused, reset) is retried on the other, as balancers do.
    const nginx = await startNginx(res, nodes.map((n) => n.addr), "max_fails=0");
    const topic = uniqueTopic("lp-faults");

    const subs = [];
    for (let i = 0; i < 20; i++) {
      const client = CLIENTS[i % CLIENTS.length];
      subs.push(await lpSubscriber(res, client, nginx, topic, `nginx, client ${i}`));
    }

    const COUNT = 500;
    const pub = steadyPublisher(nodes, topic, COUNT, 20);
    const timeline = [];
    const mark = (what) => timeline.push(`${what} at seq ${pub.next} (${new Date().toISOString()})`);
    const publishMore = async (count, what) => {
      const from = pub.next;
      await waitFor(() => pub.next >= from + count || pub.error, 30_000, () => `${count} publishes ${what} (at seq ${pub.next})`);
      assert.equal(pub.error, null, String(pub.error?.stack));
    };
    await publishMore(60, "before the faults");

    // 1. Redis SIGKILLed and restarted (AOF: nothing acknowledged is lost).
    mark("redis SIGKILL");
    await redis.kill();
    for (const node of nodes) await waitReady(node, 503, node.label);
    await redis.start();
    for (const node of nodes) await waitReady(node, 200, node.label);
    mark("redis back");
    await publishMore(60, "after the Redis restart");

    // 2. Node A drained (SIGTERM) and restarted on the same address.
    const drains = [];
    const drain = async (i) => {
      mark(`${labels[i]} SIGTERM`);
      const started = Date.now();
      const exit = await nodes[i].stop();
      const tookMs = Date.now() - started;
      drains.push({ node: nodes[i].label, tookMs, exit, logs: nodes[i].logs.slice(-8).join("\n") });
      nodes[i] = await startNode(i, nodes[i].addr);
      mark(`${labels[i]} back`);
    };
    await drain(0);
    await publishMore(60, "after node A's drain");

    // 3. Node B SIGKILLed and restarted on the same address.
    mark("node B SIGKILL");
    await nodes[1].kill();
    nodes[1] = await startNode(1, nodes[1].addr);
    mark("node B back");
    await publishMore(60, "after node B's kill");

    // 4. The last node drained too (with two nodes, B: its sessions come from the kill's
    // reconnects).
    await drain(count - 1);
    await waitPublisher(pub, 60_000);
    mark("publisher done");

    await settle(subs, COUNT);
    const told = subs.filter((s) => s.joins.some((j) => j.recovered === false)).length;
    const rejoins = subs.reduce((n, s) => n + s.joins.length - 1, 0);
    t.diagnostic(`timeline: ${timeline.join("; ")}`);
    const bad = nginx.accessLog().filter((l) => l.status !== 200);
    t.diagnostic(`nginx answered ${bad.length} requests with another status than 200: ${bad.slice(0, 12).map((l) => l.line).join(" | ")}`);
    t.diagnostic(`drains: ${drains.map((d) => `${d.node} ${d.tookMs} ms`).join(", ")}; ${rejoins} rejoins, ${told} of ${subs.length} clients told recovered:false`);
    const failures = [];
    for (const sub of subs) {
      try {
        assertLosslessOrTold(sub, pub);
      } catch (e) {
        failures.push(e.message.split("\n")[0]);
      }
    }
    assert.deepEqual(failures, [], `${failures.length} of ${subs.length} clients lost messages silently\ntimeline: ${timeline.join("\n  ")}`);
    for (const d of drains) {
      assert.equal(d.exit.code, 0, `${d.node} exit ${JSON.stringify(d.exit)}\n${d.logs}`);
      assert.ok(d.tookMs <= DRAIN_MS + 1000, `${d.node}'s drain took ${d.tookMs} ms (shutdown.drain_ms ${DRAIN_MS})\n${d.logs}`);
    }
  });
  }
});

// ---------------------------------------------------------------------------
// Presence across nodes
// ---------------------------------------------------------------------------

const PRESENCE_SECRET = AUTH_SECRET;

/** A connect token (JWT, HS256) for `sub`, valid for ten minutes. */
function presenceToken(sub) {
  return jwt({ sub, exp: Math.floor(Date.now() / 1000) + 600 }, PRESENCE_SECRET);
}

/**
 * A WebSocket client of `node` joined to `topic` with `{presence: {name}}` (and a connect token
 * for `sub` when given), watched by the client's own `Presence`.
 */
async function presenceMember(res, client, node, topic, name, sub = undefined) {
  const { socket, frames } = makeSocket(client, node, sub ? { params: { token: presenceToken(sub) } } : {});
  res.sockets.push(socket);
  socket.connect();
  const channel = socket.channel(topic, { presence: { name } });
  const presence = new client.Presence(channel);
  const member = { label: `${name} (phoenix ${client.version} on ${node.label})`, socket, frames, channel, presence };
  const joined = await replyTo(channel.join(PUSH_TIMEOUT_MS));
  assert.equal(joined.status, "ok", `${member.label}: join ${JSON.stringify(joined)}\n${showFrames(frames)}`);
  return member;
}

/** Waits until `member`'s presence list summary is `expected`. */
async function waitPresence(member, expected, timeoutMs = DEADLINE_MS) {
  await waitFor(
    () => presenceSummary(member.presence) === expected,
    timeoutMs,
    () =>
      `${member.label}'s presence list to be "${expected}"; it is "${presenceSummary(member.presence)}"\n` +
      showFrames(member.frames.filter(([, text]) => /presence_|phx_reply|phx_join/.test(text))),
  );
}

/** The inbound presence frames of `topic` as `[event, payload]`. */
function presenceEvents(member, topic) {
  return decoded(member.frames, "in")
    .filter((f) => f[2] === topic && (f[3] === "presence_state" || f[3] === "presence_diff"))
    .map((f) => [f[3], f[4]]);
}

/** Two nodes on a fresh Redis tracking presence on room:*, with presence.node_ttl_ms `ttlMs`. */
async function presenceNodes(res, ttlMs) {
  const redis = await redisFor(res);
  return startNodes(res, redis, 2, {
    PUSHGATE_PRESENCE_TOPICS: "room:*",
    PUSHGATE_PRESENCE_NODE_TTL_MS: String(ttlMs),
    PUSHGATE_AUTH_SECRET: PRESENCE_SECRET,
  });
}

describe("presence on the Redis broker", () => {
  it("presence: clients on two nodes see each other (a token sub on both is one key); a SIGKILLed node's entries leave within presence.node_ttl_ms", { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const res = resources(t);
    const TTL_MS = 1500;
    const [a, b] = await presenceNodes(res, TTL_MS);
    const topic = uniqueTopic("room");
    const annA = await presenceMember(res, CLIENTS[0], a, topic, "Ann@A", "ann");
    const annB = await presenceMember(res, CLIENTS[1], b, topic, "Ann@B", "ann");
    const bobB = await presenceMember(res, CLIENTS[0], b, topic, "Bob@B");
    const all = "ann=[Ann@A,Ann@B] anon=[Bob@B]";
    for (const member of [annA, annB, bobB]) await waitPresence(member, all);

    const killedAt = Date.now();
    const exit = await b.kill();
    assert.equal(exit.signal, "SIGKILL", `${b.label} exit ${JSON.stringify(exit)}`);
    await waitPresence(annA, "ann=[Ann@A]", DEADLINE_MS);
    const leftAfterMs = Date.now() - killedAt;
    t.diagnostic(`${b.label}'s entries left ${leftAfterMs} ms after its SIGKILL (presence.node_ttl_ms ${TTL_MS})`);
    // As presence_diff leaves (not as a new state).
    const leaves = presenceEvents(annA, topic)
      .filter(([event, p]) => event === "presence_diff" && Object.keys(p.leaves ?? {}).length)
      .flatMap(([, p]) => Object.values(p.leaves).flatMap((entry) => entry.metas.map((m) => m.name)))
      .sort();
    assert.deepEqual(leaves, ["Ann@B", "Bob@B"], `leave diffs on ${a.label}\n${showFrames(annA.frames)}`);

    // The entries are gone from the shared state, not just diffed away: a newcomer on A gets
    // a presence_state without them.
    const newcomer = await presenceMember(res, CLIENTS[1], a, topic, "Cid@A");
    await waitPresence(newcomer, "ann=[Ann@A] anon=[Cid@A]");
    const [state] = presenceEvents(newcomer, topic).filter(([event]) => event === "presence_state");
    assert.ok(state, `no presence_state for the newcomer\n${showFrames(newcomer.frames)}`);
    const stateNames = Object.values(state[1]).flatMap((entry) => entry.metas.map((m) => m.name));
    assert.deepEqual(stateNames.filter((n) => n.endsWith("@B")), [], `the newcomer's presence_state ${JSON.stringify(state[1])}`);
    await waitPresence(annA, "ann=[Ann@A] anon=[Cid@A]");
  });

  it("presence: a node stopped gracefully (SIGTERM) takes its entries away at once, long before presence.node_ttl_ms", { timeout: TEST_TIMEOUT_MS }, async (t) => {
    const res = resources(t);
    const TTL_MS = 60_000;
    const [a, b] = await presenceNodes(res, TTL_MS);
    const topic = uniqueTopic("room");
    const annA = await presenceMember(res, CLIENTS[1], a, topic, "Ann@A");
    const bobB = await presenceMember(res, CLIENTS[0], b, topic, "Bob@B", "bob");
    const cidB = await presenceMember(res, CLIENTS[1], b, topic, "Cid@B");
    const all = "anon=[Ann@A] anon=[Cid@B] bob=[Bob@B]";
    for (const member of [annA, bobB, cidB]) await waitPresence(member, all);

    const stoppedAt = Date.now();
    const stopping = b.stop();
    await waitPresence(annA, "anon=[Ann@A]", DEADLINE_MS);
    const leftAfterMs = Date.now() - stoppedAt;
    t.diagnostic(`${b.label}'s entries left ${leftAfterMs} ms after its SIGTERM (presence.node_ttl_ms ${TTL_MS})`);
    const exit = await stopping;
    assert.equal(exit.code, 0, `${b.label} exit ${JSON.stringify(exit)}\n${b.logs.slice(-20).join("\n")}`);
  });
});
