// The shipped nginx site (nginx/pushgate.conf, rendered by nginx/render.sh for this test's
// paths and ports) in a real nginx, in front of a real pushgate and a stand-in app server.
//
// nginx runs in the foreground with a private prefix (-p) on free loopback ports; the main
// nginx.conf written here mirrors Debian's (mime types, the brotli modules by absolute path,
// temp paths inside the prefix) and includes the rendered site. TLS uses a certificate made by
// openssl for localhost; the clients trust it explicitly (no verification is turned off).
//
// Both phoenix clients make their LongPoll requests with XMLHttpRequest here (xhr2, given an
// https agent that trusts the test certificate), as they do in browsers: Node's fetch cannot
// be given a CA.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";
import WebSocket from "ws";
import XHR2 from "xhr2";
import {
  CLIENTS,
  PUBLISH_TOKEN,
  PortTaken,
  disconnect,
  freePort,
  metric,
  publish,
  replyTo,
  showFrames,
  retryTakenPorts,
  saysPortTaken,
  spawnChild,
  startServer,
  terminate,
  uniqueTopic,
  waitFor,
  waitListening,
} from "./support.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "../..");
const NGINX = process.env.NGINX_BIN ?? "/usr/sbin/nginx";
const MODULES = process.env.NGINX_MODULES_DIR ?? "/usr/lib/nginx/modules";
const LONGPOLL_WINDOW_MS = 15_000; // the largest longpoll.window_ms pushgate accepts
const TEST_TIMEOUT_MS = 30_000;
const DEADLINE_MS = 10_000;
const PER_ADDRESS = 20; // pushgate's limits.max_connections_per_address in this file

// ---------------------------------------------------------------------------
// Scaffolding: certificate, static files, app stand-in, nginx
// ---------------------------------------------------------------------------

/** An HTTP(S) request; resolves with {status, headers, body: Buffer}. Never decompresses. */
function request(url, { method = "GET", headers = {}, body, ca } = {}) {
  const u = new URL(url);
  const lib = u.protocol === "https:" ? https : http;
  return new Promise((resolve, reject) => {
    const req = lib.request(u, { method, headers, ca, agent: false }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on("error", reject);
    });
    req.setTimeout(30_000, () => req.destroy(new Error(`${method} ${url}: no answer in 30 s`)));
    req.on("error", reject);
    req.end(body);
  });
}

/** A stand-in for the user's app: answers every request with "app: METHOD PATH". */
async function startApp() {
  const seen = [];
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      seen.push({ method: req.method, url: req.url, headers: req.headers, body });
      res.writeHead(200, { "content-type": "text/plain", "x-app": "yes" });
      res.end(`app: ${req.method} ${req.url}`);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, seen, addr: `127.0.0.1:${server.address().port}` };
}

function makeCertificate(dir) {
  execFileSync(
    "openssl",
    [
      "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
      "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
      "-keyout", path.join(dir, "privkey.pem"), "-out", path.join(dir, "fullchain.pem"),
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  return readFileSync(path.join(dir, "fullchain.pem"));
}

const CSS = `/* not precompressed */\n${Array.from({ length: 200 }, (_, i) => `.rule-${i} { color: #${(i * 4099).toString(16).padStart(6, "0").slice(0, 6)}; margin: ${i}px; }`).join("\n")}\n`;
const JS = `// fingerprinted\n${"console.log('pushgate static asset');\n".repeat(100)}`;
const JS_NAME = "app-5f3b2c9e.js";
// Precompressed siblings with contents of their own, so an answer shows which file was sent.
const JS_BR_SOURCE = `// from ${JS_NAME}.br\n${"x".repeat(500)}\n`;
const JS_GZ_SOURCE = `// from ${JS_NAME}.gz\n${"y".repeat(500)}\n`;

function writeStatic(root) {
  mkdirSync(root, { recursive: true });
  writeFileSync(path.join(root, "app.css"), CSS);
  writeFileSync(path.join(root, JS_NAME), JS);
  writeFileSync(path.join(root, `${JS_NAME}.br`), zlib.brotliCompressSync(JS_BR_SOURCE));
  writeFileSync(path.join(root, `${JS_NAME}.gz`), zlib.gzipSync(JS_GZ_SOURCE));
}

/** nginx's main configuration for the test, shaped like Debian's /etc/nginx/nginx.conf. */
function mainConf(prefix) {
  return `
load_module ${MODULES}/ngx_http_brotli_filter_module.so;
load_module ${MODULES}/ngx_http_brotli_static_module.so;
worker_processes 1;
pid ${prefix}/nginx.pid;
error_log ${prefix}/logs/error.log info;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    access_log ${prefix}/logs/access.log;
    client_body_temp_path ${prefix}/tmp/body;
    proxy_temp_path ${prefix}/tmp/proxy;
    fastcgi_temp_path ${prefix}/tmp/fastcgi;
    uwsgi_temp_path ${prefix}/tmp/uwsgi;
    scgi_temp_path ${prefix}/tmp/scgi;
    include ${prefix}/conf/pushgate.conf;
}
`;
}

function renderSite(vars) {
  const args = Object.entries(vars).map(([k, v]) => `${k}=${v}`);
  return execFileSync(path.join(REPO, "nginx/render.sh"), args, {
    input: readFileSync(path.join(REPO, "nginx/pushgate.conf")),
  }).toString();
}

/**
 * Starts nginx in the foreground; resolves once it listens on `ports` itself and has started its
 * worker (its master binds every listen line, IPv4 and IPv6, before that). Throws [PortTaken]
 * when it exits for a taken port.
 */
async function startNginx(prefix, ports) {
  rmSync(`${prefix}/logs/error.log`, { force: true });
  const args = ["-p", prefix, "-e", `${prefix}/logs/error.log`, "-c", `${prefix}/conf/nginx.conf`, "-g", "daemon off;"];
  const child = spawnChild(NGINX, args);
  const log = () => errorLog(prefix);
  try {
    await waitListening(child, ports, "nginx", log);
    await waitFor(
      () => {
        if (child.exit && saysPortTaken(`${child.output.join("")}${log()}`)) throw new PortTaken(`nginx exited: ${log()}`);
        if (child.exit) throw new Error(`nginx exited ${JSON.stringify(child.exit)}: ${child.output.join("")}\n${log()}`);
        return log().includes("start worker process");
      },
      DEADLINE_MS,
      () => `nginx to start its worker: ${log()}`,
    );
  } catch (e) {
    await terminate(child);
    throw e;
  }
  return {
    proc: child.proc,
    stop: () => terminate(child, DEADLINE_MS),
  };
}

function errorLog(prefix) {
  try {
    return readFileSync(`${prefix}/logs/error.log`, "utf8").split("\n").slice(-30).join("\n");
  } catch {
    return "(no error log)";
  }
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

describe("nginx site (nginx/pushgate.conf) in front of pushgate", () => {
  let prefix;
  let ca;
  let pushgate;
  let app;
  let nginx;
  let base; // https://localhost:PORT
  let plain; // http://localhost:PORT

  before(async () => {
    prefix = mkdtempSync(path.join(os.tmpdir(), "pushgate-nginx-"));
    // nginx workers run as nobody when the test runs as root: the static root must be
    // readable by everyone.
    chmodSync(prefix, 0o755);
    for (const d of ["conf", "logs", "tmp", "tls", "static"]) mkdirSync(path.join(prefix, d), { mode: 0o755 });
    ca = makeCertificate(path.join(prefix, "tls"));
    writeStatic(path.join(prefix, "static"));

    pushgate = await startServer({
      env: {
        PUSHGATE_LONGPOLL_WINDOW_MS: String(LONGPOLL_WINDOW_MS),
        // Low enough for the per-address test to reach it; every other test's clients come
        // from 127.0.0.1 and hold a few connections at a time.
        PUSHGATE_LIMITS_MAX_CONNECTIONS_PER_ADDRESS: String(PER_ADDRESS),
      },
    });
    app = await startApp();

    // A port can be taken by another process between the pick and nginx's bind: fresh ones then.
    await retryTakenPorts("nginx", async () => {
      const httpPort = await freePort({ v6: true });
      const httpsPort = await freePort({ v6: true });
      const site = renderSite({
        server_name: "localhost",
        listen_http: `127.0.0.1:${httpPort}`,
        listen_http_v6: `[::1]:${httpPort}`,
        listen_https: `127.0.0.1:${httpsPort}`,
        listen_https_v6: `[::1]:${httpsPort}`,
        https_port_suffix: `:${httpsPort}`,
        tls_dir: path.join(prefix, "tls"),
        static_root: path.join(prefix, "static"),
        pushgate_upstream: pushgate.addr,
        app_upstream: app.addr,
      });
      writeFileSync(path.join(prefix, "conf/pushgate.conf"), site);
      writeFileSync(path.join(prefix, "conf/nginx.conf"), mainConf(prefix));
      nginx = await startNginx(prefix, [httpPort, httpsPort]);
      base = `https://localhost:${httpsPort}`;
      plain = `http://localhost:${httpPort}`;
    });
    // Both phoenix clients make LongPoll requests with XMLHttpRequest (see the file comment).
    XHR2.nodejsSet({ httpsAgent: new https.Agent({ ca }) });
    globalThis.XMLHttpRequest = XHR2;
  });

  after(async () => {
    delete globalThis.XMLHttpRequest;
    await nginx?.stop();
    await pushgate?.stop();
    app?.server.close();
    if (prefix) rmSync(prefix, { recursive: true, force: true });
  });

  it("`nginx -t` accepts the rendered site", () => {
    const out = execFileSync(NGINX, ["-t", "-p", prefix, "-e", `${prefix}/logs/error.log`, "-c", `${prefix}/conf/nginx.conf`], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    assert.ok(out !== undefined);
    const rendered = readFileSync(path.join(prefix, "conf/pushgate.conf"), "utf8");
    assert.doesNotMatch(rendered, /\{\{|\}\}/, "the template left a variable unfilled");
  });

  it("redirects plain HTTP to HTTPS, except ACME challenges, which reach pushgate", async () => {
    const r = await request(`${plain}/some/page?x=1`);
    assert.equal(r.status, 301);
    assert.equal(r.headers.location, `${base}/some/page?x=1`);

    for (const url of [`${plain}/.well-known/acme-challenge/tok123`, `${base}/.well-known/acme-challenge/tok123`]) {
      const c = await request(url, { ca });
      // pushgate answers (an unknown challenge token: its JSON 404), not the app and not a
      // redirect.
      assert.equal(c.status, 404, `${url}: ${c.status} ${c.body}`);
      assert.equal(c.headers["x-app"], undefined, `${url} went to the app`);
      assert.equal(typeof JSON.parse(c.body).error, "string", c.body);
    }
  });

  for (const client of CLIENTS) {
    it(`phoenix ${client.version} over WebSocket through nginx (wss)`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const frames = [];
      class TlsWebSocket extends WebSocket {
        constructor(url, protocols) {
          super(url, protocols, { ca });
          this.addEventListener("message", (e) => frames.push(["in", String(e.data)]));
        }
      }
      const socket = new client.Socket(`${base.replace(/^https/, "wss")}/socket`, { transport: TlsWebSocket });
      socket.connect();
      try {
        const topic = uniqueTopic("nginx");
        const channel = socket.channel(topic, {});
        const received = [];
        channel.on("new_msg", (payload, ref) => received.push({ payload, ref }));
        const { status, response } = await replyTo(channel.join(5000));
        assert.equal(status, "ok", `${JSON.stringify(response)}\n${showFrames(frames)}`);
        assert.equal(socket.transport, TlsWebSocket);

        const positions = [];
        for (let n = 1; n <= 3; n++) positions.push((await publish(pushgate, topic, "new_msg", { n })).position);
        await waitFor(() => received.length === 3, DEADLINE_MS, () => `3 broadcasts\n${showFrames(frames)}`);
        assert.deepEqual(received.map((m) => m.payload.n), [1, 2, 3]);
        assert.deepEqual(received.map((m) => m.ref), positions);
      } finally {
        await disconnect(socket);
      }
    });

    it(`phoenix ${client.version} over LongPoll through nginx (https)`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const socket = new client.Socket(`${base}/socket`, { transport: client.LongPoll });
      socket.connect();
      try {
        const topic = uniqueTopic("nginx-lp");
        const channel = socket.channel(topic, {});
        const received = [];
        channel.on("new_msg", (payload, ref) => received.push({ payload, ref }));
        const { status, response } = await replyTo(channel.join(5000));
        assert.equal(status, "ok", JSON.stringify(response));
        assert.ok(socket.conn instanceof client.LongPoll, "not on LongPoll");

        const positions = [];
        for (let n = 1; n <= 3; n++) positions.push((await publish(pushgate, topic, "new_msg", { n })).position);
        await waitFor(() => received.length === 3, DEADLINE_MS, () => `3 broadcasts, got ${JSON.stringify(received)}`);
        assert.deepEqual(received.map((m) => m.payload.n), [1, 2, 3]);
        assert.deepEqual(received.map((m) => m.ref), positions);
        // Answers came through nginx: it logged the polls.
        const log = readFileSync(`${prefix}/logs/access.log`, "utf8");
        assert.match(log, /GET \/socket\/longpoll\?/);
      } finally {
        await disconnect(socket);
      }
    });
  }

  it("holds a LongPoll GET for pushgate's full window without nginx cutting it", { timeout: LONGPOLL_WINDOW_MS + 20_000 }, async () => {
    const first = await request(`${base}/socket/longpoll?vsn=2.0.0`, { ca });
    assert.equal(first.status, 200, String(first.body));
    const { status, token } = JSON.parse(first.body);
    assert.equal(status, 410);
    assert.equal(typeof token, "string");

    const started = Date.now();
    const poll = await request(`${base}/socket/longpoll?vsn=2.0.0&token=${encodeURIComponent(token)}`, { ca });
    const held = Date.now() - started;
    assert.equal(poll.status, 200, `HTTP ${poll.status} after ${held} ms: ${poll.body}`);
    assert.equal(JSON.parse(poll.body).status, 204, String(poll.body));
    assert.ok(held >= LONGPOLL_WINDOW_MS - 500, `answered after ${held} ms, expected the full ${LONGPOLL_WINDOW_MS} ms window`);
  });

  it("compresses a static file with brotli or gzip according to Accept-Encoding", async () => {
    const url = `${base}/app.css`;
    const br = await request(url, { ca, headers: { "accept-encoding": "gzip, deflate, br" } });
    assert.equal(br.status, 200);
    assert.equal(br.headers["content-encoding"], "br");
    assert.match(br.headers.vary ?? "", /accept-encoding/i);
    assert.equal(zlib.brotliDecompressSync(br.body).toString(), CSS);

    const gz = await request(url, { ca, headers: { "accept-encoding": "gzip" } });
    assert.equal(gz.headers["content-encoding"], "gzip");
    assert.equal(zlib.gunzipSync(gz.body).toString(), CSS);

    const none = await request(url, { ca });
    assert.equal(none.headers["content-encoding"], undefined);
    assert.equal(none.body.toString(), CSS);
    // Not fingerprinted: no long-lived cache header.
    assert.doesNotMatch(none.headers["cache-control"] ?? "", /immutable/);
    assert.equal(app.seen.filter((r) => r.url === "/app.css").length, 0, "a static file went to the app");
  });

  it("serves precompressed .br/.gz siblings of a fingerprinted asset, cached for a year", async () => {
    const url = `${base}/${JS_NAME}`;
    const br = await request(url, { ca, headers: { "accept-encoding": "br, gzip" } });
    assert.equal(br.headers["content-encoding"], "br");
    assert.equal(zlib.brotliDecompressSync(br.body).toString(), JS_BR_SOURCE, "not the .br file");
    assert.equal(br.headers["cache-control"], "public, max-age=31536000, immutable");

    const gz = await request(url, { ca, headers: { "accept-encoding": "gzip" } });
    assert.equal(gz.headers["content-encoding"], "gzip");
    assert.equal(zlib.gunzipSync(gz.body).toString(), JS_GZ_SOURCE, "not the .gz file");

    const none = await request(url, { ca });
    assert.equal(none.body.toString(), JS);
    assert.equal(none.headers["cache-control"], "public, max-age=31536000, immutable");
    assert.match(none.headers["strict-transport-security"] ?? "", /max-age=/);
  });

  it("keeps pushgate's /api/publish, /metrics, /healthz and /readyz off the public side", async () => {
    const topic = uniqueTopic("private");
    const before = await metric(pushgate, "pushgate_messages_published_total");
    const post = await request(`${base}/api/publish`, {
      ca,
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${PUBLISH_TOKEN}` },
      body: JSON.stringify({ topic, event: "new_msg", payload: {} }),
    });
    assert.equal(post.headers["x-app"], "yes", `reached something else: ${post.status} ${post.body}`);
    assert.equal(post.body.toString(), "app: POST /api/publish");
    assert.equal(await metric(pushgate, "pushgate_messages_published_total"), before, "pushgate published it");

    for (const p of ["/metrics", "/healthz", "/readyz"]) {
      const r = await request(`${base}${p}`, { ca });
      assert.equal(r.body.toString(), `app: GET ${p}`, `${p} answered by something else`);
    }
    // Direct access (loopback, for the backend) still works.
    assert.equal((await request(`${pushgate.url}/healthz`)).status, 200);
  });

  it("limits per client address: pushgate counts the address nginx forwards, nginx stops handshake floods", { timeout: TEST_TIMEOUT_MS }, async () => {
    const port = new URL(base).port;
    // A WebSocket handshake through nginx from `source`: "open" (the socket, still open) or
    // who refused it ("pushgate" or "nginx", by the 429's body).
    const handshake = (source) =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(`wss://127.0.0.1:${port}/socket/websocket?vsn=2.0.0`, {
          ca,
          servername: "localhost",
          localAddress: source,
        });
        ws.once("open", () => resolve({ outcome: "open", ws }));
        ws.once("unexpected-response", (_req, res) => {
          let body = "";
          res.on("data", (d) => (body += d));
          res.on("end", () => {
            assert.equal(res.statusCode, 429, body);
            resolve({ outcome: /too many connections/.test(body) ? "pushgate" : /nginx/.test(body) ? "nginx" : body });
          });
        });
        ws.once("error", reject);
      });
    const open = [];
    try {
      const refusedBefore = await metric(pushgate, 'pushgate_refusals_total{cause="per_address"}');
      // pushgate's own limit, per forwarded address.
      for (let i = 0; i < PER_ADDRESS; i++) {
        const r = await handshake("127.0.0.21");
        assert.equal(r.outcome, "open", `handshake ${i}`);
        open.push(r.ws);
      }
      assert.equal((await handshake("127.0.0.21")).outcome, "pushgate");
      assert.equal(await metric(pushgate, 'pushgate_refusals_total{cause="per_address"}'), refusedBefore + 1);
      // Another address is its own client (were the forwarded address ignored, every client
      // would be 127.0.0.1, nginx, and this one refused too); it joins and receives.
      const other = await handshake("127.0.0.23");
      assert.equal(other.outcome, "open");
      open.push(other.ws);
      const topic = uniqueTopic("peraddr");
      const got = new Promise((resolve) =>
        other.ws.on("message", (m) => {
          const f = JSON.parse(m.toString());
          if (f[3] === "phx_reply") resolve("joined");
        }),
      );
      other.ws.send(JSON.stringify(["1", "1", topic, "phx_join", {}]));
      assert.equal(await got, "joined");
      const delivered = new Promise((resolve) =>
        other.ws.on("message", (m) => {
          const f = JSON.parse(m.toString());
          if (f[3] === "hello") resolve(f[4]);
        }),
      );
      await publish(pushgate, topic, "hello", { n: 1 });
      assert.deepEqual(await delivered, { n: 1 });

      // nginx's handshake rate (burst 150): a flood of 220 at once from one address is cut
      // by nginx before pushgate sees all of it.
      const flood = await Promise.all(Array.from({ length: 220 }, () => handshake("127.0.0.22")));
      for (const r of flood) if (r.ws) open.push(r.ws);
      const by = (o) => flood.filter((r) => r.outcome === o).length;
      assert.ok(by("nginx") > 0, `nginx refused none: ${JSON.stringify({ open: by("open"), pushgate: by("pushgate") })}`);
      assert.ok(by("open") <= PER_ADDRESS, `pushgate let ${by("open")} in`);
    } finally {
      for (const ws of open) ws.terminate();
    }
  });

  it("proxies everything else to the app with the forwarding headers", async () => {
    const r = await request(`${base}/users/42?tab=posts`, { ca });
    assert.equal(r.status, 200);
    assert.equal(r.body.toString(), "app: GET /users/42?tab=posts");
    const seen = app.seen.find((s) => s.url === "/users/42?tab=posts");
    assert.equal(seen.headers["x-forwarded-proto"], "https");
    assert.equal(seen.headers.host, new URL(base).hostname);
    assert.match(seen.headers["x-forwarded-for"], /127\.0\.0\.1|::1/);
  });
});
