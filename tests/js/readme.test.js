// README.md's "Publish from your backend" snippets, run as a reader would paste them (curl in
// sh, Python's standard library, Node's fetch) against a real server, with the server's address
// in place of 127.0.0.1:4000 and its token in PUSHGATE_PUBLISH_TOKEN; a phoenix client joined to
// room:lobby must receive each one's message. (Ruby, PHP and Elixir are not installed here.)
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, it } from "node:test";
import { CLIENTS, PUBLISH_TOKEN, disconnect, makeSocket, replyTo, showFrames, startServer, waitFor } from "./support.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const README = readFileSync(path.join(HERE, "..", "..", "README.md"), "utf8");
const TEST_TIMEOUT_MS = 20_000;

/** The fenced blocks of `lang` in the README section headed `heading`. */
function snippets(heading, lang) {
  const start = README.indexOf(`\n## ${heading}\n`);
  assert.ok(start >= 0, `README has a "## ${heading}" section`);
  const end = README.indexOf("\n## ", start + 1);
  const section = README.slice(start, end < 0 ? undefined : end);
  return [...section.matchAll(new RegExp("```" + lang + "\\n([\\s\\S]*?)```", "g"))].map((m) => m[1]);
}

/** Runs `command args` with `env` added; resolves with {code, stdout, stderr}. */
function run(command, args, env) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

describe("README: publish from your backend", () => {
  let server;
  let dir;
  const client = CLIENTS[0];

  before(async () => {
    server = await startServer();
    dir = mkdtempSync(path.join(os.tmpdir(), "pushgate-readme-"));
  });

  after(async () => {
    await server?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const cases = [
    ["sh", "curl", (file) => ["bash", [file]], "sh"],
    ["python", "Python", (file) => ["python3", [file]], "py"],
    ["js", "Node", (file) => [process.execPath, [file]], "mjs"],
  ];
  for (const [lang, name, command, extension] of cases) {
    it(`the ${name} snippet publishes`, { timeout: TEST_TIMEOUT_MS }, async () => {
      const blocks = snippets("Publish from your backend", lang);
      assert.equal(blocks.length, 1, `one ${lang} block in the section`);
      const code = blocks[0].replaceAll("http://127.0.0.1:4000", server.url);
      assert.notEqual(code, blocks[0], "the snippet names the default address");

      const { socket, frames } = makeSocket(client, server);
      socket.connect();
      const channel = socket.channel("room:lobby", {});
      const got = [];
      channel.on("new_msg", (payload, position) => got.push({ payload, position }));
      assert.equal((await replyTo(channel.join(5000))).status, "ok", showFrames(frames));

      const file = path.join(dir, `snippet-${name}.${extension}`);
      writeFileSync(file, code);
      const [program, args] = command(file);
      const out = await run(program, args, { PUSHGATE_PUBLISH_TOKEN: PUBLISH_TOKEN });
      assert.equal(out.code, 0, `${name} snippet failed:\n${out.stdout}\n${out.stderr}`);
      const position = out.stdout.match(/[0-9a-f]+:\d+/)?.[0];
      assert.ok(position, `the snippet prints the position: ${out.stdout}`);
      await waitFor(() => got.length > 0, 5000, () => `new_msg on room:lobby\n${showFrames(frames)}`);
      assert.deepEqual(got, [{ payload: { body: "hello" }, position }]);
      await disconnect(socket);
    });
  }
});
