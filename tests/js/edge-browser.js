// Run by tests/acme.rs (`demo_page_in_chromium_at_the_edge`), not by `npm test`: the demo page
// served by pushgate's own TLS listener (tls.listen) with the certificate Pebble issued, in
// headless Chromium, once per transport. The page, its publish and its LongPoll requests go over
// HTTPS (HTTP/2 when ALPN picks it), its WebSocket over wss://.
//
// Environment: EDGE_ORIGIN (https://<domain>:<port>), EDGE_CHAIN (the served chain as PEM:
// Chromium cannot be handed Pebble's root, so it is told to accept the leaf's key), EDGE_TOKEN
// (the publish token). The domain resolves to 127.0.0.1 for the browser.
// Prints one JSON line, per transport the protocol (ALPN) each kind of request went over; on a
// failure, the reason on stderr and exit status 1.

import assert from "node:assert/strict";
import { X509Certificate, createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { launchBrowser, openDemo, publishThroughForm, waitForMessage, waitForTransport } from "./demo-page.js";

const origin = process.env.EDGE_ORIGIN;
const chainFile = process.env.EDGE_CHAIN;
const token = process.env.EDGE_TOKEN;
assert.ok(origin && chainFile && token, "set EDGE_ORIGIN, EDGE_CHAIN and EDGE_TOKEN");
const domain = new URL(origin).hostname;
const leaf = new X509Certificate(readFileSync(chainFile));
const spki = createHash("sha256")
  .update(leaf.publicKey.export({ type: "spki", format: "der" }))
  .digest("base64");

const browser = await launchBrowser(origin, [
  `--host-resolver-rules=MAP ${domain} 127.0.0.1`,
  `--ignore-certificate-errors-spki-list=${spki}`,
]);
const seen = {};
try {
  for (const transport of ["websocket", "longpoll"]) {
    const query = transport === "longpoll" ? "?transport=longpoll" : "";
    const demo = await openDemo(browser, `${origin}/${query}`);
    await waitForTransport(demo, transport);
    const body = `over ${transport} at the edge ${Math.random().toString(36).slice(2, 8)}`;
    await publishThroughForm(demo, body, token);
    await waitForMessage(demo, body);
    assert.equal(await demo.page.locator("#transport").textContent(), transport, "no fallback");
    assert.deepEqual(demo.log.filter((line) => line.startsWith("pageerror")), [], demo.describe());
    seen[transport] = await demo.page.evaluate(() => {
      const protocols = { page: performance.getEntriesByType("navigation")[0]?.nextHopProtocol };
      for (const entry of performance.getEntriesByType("resource")) {
        const kind = new URL(entry.name).pathname.replace(/^\//, "");
        if (kind === "api/publish" || kind === "socket/longpoll") protocols[kind] = entry.nextHopProtocol;
      }
      return protocols;
    });
    await demo.page.close();
  }
} catch (err) {
  console.error(err?.stack ?? String(err));
  process.exitCode = 1;
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
