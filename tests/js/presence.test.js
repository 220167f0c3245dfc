// Phoenix Presence ([presence], src/presence*) with the official phoenix client (1.8.17 and
// 1.7.23) and its own `Presence` class: on a topic matching presence.topics, the joiner gets
// `presence_state` (everyone already there) after its ok join reply, and every subscriber gets
// `presence_diff` for each join and leave (channel leave, closed connection, expired LongPoll
// session). The key is the connect token's `sub`, or for an anonymous connection the entry's own
// phx_ref; the meta is `{phx_ref, online_at, ...the join params' "presence" object}`.
// Run with `npm test` (see support.js for how the server is found).

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  AUTH_SECRET,
  CLIENTS,
  disconnect,
  leaveAcknowledged,
  makeLongPollSocket,
  makeSocket,
  presenceSummary,
  publish,
  quietPeriod,
  replyTo,
  showExchanges,
  showFrames,
  jwt,
  startServer,
  uniqueTopic,
  waitFor,
} from "./support.js";

const SECRET = AUTH_SECRET;
const TEST_TIMEOUT_MS = 20_000;
const PUSH_TIMEOUT_MS = 3000;
const DEADLINE_MS = 5000;
// Short LongPoll sessions, so that an abandoned one expires (and leaves) in about two seconds.
const WINDOW_MS = 500;
const SESSION_TIMEOUT_MS = 1600;
const SESSION_EXPIRY_DEADLINE_MS = SESSION_TIMEOUT_MS * 2 + WINDOW_MS + 2000;
const SERVER_ENV = {
  PUSHGATE_PRESENCE_TOPICS: "room:*",
  PUSHGATE_AUTH_SECRET: SECRET,
  PUSHGATE_LONGPOLL_WINDOW_MS: String(WINDOW_MS),
  PUSHGATE_LONGPOLL_SESSION_TIMEOUT_MS: String(SESSION_TIMEOUT_MS),
};
const MAX_META_BYTES = 512; // presence.max_meta_bytes' default

/** A connect token for `sub`, valid for ten minutes. */
const tokenFor = (sub) => jwt({ sub, exp: Math.floor(Date.now() / 1000) + 600 });

/** Decoded frames of one direction, as `[join_ref, ref, topic, event, payload]`. */
function decoded(frames, direction) {
  return frames.filter(([dir]) => dir === direction).map(([, text]) => JSON.parse(text));
}

/** The inbound presence_state / presence_diff frames of `topic`. */
function presenceFrames(frames, topic) {
  return decoded(frames, "in").filter((f) => f[2] === topic && (f[3] === "presence_state" || f[3] === "presence_diff"));
}

/**
 * A phoenix `Presence` on `channel` (made before the join, as an app does), with every onJoin
 * and onLeave callback recorded: `joins` as `{key, names}`, `leaves` as `{key, names, remaining}`.
 */
function watch(client, channel) {
  const presence = new client.Presence(channel);
  const seen = { presence, joins: [], leaves: [] };
  presence.onJoin((key, _current, joined) => seen.joins.push({ key, names: joined.metas.map((m) => m.name) }));
  presence.onLeave((key, current, left) =>
    seen.leaves.push({ key, names: left.metas.map((m) => m.name), remaining: current.metas.length }),
  );
  return seen;
}

/** Every meta in the presence list, as `{key, meta}`. */
function allMetas(presence) {
  return presence.list((key, { metas }) => metas.map((meta) => ({ key, meta }))).flat();
}

for (const client of CLIENTS) {
  describe(`presence with phoenix ${client.version}`, () => {
    let server;
    const sockets = [];

    before(async () => {
      server = await startServer({ env: SERVER_ENV });
    });

    after(async () => {
      for (const socket of sockets) socket.disconnect();
      await server?.stop();
    });

    /** A connected socket over `transport` ("WebSocket" or "LongPoll"), disconnected when the suite ends. */
    function open(transport, opts = {}) {
      const made = transport === "LongPoll" ? makeLongPollSocket(client, server, opts) : makeSocket(client, server, opts);
      made.transport = transport;
      made.opens = 0;
      made.socket.onOpen(() => made.opens++);
      sockets.push(made.socket);
      made.socket.connect();
      return made;
    }

    /** Frames (and LongPoll exchanges) of recorded sockets, for assertion messages. */
    function evidence(...made) {
      return made
        .map((m) => {
          const label = m.label ?? m.transport;
          const ex = m.exchanges ? `\n  exchanges:\n${showExchanges(m.exchanges, 10)}` : "";
          return `${label} (${m.transport}) frames:\n${showFrames(m.frames)}${ex}`;
        })
        .join("\n");
    }

    /** Joins `channel` and resolves with the reply's response; fails the test on anything but "ok". */
    async function join(channel, made) {
      const { status, response } = await replyTo(channel.join(PUSH_TIMEOUT_MS));
      assert.equal(status, "ok", `join ${channel.topic}: ${status} ${JSON.stringify(response)}\n${evidence(made)}`);
      return response;
    }

    /** Waits until `seen`'s presence list summary is `expected`. */
    async function waitList(seen, expected, made, others = [], timeoutMs = DEADLINE_MS) {
      await waitFor(
        () => presenceSummary(seen.presence) === expected,
        timeoutMs,
        () =>
          `${made.label}'s presence list to be "${expected}"; it is "${presenceSummary(seen.presence)}" ` +
          `(state ${JSON.stringify(seen.presence.state)})\n${evidence(made, ...others)}`,
      );
    }

    for (const second of ["WebSocket", "LongPoll"]) {
      it(`WebSocket and ${second}: each one's Presence lists both, names in the metas; a ${second === "LongPoll" ? "LongPoll session that expires" : "disconnect"} leaves`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const topic = uniqueTopic("room");
        const startedAt = Date.now();

        const ann = open("WebSocket");
        ann.label = "Ann";
        // A forged phx_ref and online_at are overwritten; other fields are kept.
        const annChannel = ann.socket.channel(topic, {
          presence: { name: "Ann", color: "red", phx_ref: "forged-ref", online_at: "yesterday" },
        });
        const annSeen = watch(client, annChannel);
        await join(annChannel, ann);
        await waitList(annSeen, "anon=[Ann]", ann);

        const bob = open(second);
        bob.label = "Bob";
        const bobChannel = bob.socket.channel(topic, { presence: { name: "Bob" } });
        const bobSeen = watch(client, bobChannel);
        await join(bobChannel, bob);

        await waitList(annSeen, "anon=[Ann] anon=[Bob]", ann, [bob]);
        await waitList(bobSeen, "anon=[Ann] anon=[Bob]", bob, [ann]);

        // The metas: a unique server-made phx_ref, online_at in unix ms, the client's fields.
        const metas = allMetas(bobSeen.presence);
        const annMeta = metas.find((m) => m.meta.name === "Ann").meta;
        const bobMeta = metas.find((m) => m.meta.name === "Bob").meta;
        for (const meta of [annMeta, bobMeta]) {
          assert.equal(typeof meta.phx_ref, "string", JSON.stringify(meta));
          assert.ok(meta.phx_ref.length > 0, JSON.stringify(meta));
          assert.equal(typeof meta.online_at, "number", JSON.stringify(meta));
          assert.ok(
            meta.online_at >= startedAt - 5000 && meta.online_at <= Date.now() + 5000,
            `online_at ${meta.online_at} is not unix ms of the join (test started at ${startedAt}): ${JSON.stringify(meta)}`,
          );
        }
        assert.notEqual(annMeta.phx_ref, "forged-ref", `a client-supplied phx_ref was kept: ${JSON.stringify(annMeta)}`);
        assert.notEqual(annMeta.phx_ref, bobMeta.phx_ref, "two entries share a phx_ref");
        assert.equal(annMeta.color, "red", JSON.stringify(annMeta));
        assert.deepEqual(Object.keys(bobMeta).sort(), ["name", "online_at", "phx_ref"], JSON.stringify(bobMeta));
        // Both sockets see the same metas.
        assert.deepEqual(
          allMetas(annSeen.presence).sort((x, y) => x.key.localeCompare(y.key)),
          metas.sort((x, y) => x.key.localeCompare(y.key)),
          "Ann and Bob see different metas",
        );

        // On the wire: presence_state follows the ok join reply; then a presence_diff with the
        // joiner's own join reaches the joiner too.
        for (const [made, meta] of [[ann, annMeta], [bob, bobMeta]]) {
          const inbound = decoded(made.frames, "in");
          const [joinFrame] = decoded(made.frames, "out").filter((f) => f[2] === topic && f[3] === "phx_join");
          const reply = inbound.findIndex((f) => f[3] === "phx_reply" && f[2] === topic && f[1] === joinFrame[1]);
          const state = inbound.findIndex((f) => f[3] === "presence_state" && f[2] === topic);
          assert.ok(reply !== -1 && state > reply, `${made.label}: presence_state is not after the ok join reply\n${evidence(made)}`);
          for (const [key, entry] of Object.entries(inbound[state][4])) {
            assert.ok(Array.isArray(entry.metas) && entry.metas.length > 0, `presence_state entry ${key}: ${JSON.stringify(entry)}`);
          }
          const ownJoinAt = inbound.findIndex(
            (f, i) => i > reply && f[3] === "presence_diff" && f[2] === topic && Object.values(f[4].joins ?? {}).some((e) => e.metas.some((m) => m.phx_ref === meta.phx_ref)),
          );
          assert.ok(ownJoinAt !== -1, `${made.label} got no presence_diff with its own join\n${evidence(made)}`);
          const ownJoin = inbound[ownJoinAt];
          // As in a Phoenix app (push presence_state, then Presence.track): the state comes first.
          assert.ok(state < ownJoinAt, `${made.label}: the presence_diff with its own join came before its presence_state\n${evidence(made)}`);
          assert.deepEqual(ownJoin[4], { joins: { [meta.phx_ref]: { metas: [meta] } }, leaves: {} }, `${made.label}'s own join diff`);
        }
        // Bob's presence_state holds Ann, who was there before him.
        const bobState = presenceFrames(bob.frames, topic).find((f) => f[3] === "presence_state");
        assert.deepEqual(bobState[4][annMeta.phx_ref], { metas: [annMeta] }, `Bob's presence_state\n${evidence(bob)}`);
        // Ann learnt of Bob through onJoin.
        assert.ok(annSeen.joins.some((j) => j.key === bobMeta.phx_ref && j.names.includes("Bob")), JSON.stringify(annSeen.joins));

        // Bob goes away: Ann's list drops him (onLeave fires).
        await disconnect(bob.socket);
        await waitList(annSeen, "anon=[Ann]", ann, [bob], second === "LongPoll" ? SESSION_EXPIRY_DEADLINE_MS : DEADLINE_MS);
        assert.deepEqual(annSeen.leaves, [{ key: bobMeta.phx_ref, names: ["Bob"], remaining: 0 }], `Ann's onLeave calls\n${evidence(ann)}`);
        const leaveDiffs = presenceFrames(ann.frames, topic).filter((f) => f[3] === "presence_diff" && Object.keys(f[4].leaves ?? {}).length);
        assert.deepEqual(
          leaveDiffs.map((f) => f[4]),
          [{ joins: {}, leaves: { [bobMeta.phx_ref]: { metas: [bobMeta] } } }],
          `leave diffs Ann got\n${evidence(ann)}`,
        );
      });
    }

    it("keys by the connect token's sub: two alice sockets are one key with two metas; one leaving keeps the other", { timeout: TEST_TIMEOUT_MS }, async () => {
      const topic = uniqueTopic("room");
      const members = [];
      for (const [label, sub, transport] of [
        ["Alice-1", "alice", "WebSocket"],
        ["Alice-2", "alice", "LongPoll"],
        ["Bob", "bob", "WebSocket"],
      ]) {
        const made = open(transport, { params: { token: tokenFor(sub) } });
        made.label = label;
        made.channel = made.socket.channel(topic, { presence: { name: label } });
        made.seen = watch(client, made.channel);
        await join(made.channel, made);
        members.push(made);
      }
      const [alice1, alice2, bob] = members;
      for (const member of members) await waitList(member.seen, "alice=[Alice-1,Alice-2] bob=[Bob]", member, members);

      const alice2Meta = allMetas(bob.seen.presence).find((m) => m.meta.name === "Alice-2").meta;
      alice2.channel.leave(PUSH_TIMEOUT_MS);
      await waitFor(() => leaveAcknowledged(alice2.frames, topic), DEADLINE_MS, () => `the server's leave reply\n${evidence(alice2)}`);

      for (const member of [alice1, bob]) {
        await waitList(member.seen, "alice=[Alice-1] bob=[Bob]", member, [alice2]);
        const left = member.seen.leaves;
        assert.deepEqual(left, [{ key: "alice", names: ["Alice-2"], remaining: 1 }], `${member.label}'s onLeave calls\n${evidence(member)}`);
        const leaveDiffs = presenceFrames(member.frames, topic).filter((f) => f[3] === "presence_diff" && Object.keys(f[4].leaves ?? {}).length);
        assert.deepEqual(
          leaveDiffs.map((f) => f[4]),
          [{ joins: {}, leaves: { alice: { metas: [alice2Meta] } } }],
          `${member.label}'s leave diffs\n${evidence(member)}`,
        );
      }
      // Bob's own join diff is keyed by his sub.
      const bobJoin = presenceFrames(bob.frames, topic).find((f) => f[3] === "presence_diff" && f[4].joins?.bob);
      assert.ok(bobJoin, `no join diff keyed "bob"\n${evidence(bob)}`);
      assert.deepEqual(bobJoin[4].joins.bob.metas.map((m) => m.name), ["Bob"]);
    });

    it("sends no presence events on a topic that presence.topics does not match", { timeout: TEST_TIMEOUT_MS }, async () => {
      const plain = uniqueTopic("lobby");
      const room = uniqueTopic("room");
      const one = open("WebSocket");
      one.label = "one";
      const two = open("WebSocket", { params: { token: tokenFor("carol") } });
      two.label = "two";
      const got = [];
      const oneChannel = one.socket.channel(plain, { presence: { name: "One" } });
      oneChannel.on("note", (payload) => got.push(payload));
      await join(oneChannel, one);
      await join(two.socket.channel(plain, { presence: { name: "Two" } }), two);

      // A presence topic on the same socket does get them (the server is not simply off).
      const roomChannel = one.socket.channel(room, { presence: { name: "One" } });
      const roomSeen = watch(client, roomChannel);
      await join(roomChannel, one);
      await waitList(roomSeen, "anon=[One]", one);

      await publish(server, plain, "note", { n: 1 });
      await waitFor(() => got.length === 1, DEADLINE_MS, () => `the note on ${plain}\n${evidence(one)}`);
      await quietPeriod(300); // a late presence event would show up here
      for (const made of [one, two]) {
        assert.deepEqual(presenceFrames(made.frames, plain), [], `presence events on ${plain}\n${evidence(made)}`);
      }
    });

    for (const transport of ["WebSocket", "LongPoll"]) {
      it(`${transport}: refuses a join whose presence is not an object or too big; the socket and its other channels go on`, { timeout: TEST_TIMEOUT_MS }, async () => {
        const room = uniqueTopic("room");
        const plain = uniqueTopic("lobby");
        const made = open(transport);
        made.label = "socket";
        const got = [];
        const other = made.socket.channel(plain, {});
        other.on("note", (payload) => got.push(payload));
        await join(other, made);

        const oversized = { name: "Big", blob: "x".repeat(MAX_META_BYTES + 100) };
        for (const [what, presence] of [
          ["a string", "nope"],
          ["an array", [1, 2]],
          ["a number", 42],
          [`${JSON.stringify(oversized).length} bytes of JSON`, oversized],
        ]) {
          const channel = made.socket.channel(room, { presence });
          const refused = await replyTo(channel.join(PUSH_TIMEOUT_MS));
          assert.equal(refused.status, "error", `presence ${what}: ${JSON.stringify(refused)}\n${evidence(made)}`);
          assert.equal(typeof refused.response?.reason, "string", `presence ${what}: ${JSON.stringify(refused.response)}`);
          assert.match(refused.response.reason, /presence/, `presence ${what}: ${JSON.stringify(refused.response)}`);
          channel.leave(); // phoenix.js would retry a refused join with backoff
        }

        // The same socket joins the topic with a good presence (a fitting one of about 430
        // bytes), and only that entry is there: the refused joins were not tracked.
        const fitting = { name: "Fits", blob: "y".repeat(400) };
        const channel = made.socket.channel(room, { presence: fitting });
        const seen = watch(client, channel);
        await join(channel, made);
        await waitList(seen, "anon=[Fits]", made);
        const [{ meta }] = allMetas(seen.presence);
        assert.equal(meta.blob, fitting.blob);

        await publish(server, plain, "note", { n: 1 });
        await waitFor(() => got.length === 1, DEADLINE_MS, () => `the note on ${plain}\n${evidence(made)}`);
        assert.equal(made.opens, 1, `the socket reconnected\n${evidence(made)}`);
      });
    }
  });
}
