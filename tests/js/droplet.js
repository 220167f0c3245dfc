// The official phoenix client against a provisioned droplet (scripts/test-droplet.sh), from
// outside it, through its nginx. Not a *.test.js file: the shell script runs it with the
// droplet's address, and it exits non-zero with the reason when a check fails.
//
//   node droplet.js clients    DROPLET_URL=https://<address>  PUBLISHER='["ip","netns",...]'
//                              [ACTION='["nsenter",...,"systemctl","restart","pushgate"]']
//                              [CLIENTS=20] [INTERVAL_MS=20]
//   node droplet.js publisher  (run on the droplet's network namespace by `clients`)
//                              PUBLISH_URL=http://127.0.0.1:4000 TOKEN=... TOPIC=...
//
// `clients`: CLIENTS clients (WebSocket and LongPoll, phoenix 1.8.17 and 1.7.23 in turn) join
// one topic through nginx, then PUBLISHER publishes {n: 1, 2, ...} every INTERVAL_MS on the
// droplet's loopback publish API. With ACTION, once every client has live messages, ACTION
// runs (a restart, an upgrade); every client must then rejoin with `recovered: true`. In the
// end every client must have received every published message exactly once, in order, and the
// publisher must have had no failure. The summary is one JSON line on stdout.
import { spawn } from "node:child_process";
import readline from "node:readline";
import { CLIENTS, makeLongPollSocket, makeSocket, waitFor } from "./support.js";

const mode = process.argv[2];

if (mode === "publisher") {
  const { PUBLISH_URL, TOKEN, TOPIC } = process.env;
  const interval = Number(process.env.INTERVAL_MS || 20);
  let stopping = false;
  let n = 0;
  process.stdin.on("data", () => {});
  process.stdin.on("end", () => (stopping = true));
  while (!stopping) {
    const started = Date.now();
    n += 1;
    try {
      const response = await fetch(`${PUBLISH_URL}/api/publish`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${TOKEN}` },
        body: JSON.stringify({ topic: TOPIC, event: "msg", payload: { n } }),
      });
      const text = await response.text();
      if (!response.ok) throw new Error(`HTTP ${response.status}: ${text}`);
      console.log(JSON.stringify({ n, position: JSON.parse(text).position }));
    } catch (error) {
      // Not published: the number is not used again, so a client must not see it.
      console.log(JSON.stringify({ n, error: String(error?.cause ?? error) }));
    }
    const wait = interval - (Date.now() - started);
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
  }
  console.log(JSON.stringify({ done: n }));
  process.exit(0);
}

if (mode !== "clients") {
  console.error("usage: node droplet.js clients|publisher");
  process.exit(2);
}

const url = process.env.DROPLET_URL;
const publisherArgv = JSON.parse(process.env.PUBLISHER);
const actionArgv = process.env.ACTION ? JSON.parse(process.env.ACTION) : null;
const count = Number(process.env.CLIENTS || 20);
const topic = `droplet:${process.pid}-${Date.now()}`;
const failures = [];
const log = (line) => console.error(`      ${line}`);

function run(argv, env = {}) {
  return new Promise((resolve) => {
    const child = spawn(argv[0], argv.slice(1), { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
    let output = "";
    child.stdout.on("data", (d) => (output += d));
    child.stderr.on("data", (d) => (output += d));
    child.on("close", (code) => resolve({ code, output }));
  });
}

// Clients: WebSocket / LongPoll x 1.8.17 / 1.7.23 in turn.
const clients = [];
for (let i = 0; i < count; i++) {
  const client = CLIENTS[i % 2];
  const transport = Math.floor(i / 2) % 2 === 0 ? "websocket" : "longpoll";
  const made =
    transport === "websocket"
      ? makeSocket(client, { url }, { reconnectAfterMs: () => 100 })
      : makeLongPollSocket(client, { url }, { reconnectAfterMs: () => 100, rejoinAfterMs: () => 100 });
  const c = { label: `${transport}/${client.version}#${i}`, socket: made.socket, received: [], joins: [], errors: [], lastPosition: null };
  c.socket.onError((error) => c.errors.push(String(error?.message ?? error?.type ?? error)));
  c.channel = c.socket.channel(topic, () => (c.lastPosition ? { since: c.lastPosition } : {}));
  c.channel.on("msg", (payload, ref) => {
    c.received.push(payload.n);
    c.lastPosition = ref;
  });
  c.channel.join().receive("ok", (response) => c.joins.push(response));
  c.socket.connect();
  clients.push(c);
}
const status = () => clients.map((c) => `${c.label}: joins ${c.joins.length}, received ${c.received.length}, errors ${c.errors.slice(-3).join(" | ")}`).join("\n");

try {
  await waitFor(() => clients.every((c) => c.joins.length >= 1), 30_000, () => `every client to join\n${status()}`);

  const published = [];
  const publishErrors = [];
  let publisherDone = null;
  const publisher = spawn(publisherArgv[0], [...publisherArgv.slice(1)], {
    stdio: ["pipe", "pipe", "inherit"],
    env: { ...process.env, TOPIC: topic },
  });
  readline.createInterface({ input: publisher.stdout }).on("line", (line) => {
    const event = JSON.parse(line);
    if (event.done !== undefined) publisherDone = event.done;
    else if (event.error) publishErrors.push(event);
    else published.push(event.n);
  });
  const publisherExit = new Promise((resolve) => publisher.on("close", resolve));

  await waitFor(() => clients.every((c) => c.received.length >= 5), 30_000, () => `5 live messages on every client\n${status()}`);
  let action = null;
  if (actionArgv) {
    const before = published.length;
    const started = Date.now();
    action = await run(actionArgv);
    action.ms = Date.now() - started;
    if (action.code !== 0) throw new Error(`${actionArgv.join(" ")} exited with ${action.code}: ${action.output}`);
    log(`${actionArgv.slice(-3).join(" ")}: ${action.ms} ms, ${published.length - before} messages published meanwhile`);
    await waitFor(() => clients.every((c) => c.joins.length >= 2), 60_000, () => `every client to rejoin\n${status()}`);
    const after = published.length;
    await waitFor(() => published.length >= after + 25, 30_000, () => `25 more publishes (${published.length - after})`);
  } else {
    await waitFor(() => published.length >= 25, 30_000, () => `25 publishes (${published.length})`);
  }
  publisher.stdin.end();
  await publisherExit;
  if (publisherDone === null) throw new Error("the publisher did not finish");
  try {
    await waitFor(() => clients.every((c) => c.received.length >= published.length), 30_000, "all messages");
  } catch {
    // Reported per client below, with what each one missed.
  }
  await new Promise((resolve) => setTimeout(resolve, 300)); // duplicates would show up here

  if (publishErrors.length) failures.push(`${publishErrors.length} publishes failed, first: ${JSON.stringify(publishErrors[0])}`);
  const expected = JSON.stringify(published);
  for (const c of clients) {
    if (JSON.stringify(c.received) !== expected) {
      const missing = published.filter((n) => !c.received.includes(n));
      failures.push(`${c.label}: received ${c.received.length} of ${published.length} (missing ${missing.length}: ${missing.slice(0, 10)}${missing.length ? "" : "; duplicates or disorder"})`);
    }
    if (actionArgv) {
      const rejoins = c.joins.slice(1);
      const notRecovered = rejoins.filter((j) => j.recovered !== true);
      if (notRecovered.length) failures.push(`${c.label}: rejoin answered ${JSON.stringify(notRecovered[0])}`);
    }
  }
  const summary = {
    clients: clients.length,
    transports: [...new Set(clients.map((c) => c.label.split("#")[0]))],
    published: published.length,
    publishErrors: publishErrors.length,
    rejoins: clients.reduce((sum, c) => sum + c.joins.length - 1, 0),
    recovered: clients.every((c) => c.joins.slice(1).every((j) => j.recovered === true)),
    // LongPoll: the old process's sessions end with {"status":500} (phoenix.js reports an error
    // and reconnects), so a restart counts one per LongPoll client.
    clientErrors: clients.reduce((sum, c) => sum + c.errors.length, 0),
    actionMs: action?.ms ?? null,
  };
  console.log(JSON.stringify(summary));
} catch (error) {
  failures.push(String(error?.message ?? error));
}
for (const c of clients) c.socket.disconnect();
if (failures.length) {
  for (const f of failures) console.error(`      ${f}`);
  process.exit(1);
}
process.exit(0);
