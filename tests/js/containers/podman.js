// Helpers for the container tests (tests/js/containers/*.test.js): the image built from the
// top-level Dockerfile, run with podman as a platform would run it (PORT set, its port published
// on 127.0.0.1 only), a redis-server and a round-robin nginx on the host for several containers.
//
// scripts/test-container.sh builds the image and runs these tests; it sets PUSHGATE_IMAGE (the
// image to run) and CONTAINERS_CONF (runc, ulimits). Without PUSHGATE_IMAGE the tests fail.

import { execFile } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { PUBLISH_TOKEN, spawnChild, terminate as terminateWithin, waitFor } from "../support.js";

export const IMAGE = process.env.PUSHGATE_IMAGE;
const PODMAN = process.env.PODMAN_BIN ?? "podman";
const REDIS_SERVER = process.env.REDIS_SERVER_BIN ?? "redis-server";
const REDIS_CLI = process.env.REDIS_CLI_BIN ?? "redis-cli";
const NGINX = process.env.NGINX_BIN ?? "/usr/sbin/nginx";
export const DEADLINE_MS = 20_000;
const terminate = (child) => terminateWithin(child, DEADLINE_MS);
/** The port the image's PORT default names; platforms set their own, the tests set it too. */
export const CONTAINER_PORT = 8080;
/** Where a container on slirp4netns with allow_host_loopback reaches the host's 127.0.0.1. */
export const HOST_LOOPBACK_FROM_CONTAINER = "10.0.2.2";

export function requireImage() {
  if (!IMAGE) {
    throw new Error("PUSHGATE_IMAGE is not set: run scripts/test-container.sh (it builds the image)");
  }
}

/** Runs a command; resolves with {code, stdout, stderr} (never rejects on a non-zero exit). */
export function run(file, args, timeoutMs = 30_000) {
  return new Promise((resolve) => {
    execFile(file, args, { timeout: timeoutMs }, (error, stdout, stderr) => {
      resolve({ code: error ? (error.code ?? -1) : 0, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

export const podman = (...args) => run(PODMAN, args);

/** A free TCP port on 127.0.0.1 (checked, then released), below the ephemeral range. */
export async function freePort() {
  for (let attempt = 1; attempt <= 200; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    const free = await new Promise((resolve) => {
      const s = net.createServer();
      s.once("error", () => resolve(false));
      s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error("no free port on 127.0.0.1");
}

/** GET url; resolves with the status, or 0 when nothing answers. */
export async function status(url) {
  try {
    const response = await fetch(url, { signal: AbortSignal.timeout(2000) });
    await response.arrayBuffer();
    return response.status;
  } catch {
    return 0;
  }
}

let serial = 0;

/**
 * Runs the image as a platform would: `PORT` set, the port published on 127.0.0.1 (a free host
 * port, retried on collision), the publish token given. `env` adds variables; `hostLoopback`
 * puts the container on slirp4netns with the host's loopback reachable (for a host Redis).
 * Resolves once /readyz answers 200 with `{name, url, port, logs(), stop(seconds), remove()}`.
 */
export async function startContainer(res, { env = {}, hostLoopback = false } = {}) {
  requireImage();
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const name = `pushgate-test-${process.pid}-${++serial}-${Date.now() % 100000}`;
    const args = ["run", "-d", "--name", name, "-p", `127.0.0.1:${port}:${CONTAINER_PORT}`,
      "-e", `PORT=${CONTAINER_PORT}`, "-e", `PUSHGATE_PUBLISH_TOKEN=${PUBLISH_TOKEN}`];
    if (hostLoopback) args.push("--network", "slirp4netns:allow_host_loopback=true");
    for (const [k, v] of Object.entries(env)) args.push("-e", `${k}=${v}`);
    args.push(IMAGE);
    const started = await podman(...args);
    const c = container(name, port);
    res.containers.push(c);
    if (started.code !== 0) {
      await c.remove();
      if (/address already in use/i.test(started.stderr) && attempt < 3) continue;
      throw new Error(`podman ${args.join(" ")}: ${started.stderr}`);
    }
    await waitFor(
      async () => {
        const state = await c.state();
        if (state && state.Running === false) throw new Error(`${name} exited: ${JSON.stringify(state)}\n${await c.logs()}`);
        return (await status(`${c.url}/readyz`)) === 200;
      },
      DEADLINE_MS,
      async () => `${name} to be ready on ${c.url}\n${await c.logs()}`,
    );
    return c;
  }
}

function container(name, port) {
  return {
    name,
    port,
    url: `http://127.0.0.1:${port}`,
    label: name,
    /** stdout and stderr of the container, apart. */
    async output() {
      const r = await podman("logs", name);
      return { stdout: r.stdout, stderr: r.stderr };
    },
    async logs() {
      const { stdout, stderr } = await this.output();
      return `--- ${name} stdout\n${stdout.slice(-3000)}--- ${name} stderr\n${stderr.slice(-3000)}`;
    },
    async state() {
      const r = await podman("inspect", "--format", "{{json .State}}", name);
      return r.code === 0 ? JSON.parse(r.stdout) : null;
    },
    async inspect(format) {
      return (await podman("inspect", "--format", format, name)).stdout.trim();
    },
    /** `podman stop -t seconds`: SIGTERM, SIGKILL after `seconds`; resolves with the elapsed ms. */
    async stop(seconds) {
      const start = performance.now();
      const r = await podman("stop", "-t", String(seconds), name);
      if (r.code !== 0) throw new Error(`podman stop ${name}: ${r.stderr}`);
      return performance.now() - start;
    },
    /** Sends `signal` alone and waits for the exit (`podman wait`); resolves with the elapsed ms. */
    async signalAndWait(signal) {
      const start = performance.now();
      const k = await podman("kill", "--signal", signal, name);
      if (k.code !== 0) throw new Error(`podman kill --signal ${signal} ${name}: ${k.stderr}`);
      const w = await run(PODMAN, ["wait", name], DEADLINE_MS);
      if (w.code !== 0) throw new Error(`podman wait ${name}: ${w.stderr}`);
      return performance.now() - start;
    },
    async remove() {
      await podman("rm", "-f", "-t", "0", name);
    },
  };
}

/** Collects containers, redis, nginx and temp dirs of one test; all torn down in t.after. */
export function resources(t) {
  const res = { containers: [], children: [], dirs: [], sockets: [] };
  t.after(async () => {
    for (const socket of res.sockets) {
      try {
        socket.disconnect();
      } catch {
        // already gone
      }
    }
    for (const child of res.children) await terminate(child);
    await Promise.all(res.containers.map((c) => c.remove()));
    for (const d of res.dirs) rmSync(d, { recursive: true, force: true });
  });
  return res;
}




/**
 * A redis-server on the host (127.0.0.1, a free port, no persistence); containers reach it at
 * HOST_LOOPBACK_FROM_CONTAINER. Resolves with `{port, urlFromContainers}`.
 */
export async function startRedis(res) {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    const child = spawnChild(REDIS_SERVER, ["--port", String(port), "--bind", "127.0.0.1",
      "--save", "", "--appendonly", "no", "--protected-mode", "no"]);
    res.children.push(child);
    try {
      await waitFor(
        async () => {
          if (child.exit) throw new Error(`redis-server exited ${JSON.stringify(child.exit)}: ${child.output.join("")}`);
          return (await run(REDIS_CLI, ["-p", String(port), "ping"], 3000)).stdout.trim() === "PONG";
        },
        DEADLINE_MS,
        () => `redis-server on ${port}: ${child.output.join("")}`,
      );
      return { port, urlFromContainers: `redis://${HOST_LOOPBACK_FROM_CONTAINER}:${port}/` };
    } catch (e) {
      await terminate(child);
      if (attempt >= 3) throw e;
    }
  }
}

function nginxConf(prefix, port, upstreams) {
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
    log_format pg '$request_method $request_uri $status upstream=$upstream_addr rt=$request_time';
    access_log ${prefix}/logs/access.log pg;
    client_body_temp_path ${prefix}/tmp/body;
    proxy_temp_path ${prefix}/tmp/proxy;
    fastcgi_temp_path ${prefix}/tmp/fastcgi;
    uwsgi_temp_path ${prefix}/tmp/uwsgi;
    scgi_temp_path ${prefix}/tmp/scgi;
    # Round robin, no ip_hash: as App Runner and App Platform balance, request by request.
    upstream pg {
${upstreams.map((u) => `        server ${u};`).join("\n")}
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

/**
 * nginx in the foreground, round-robin over `upstreams` (host:port). `nginx.route(upstreams)`
 * rewrites the upstream list and reloads (SIGHUP), as a platform's router moves to new instances;
 * it resolves once the old workers are gone, so no request goes to a removed upstream after it.
 */
export async function startNginx(res, upstreams) {
  const prefix = mkdtempSync(path.join(os.tmpdir(), "pushgate-container-nginx-"));
  res.dirs.push(prefix);
  chmodSync(prefix, 0o755);
  for (const d of ["conf", "logs", "tmp"]) mkdirSync(path.join(prefix, d), { mode: 0o755 });
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    writeFileSync(path.join(prefix, "conf/nginx.conf"), nginxConf(prefix, port, upstreams));
    const child = spawnChild(NGINX, ["-p", prefix, "-e", `${prefix}/logs/error.log`, "-c", "conf/nginx.conf", "-g", "daemon off;"]);
    const listening = () =>
      new Promise((resolve) => {
        const s = net.connect(port, "127.0.0.1", () => {
          s.destroy();
          resolve(true);
        });
        s.once("error", () => resolve(false));
      });
    try {
      await waitFor(async () => {
        if (child.exit) throw new Error(`nginx exited ${JSON.stringify(child.exit)}: ${child.output.join("")}`);
        return listening();
      }, DEADLINE_MS, `nginx on ${port}`);
    } catch (e) {
      await terminate(child);
      if (attempt >= 3) throw e;
      continue;
    }
    res.children.push(child);
    return {
      url: `http://127.0.0.1:${port}`,
      label: `nginx (127.0.0.1:${port})`,
      async route(next) {
        writeFileSync(path.join(prefix, "conf/nginx.conf"), nginxConf(prefix, port, next));
        const workers = async () =>
          (await run("pgrep", ["-P", String(child.proc.pid)])).stdout.split("\n").filter(Boolean);
        const before = new Set(await workers());
        child.proc.kill("SIGHUP");
        // The reload is done when none of the old workers is left (they finish their requests).
        await waitFor(async () => {
          const now = await workers();
          return now.length > 0 && now.every((w) => !before.has(w));
        }, DEADLINE_MS, () => `nginx reload: ${readFileSync(path.join(prefix, "logs/error.log"), "utf8").slice(-2000)}`);
      },
      accessLog() {
        try {
          return readFileSync(path.join(prefix, "logs/access.log"), "utf8").split("\n").filter(Boolean);
        } catch {
          return [];
        }
      },
    };
  }
}
