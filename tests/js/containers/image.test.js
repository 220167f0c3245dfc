// The container image (top-level Dockerfile), run as a container platform runs it: PORT set, the
// port published on 127.0.0.1, SIGTERM to stop. The official phoenix client (1.8.17 and 1.7.23)
// over WebSocket and LongPoll; the image's defaults (non-root, JSON logs on stdout, HEALTHCHECK);
// the drain on SIGTERM inside Fly.io's default 5 s kill timeout, the shortest of the platforms'.
//
// Run by scripts/test-container.sh, which builds the image and sets PUSHGATE_IMAGE.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import WebSocket from "ws";
import { CLIENTS, makeLongPollSocket, makeSocket, publish, showFrames, uniqueTopic, waitFor } from "../support.js";
import { CONTAINER_PORT, DEADLINE_MS, podman, requireImage, resources, startContainer } from "./podman.js";

/** Fly.io's default kill_timeout (fly.toml), App Runner's and App Platform's are longer. */
const SHORTEST_GRACE_S = 5;

/** Joins `topic` on `socket`; resolves with the join reply; `seen` collects "new_msg" payloads. */
function join(socket, topic, seen) {
  const channel = socket.channel(topic, {});
  channel.on("new_msg", (payload) => seen.push(payload));
  return new Promise((resolve, reject) => {
    channel.join().receive("ok", resolve).receive("error", reject).receive("timeout", () => reject(new Error("join timeout")));
  });
}

describe("the container image", { timeout: 120_000 }, () => {
  it("serves the official client on PORT over WebSocket and LongPoll", async (t) => {
    requireImage();
    const res = resources(t);
    const c = await startContainer(res);
    for (const client of CLIENTS) {
      for (const transport of ["websocket", "longpoll"]) {
        const label = `phoenix ${client.version} over ${transport} to ${c.name}`;
        const made = transport === "websocket" ? makeSocket(client, c) : makeLongPollSocket(client, c);
        res.sockets.push(made.socket);
        made.socket.connect();
        const topic = uniqueTopic();
        const seen = [];
        await join(made.socket, topic, seen);
        await publish(c, topic, "new_msg", { body: label });
        await waitFor(() => seen.length === 1, DEADLINE_MS, () => `${label}: the message\n${showFrames(made.frames)}`);
        assert.deepEqual(seen, [{ body: label }]);
        made.socket.disconnect();
      }
    }
  });

  it("runs as a non-root user, logs JSON to stdout, and passes its HEALTHCHECK", async (t) => {
    requireImage();
    const res = resources(t);
    const c = await startContainer(res);
    assert.equal(await c.inspect("{{.Config.User}}"), "65532:65532");
    const top = await podman("top", c.name, "user", "huser");
    assert.equal(top.code, 0, top.stderr);
    const [, row] = top.stdout.trim().split("\n");
    assert.ok(row && !/\broot\b/.test(row) && !/^\s*0\s/.test(row), `the process runs as: ${top.stdout}`);

    const hc = await c.inspect("{{json .Config.Healthcheck}}");
    assert.match(hc, /pushgate","health"/, `HEALTHCHECK: ${hc}`);
    const check = await podman("healthcheck", "run", c.name);
    assert.equal(check.code, 0, `podman healthcheck run: ${check.stdout}${check.stderr}`);

    const { stdout, stderr } = await c.output();
    assert.equal(stderr, "", "nothing on stderr");
    const lines = stdout.trim().split("\n").map((l) => JSON.parse(l));
    const listening = lines.find((l) => l.fields?.message === "listening");
    assert.ok(listening, stdout);
    assert.equal(listening.fields.addr, `0.0.0.0:${CONTAINER_PORT}`);
  });

  // SIGTERM as App Runner and App Platform send it (podman stop: SIGKILL after the grace), and
  // SIGINT, Fly.io's default kill_signal (sent alone; the test then waits for the exit).
  for (const signal of ["SIGTERM", "SIGINT"]) {
    it(`drains on ${signal} (WebSockets closed with 1012) and exits 0 within ${SHORTEST_GRACE_S} s`, async (t) => {
      requireImage();
      const res = resources(t);
      const c = await startContainer(res);
      const closes = [];
      const sockets = [];
      for (let i = 0; i < 20; i++) {
        const ws = new WebSocket(`ws://127.0.0.1:${c.port}/socket/websocket?vsn=2.0.0`);
        ws.on("close", (code) => closes.push(code));
        ws.on("error", () => {});
        sockets.push(ws);
      }
      await waitFor(() => sockets.every((ws) => ws.readyState === WebSocket.OPEN), DEADLINE_MS, "20 WebSockets open");
      const elapsed = signal === "SIGTERM" ? await c.stop(SHORTEST_GRACE_S) : await c.signalAndWait(signal);
      const state = await c.state();
      await waitFor(() => closes.length === sockets.length, DEADLINE_MS, () => `closes: ${closes}`);
      t.diagnostic(`${signal} to exit: ${Math.round(elapsed)} ms (exit code ${state.ExitCode})`);
      assert.equal(state.ExitCode, 0, `killed, not drained: ${JSON.stringify(state)}\n${await c.logs()}`);
      assert.ok(elapsed < SHORTEST_GRACE_S * 1000, `${elapsed} ms`);
      assert.deepEqual([...new Set(closes)], [1012], `close codes: ${closes}`);
    });
  }
});
