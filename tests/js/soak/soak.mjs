// A soak with faults (issue 20, item 2): three pushgate nodes on one Redis, each node in a network
// namespace of its own (a veth pair to the host, nftables inside), under connection churn of the
// official phoenix clients (1.8.17 and 1.7.23, WebSocket and LongPoll), two steady publishers
// (POST /api/publish, and redis/publish.lua straight into Redis), presence topics, and faults on a
// schedule: Redis restart, node SIGTERM + restart, node SIGKILL + restart, a node cut off from
// Redis, a node cut off from its clients (nftables drop rules in the node's namespace).
//
//   sudo node tests/js/soak/soak.mjs [seconds]        (scripts/soak.sh wraps it; default 120)
//
// At the end it checks, and exits non-zero when any check fails:
// - every client (a logical subscriber, across its sockets and rejoins) received every
//   acknowledged message of its topics exactly once and in position order since it joined, or
//   got `recovered: false` and then everything after that join's position;
// - no ghost presence entries once presence has converged (GET /api/presence on every node);
// - each node's RSS and open fds back within a stated bound of where they were after warm-up;
// - /readyz truthful throughout (sampled every 500 ms: 503 while a node is cut from Redis or
//   Redis is down, 200 otherwise, with a stated tolerance after each fault begins and ends).
// A JSON report goes to SOAK_REPORT (if set). Needs root, ip, nft, redis-server: a run without
// them fails. Nothing is started outside this run's namespaces and loopback; every namespace is
// removed on exit.

import { execFileSync, spawn } from "node:child_process";
import { existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { CLIENTS, PUBLISH_TOKEN, makeLongPollSocket, makeSocket, startServer, waitFor } from "../support.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "../../..");
const DURATION_S = Number(process.argv[2] ?? process.env.SOAK_DURATION_S ?? 120);
const REDIS_SERVER = process.env.REDIS_SERVER_BIN ?? "redis-server";
const NODES = 3;
const SUBSCRIBERS = Number(process.env.SOAK_SUBSCRIBERS ?? 18);
const NODE_PORT = 4000; // inside each node's own namespace: nothing else can hold it
const API_PACE_MS = 60;
const REDIS_PACE_MS = 120;
const TOPICS = ["soak:a", "soak:b", "room:p1", "room:p2"]; // room:* are presence topics
const NODE_TTL_MS = 4000;
const LP_WINDOW_MS = 4000;
const LP_SESSION_TIMEOUT_MS = 8000;
// The stated bounds.
const READYZ_TOLERANCE_START_MS = 3000; // a fault's first 3 s: /readyz may still say 200
const READYZ_TOLERANCE_END_MS = 9000; // and 9 s after it ends (reconnect backoff at most 5 s + jitter) 503
const RSS_BOUND_BYTES = 24 * 1024 * 1024; // RSS at the end at most this much above the warm-up's
const FD_BOUND = 24; // open fds at the end at most this many above the warm-up's
const QUIET_MS = 500;

const t0 = Date.now();
const now = () => Date.now() - t0;
const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const rand = (a, b) => a + Math.random() * (b - a);
const pick = (xs) => xs[Math.floor(Math.random() * xs.length)];
const log = (...args) => console.log(`[soak ${(now() / 1000).toFixed(1).padStart(6)}s]`, ...args);

// ---------------------------------------------------------------------------
// Environment: fail, never pass, when something is missing
// ---------------------------------------------------------------------------

function need(cond, what) {
  if (!cond) {
    console.error(`soak: FAIL: ${what}`);
    process.exit(2);
  }
}
need(process.getuid?.() === 0, "must run as root (network namespaces, nftables)");
for (const bin of ["ip", "nft", REDIS_SERVER]) {
  let found = false;
  try {
    execFileSync("sh", ["-c", `command -v ${bin}`], { stdio: "ignore" });
    found = true;
  } catch {
    // not found
  }
  need(found, `${bin} not found`);
}

// ---------------------------------------------------------------------------
// Network namespaces: node i lives in <RUN>n<i>, 10.<O2>.<i>.2, the host side is 10.<O2>.<i>.1
// ---------------------------------------------------------------------------

const RUN = `pgs${process.pid % 100000}`;
const O2 = 200 + (process.pid % 50);
const made = [];
function sh(file, args, input) {
  return execFileSync(file, args, { input, stdio: [input ? "pipe" : "ignore", "pipe", "pipe"] }).toString();
}
function cleanup() {
  for (const ns of made.splice(0)) {
    try {
      execFileSync("ip", ["netns", "del", ns], { stdio: "ignore" });
    } catch {
      // already gone
    }
  }
}
process.on("exit", cleanup);
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) process.on(sig, () => process.exit(130));

function makeNamespace(i) {
  const ns = `${RUN}n${i}`;
  const host = `${RUN}h${i}`;
  const peer = `${RUN}p${i}`;
  sh("ip", ["netns", "add", ns]);
  made.push(ns);
  sh("ip", ["link", "add", host, "type", "veth", "peer", "name", peer]);
  sh("ip", ["link", "set", peer, "netns", ns]);
  sh("ip", ["addr", "add", `10.${O2}.${i}.1/24`, "dev", host]);
  sh("ip", ["link", "set", host, "up"]);
  sh("ip", ["-n", ns, "addr", "add", `10.${O2}.${i}.2/24`, "dev", peer]);
  sh("ip", ["-n", ns, "link", "set", peer, "up"]);
  sh("ip", ["-n", ns, "link", "set", "lo", "up"]);
  sh("ip", ["netns", "exec", ns, "nft", "-f", "-"],
    "table inet soak {\n chain in { type filter hook input priority 0; }\n chain out { type filter hook output priority 0; }\n}\n");
  return { ns, hostAddr: `10.${O2}.${i}.1`, addr: `10.${O2}.${i}.2` };
}
const nft = (ns, ...rule) => sh("ip", ["netns", "exec", ns, "nft", ...rule]);

// ---------------------------------------------------------------------------
// Redis on the host (loopback and the veths' host ends), and a small RESP client
// ---------------------------------------------------------------------------

async function freePort() {
  for (let attempt = 0; attempt < 200; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    const free = await new Promise((resolve) => {
      const s = net.createServer();
      s.once("error", () => resolve(false));
      s.listen(port, "0.0.0.0", () => s.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error("no free port");
}

/** One RESP connection; `cmd(...args)` resolves with the reply (rejects on an error reply or a lost link). */
function resp(port) {
  const sock = net.connect(port, "127.0.0.1");
  const queue = [];
  let buf = Buffer.alloc(0);
  let dead = null;
  const fail = (e) => {
    dead = e;
    for (const p of queue.splice(0)) p.reject(e);
  };
  sock.on("error", fail);
  sock.on("close", () => fail(new Error("closed")));
  function parse(b, i) {
    const end = b.indexOf("\r\n", i);
    if (end < 0) return null;
    const type = String.fromCharCode(b[i]);
    const line = b.toString("utf8", i + 1, end);
    if (type === "+") return [line, end + 2];
    if (type === "-") return [new Error(line), end + 2];
    if (type === ":") return [Number(line), end + 2];
    if (type === "$") {
      const n = Number(line);
      if (n < 0) return [null, end + 2];
      if (b.length < end + 2 + n + 2) return null;
      return [b.toString("utf8", end + 2, end + 2 + n), end + 2 + n + 2];
    }
    if (type === "*") {
      const n = Number(line);
      const out = [];
      let at = end + 2;
      for (let k = 0; k < n; k++) {
        const r = parse(b, at);
        if (!r) return null;
        out.push(r[0]);
        at = r[1];
      }
      return [out, at];
    }
    throw new Error(`RESP: unexpected ${type}`);
  }
  sock.on("data", (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      const r = parse(buf, 0);
      if (!r) break;
      buf = buf.subarray(r[1]);
      const p = queue.shift();
      if (r[0] instanceof Error) p?.reject(r[0]);
      else p?.resolve(r[0]);
    }
  });
  return {
    cmd(...args) {
      if (dead) return Promise.reject(dead);
      const parts = [`*${args.length}\r\n`];
      for (const a of args) parts.push(`$${Buffer.byteLength(String(a))}\r\n${a}\r\n`);
      return new Promise((resolve, reject) => {
        queue.push({ resolve, reject });
        sock.write(parts.join(""));
      });
    },
    close: () => sock.destroy(),
    get dead() {
      return dead;
    },
  };
}

class Redis {
  constructor(port, binds) {
    this.port = port;
    this.binds = binds;
    this.proc = null;
  }
  async start() {
    const proc = spawn(REDIS_SERVER, ["--port", String(this.port), "--bind", ...this.binds, "--protected-mode", "no",
      "--save", "", "--appendonly", "no"], { stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    const out = [];
    proc.stdout.on("data", (d) => out.push(String(d)));
    proc.exited = new Promise((resolve) => proc.once("exit", resolve));
    await waitFor(async () => {
      if (proc.exitCode !== null) throw new Error(`redis-server exited: ${out.join("")}`);
      const c = resp(this.port);
      try {
        return (await c.cmd("PING")) === "PONG";
      } catch {
        return false;
      } finally {
        c.close();
      }
    }, 10_000, "redis-server to answer PING");
  }
  async stop() {
    if (this.proc && this.proc.exitCode === null) {
      this.proc.kill("SIGTERM");
      await this.proc.exited;
    }
  }
}
process.on("exit", () => soak.redis?.proc?.kill("SIGKILL"));

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

const soak = {
  redis: null,
  nodes: [], // {i, ns, addr, url, server, down, restarts}
  acks: new Map(TOPICS.map((t) => [t, new Map()])), // topic -> id -> {position, at}
  unacked: new Set(), // ids of attempts that got no position (may still be delivered)
  publishFailures: { api: 0, redis: 0 },
  faults: [], // {kind, node, from, to}
  readyz: [], // {t, node, status}
  resources: [], // {t, node, pid, rss, fds}
  subscribers: [],
  stopping: false,
  zombies: [],
  apiAttempts: [], // {t, node, ok}
  errors: [],
};
const epochsSeen = new Set();
const order = (position) => {
  const at = position.lastIndexOf(":");
  return [BigInt(`0x${position.slice(0, at)}`), Number(position.slice(at + 1))];
};
const before = (a, b) => a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]);

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

async function startNode(node) {
  const server = await startServer({
    wrap: ["ip", "netns", "exec", node.ns],
    listen: `${node.addr}:${NODE_PORT}`,
    env: {
      PUSHGATE_REDIS_URL: `redis://${node.hostAddr}:${soak.redis.port}/`,
      PUSHGATE_PRESENCE_TOPICS: "room:*",
      PUSHGATE_PRESENCE_NODE_TTL_MS: String(NODE_TTL_MS),
      PUSHGATE_LONGPOLL_WINDOW_MS: String(LP_WINDOW_MS),
      PUSHGATE_LONGPOLL_SESSION_TIMEOUT_MS: String(LP_SESSION_TIMEOUT_MS),
      PUSHGATE_LOG: "info",
    },
  });
  node.server = server;
  node.allLogs ??= [];
  node.allLogs.push(`--- start pid ${server.proc.pid} at ${now()} ms`);
  const flush = () => {
    node.allLogs.push(...server.logs.splice(0));
  };
  node.flushLogs = flush;
  server.exited.then(flush);
  node.url = server.url;
  node.pid = server.proc.pid;
  server.exited.then(({ code, signal }) => {
    if (!node.expectExit) soak.errors.push(`node ${node.i} (pid ${server.proc.pid}) exited unexpectedly: code ${code} signal ${signal}\n${server.logs.slice(-20).join("\n")}`);
  });
  return node;
}

async function readyz(node) {
  try {
    const r = await fetch(`${node.url}/readyz`, { signal: AbortSignal.timeout(1000) });
    await r.text();
    return r.status;
  } catch {
    return 0;
  }
}

function sampleResources(node) {
  try {
    const status = readFileSync(`/proc/${node.pid}/status`, "utf8");
    const rss = Number(/VmRSS:\s+(\d+)/.exec(status)[1]) * 1024;
    const fds = readdirSync(`/proc/${node.pid}/fd`).length;
    return { t: now(), node: node.i, pid: node.pid, rss, fds };
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------
// Publishers
// ---------------------------------------------------------------------------

let nextId = 0;
async function apiPublisher() {
  let k = 0;
  while (!soak.stopping) {
    const topic = TOPICS[k % TOPICS.length];
    const node = soak.nodes[k % soak.nodes.length];
    k++;
    const id = `a${nextId++}`;
    try {
      const r = await fetch(`${node.url}/api/publish`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${PUBLISH_TOKEN}` },
        body: JSON.stringify({ topic, event: "m", payload: { id } }),
        signal: AbortSignal.timeout(2000),
      });
      const body = await r.text();
      soak.apiAttempts.push({ t: now(), node: node.i, ok: r.ok });
      if (r.ok) {
        const { position } = JSON.parse(body);
        soak.acks.get(topic).set(id, { position, at: now() });
        epochsSeen.add(position.slice(0, position.lastIndexOf(":")));
      } else {
        if (r.status !== 503) soak.errors.push(`publish on node ${node.i} answered ${r.status}: ${body}`);
        soak.unacked.add(id);
        soak.publishFailures.api++;
      }
    } catch {
      soak.apiAttempts.push({ t: now(), node: node.i, ok: false });
      soak.unacked.add(id);
      soak.publishFailures.api++;
    }
    await delay(API_PACE_MS);
  }
}

async function redisPublisher() {
  const script = readFileSync(path.join(REPO, "redis/publish.lua"), "utf8");
  let conn = null;
  let sha = null;
  let k = 0;
  while (!soak.stopping) {
    const topic = TOPICS[k++ % TOPICS.length];
    const id = `r${nextId++}`;
    try {
      if (!conn || conn.dead) {
        conn?.close();
        conn = resp(soak.redis.port);
        sha = await conn.cmd("SCRIPT", "LOAD", script);
      }
      const position = await Promise.race([
        conn.cmd("EVALSHA", sha, 2, `pushgate:{${topic}}:m`, `pushgate:{${topic}}:s`, `pushgate:${topic}`, "m", JSON.stringify({ id })),
        delay(2000).then(() => {
          throw new Error("timeout");
        }),
      ]);
      soak.acks.get(topic).set(id, { position, at: now() });
    } catch (e) {
      soak.unacked.add(id);
      soak.publishFailures.redis++;
      if (/NOSCRIPT/.test(String(e))) sha = await conn.cmd("SCRIPT", "LOAD", script).catch(() => null);
      else {
        conn?.close();
        conn = null;
      }
    }
    await delay(REDIS_PACE_MS);
  }
  conn?.close();
}

// ---------------------------------------------------------------------------
// Subscribers: a logical client with two channels, whatever sockets it goes through
// ---------------------------------------------------------------------------

function makeSubscriber(k) {
  const client = CLIENTS[k % 2];
  const transport = k % 3 === 2 ? "longpoll" : "websocket"; // a third on LongPoll
  const topics = [TOPICS[k % 2], TOPICS[2 + (Math.floor(k / 2) % 2)]];
  const sub = {
    k,
    label: `s${k} phoenix ${client.version} ${transport}`,
    client,
    transport,
    home: k % NODES,
    node: k % NODES,
    socket: null,
    channels: new Map(),
    trackers: new Map(topics.map((topic) => [topic, { topic, last: null, events: [], joinedOnce: false, strays: 0 }])),
    actions: [],
  };
  return sub;
}

function joinChannel(sub, topic) {
  const tr = sub.trackers.get(topic);
  const presence = topic.startsWith("room:") ? { presence: { name: `s${sub.k}` } } : {};
  const channel = sub.socket.channel(topic, () => {
    tr.sentSince = tr.last;
    return tr.last ? { since: tr.last, ...presence } : presence;
  });
  // A channel being left, or on a socket being closed, may still get a message after the
  // replacement's join was sent with its `since`: the soak stops listening to it first, as an app
  // that moves on would (otherwise the replay of that message counts as a duplicate).
  channel.active = true;
  channel.on("m", (payload, ref) => {
    if (!channel.active) return;
    // Broadcasts carry no join_ref ([null, position, topic, event, payload], as Phoenix's), so
    // phoenix.js hands a channel that is still joining whatever was in flight for the topic's
    // previous subscription on the same socket or LongPoll session (seen: a leave and rejoin
    // while the node was cut off from its clients). The server answers a join before it sends
    // anything of the new subscription, so such strays are counted and left to the replay.
    if (channel.state !== "joined") {
      tr.strays++;
      tr.events.push({ type: "stray", pos: ref, state: channel.state, t: now() });
      return;
    }
    tr.events.push({ type: "msg", id: payload.id, pos: ref, t: now() });
    tr.last = ref;
  });
  channel.onError((reason) => tr.events.push({ type: "chan-error", reason: String(reason ?? ""), node: sub.node, t: now() }));
  channel.onClose(() => tr.events.push({ type: "chan-close", node: sub.node, t: now() }));
  tr.events.push({ type: "join-sent", node: sub.node, t: now() });
  channel.join(10_000)
    .receive("ok", (reply) => {
      tr.events.push({ type: "join", since: tr.sentSince ?? null, position: reply.position, recovered: reply.recovered, node: sub.node, t: now() });
      tr.joinedOnce = true;
    })
    .receive("error", (reply) => tr.events.push({ type: "join-error", reply, t: now() }))
    .receive("timeout", () => tr.events.push({ type: "join-timeout", t: now() }));
  sub.channels.set(topic, channel);
  return channel;
}

function connect(sub, nodeIndex) {
  sub.node = nodeIndex;
  const node = soak.nodes[nodeIndex];
  const opts = { heartbeatIntervalMs: 5000, timeout: 10_000 };
  const made = sub.transport === "websocket" ? makeSocket(sub.client, node, opts) : makeLongPollSocket(sub.client, node, opts);
  // The recording helpers keep every frame; a soak drops them as it goes (sampler loop).
  sub.recorded = [made.frames, made.exchanges].filter(Boolean);
  const { socket } = made;
  sub.socket = socket;
  const note = (type) => () => {
    for (const tr of sub.trackers.values()) tr.events.push({ type, node: nodeIndex, t: now() });
  };
  socket.onOpen(note("socket-open"));
  socket.onClose(note("socket-close"));
  socket.onError(note("socket-error"));
  sub.channels.clear();
  for (const topic of sub.trackers.keys()) joinChannel(sub, topic);
  socket.connect();
}

function disconnect(sub) {
  for (const channel of sub.channels.values()) channel.active = false;
  const socket = sub.socket;
  sub.socket = null;
  // phoenix 1.7.23 over WebSocket may open a socket again after disconnect() when its
  // heartbeat-timeout close to an unreachable node was still pending (seen in this soak: the old
  // socket came back, rejoined its channels and held a second presence entry). Such a socket is
  // counted as a zombie and disconnected again, and connect() is disabled on it.
  socket.retired = true;
  socket.connect = () => {};
  socket.onOpen(() => {
    soak.zombies.push({ sub: sub.label, t: now() });
    socket.disconnect();
  });
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, 3000);
    try {
      socket.disconnect(() => {
        clearTimeout(timer);
        resolve();
      });
    } catch {
      resolve();
    }
  });
}

const joinsOf = (sub) => [...sub.trackers.values()].reduce((n, tr) => n + tr.events.filter((e) => e.type === "join").length, 0);

async function churn(sub) {
  while (!soak.stopping) {
    await delay(rand(3000, 12_000));
    if (soak.stopping) break;
    const action = pick(["reconnect", "reconnect", "rejoin"]);
    sub.actions.push(action);
    if (action === "reconnect") {
      await disconnect(sub);
      connect(sub, Math.floor(Math.random() * NODES));
    } else {
      const topic = pick([...sub.trackers.keys()]);
      const old = sub.channels.get(topic);
      if (!old || !sub.socket) continue;
      old.active = false;
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, 5000);
        old.leave(5000).receive("ok", () => {
          clearTimeout(timer);
          resolve();
        }).receive("timeout", () => {
          clearTimeout(timer);
          resolve();
        });
      });
      if (sub.socket) joinChannel(sub, topic);
    }
  }
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

function fault(kind, node) {
  const f = { kind, node, from: now(), to: null };
  soak.faults.push(f);
  log(`fault: ${kind}${node === null ? "" : ` node ${node}`}`);
  return f;
}

async function restartRedis() {
  const f = fault("redis-restart", null);
  await soak.redis.stop();
  await delay(2000);
  await soak.redis.start();
  f.to = now();
}

async function restartNode(i, signal) {
  const node = soak.nodes[i];
  const f = fault(signal === "SIGTERM" ? "node-sigterm" : "node-sigkill", i);
  node.expectExit = true;
  const started = Date.now();
  if (signal === "SIGTERM") await node.server.stop();
  else await node.server.kill();
  f.exitMs = Date.now() - started;
  await delay(1000);
  node.expectExit = false;
  await startNode(node);
  node.restarts = (node.restarts ?? 0) + 1;
  f.to = now();
}

async function cutFromRedis(i, ms) {
  const node = soak.nodes[i];
  const f = fault("cut-from-redis", i);
  nft(node.ns, "add", "rule", "inet", "soak", "out", "ip", "daddr", node.hostAddr, "tcp", "dport", String(soak.redis.port), "drop");
  nft(node.ns, "add", "rule", "inet", "soak", "in", "ip", "saddr", node.hostAddr, "tcp", "sport", String(soak.redis.port), "drop");
  await delay(ms);
  nft(node.ns, "flush", "chain", "inet", "soak", "out");
  nft(node.ns, "flush", "chain", "inet", "soak", "in");
  f.to = now();
}

async function cutFromClients(i, ms) {
  const node = soak.nodes[i];
  const f = fault("cut-from-clients", i);
  nft(node.ns, "add", "rule", "inet", "soak", "in", "tcp", "dport", String(NODE_PORT), "drop");
  nft(node.ns, "add", "rule", "inet", "soak", "out", "tcp", "sport", String(NODE_PORT), "drop");
  await delay(ms);
  nft(node.ns, "flush", "chain", "inet", "soak", "out");
  nft(node.ns, "flush", "chain", "inet", "soak", "in");
  f.to = now();
}

/** One round of every fault, `gap` ms apart; node 2 (C) is never restarted (the strict leak check). */
const ROUND = [
  ["redis-restart", () => restartRedis()],
  ["node-sigterm", () => restartNode(0, "SIGTERM")],
  ["cut-from-redis", () => cutFromRedis(1, 6000)],
  ["node-sigkill", () => restartNode(1, "SIGKILL")],
  ["cut-from-clients", () => cutFromClients(2, 6000)],
  ["cut-from-redis", () => cutFromRedis(2, 5000)],
];

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/**
 * The delivery check for one client's subscription to one topic, over all its sockets and joins.
 * Expected: every acknowledged message positioned after the first join's reply position, except
 * those in a gap a `recovered: false` join forgave (after the last message the client had, up
 * to that join's reply position); each once, and in position order between `recovered: false`
 * joins. A message received again after a `recovered: false` join whose position lies behind
 * the client's `since` is counted (the client was told to refetch), not failed.
 */
function checkDelivery(sub, tr) {
  const acked = soak.acks.get(tr.topic);
  const problems = [];
  const seen = new Map(); // id -> times received
  const forgiven = []; // [lo, hi] as order keys: lo exclusive, hi inclusive
  let start = null;
  let lastPos = null;
  let resetAt = -1; // index in receipts of the last recovered:false join
  let prev = null; // previous receipt's order key, since the last recovered:false
  let redelivered = 0;
  let spurious = 0;
  let recoveredFalse = 0;
  let joins = 0;
  let received = 0;
  for (const e of tr.events) {
    if (e.type === "join") {
      joins++;
      if (start === null) {
        start = order(e.position);
        continue;
      }
      if (e.recovered === true) {
        if (e.since !== lastPos) problems.push(`rejoin since ${e.since} but last received ${lastPos}`);
      } else if (e.recovered === false) {
        recoveredFalse++;
        const reply = order(e.position);
        const last = lastPos ? order(lastPos) : start;
        if (before(last, reply)) forgiven.push([last, reply]);
        else if (e.since && before(reply, order(e.since))) spurious++;
        prev = null;
        resetAt = received;
      } else if (e.since) {
        problems.push(`join with since ${e.since} answered ${JSON.stringify(e)}`);
      }
    } else if (e.type === "msg") {
      received++;
      const times = (seen.get(e.id) ?? 0) + 1;
      seen.set(e.id, times);
      const key = order(e.pos);
      if (times > 1) {
        if (resetAt >= 0) redelivered++;
        else problems.push(`duplicated ${e.id}@${e.pos}`);
      }
      if (prev && !before(prev, key)) problems.push(`out of order: ${e.pos} after a later position`);
      prev = key;
      lastPos = e.pos;
      if (!acked.has(e.id) && !soak.unacked.has(e.id)) problems.push(`never published: ${e.id}`);
    }
  }
  if (start === null) problems.push("never joined");
  const inForgiven = (k) => forgiven.some(([lo, hi]) => before(lo, k) && !before(hi, k));
  const missing = [];
  let expected = 0;
  for (const [id, a] of acked) {
    const k = order(a.position);
    if (start === null || !before(start, k) || inForgiven(k)) continue;
    expected++;
    if (!seen.has(id)) missing.push(`${id}@${a.position}`);
  }
  if (missing.length) problems.push(`missing ${missing.length} of ${expected}: ${missing.sort().slice(0, 12).join(" ")}`);
  if (problems.length) {
    // The events around the first problem, compressed: runs of messages as first..last.
    const from = 0;
    const lines = [];
    for (const e of tr.events.slice(from)) {
      const prev = lines[lines.length - 1];
      if (e.type === "msg" && prev?.type === "msg" && prev.t + 2000 > e.t) {
        prev.to = e.pos;
        prev.n++;
        continue;
      }
      lines.push(e.type === "msg" ? { type: "msg", from: e.pos, to: e.pos, n: 1, t: e.t } : e);
    }
    problems.push(`events: ${lines.map((e) => JSON.stringify(e)).join("\n      ")}`);
  }
  return { problems, joins, recoveredFalse, spuriousRecoveredFalse: spurious, redelivered, received, strays: tr.strays,
    forgivenGaps: forgiven.length };
}

const lastMetas = {};
async function presenceOf(node, topic) {
  const r = await fetch(`${node.url}/api/presence?topic=${encodeURIComponent(topic)}`, {
    headers: { authorization: `Bearer ${PUBLISH_TOKEN}` },
    signal: AbortSignal.timeout(2000),
  });
  if (!r.ok) return null;
  const { presences } = await r.json();
  lastMetas[`${topic}@${node.i}`] = presences;
  return Object.values(presences).flatMap((e) => e.metas.map((m) => m.name)).sort();
}

function expectedPresence(topic) {
  return soak.subscribers.filter((s) => s.trackers.has(topic)).map((s) => `s${s.k}`).sort();
}

function judgeReadyz() {
  const judged = { samples: soak.readyz.length, judged: 0, ok: 0, skipped: 0, wrong: [] };
  for (const s of soak.readyz) {
    let expect = 200;
    let skip = false;
    for (const f of soak.faults) {
      const to = f.to ?? Infinity;
      const mine = f.node === null || f.node === s.node;
      if (!mine) continue;
      if (f.kind === "cut-from-clients" || f.kind === "node-sigterm" || f.kind === "node-sigkill") {
        // Unreachable or restarting: not judged (the restarted node is judged from its start + tolerance).
        if (s.t >= f.from && s.t <= to + READYZ_TOLERANCE_END_MS) skip = true;
        continue;
      }
      // Redis down or the node cut from it.
      if (s.t >= f.from && s.t < f.from + READYZ_TOLERANCE_START_MS) skip = true;
      else if (s.t >= to && s.t < to + READYZ_TOLERANCE_END_MS) skip = true;
      else if (s.t >= f.from && s.t < to) expect = 503;
    }
    if (skip) {
      judged.skipped++;
      continue;
    }
    judged.judged++;
    if (s.status === expect) judged.ok++;
    else judged.wrong.push({ ...s, expect });
  }
  return judged;
}

/** For each Redis fault: how long after it began each node said 503, and after it ended 200. */
function readyzLatencies() {
  const out = [];
  for (const f of soak.faults.filter((f) => f.kind === "redis-restart" || f.kind === "cut-from-redis")) {
    for (const node of soak.nodes) {
      if (f.node !== null && f.node !== node.i) continue;
      const mine = soak.readyz.filter((s) => s.node === node.i);
      const red = mine.find((s) => s.t >= f.from && s.status === 503);
      const green = mine.find((s) => s.t >= f.to && s.status === 200);
      // The first publish through this node that succeeded after the fault ended.
      const published = soak.apiAttempts.find((a) => a.node === node.i && a.t >= f.to && a.ok);
      out.push({ kind: f.kind, node: node.i, redAfterMs: red ? red.t - f.from : null, greenAfterMs: green ? green.t - f.to : null,
        publishAfterMs: published ? published.t - f.to : null });
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

async function main() {
  log(`duration ${DURATION_S} s, ${NODES} nodes, ${SUBSCRIBERS} subscribers, run ${RUN}, net 10.${O2}.0.0/16`);
  for (let i = 0; i < NODES; i++) soak.nodes.push({ i, ...makeNamespace(i + 1) });
  soak.redis = new Redis(await freePort(), ["127.0.0.1", ...soak.nodes.map((n) => n.hostAddr)]);
  await soak.redis.start();
  await Promise.all(soak.nodes.map((n) => startNode(n)));
  await Promise.all(soak.nodes.map((n) => waitFor(async () => (await readyz(n)) === 200, 15_000, `node ${n.i} ready`)));
  log(`redis on port ${soak.redis.port}; nodes ${soak.nodes.map((n) => n.url).join(" ")}`);

  const samplers = [];
  const sampling = { on: true };
  samplers.push((async () => {
    while (sampling.on) {
      await Promise.all(soak.nodes.map(async (n) => {
        const t = now();
        soak.readyz.push({ t, node: n.i, status: await readyz(n) });
      }));
      await delay(500);
    }
  })());
  samplers.push((async () => {
    while (sampling.on) {
      for (const n of soak.nodes) {
        const r = sampleResources(n);
        if (r) soak.resources.push(r);
      }
      for (const sub of soak.subscribers) for (const list of sub.recorded ?? []) list.length = 0;
      for (const n of soak.nodes) {
        n.flushLogs?.();
        if (n.allLogs.length > 20000) n.allLogs.splice(0, n.allLogs.length - 20000);
      }
      await delay(2000);
    }
  })());

  for (let k = 0; k < SUBSCRIBERS; k++) soak.subscribers.push(makeSubscriber(k));
  for (const sub of soak.subscribers) connect(sub, sub.home);
  await waitFor(() => soak.subscribers.every((s) => [...s.trackers.values()].every((tr) => tr.joinedOnce)), 30_000, "every subscriber joined");
  const publishers = [apiPublisher(), redisPublisher()];
  // Warm-up: a few seconds of traffic before the baseline.
  await delay(Math.min(10_000, DURATION_S * 80));
  const baseline = soak.nodes.map(sampleResources);
  log(`baseline: ${baseline.map((b) => `node ${b.node} rss ${(b.rss / 1048576).toFixed(1)} MiB fds ${b.fds}`).join("; ")}`);
  const churners = soak.subscribers.map(churn);

  // Faults until the last 40 s (at least one full round), spaced by `gap`.
  const faultEnd = DURATION_S * 1000 - 40_000;
  const gap = DURATION_S <= 180 ? 4000 : 15_000;
  let round = 0;
  let roundMs = 0;
  while (round === 0 || now() + roundMs < faultEnd) {
    const began = now();
    for (const [, run] of ROUND) {
      await run();
      await delay(gap);
    }
    roundMs = Math.max(roundMs, now() - began);
    round++;
  }
  log(`faults done: ${round} round(s), ${soak.faults.length} faults`);

  // Convergence: churn stops, every subscriber goes home (a last rejoin with since), publishers
  // stop, and every live subscriber must then hold every acknowledged message.
  soak.stopping = true;
  await Promise.all(churners);
  await Promise.all(publishers);
  const endJoins = soak.subscribers.map(joinsOf);
  for (const sub of soak.subscribers) {
    await disconnect(sub);
    connect(sub, sub.home);
  }
  await waitFor(() => soak.subscribers.every((s, n) => joinsOf(s) >= endJoins[n] + s.trackers.size), 30_000, "every subscriber rejoined at home")
    .catch((e) => soak.errors.push(`${e.message}: ${soak.subscribers.filter((s, n) => joinsOf(s) < endJoins[n] + s.trackers.size)
      .map((s) => `${s.label} on node ${s.node}: ${[...s.trackers.values()].map((tr) => `${tr.topic} ${JSON.stringify(tr.events.filter((e) => e.type !== "msg").slice(-3))}`).join(" | ")}`).join("\n")}`));
  // A last message per topic through the API, so the tail is checked too.
  for (const topic of TOPICS) {
    const r = await fetch(`${soak.nodes[0].url}/api/publish`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${PUBLISH_TOKEN}` },
      body: JSON.stringify({ topic, event: "m", payload: { id: `end-${topic}` } }),
    });
    const { position } = await r.json();
    soak.acks.get(topic).set(`end-${topic}`, { position, at: now() });
  }
  const received = (sub) => [...sub.trackers.values()].every((tr) => tr.events.some((e) => e.id === `end-${tr.topic}`));
  await waitFor(() => soak.subscribers.every(received), 30_000, "every subscriber to receive the last message").catch((e) => soak.errors.push(String(e)));
  await delay(QUIET_MS); // only to let duplicates show up

  const report = { durationS: DURATION_S, elapsedS: now() / 1000, subscribers: SUBSCRIBERS, rounds: round, faults: soak.faults, checks: {} };
  // 1. Delivery.
  const delivery = [];
  for (const sub of soak.subscribers) {
    for (const tr of sub.trackers.values()) {
      const r = checkDelivery(sub, tr);
      delivery.push({ sub: sub.label, topic: tr.topic, ...r });
    }
  }
  const acked = [...soak.acks.values()].reduce((n, m) => n + m.size, 0);
  report.checks.delivery = {
    acknowledged: acked,
    unacknowledgedAttempts: soak.unacked.size,
    publishFailures: soak.publishFailures,
    messagesReceived: delivery.reduce((n, d) => n + d.received, 0),
    joins: delivery.reduce((n, d) => n + d.joins, 0),
    spuriousRecoveredFalse: delivery.reduce((n, d) => n + d.spuriousRecoveredFalse, 0),
    redeliveredAfterRecoveredFalse: delivery.reduce((n, d) => n + d.redelivered, 0),
    forgivenGaps: delivery.reduce((n, d) => n + d.forgivenGaps, 0),
    strays: delivery.reduce((n, d) => n + d.strays, 0),
    recoveredFalse: delivery.reduce((n, d) => n + d.recoveredFalse, 0),
    epochs: epochsSeen.size,
    churnActions: soak.subscribers.reduce((n, s) => n + s.actions.length, 0),
    failing: delivery.filter((d) => d.problems.length),
  };
  // 2. Presence converges to who is joined, on every node.
  let lastPresence = null;
  const presenceStart = Date.now();
  const presenceOk = await waitFor(async () => {
    lastPresence = {};
    let ok = true;
    for (const topic of ["room:p1", "room:p2"]) {
      for (const node of soak.nodes) {
        const names = await presenceOf(node, topic).catch(() => null);
        lastPresence[`${topic}@${node.i}`] = names;
        if (JSON.stringify(names) !== JSON.stringify(expectedPresence(topic))) ok = false;
      }
    }
    return ok;
  }, 30_000, "presence").then(() => true, () => false);
  report.checks.presence = { ok: presenceOk, convergedMs: Date.now() - presenceStart, expected: { "room:p1": expectedPresence("room:p1"), "room:p2": expectedPresence("room:p2") }, last: lastPresence };
  if (!presenceOk) {
    report.checks.presence.metas = lastMetas;
    // What Redis holds: the node set, each node's topics and liveness, the presence hashes.
    const c = resp(soak.redis.port);
    const I = "pushgate.internal:";
    const redisState = { nodes: await c.cmd("SMEMBERS", `${I}presence:nodes`) };
    const ids = new Set(redisState.nodes);
    for (const topic of ["room:p1", "room:p2"]) {
      const flat = await c.cmd("HGETALL", `pushgate:{${topic}}:p`);
      redisState[topic] = {};
      for (let j = 0; j < flat.length; j += 2) {
        redisState[topic][flat[j]] = flat[j + 1];
        ids.add(JSON.parse(flat[j + 1]).node);
      }
    }
    for (const id of ids) {
      redisState[`node ${id}`] = { topics: await c.cmd("SMEMBERS", `${I}presence:node:${id}`), alive: await c.cmd("PTTL", `${I}node:${id}`) };
    }
    c.close();
    report.checks.presence.redis = redisState;
    report.checks.presence.logs = soak.nodes.map((n) => n.allLogs.filter((l) => /presence|redis/i.test(l)));
    report.checks.presence.timelines = Object.fromEntries(soak.subscribers.map((sub) => [`s${sub.k}`,
      [...sub.trackers.values()].filter((tr) => tr.topic.startsWith("room:")).map((tr) => tr.events.filter((e) => e.type !== "msg"))]));
  }
  // 3. Resources: back within the bound, polled (LongPoll sessions of sockets left behind must
  // expire first, longpoll.session_timeout_ms).
  const within = (n, b, e) => e && e.rss <= b.rss + RSS_BOUND_BYTES && e.fds <= b.fds + FD_BOUND;
  let end = [];
  const resourcesStart = Date.now();
  await waitFor(() => {
    end = soak.nodes.map(sampleResources);
    return soak.nodes.every((n) => within(n, baseline[n.i], end[n.i]));
  }, LP_SESSION_TIMEOUT_MS + 20_000, "RSS and fds back within bounds").catch(() => {});
  const resourcesMs = Date.now() - resourcesStart;
  report.checks.resources = soak.nodes.map((n) => {
    const b = baseline[n.i];
    const e = end[n.i];
    const peak = soak.resources.filter((r) => r.node === n.i).reduce((m, r) => Math.max(m, r.rss), 0);
    return { node: n.i, restarts: n.restarts ?? 0, rssStart: b.rss, rssEnd: e?.rss, rssPeak: peak, fdsStart: b.fds, fdsEnd: e?.fds,
      withinMs: resourcesMs, ok: Boolean(within(n, b, e)) };
  });
  sampling.on = false;
  await Promise.all(samplers);
  // 4. /readyz.
  report.checks.readyz = { ...judgeReadyz(), latencies: readyzLatencies(),
    tolerance: { afterStartMs: READYZ_TOLERANCE_START_MS, afterEndMs: READYZ_TOLERANCE_END_MS } };
  report.errors = soak.errors;
  report.zombieSockets = soak.zombies;
  report.bounds = { rssBytes: RSS_BOUND_BYTES, fds: FD_BOUND };

  for (const sub of soak.subscribers) await disconnect(sub);
  soak.nodes.forEach((n) => (n.expectExit = true));
  await Promise.all(soak.nodes.map((n) => n.server.stop()));
  await soak.redis.stop();

  const failures = [];
  if (report.checks.delivery.failing.length) failures.push(`delivery: ${report.checks.delivery.failing.length} subscriptions with problems`);
  if (!presenceOk) failures.push("presence did not converge (ghosts or missing entries)");
  for (const r of report.checks.resources) if (!r.ok) failures.push(`node ${r.node}: rss ${r.rssStart}->${r.rssEnd}, fds ${r.fdsStart}->${r.fdsEnd}`);
  if (report.checks.readyz.wrong.length) failures.push(`readyz: ${report.checks.readyz.wrong.length} of ${report.checks.readyz.judged} judged samples wrong`);
  if (soak.errors.length) failures.push(`errors: ${soak.errors.length}`);
  report.failures = failures;
  if (process.env.SOAK_REPORT) writeFileSync(process.env.SOAK_REPORT, JSON.stringify(report, null, 2));
  summarize(report);
  if (failures.length) {
    console.log(`soak: FAIL\n  ${failures.join("\n  ")}`);
    process.exitCode = 1;
  } else {
    console.log("soak: PASS");
  }
}

function summarize(r) {
  const d = r.checks.delivery;
  log(`faults: ${r.faults.map((f) => `${f.kind}${f.node === null ? "" : `(${f.node})`}@${(f.from / 1000).toFixed(0)}s`).join(" ")}`);
  log(`delivery: ${d.acknowledged} acknowledged (${d.unacknowledgedAttempts} attempts unacknowledged: api ${d.publishFailures.api}, redis ${d.publishFailures.redis}), ` +
    `${d.messagesReceived} received by ${r.subscribers} clients, ${d.joins} joins (${d.recoveredFalse} recovered:false: ${d.forgivenGaps} with a gap forgiven, ${d.spuriousRecoveredFalse} answered by a node behind the client's since; ${d.redeliveredAfterRecoveredFalse} messages delivered again after one), ${d.strays} strays ignored, ${d.epochs} epochs, ${d.churnActions} churn actions`);
  for (const f of d.failing.slice(0, 10)) log(`  ${f.sub} ${f.topic}: ${f.problems.join("\n    ")}`);
  log(`presence: ${r.checks.presence.ok ? "converged" : "NOT converged"} in ${r.checks.presence.convergedMs} ms` +
    (r.checks.presence.ok ? "" : ` ${JSON.stringify(r.checks.presence)}`));
  for (const x of r.checks.resources) {
    log(`node ${x.node} (${x.restarts} restarts): rss ${(x.rssStart / 1048576).toFixed(1)} -> ${(x.rssEnd / 1048576).toFixed(1)} MiB (peak ${(x.rssPeak / 1048576).toFixed(1)}), fds ${x.fdsStart} -> ${x.fdsEnd} ${x.ok ? "ok" : "OVER BOUND"}`);
  }
  const z = r.checks.readyz;
  log(`readyz: ${z.samples} samples, ${z.judged} judged, ${z.ok} right, ${z.wrong.length} wrong, ${z.skipped} in tolerance or unreachable-by-design`);
  for (const w of z.wrong.slice(0, 10)) log(`  wrong: ${JSON.stringify(w)}`);
  log(`readyz latencies (ms; then the first publish through the node): ${z.latencies.map((l) => `${l.kind}(${l.node}) red ${l.redAfterMs} green ${l.greenAfterMs} publish ${l.publishAfterMs}`).join("; ")}`);
  log(`client sockets that reopened after disconnect() (phoenix.js, disconnected again): ${r.zombieSockets.length}`);
  for (const e of r.errors.slice(0, 10)) log(`error: ${e}`);
}

main().catch((e) => {
  console.error(`soak: FAIL: ${e.stack ?? e}`);
  process.exitCode = 1;
}).finally(() => {
  // Sockets of the phoenix clients keep timers: leave once done.
  setTimeout(() => process.exit(process.exitCode ?? 0), 200).unref();
});
