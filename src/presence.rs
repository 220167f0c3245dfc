//! Phoenix Presence (`[presence]`): who is joined to a topic, on every node.
//!
//! A join to a topic matching `presence.topics` is tracked. The joiner gets a `presence_state`
//! push (everyone already present, as `{key: {"metas": [meta, ...]}}`), then every subscriber,
//! the joiner too, gets a `presence_diff` broadcast `{"joins": {key: {"metas": [meta]}},
//! "leaves": {}}`; leaving the channel, closing the connection or a LongPoll session expiring
//! sends the matching `leaves`. That is what a Phoenix app does with `Presence.list` and
//! `Presence.track` after a join, and what phoenix.js's `Presence` class consumes.
//!
//! - **key**: the `sub` claim of the connection's connect token when it verifies
//!   ([`crate::auth::Auth::subject`]); otherwise the entry's own `phx_ref` (an anonymous
//!   connection is a key of its own: clients cannot claim an identity).
//! - **meta**: `{"phx_ref", "online_at" (unix ms), ...}` plus the fields of the join params'
//!   `presence` object (at most `presence.max_meta_bytes` of JSON).
//!
//! Diffs are ordinary broadcasts of the topic (published through the broker, so they reach every
//! node and keep their order with the topic's other messages). A joiner subscribes before its
//! state is read, so a change lands in the state, in a diff after it, or in both; phoenix.js
//! applies a diff over a state idempotently (metas are matched by `phx_ref`), so the client's view
//! converges either way.
//!
//! One task per node ([`run`]) applies the changes in order. With the embedded broker the table
//! is that task's memory. With Redis each topic's entries live in a hash that every node reads
//! for `presence_state`; a node renews a liveness key every second (or every third of
//! `presence.node_ttl_ms`, if that is shorter), and
//! the nodes remove (and announce the leaves of) the entries of a node whose key has expired. A
//! node that finds its own key gone (Redis restarted, or it was cut off for longer than the TTL)
//! or that failed to write a change puts all of its entries back.

use crate::broker::{Broker, Message};
use crate::config::PresenceConfig;
use crate::metrics::Metrics;
use crate::session::PresenceEntry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most changes waiting for the presence task (it stalls only while Redis does). Past this, new
/// joins go ahead untracked (logged) until it catches up; leaves of tracked channels always queue,
/// so the queue holds at most this many plus one leave per tracked channel.
const MAX_QUEUED: usize = 65_536;

/// Hands frames to one session (through its mailbox): its `presence_state`, and a fresh one
/// if the first was incomplete (Redis did not answer).
pub type Deliver = crate::session::Deliver;

/// What the presence task needs from the node.
pub struct Context {
    pub presence: Arc<Presence>,
    /// Diffs are published through it; with Redis, entries live there.
    pub broker: Broker,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the node starts to shut down: this node's entries leave.
    pub shutdown: CancellationToken,
}

/// Why `GET /api/presence` cannot tell who is on a topic (HTTP 503, this as the reason).
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// [`MAX_QUEUED`] changes are waiting for the presence task.
    #[error("presence is busy: too many changes waiting; retry")]
    Busy,
    #[error("presence is not running (shutting down)")]
    NotRunning,
    /// No answer within [`LIST_TIMEOUT`].
    #[error("presence did not answer within {} s", LIST_TIMEOUT.as_secs())]
    TimedOut,
    #[error("Redis unavailable: {0}")]
    RedisUnavailable(crate::broker::redis::LinkDown),
    /// Reading the topic's entries failed.
    #[error("Redis: {0}")]
    Redis(::redis::RedisError),
}

/// Why a join's `presence` param is refused: the join's error reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// More than `presence.max_meta_bytes` of JSON.
    #[error("presence meta too large: at most {0} bytes of JSON (presence.max_meta_bytes)")]
    TooLarge(usize),
    #[error("presence must be a JSON object (the entry's meta)")]
    NotAnObject,
}

/// The `[presence]` rules and the queue to this node's presence task.
pub struct Presence {
    topics: Vec<String>,
    max_meta_bytes: usize,
    node_ttl: Duration,
    node: String,
    next_ref: AtomicU64,
    ops: Sender,
    queue: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Op>>>,
}

/// The queue to the presence task, with its length (see [`MAX_QUEUED`]).
#[derive(Debug, Clone)]
struct Sender {
    tx: mpsc::UnboundedSender<Op>,
    queued: Arc<AtomicUsize>,
}

impl Sender {
    fn send(&self, op: Op) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(op).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn full(&self) -> bool {
        self.queued.load(Ordering::Relaxed) >= MAX_QUEUED
    }
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("topics", &self.topics)
            .finish()
    }
}

/// One tracked channel: who and where.
#[derive(Debug, Clone)]
struct Entry {
    topic: Arc<str>,
    phx_ref: String,
    key: String,
    /// The meta: a JSON object.
    meta: String,
}

enum Op {
    Track {
        entry: Entry,
        join_ref: String,
        state_to: Deliver,
    },
    Untrack {
        topic: Arc<str>,
        phx_ref: String,
    },
    /// `GET /api/presence`.
    List {
        topic: Arc<str>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, ListError>>,
    },
}

/// Redis only: the longest time between two beats (liveness renewal, dead-node check, and the
/// first write after Redis returns).
const MAX_BEAT: Duration = Duration::from_secs(1);

/// Beats per `presence.node_ttl_ms` (when that makes them more frequent than [`MAX_BEAT`]): a
/// node's liveness key survives two missed renewals.
const BEATS_PER_TTL: u32 = 3;

/// How long `GET /api/presence` waits for the presence task.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes reserved for an encoded `presence_state` (grown as entries need): an empty state and
/// a small entry fit.
const STATE_CAPACITY: usize = 64;

/// Bytes reserved for an encoded `presence_diff`: the two empty halves and one small entry.
const DIFF_CAPACITY: usize = 96;

/// A join that will be tracked once it is answered ([`Presence::start`]).
pub type Prepared = PresenceEntry;

/// A tracked channel; dropping it (leave, rejoin, connection gone) untracks it.
#[derive(Debug)]
pub struct Tracked {
    ops: Sender,
    topic: Arc<str>,
    phx_ref: String,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.ops.send(Op::Untrack {
            topic: self.topic.clone(),
            phx_ref: std::mem::take(&mut self.phx_ref),
        });
    }
}

impl Presence {
    /// `None` when no topic is tracked.
    pub fn new(config: &PresenceConfig, node: &str) -> Option<Presence> {
        if config.topics.is_empty() {
            return None;
        }
        let (tx, queue) = mpsc::unbounded_channel();
        let ops = Sender {
            tx,
            queued: Default::default(),
        };
        Some(Presence {
            topics: config.topics.clone(),
            max_meta_bytes: config.max_meta_bytes,
            node_ttl: Duration::from_millis(config.node_ttl_ms),
            node: node.to_string(),
            next_ref: AtomicU64::new(1),
            ops,
            queue: std::sync::Mutex::new(Some(queue)),
        })
    }

    /// Whether joins of `topic` are tracked.
    pub fn tracks(&self, topic: &str) -> bool {
        self.topics
            .iter()
            .any(|p| crate::auth::glob_match(p, topic))
    }

    /// Checks a join's `presence` param before the join goes ahead; `subject` is the verified
    /// token's `sub`. `Err` is the join's error reason.
    pub fn prepare(
        &self,
        subject: Option<String>,
        param: Option<&serde_json::value::RawValue>,
    ) -> Result<Prepared, MetaError> {
        let meta = match param.map(|p| p.get()) {
            None | Some("null") => serde_json::Map::new(),
            Some(text) => {
                if text.len() > self.max_meta_bytes {
                    return Err(MetaError::TooLarge(self.max_meta_bytes));
                }
                serde_json::from_str(text).map_err(|_| MetaError::NotAnObject)?
            }
        };
        Ok(Prepared { key: subject, meta })
    }

    /// Tracks a channel that has just been joined (and subscribed): `state_to` gets its
    /// `presence_state` (addressed to `join_ref`), then everyone gets the join's diff. `None`
    /// while the presence task is [`MAX_QUEUED`] changes behind: the channel goes untracked.
    pub fn start(
        &self,
        prepared: Prepared,
        topic: &str,
        join_ref: &str,
        state_to: Deliver,
    ) -> Option<Tracked> {
        if self.ops.full() {
            tracing::warn!(
                topic = ?topic,
                "presence: too many changes waiting; a join goes untracked"
            );
            return None;
        }
        let n = self.next_ref.fetch_add(1, Ordering::Relaxed);
        let phx_ref = format!("{}-{n:x}", self.node);
        let mut meta = serde_json::Map::new();
        meta.insert("phx_ref".into(), phx_ref.clone().into());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        meta.insert("online_at".into(), now.into());
        for (k, v) in prepared.meta {
            if k != "phx_ref" && k != "online_at" {
                meta.insert(k, v);
            }
        }
        let topic: Arc<str> = topic.into();
        let entry = Entry {
            topic: topic.clone(),
            key: prepared.key.unwrap_or_else(|| phx_ref.clone()),
            phx_ref: phx_ref.clone(),
            meta: serde_json::Value::Object(meta).to_string(),
        };
        self.ops.send(Op::Track {
            entry,
            join_ref: join_ref.to_string(),
            state_to,
        });
        Some(Tracked {
            ops: self.ops.clone(),
            topic,
            phx_ref,
        })
    }
}

impl Presence {
    /// Who is on `topic` now, on every node, as a `presence_state` payload (for
    /// `GET /api/presence`). `Err` says why it cannot be told (HTTP 503).
    pub async fn list(&self, topic: &str) -> Result<Vec<u8>, ListError> {
        if self.ops.full() {
            return Err(ListError::Busy);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.ops.send(Op::List {
            topic: topic.into(),
            reply,
        });
        match tokio::time::timeout(LIST_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ListError::NotRunning),
            Err(_) => Err(ListError::TimedOut),
        }
    }
}

/// `{key: {"metas": [meta, ...]}, ...}` of `entries`.
fn encode_state<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, meta) in entries {
        by_key.entry(key).or_default().push(meta);
    }
    let mut out = Vec::with_capacity(STATE_CAPACITY);
    out.push(b'{');
    for (i, (key, metas)) in by_key.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        crate::protocol::push_json_str(&mut out, key);
        out.extend_from_slice(b":{\"metas\":[");
        for (j, meta) in metas.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(meta.as_bytes());
        }
        out.extend_from_slice(b"]}");
    }
    out.push(b'}');
    out
}

/// A `presence_diff` payload.
fn encode_diff<'a>(joins: &[(&'a str, &'a str)], leaves: &[(&'a str, &'a str)]) -> String {
    let mut out = Vec::with_capacity(DIFF_CAPACITY);
    out.extend_from_slice(b"{\"joins\":");
    out.extend_from_slice(&encode_state(joins.iter().copied()));
    out.extend_from_slice(b",\"leaves\":");
    out.extend_from_slice(&encode_state(leaves.iter().copied()));
    out.push(b'}');
    String::from_utf8(out).expect("JSON built from strings")
}

/// Redis only: channels whose `presence_state` was sent without Redis, by phx_ref: topic,
/// join_ref and where to send the complete one.
type Incomplete = HashMap<String, (Arc<str>, String, Deliver)>;

/// Most queued changes applied (and announced) together.
const MAX_BATCH: usize = 256;

/// `(key, meta)` of entries that joined or left.
type Changes = Vec<(String, String)>;

/// The joins and leaves of one batch of changes, by topic.
#[derive(Default)]
struct Diffs {
    topics: HashMap<Arc<str>, (Changes, Changes)>,
}

impl Diffs {
    fn join(&mut self, e: &Entry) {
        let t = self.topics.entry(e.topic.clone()).or_default();
        t.0.push((e.key.clone(), e.meta.clone()));
    }

    fn leave(&mut self, e: &Entry) {
        let t = self.topics.entry(e.topic.clone()).or_default();
        t.1.push((e.key.clone(), e.meta.clone()));
    }
}

/// `(key, meta)` pairs borrowed for [`encode_diff`].
fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, m)| (k.as_str(), m.as_str())).collect()
}

/// This node's entries, by topic.
#[derive(Default)]
struct Local {
    /// Topic, then phx_ref: a join, a leave and a count cost the same however many are here.
    topics: HashMap<Arc<str>, HashMap<String, Entry>>,
    count: usize,
}

impl Local {
    fn add(&mut self, entry: Entry) {
        let entries = self.topics.entry(entry.topic.clone()).or_default();
        if entries.insert(entry.phx_ref.clone(), entry).is_none() {
            self.count += 1;
        }
    }

    /// Removes an entry; also says whether it was the topic's last one here.
    fn remove(&mut self, topic: &str, phx_ref: &str) -> Option<(Entry, bool)> {
        let entries = self.topics.get_mut(topic)?;
        let entry = entries.remove(phx_ref)?;
        self.count -= 1;
        let last = entries.is_empty();
        if last {
            self.topics.remove(topic);
        }
        Some((entry, last))
    }

    /// The topic's entries here, as a `presence_state` payload.
    fn state(&self, topic: &str) -> Vec<u8> {
        encode_state(
            self.topics
                .get(topic)
                .into_iter()
                .flat_map(HashMap::values)
                .map(|e| (e.key.as_str(), e.meta.as_str())),
        )
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.topics.values().flat_map(HashMap::values)
    }

    fn count(&self) -> usize {
        self.count
    }
}

/// Applies presence changes in order until shutdown (spawned by `server::run` when
/// `presence.topics` is set).
pub async fn run(ctx: Context) {
    let presence = ctx.presence.clone();
    let Some(mut queue) = presence
        .queue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return;
    };
    let mut local = Local::default();
    let mut redis = match &ctx.broker {
        Broker::Embedded(_) => None,
        Broker::Redis(r) => Some(redis::Store::new(r.clone(), &presence)),
    };
    let mut beat = tokio::time::interval((presence.node_ttl / BEATS_PER_TTL).min(MAX_BEAT));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Redis only: channels whose `presence_state` was sent without Redis (it was down), by
    // phx_ref; each gets a complete one once Redis answers again.
    let mut incomplete = Incomplete::new();
    loop {
        tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => break,
            // First, so the node's liveness key exists before its first entry, and renewals are
            // never starved by a busy queue.
            _ = beat.tick(), if redis.is_some() => {
                // Not while Redis is down (nothing would wait on it); the key may expire
                // meanwhile, and the first beat after puts this node's entries back.
                if let Some(store) = &mut redis
                    && ctx.broker.readiness().is_ok()
                    && store.beat(&ctx, &local).await
                {
                    store.complete(&mut incomplete).await;
                }
            }
            op = queue.recv() => {
                let Some(op) = op else { break };
                // Changes already waiting are applied together and announced in one diff per
                // topic (a reconnect storm on a crowded topic is then not one diff per join to
                // every subscriber); nothing waits for more.
                let mut batch = vec![op];
                while batch.len() < MAX_BATCH
                    && let Ok(op) = queue.try_recv()
                {
                    batch.push(op);
                }
                presence.ops.queued.fetch_sub(batch.len(), Ordering::Relaxed);
                let mut diffs = Diffs::default();
                for op in batch {
                    apply(&ctx, op, &mut local, &mut redis, &mut incomplete, &mut diffs).await;
                }
                for (topic, (joins, leaves)) in &diffs.topics {
                    publish_diff(&ctx, topic, &encode_diff(&pairs(joins), &pairs(leaves))).await;
                }
                ctx.metrics.presence_entries.store(local.count() as u64, Ordering::Relaxed);
            }
        }
    }
    if let Some(store) = &mut redis {
        store.leave_all(&ctx).await;
    }
}

/// Applies one change: answers a join's state, writes Redis, and collects the diff.
async fn apply(
    ctx: &Context,
    op: Op,
    local: &mut Local,
    redis: &mut Option<redis::Store>,
    incomplete: &mut Incomplete,
    diffs: &mut Diffs,
) {
    match op {
        Op::Track {
            entry,
            join_ref,
            state_to,
        } => {
            // While Redis is down nothing waits on it: the joiner gets what this
            // node knows (a complete state follows), and the entry reaches Redis,
            // with its diff, when this node puts its entries back.
            let up = redis.is_none() || ctx.broker.readiness().is_ok();
            let state = match redis {
                None => Some(local.state(&entry.topic)),
                Some(store) if up => store.state(&entry.topic).await,
                Some(store) => {
                    store.resync_later();
                    None
                }
            };
            let complete = state.is_some();
            let state = state.unwrap_or_else(|| local.state(&entry.topic));
            state_to(crate::protocol::encode_push(
                &join_ref,
                &entry.topic,
                "presence_state",
                &state,
            ));
            if !complete {
                incomplete.insert(
                    entry.phx_ref.clone(),
                    (entry.topic.clone(), join_ref, state_to),
                );
            }
            if up {
                if let Some(store) = redis {
                    // The liveness key exists before this node's first entry, so
                    // that losing it later says the entries were lost too.
                    if !store.started() {
                        store.beat(ctx, local).await;
                    }
                    store.track(&entry).await;
                }
                diffs.join(&entry);
            }
            local.add(entry);
        }
        Op::Untrack { topic, phx_ref } => {
            incomplete.remove(&phx_ref);
            let Some((entry, last)) = local.remove(&topic, &phx_ref) else {
                return;
            };
            let announce = match redis {
                None => true,
                Some(store) if ctx.broker.readiness().is_ok() => store.untrack(&entry, last).await,
                Some(store) => {
                    // Put back (and announced) with the others when Redis returns.
                    store.resync_later();
                    false
                }
            };
            if announce {
                diffs.leave(&entry);
            }
        }
        Op::List { topic, reply } => {
            let state = match redis {
                None => Ok(local.state(&topic)),
                Some(store) => match ctx.broker.readiness() {
                    Err(e) => Err(ListError::RedisUnavailable(e)),
                    Ok(()) => store.read_state(&topic).await.map_err(ListError::Redis),
                },
            };
            let _ = reply.send(state);
        }
    }
}

/// Publishes a diff through the broker (so every node's subscribers get it, in order).
async fn publish_diff(ctx: &Context, topic: &str, payload: &str) {
    let message = Message {
        topic,
        event: crate::protocol::PRESENCE_DIFF_EVENT,
        payload,
        exclude: None,
    };
    if let Err(e) = ctx.broker.publish(std::slice::from_ref(&message)).await {
        tracing::warn!(topic = ?topic, error = ?e.to_string(), "presence: could not publish a diff");
    }
}

mod redis {
    //! Presence entries in Redis (names from [`Keys`](crate::broker::redis::Keys)):
    //! `<prefix>{<topic>}:p` (a hash: `phx_ref` to `{"key", "node", "meta"}`), and under the
    //! internal prefix `presence:node:<id>` (the topics where a node has entries),
    //! `presence:nodes` (the nodes that may have entries) and `node:<id>` (a node's liveness
    //! key, with a TTL).

    use super::Context;
    use super::{Entry, Local, encode_diff, encode_state, publish_diff};
    use crate::broker::redis::RedisBroker;
    use redis::AsyncCommands;
    use std::sync::Arc;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Stored {
        key: String,
        node: String,
        meta: Box<serde_json::value::RawValue>,
    }

    /// Removes a node's entries in one atomic step (see the script's header).
    const REAP_SCRIPT: &str = include_str!("../redis/reap.lua");

    /// What `redis/reap.lua` removed from one topic: the topic and the stored entries.
    type Reaped = (String, Vec<String>);

    /// Whose entries [`Store::reap`] removes.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Reap {
        /// Another node's, if its liveness key is gone and it is still in the node set (which
        /// it leaves in the same step): one reaper wins, and one that fails or dies half way
        /// leaves the node there for the next.
        Dead,
        /// This node's own (putting them back, or leaving); the node set is not touched.
        Own,
    }

    pub(super) struct Store {
        reap_script: redis::Script,
        broker: Arc<RedisBroker>,
        node: String,
        ttl_ms: u64,
        /// Set when a change could not be written: the next beat puts every entry back.
        resync: bool,
        /// Whether the liveness key has been set once.
        started: bool,
        /// The broker's Redis generation at the last beat ([`RedisBroker::generation`]).
        generation: u64,
        /// The last failure logged (logged again only when it changes).
        failing: Option<String>,
    }

    impl Store {
        pub(super) fn new(broker: Arc<RedisBroker>, presence: &super::Presence) -> Store {
            Store {
                reap_script: redis::Script::new(REAP_SCRIPT),
                broker,
                node: presence.node.clone(),
                ttl_ms: presence.node_ttl.as_millis() as u64,
                resync: false,
                started: false,
                generation: 0,
                failing: None,
            }
        }

        fn keys(&self) -> &crate::broker::redis::Keys {
            self.broker.keys()
        }

        /// A write failed: the next beat puts every entry back.
        fn failed(&mut self, doing: &str, e: &redis::RedisError) {
            self.resync = true;
            self.log_failure(doing, e);
        }

        fn log_failure(&mut self, doing: &str, e: &redis::RedisError) {
            let text = format!("{doing}: {e}");
            if self.failing.as_deref() != Some(text.as_str()) {
                tracing::warn!(error = ?text, "presence: Redis failed");
                self.failing = Some(text);
            }
        }

        /// The topic's entries on every node, as a `presence_state` payload (`None` when Redis
        /// cannot be read).
        pub(super) async fn state(&mut self, topic: &str) -> Option<Vec<u8>> {
            match self.read_state(topic).await {
                Ok(state) => Some(state),
                Err(e) => {
                    self.log_failure("reading a topic's entries", &e);
                    None
                }
            }
        }

        /// Whether a beat has reached Redis yet.
        pub(super) fn started(&self) -> bool {
            self.started
        }

        /// A change was not written (Redis is down): the next beat that reaches Redis puts
        /// every entry back.
        pub(super) fn resync_later(&mut self) {
            self.resync = true;
        }

        /// Sends a complete `presence_state` to each channel that got an incomplete one.
        pub(super) async fn complete(&mut self, incomplete: &mut super::Incomplete) {
            let refs: Vec<String> = incomplete.keys().cloned().collect();
            for phx_ref in refs {
                let (topic, join_ref, _) = &incomplete[&phx_ref];
                let Some(state) = self.state(topic).await else {
                    return; // the next beat tries again
                };
                let frame = crate::protocol::encode_push(join_ref, topic, "presence_state", &state);
                if let Some((_, _, deliver)) = incomplete.remove(&phx_ref) {
                    deliver(frame);
                }
            }
        }

        /// The topic's entries on every node, as a `presence_state` payload.
        pub(super) async fn read_state(&self, topic: &str) -> Result<Vec<u8>, redis::RedisError> {
            let mut con = self.broker.commands().await?;
            let all: Vec<(String, String)> = con.hgetall(self.keys().presence(topic)).await?;
            let stored: Vec<Stored> = all
                .iter()
                .filter_map(|(_, v)| serde_json::from_str(v).ok())
                .collect();
            Ok(encode_state(
                stored.iter().map(|s| (s.key.as_str(), s.meta.get())),
            ))
        }

        async fn write(&self, entry: &Entry) -> Result<(), redis::RedisError> {
            let value = serde_json::json!({
                "key": entry.key,
                "node": self.node,
                "meta": serde_json::value::RawValue::from_string(entry.meta.clone())
                    .expect("meta is JSON"),
            })
            .to_string();
            let mut con = self.broker.commands().await?;
            redis::pipe()
                .hset(self.keys().presence(&entry.topic), &entry.phx_ref, value)
                .ignore()
                .sadd(self.keys().node_topics(&self.node), &*entry.topic)
                .ignore()
                .query_async::<()>(&mut con)
                .await
        }

        pub(super) async fn track(&mut self, entry: &Entry) {
            if let Err(e) = self.write(entry).await {
                self.failed("adding an entry", &e);
            }
        }

        /// Removes an entry; `false` when it was not there (another node removed it and
        /// announced the leave, or it was never written).
        pub(super) async fn untrack(&mut self, entry: &Entry, last_here: bool) -> bool {
            let result: Result<i64, redis::RedisError> = async {
                let mut con = self.broker.commands().await?;
                let (removed,): (i64,) = {
                    let mut pipe = redis::pipe();
                    pipe.hdel(self.keys().presence(&entry.topic), &entry.phx_ref);
                    if last_here {
                        pipe.srem(self.keys().node_topics(&self.node), &*entry.topic)
                            .ignore();
                    }
                    pipe.query_async(&mut con).await?
                };
                Ok(removed)
            }
            .await;
            match result {
                Ok(removed) => removed > 0,
                Err(e) => {
                    self.failed("removing an entry", &e);
                    true
                }
            }
        }

        /// Renews this node's liveness key, puts its entries back if they were lost, and
        /// removes the entries of nodes that died. `false` when Redis did not answer.
        pub(super) async fn beat(&mut self, ctx: &Context, local: &Local) -> bool {
            let renewed: Result<Option<String>, redis::RedisError> = async {
                let mut con = self.broker.commands().await?;
                let (previous,): (Option<String>,) = redis::pipe()
                    .cmd("SET")
                    .arg(self.keys().node_alive(&self.node))
                    .arg(1)
                    .arg("PX")
                    .arg(self.ttl_ms)
                    .arg("GET")
                    .sadd(self.keys().nodes(), &self.node)
                    .ignore()
                    .query_async(&mut con)
                    .await?;
                Ok(previous)
            }
            .await;
            let previous = match renewed {
                Ok(p) => p,
                Err(e) => {
                    self.failed("renewing this node's liveness key", &e);
                    return false;
                }
            };
            if self.failing.take().is_some() {
                tracing::info!("presence: Redis answers again");
            }
            // Another Redis process than at the last beat (a restart from a snapshot, a
            // failover to a replica that lacked writes): it may miss entries of ours or keep
            // entries we removed, although our liveness key is there. Put ours back.
            let generation = self.broker.generation();
            let moved = self.started && generation != self.generation;
            self.generation = generation;
            if (previous.is_none() && self.started) || self.resync || moved {
                self.resync = false;
                tracing::info!(
                    entries = local.count(),
                    "presence: putting this node's entries back in Redis"
                );
                self.reap(ctx, &self.node.clone(), Reap::Own).await;
                for entry in local.entries() {
                    self.track(entry).await;
                    let diff = encode_diff(&[(&entry.key, &entry.meta)], &[]);
                    publish_diff(ctx, &entry.topic, &diff).await;
                }
            }
            self.started = true;
            self.reap_dead(ctx).await;
            true
        }

        /// Removes the entries of nodes whose liveness key has expired (one node wins each).
        async fn reap_dead(&mut self, ctx: &Context) {
            let dead: Result<Vec<String>, redis::RedisError> = async {
                let mut con = self.broker.commands().await?;
                let nodes: Vec<String> = con.smembers(self.keys().nodes()).await?;
                let mut dead = Vec::new();
                for id in nodes.into_iter().filter(|id| *id != self.node) {
                    let alive: bool = con.exists(self.keys().node_alive(&id)).await?;
                    if !alive {
                        dead.push(id);
                    }
                }
                Ok(dead)
            }
            .await;
            match dead {
                Ok(dead) => {
                    for id in dead {
                        // The script checks again, atomically: another node may have won.
                        if let Some(n) = self.reap(ctx, &id, Reap::Dead).await {
                            tracing::info!(node = ?id, entries = n, "presence: removed a dead node's entries");
                            crate::metrics::Metrics::add(&ctx.metrics.presence_reaped, n as u64);
                        }
                    }
                }
                Err(e) => self.failed("looking for dead nodes", &e),
            }
        }

        /// Removes every entry of node `id` (`redis/reap.lua`, one atomic step) and announces
        /// the leaves; returns how many, or `None` when there was nothing to reap (another
        /// node did) or Redis failed (then nothing was removed).
        async fn reap(&mut self, ctx: &Context, id: &str, whose: Reap) -> Option<usize> {
            let gone: Result<Option<Vec<Reaped>>, redis::RedisError> = async {
                let mut con = self.broker.commands().await?;
                self.reap_script
                    .key(self.keys().nodes())
                    .key(self.keys().node_alive(id))
                    .key(self.keys().node_topics(id))
                    .arg(id)
                    .arg(self.keys().topic_prefix())
                    .arg(if whose == Reap::Dead { "dead" } else { "own" })
                    .invoke_async(&mut con)
                    .await
            }
            .await;
            match gone {
                Ok(gone) => {
                    let mut n = 0;
                    for (topic, values) in gone? {
                        let entries: Vec<Stored> = values
                            .iter()
                            .filter_map(|v| serde_json::from_str(v).ok())
                            .collect();
                        n += entries.len();
                        let leaves: Vec<(&str, &str)> = entries
                            .iter()
                            .map(|s| (s.key.as_str(), s.meta.get()))
                            .collect();
                        publish_diff(ctx, &topic, &encode_diff(&[], &leaves)).await;
                    }
                    Some(n)
                }
                Err(e) => {
                    self.failed("removing a node's entries", &e);
                    None
                }
            }
        }

        /// At shutdown: this node's entries leave, and so does the node. If they could not be
        /// removed, the node stays in the node set (its liveness key goes), so another node
        /// reaps them at its next beat instead of leaving them behind for good.
        pub(super) async fn leave_all(&mut self, ctx: &Context) {
            let node = self.node.clone();
            let removed = self.reap(ctx, &node, Reap::Own).await.is_some();
            let result: Result<(), redis::RedisError> = async {
                let mut con = self.broker.commands().await?;
                let mut pipe = redis::pipe();
                pipe.del(self.keys().node_alive(&node)).ignore();
                if removed {
                    pipe.srem(self.keys().nodes(), &node).ignore();
                }
                pipe.query_async::<()>(&mut con).await
            }
            .await;
            if let Err(e) = result {
                self.failed("leaving", &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_groups_metas_by_key() {
        let state = encode_state(
            [
                ("bob", r#"{"phx_ref":"1"}"#),
                ("al\"ice", r#"{"phx_ref":"2"}"#),
                ("bob", r#"{"phx_ref":"3"}"#),
            ]
            .into_iter(),
        );
        let v: serde_json::Value = serde_json::from_slice(&state).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "al\"ice": {"metas": [{"phx_ref": "2"}]},
                "bob": {"metas": [{"phx_ref": "1"}, {"phx_ref": "3"}]},
            })
        );
        assert_eq!(encode_state(std::iter::empty()), b"{}");
    }

    /// These reach operators as /api/presence's 503 reason: the texts are pinned.
    #[test]
    fn list_errors_say_what_they_said() {
        assert_eq!(
            ListError::TimedOut.to_string(),
            "presence did not answer within 5 s"
        );
        assert_eq!(
            ListError::RedisUnavailable(crate::broker::redis::LinkDown::PingTimedOut).to_string(),
            "Redis unavailable: redis: ping timed out"
        );
        assert_eq!(
            MetaError::TooLarge(64).to_string(),
            "presence meta too large: at most 64 bytes of JSON (presence.max_meta_bytes)"
        );
    }

    #[test]
    fn diff_has_joins_and_leaves() {
        let d = encode_diff(&[("a", r#"{"phx_ref":"1"}"#)], &[]);
        assert_eq!(
            d,
            r#"{"joins":{"a":{"metas":[{"phx_ref":"1"}]}},"leaves":{}}"#
        );
    }

    fn presence() -> Presence {
        let config = PresenceConfig {
            topics: vec!["room:*".into()],
            max_meta_bytes: 64,
            ..Default::default()
        };
        Presence::new(&config, "n1").unwrap()
    }

    #[test]
    fn meta_is_checked_and_ours_wins() {
        let p = presence();
        assert!(p.tracks("room:1") && !p.tracks("lobby"));
        let raw = |s: &str| serde_json::value::RawValue::from_string(s.into()).unwrap();
        let e = p
            .prepare(None, Some(&raw("\"nope\"")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("presence must be a JSON object"), "{e}");
        let big = format!("{{\"name\":\"{}\"}}", "x".repeat(64));
        let e = p.prepare(None, Some(&raw(&big))).unwrap_err().to_string();
        assert!(e.contains("presence.max_meta_bytes"), "{e}");

        let prepared = p
            .prepare(None, Some(&raw(r#"{"name":"Ann","phx_ref":"forged"}"#)))
            .unwrap();
        let mut queue = p.queue.lock().unwrap().take().unwrap();
        let tracked = p.start(prepared, "room:1", "7", Arc::new(|_| {})).unwrap();
        let Some(Op::Track {
            entry, join_ref, ..
        }) = queue.try_recv().ok()
        else {
            panic!("no track");
        };
        assert_eq!(join_ref, "7");
        assert_eq!(entry.key, entry.phx_ref, "anonymous: its own key");
        let meta: serde_json::Value = serde_json::from_str(&entry.meta).unwrap();
        assert_eq!(meta["name"], "Ann");
        assert_eq!(meta["phx_ref"], entry.phx_ref.as_str());
        assert!(meta["online_at"].as_u64().unwrap() > 0);
        drop(tracked);
        assert!(
            matches!(queue.try_recv(), Ok(Op::Untrack { phx_ref, .. }) if phx_ref == entry.phx_ref)
        );

        let prepared = p.prepare(Some("alice".into()), None).unwrap();
        let _t = p.start(prepared, "room:1", "8", Arc::new(|_| {}));
        let Some(Op::Track { entry, .. }) = queue.try_recv().ok() else {
            panic!("no track");
        };
        assert_eq!(entry.key, "alice");
    }

    #[test]
    fn a_stalled_task_leaves_new_joins_untracked_but_never_loses_a_leave() {
        let p = presence();
        let _queue = p.queue.lock().unwrap().take().unwrap();
        let start = || {
            p.start(
                p.prepare(None, None).unwrap(),
                "room:1",
                "1",
                Arc::new(|_| {}),
            )
        };
        let tracked: Vec<Tracked> = (0..MAX_QUEUED).map(|_| start().unwrap()).collect();
        assert!(start().is_none(), "the queue is full");
        drop(tracked);
        assert_eq!(p.ops.queued.load(Ordering::Relaxed), 2 * MAX_QUEUED);
    }
}
