// RFC 6455 conformance of our WebSocket layer (src/ws.rs and the connection task), judged by
// Autobahn|Testsuite's fuzzing client against the real server. The server is the conformance
// build (Cargo feature `autobahn-echo`): it echoes data messages, which is what the suite's
// cases expect, instead of handling them as Phoenix; the handshake, the frame layer, control
// frames, limits and the closing handshake are the production code.
//
// Needs PUSHGATE_AUTOBAHN_BIN (that build) and WSTEST (Autobahn's `wstest`, from
// scripts/autobahn-env.sh); scripts/test.sh provides both.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { startServer, waitFor } from "./support.js";

const BIN = process.env.PUSHGATE_AUTOBAHN_BIN;
const WSTEST = process.env.WSTEST;
const RUN_DEADLINE_MS = 5 * 60_000;
// Which cases run and which verdicts conform, shared with the TLS run in tests/acme.rs.
const POLICY = JSON.parse(readFileSync(new URL("../autobahn-policy.json", import.meta.url), "utf8"));
const EXCLUDED = POLICY["exclude-cases"];
const CONFORMS = new Set(POLICY.conforms);

/** Runs `cmd` in `cwd` to its end; rejects after `deadlineMs`. Resolves with its output. */
function run(cmd, args, cwd, deadlineMs) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, stdio: ["ignore", "pipe", "pipe"] });
    const output = [];
    child.stdout.on("data", (d) => output.push(d));
    child.stderr.on("data", (d) => output.push(d));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${cmd} did not finish within ${deadlineMs} ms`));
    }, deadlineMs);
    child.once("error", (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${cmd}: ${err.message}`));
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      const text = Buffer.concat(output).toString();
      if (code === 0) resolve(text);
      else reject(new Error(`${cmd} exited with ${code}:\n${text.slice(-4000)}`));
    });
  });
}

test("Autobahn|Testsuite fuzzing client: every case conforms", { timeout: RUN_DEADLINE_MS + 60_000 }, async () => {
  assert.ok(BIN && WSTEST, "set PUSHGATE_AUTOBAHN_BIN and WSTEST (scripts/test.sh does)");
  // Autobahn opens one connection per case from one address, hundreds in a few seconds: the
  // per-address connect rate (a protection, tested in tests/admission.rs) is not under test.
  const server = await startServer({ bin: BIN, env: { PUSHGATE_LIMITS_CONNECT_RATE_PER_ADDRESS: "0" } });
  const dir = mkdtempSync(path.join(os.tmpdir(), "pushgate-autobahn-"));
  try {
    // The build says so before it says "listening" (though on its own line, read separately).
    await waitFor(
      () => server.logs.some((l) => l.includes("autobahn-echo")),
      2000,
      () => `${BIN} to say it is the conformance build:\n${server.logs.join("\n")}`,
    );
    const reports = path.join(dir, "reports");
    const spec = {
      outdir: reports,
      servers: [{ agent: "pushgate", url: `ws://${server.addr}/socket/websocket?vsn=2.0.0` }],
      cases: ["*"],
      "exclude-cases": EXCLUDED,
      "exclude-agent-cases": {},
    };
    writeFileSync(path.join(dir, "spec.json"), JSON.stringify(spec));
    // wstest exits 0 whatever the verdicts: they are read from its report below.
    const output = await run(WSTEST, ["-m", "fuzzingclient", "-s", "spec.json"], dir, RUN_DEADLINE_MS);

    const results = JSON.parse(readFileSync(path.join(reports, "index.json"), "utf8")).pushgate ?? {};
    const ids = Object.keys(results);
    assert.ok(ids.length > 200, `only ${ids.length} cases ran:\n${output.slice(-4000)}`);
    const failed = ids
      .filter((id) => !CONFORMS.has(results[id].behavior) || !CONFORMS.has(results[id].behaviorClose))
      .map((id) => {
        const r = results[id];
        const report = JSON.parse(readFileSync(path.join(reports, r.reportfile), "utf8"));
        return `${id} ${r.behavior}/${r.behaviorClose}: ${report.description.replace(/<[^>]+>/g, "")} -> ${report.result}; ${report.resultClose}`;
      });
    assert.deepEqual(failed, [], `cases that do not conform:\n${failed.join("\n")}`);
    // The node is still well after the fuzzing.
    const health = await fetch(`${server.url}/healthz`);
    assert.equal(health.status, 200);
    assert.ok(!server.logs.some((l) => /panicked/.test(l)), server.logs.join("\n"));
  } finally {
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
