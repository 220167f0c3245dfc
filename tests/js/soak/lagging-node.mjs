// A failing reproduction of a bug the soak found (SOAK.md, "A node behind the client answers
// recovered: false"): a client that has seen a topic up to position P joins with `since: P` on a
// node that is live on the topic but has not yet received P (here: cut off from Redis by an
// nftables drop rule in its own network namespace, before it noticed; in production, any node a
// few milliseconds behind another). The node answers `recovered: false` at once with its own,
// older position (hub.rs, `TopicState::locate`: an offset ahead of the local buffer is
// `Start::Unrecoverable`), although Redis holds P and nothing was lost; once the node catches up
// it sends the messages between its position and P again.
//
//   sudo PUSHGATE_BIN=target/debug/pushgate node tests/js/soak/lagging-node.mjs
//
// Exits 0 when the join is answered `recovered: true` (or refused as unavailable, or held, until
// the node can tell), 1 when the bug shows, 2 when the environment is missing (root, ip, nft,
// redis-server).

import { execFileSync, spawn } from "node:child_process";
import net from "node:net";
import { CLIENTS, PUBLISH_TOKEN, makeSocket, startServer, waitFor } from "../support.js";

const need = (ok, what) => {
  if (!ok) {
    console.error(`lagging-node: FAIL: ${what}`);
    process.exit(2);
  }
};
need(process.getuid?.() === 0, "must run as root");
for (const bin of ["ip", "nft", "redis-server"]) {
  try {
    execFileSync("sh", ["-c", `command -v ${bin}`], { stdio: "ignore" });
  } catch {
    need(false, `${bin} not found`);
  }
}

const ns = `pgl${process.pid % 100000}`;
const O2 = 150 + (process.pid % 40);
const sh = (file, args, input) => execFileSync(file, args, { input, stdio: [input ? "pipe" : "ignore", "pipe", "pipe"] }).toString();
const children = [];
process.on("exit", () => {
  for (const c of children) c.kill("SIGKILL");
  try {
    execFileSync("ip", ["netns", "del", ns], { stdio: "ignore" });
  } catch {
    // not made
  }
});

async function freePort() {
  for (;;) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    const free = await new Promise((resolve) => {
      const s = net.createServer();
      s.once("error", () => resolve(false));
      s.listen(port, "0.0.0.0", () => s.close(() => resolve(true)));
    });
    if (free) return port;
  }
}

async function publish(node, topic, seq) {
  const r = await fetch(`${node.url}/api/publish`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${PUBLISH_TOKEN}` },
    body: JSON.stringify({ topic, event: "m", payload: { seq } }),
  });
  if (!r.ok) throw new Error(`publish: ${r.status} ${await r.text()}`);
  return (await r.json()).position;
}

async function main() {
  // Node B in a namespace of its own, 10.O2.1.2; the host end is 10.O2.1.1.
  sh("ip", ["netns", "add", ns]);
  sh("ip", ["link", "add", `${ns}h`, "type", "veth", "peer", "name", `${ns}p`]);
  sh("ip", ["link", "set", `${ns}p`, "netns", ns]);
  sh("ip", ["addr", "add", `10.${O2}.1.1/24`, "dev", `${ns}h`]);
  sh("ip", ["link", "set", `${ns}h`, "up"]);
  sh("ip", ["-n", ns, "addr", "add", `10.${O2}.1.2/24`, "dev", `${ns}p`]);
  sh("ip", ["-n", ns, "link", "set", `${ns}p`, "up"]);
  sh("ip", ["-n", ns, "link", "set", "lo", "up"]);
  sh("ip", ["netns", "exec", ns, "nft", "-f", "-"], "table inet t {\n chain in { type filter hook input priority 0; }\n chain out { type filter hook output priority 0; }\n}\n");

  const port = await freePort();
  const redis = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", `10.${O2}.1.1`, "--protected-mode", "no", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  children.push(redis);
  await waitFor(() => new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  }), 10_000, "redis-server");

  const a = await startServer({ env: { PUSHGATE_REDIS_URL: `redis://127.0.0.1:${port}/` } });
  const b = await startServer({ wrap: ["ip", "netns", "exec", ns], listen: `10.${O2}.1.2:4000`, env: { PUSHGATE_REDIS_URL: `redis://10.${O2}.1.1:${port}/` } });
  children.push(a.proc, b.proc);
  for (const node of [a, b]) {
    await waitFor(async () => (await fetch(`${node.url}/readyz`).catch(() => null))?.status === 200, 10_000, `${node.url} ready`);
  }
  const client = CLIENTS[0];
  const topic = "room:lag";

  // A subscriber on B keeps B live on the topic; a client on A follows it.
  const keeper = makeSocket(client, b).socket;
  const keepChannel = keeper.channel(topic, {});
  let keeperGot = 0;
  keepChannel.on("m", () => keeperGot++);
  keeper.connect();
  await new Promise((resolve) => keepChannel.join().receive("ok", resolve));

  const onA = makeSocket(client, a).socket;
  let last = null;
  const chA = onA.channel(topic, {});
  chA.on("m", (_payload, ref) => (last = ref));
  onA.connect();
  await new Promise((resolve) => chA.join().receive("ok", resolve));
  for (let seq = 1; seq <= 3; seq++) await publish(a, topic, seq);
  await waitFor(() => keeperGot === 3 && last?.endsWith(":3"), 10_000, "both to have 3 messages");

  // B is cut off from Redis (it has not noticed yet); a fourth message reaches only A.
  sh("ip", ["netns", "exec", ns, "nft", "add", "rule", "inet", "t", "out", "ip", "daddr", `10.${O2}.1.1`, "tcp", "dport", String(port), "drop"]);
  sh("ip", ["netns", "exec", ns, "nft", "add", "rule", "inet", "t", "in", "ip", "saddr", `10.${O2}.1.1`, "tcp", "sport", String(port), "drop"]);
  const p4 = await publish(a, topic, 4);
  await waitFor(() => last === p4, 5000, "the client on A to receive the fourth message");

  // The client moves to B with since = the fourth message's position.
  const onB = makeSocket(client, b).socket;
  const chB = onB.channel(topic, { since: p4 });
  onB.connect();
  const reply = await new Promise((resolve) => chB.join(10_000).receive("ok", resolve).receive("error", resolve).receive("timeout", () => resolve("timeout")));
  console.log(`join on B with since ${p4} answered ${JSON.stringify(reply)}`);
  for (const s of [keeper, onA, onB]) s.disconnect();
  if (reply?.recovered === false) {
    console.log("lagging-node: FAIL: a node behind the client answered recovered: false although Redis holds the position (SOAK.md)");
    process.exitCode = 1;
  } else {
    console.log("lagging-node: PASS");
  }
}

main()
  .catch((e) => {
    console.error(`lagging-node: FAIL: ${e.stack ?? e}`);
    process.exitCode = 1;
  })
  .finally(() => setTimeout(() => process.exit(process.exitCode ?? 0), 100).unref());
