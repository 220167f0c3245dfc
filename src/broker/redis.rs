//! The Redis broker: cross-node fanout through pub/sub, history in capped streams.
//!
//! Keys and channels ([`Keys`]), for topic `T`, topic prefix `P` (`redis.prefix`, default
//! `pushgate:`) and internal prefix `I` (`redis.internal_prefix`, default `pushgate.internal:`):
//! - `PT`: the topic's pub/sub channel. `redis/publish.lua` assigns the offset, appends to the
//!   stream, and publishes `{"position":"E:O","event":...,"payload":...}` atomically. A plain
//!   `PUBLISH PT {"event":...,"payload":...}` is delivered live, without a position.
//! - `P{T}:m`: hash with the topic's `epoch` and last `offset`; `P{T}:s`: stream of the last
//!   `history.size` messages, entry id `<offset>-0`; `P{T}:p`: the topic's presence entries;
//!   `P{T}:o`: the previous epoch's stream, kept (meta field `prev`) when the scripts start a
//!   new epoch, so that a node that had not received its last messages delivers them first.
//!   Hash-tagged by topic so that a move to Redis Cluster keeps a topic's keys in one slot.
//! - Everything else is the nodes' own, under `I`, which no `PT` can equal (`I` and `P` differ
//!   before either ends; `Config::validate` checks it): `Inode:<id>`, a node's control channel
//!   (LongPoll requests and answers) and its liveness key; `Ipresence:node:<id>` and
//!   `Ipresence:nodes` (presence bookkeeping). Every topic key ends in `}:` and one letter
//!   after the topic, so no two topics' keys meet either.
//!
//! One task ([`run`]) owns the subscriber connection. It subscribes per topic, only while the
//! topic has local subscribers (unsubscribing in batches when the hub reports idle topics), and
//! feeds messages to the hub in order. Because the same task also completes joins that need
//! Redis, "subscribe first, then read the position and the history" is one sequence: messages
//! that arrive meanwhile wait in the connection's buffer and are deduplicated by offset, so
//! there is no gap and no duplicate at the seam. A gap in live offsets (messages lost while
//! disconnected) is filled from the stream before the next message is appended.
//!
//! When the subscriber connection drops, `/readyz` turns 503 with the reason, every topic is
//! marked not live, and the task reconnects with capped exponential backoff and jitter,
//! resubscribes every topic with local subscribers, and catches each up from its stream.
//! Publishing goes through a separate command connection and fails loudly (HTTP 503) while
//! Redis is unreachable.

use super::{JoinRequest, Joined, Message, PublishError};
use crate::app::App;
use crate::config::HistoryConfig;
use crate::hub::{self, JoinInfo, LiveJoin, RemoteAppend};
use crate::metrics::Metrics;
use crate::protocol;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

const PUBLISH_SCRIPT: &str = include_str!("../../redis/publish.lua");
const POSITION_SCRIPT: &str = include_str!("../../redis/position.lua");
/// Joins waiting for the broker task, all connections together. A join beyond this gets an
/// error reply and the client rejoins on its schedule. Served [`JOIN_BATCH`] at a time, a full
/// queue is a few dozen batches: well under a second of waiting for the last join.
const JOIN_QUEUE: usize = 8192;
/// Most joins completed together (one SUBSCRIBE, one pipeline of positions, one of history).
const JOIN_BATCH: usize = 256;
/// Channels per SUBSCRIBE/UNSUBSCRIBE command when many change at once.
const SUBSCRIBE_BATCH: usize = 500;
/// Reconnect backoff: doubles from the first to the cap, each wait jittered by up to half.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How often the subscriber connection is pinged, and how long a ping may take, so that a
/// silent Redis turns `/readyz` red within a couple of seconds.
const PING_EVERY: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for one subscriber-connection command (SUBSCRIBE/UNSUBSCRIBE); past it the
/// connection is treated as dead, so a stalled Redis never stalls the node.
const SUBSCRIBER_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest resubscription and catch-up after a reconnect before trying again.
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Every Redis key and channel pushgate uses. Injective: distinct (topic, kind) pairs and the
/// internal names never map to the same key or channel, whatever bytes a topic holds.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `redis.prefix`: topic channels and topic keys.
    topic: String,
    /// `redis.internal_prefix`: the nodes' own keys and channels.
    internal: String,
}

impl Keys {
    /// `prefix` and `internal` must differ before either ends (`Config::validate`).
    pub fn new(prefix: &str, internal: &str) -> Keys {
        Keys {
            topic: prefix.to_string(),
            internal: internal.to_string(),
        }
    }

    /// The topic's pub/sub channel, `<prefix><topic>` (pinned: plain `PUBLISH` works).
    pub fn channel(&self, topic: &str) -> String {
        format!("{}{topic}", self.topic)
    }

    /// The topic a topic channel carries.
    pub fn topic_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(self.topic.as_str())
    }

    fn topic_key(&self, topic: &str, kind: char) -> String {
        format!("{}{{{topic}}}:{kind}", self.topic)
    }

    /// The topic's meta hash (`epoch`, `offset`).
    pub fn meta(&self, topic: &str) -> String {
        self.topic_key(topic, 'm')
    }

    /// The topic's history stream.
    pub fn stream(&self, topic: &str) -> String {
        self.topic_key(topic, 's')
    }

    /// The stream of the topic's previous epoch, kept when a new epoch starts (until it
    /// expires) for nodes that had not received its last messages yet.
    pub fn old_stream(&self, topic: &str) -> String {
        self.topic_key(topic, 'o')
    }

    /// The topic's presence entries (a hash: `phx_ref` to `{"key", "node", "meta"}`).
    pub fn presence(&self, topic: &str) -> String {
        self.topic_key(topic, 'p')
    }

    /// A node's control channel: LongPoll requests for its sessions, answers to its requests.
    pub fn node_channel(&self, node: &str) -> String {
        format!("{}node:{node}", self.internal)
    }

    /// A node's presence liveness key (a TTL renewed by its beats).
    pub fn node_alive(&self, node: &str) -> String {
        format!("{}node:{node}", self.internal)
    }

    /// The topics where a node has presence entries (a set).
    pub fn node_topics(&self, node: &str) -> String {
        format!("{}presence:node:{node}", self.internal)
    }

    /// The nodes that may have presence entries (a set).
    pub fn nodes(&self) -> String {
        format!("{}presence:nodes", self.internal)
    }
}

/// Joins queued or in progress, by connection ([`hub::ConnHandle::id`]).
type InFlight = Mutex<std::collections::HashMap<u64, usize>>;

/// One join counted in [`InFlight`]; dropping it uncounts it.
struct InFlightSlot {
    map: Arc<InFlight>,
    id: u64,
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut e) = map.entry(self.id) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// How a LongPoll request forwarded to the node that owns its session ended.
#[derive(Debug)]
pub enum Forwarded {
    /// The owner's answer (JSON).
    Answer(String),
    /// The owner is not listening (gone) or did not answer in time.
    Gone,
    /// Cut short here: this node is draining, or its Redis link dropped or is down, so an
    /// answer could not come back (the owner keeps unacknowledged frames for the next poll).
    CutShort,
}

/// While Redis is unreachable, a relayed GET waits this long before it is answered (`204`), so
/// a client whose balancer keeps sending it here does not poll in a tight loop.
const RELAY_DOWN_PAUSE: Duration = Duration::from_millis(500);

/// Forwarded LongPoll requests waiting for the owner's answer, by request id.
type ReplySlots = Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<String>>>;

/// Where the Redis master is.
enum Target {
    /// `redis.url`.
    Direct(redis::Client),
    /// Asked from the sentinels at every (re)connect (`redis.sentinels`).
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

pub struct RedisBroker {
    target: Target,
    keys: Keys,
    history: HistoryConfig,
    publish_script: redis::Script,
    position_script: redis::Script,
    /// The command connection to the current master: made once with `redis.url`; with
    /// Sentinel, replaced by [`run`] whenever it connects to a (possibly new) master.
    commands: Mutex<Option<ConnectionManager>>,
    joins: mpsc::Sender<JoinRequest>,
    join_queue: Mutex<Option<mpsc::Receiver<JoinRequest>>>,
    /// Joins each connection (by [`hub::ConnHandle::id`]) has queued or in progress here, so that
    /// one connection cannot fill [`JOIN_QUEUE`].
    in_flight: Arc<InFlight>,
    /// Most joins one connection may have here at once (`limits.max_topics_per_connection`:
    /// a client that does not churn never has more).
    per_connection: usize,
    metrics: Arc<Metrics>,
    /// Notified by the hub when a topic loses its last local subscriber.
    pub idle: Arc<Notify>,
    status: Mutex<Result<(), String>>,
    /// This node's channel, where other nodes send LongPoll requests for our sessions and
    /// answers to the requests we forwarded.
    node_channel: String,
    next_request: std::sync::atomic::AtomicU64,
    replies: ReplySlots,
    /// The `run_id` of the Redis process the broker last connected to, and how many times it
    /// has been another one (a restart, a failover): presence puts this node's entries back
    /// when it changes, since the new process may have lost some or kept stale ones.
    run: Mutex<(String, u64)>,
    /// Counts the subscriber connection's losses: a LongPoll request relayed to another node
    /// waits for its answer on that connection, and gives up when this changes.
    link_losses: tokio::sync::watch::Sender<u64>,
}

/// A LongPoll request or answer travelling between nodes.
#[derive(serde::Serialize, Deserialize)]
struct Routed {
    /// "req" or "rep".
    t: String,
    id: u64,
    /// Requests: the node to answer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    from: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    token: String,
    /// Requests: the POST body (absent for a GET). Answers: the JSON answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

/// A message as it travels on a topic's channel.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    /// Borrowed unless the sender escaped characters in it (any JSON encoder may: a message
    /// published with `PUBLISH` need not come from our script).
    #[serde(borrow, default)]
    position: Option<Cow<'a, str>>,
    event: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    /// The sender a publish excludes ("send to others"), as `<node>.<connection>`.
    #[serde(borrow, default)]
    exclude: Option<Cow<'a, str>>,
}

impl<'a> Envelope<'a> {
    /// Decodes a message from a topic's channel.
    pub fn decode(payload: &'a [u8]) -> Result<Envelope<'a>, serde_json::Error> {
        serde_json::from_slice(payload)
    }

    /// Its position (`epoch:offset`), when it carries a well-formed one.
    pub fn position(&self) -> Option<(&str, u64)> {
        self.position.as_deref().and_then(hub::parse_position)
    }

    /// The message for this node's hub (`node`: this node's id).
    pub fn broadcast(&self, node: &str) -> hub::Broadcast<'_> {
        hub::Broadcast {
            event: &self.event,
            payload: self.payload.get().as_bytes(),
            exclude: crate::session::local_exclude(self.exclude.as_deref(), node),
        }
    }
}

impl RedisBroker {
    /// Checks the configuration; connects later (in [`run`] and on first publish).
    pub fn new(
        config: &crate::config::RedisConfig,
        keys: Keys,
        history: HistoryConfig,
        node_id: &str,
        per_connection: usize,
        metrics: Arc<Metrics>,
    ) -> Result<RedisBroker, String> {
        let client = if config.tls_ca_file.is_empty() {
            redis::Client::open(config.url.as_str())
        } else {
            let root = std::fs::read(&config.tls_ca_file)
                .map_err(|e| format!("redis.tls_ca_file: {e}"))?;
            redis::Client::build_with_tls(
                config.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                },
            )
        }
        .map_err(|e| e.to_string())?;
        let target = if config.sentinels.is_empty() {
            Target::Direct(client)
        } else {
            let sentinels = config
                .sentinels
                .iter()
                .map(|a| {
                    crate::config::sentinel_url(a, &config.sentinel_password)
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, _>>()?;
            let info = client.get_connection_info();
            let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(info.redis_settings().clone());
            if let redis::ConnectionAddr::TcpTls { insecure, .. } = info.addr() {
                node = node.set_tls_mode(if *insecure {
                    redis::TlsMode::Insecure
                } else {
                    redis::TlsMode::Secure
                });
            }
            let sentinel = redis::sentinel::SentinelClient::build(
                sentinels,
                config.master_name.clone(),
                Some(node),
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|e| e.to_string())?;
            Target::Sentinel(tokio::sync::Mutex::new(sentinel))
        };
        let (tx, rx) = mpsc::channel(JOIN_QUEUE);
        Ok(RedisBroker {
            node_channel: keys.node_channel(node_id),
            target,
            keys,
            history,
            publish_script: redis::Script::new(PUBLISH_SCRIPT),
            position_script: redis::Script::new(POSITION_SCRIPT),
            commands: Mutex::new(None),
            joins: tx,
            join_queue: Mutex::new(Some(rx)),
            in_flight: Default::default(),
            per_connection: per_connection.max(1),
            metrics,
            idle: Arc::new(Notify::new()),
            status: Mutex::new(Err("redis: connecting".into())),
            next_request: std::sync::atomic::AtomicU64::new(1),
            replies: Mutex::new(Default::default()),
            run: Mutex::new((String::new(), 0)),
            link_losses: tokio::sync::watch::Sender::new(0),
        })
    }

    fn meta_key(&self, topic: &str) -> String {
        self.keys.meta(topic)
    }

    fn stream_key(&self, topic: &str) -> String {
        self.keys.stream(topic)
    }

    fn channel(&self, topic: &str) -> String {
        self.keys.channel(topic)
    }

    fn set_status(&self, s: Result<(), String>) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    pub fn readiness(&self) -> Result<(), String> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts the Redis processes the broker has connected to (see [`run`]); it
    /// changes when Redis restarted or failed over.
    pub(crate) fn generation(&self) -> u64 {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Records the `run_id` of the server just connected to.
    fn connected_to(&self, run_id: &str) {
        let mut run = self.run.lock().unwrap_or_else(|e| e.into_inner());
        if run.0 != run_id {
            if !run.0.is_empty() {
                tracing::warn!(
                    "redis: connected to another Redis process than before (restarted or failed \
                     over): topics start new epochs, presence entries are written back"
                );
            }
            run.0 = run_id.to_string();
            run.1 += 1;
        }
    }

    /// Where everything lives in Redis.
    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A client for the master: `redis.url`, or the master the sentinels name now.
    async fn master(&self) -> Result<redis::Client, redis::RedisError> {
        match &self.target {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel(s) => {
                let mut s = s.lock().await;
                tokio::time::timeout(Duration::from_secs(3), s.async_get_client())
                    .await
                    .map_err(|_| {
                        redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "no answer from the sentinels in time",
                        ))
                    })?
            }
        }
    }

    fn sentinel(&self) -> bool {
        matches!(self.target, Target::Sentinel(_))
    }

    async fn connect_commands(
        &self,
        client: redis::Client,
    ) -> Result<ConnectionManager, redis::RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        ConnectionManager::new_with_config(client, config).await
    }

    /// The shared command connection (to the current master).
    pub(crate) async fn commands(&self) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(c) = self.commands_now() {
            return Ok(c);
        }
        let con = self.connect_commands(self.master().await?).await?;
        let mut slot = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        Ok(slot.get_or_insert(con).clone())
    }

    fn commands_now(&self) -> Option<ConnectionManager> {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes through the Lua script, in order (pipelined).
    pub async fn publish(&self, messages: &[Message<'_>]) -> Result<Vec<String>, PublishError> {
        let mut con = self
            .commands()
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let r: Result<String, redis::RedisError> = self
                .publish_script
                .key(self.meta_key(m.topic))
                .key(self.stream_key(m.topic))
                .arg(self.channel(m.topic))
                .arg(m.event)
                .arg(m.payload)
                .arg(self.history.size)
                .arg(self.history.max_age_secs)
                .arg(m.exclude.unwrap_or(""))
                .invoke_async(&mut con)
                .await;
            match r {
                Ok(p) => out.push(p),
                Err(e)
                    if e.kind()
                        == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                        && !e.to_string().contains("READONLY") =>
                {
                    return Err(PublishError::Rejected(e.to_string()));
                }
                Err(e) => return Err(PublishError::Unavailable(e.to_string())),
            }
        }
        Ok(out)
    }

    /// Sends a LongPoll request to the node that owns the session and waits for its answer:
    /// [`Forwarded::Gone`] when that node is not listening or does not answer within `wait`;
    /// [`Forwarded::CutShort`] as soon as `shutdown` is cancelled (this node drains) or the
    /// subscriber connection, where the answer would arrive, drops; after [`RELAY_DOWN_PAUSE`]
    /// when Redis cannot be reached at all.
    pub async fn forward_longpoll(
        &self,
        owner: &str,
        token: &str,
        post_body: Option<&[u8]>,
        wait: Duration,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Forwarded {
        let mut link = self.link_losses.subscribe();
        if self.readiness().is_err() || shutdown.is_cancelled() {
            // No subscriber connection: no answer could come back.
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(RELAY_DOWN_PAUSE) => {}
            }
            return Forwarded::CutShort;
        }
        // Boxed: one allocation per relayed request keeps the connection task's future (which
        // holds this one) small and its type shallow.
        let relay = Box::pin(self.relay(owner, token, post_body, wait));
        tokio::select! {
            f = relay => f,
            _ = shutdown.cancelled() => Forwarded::CutShort,
            _ = link.changed() => Forwarded::CutShort,
        }
    }

    async fn relay(
        &self,
        owner: &str,
        token: &str,
        post_body: Option<&[u8]>,
        wait: Duration,
    ) -> Forwarded {
        let id = self.next_request.fetch_add(1, Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        // However this ends (answered, given up, or dropped because the client went away), the
        // reply slot goes with it.
        struct Slot<'a> {
            replies: &'a ReplySlots,
            id: u64,
        }
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                self.replies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&self.id);
            }
        }
        let _slot = Slot {
            replies: &self.replies,
            id,
        };
        let request = Routed {
            t: "req".into(),
            id,
            from: self.node_channel.clone(),
            token: token.into(),
            body: post_body.map(|b| String::from_utf8_lossy(b).into_owned()),
        };
        let Ok(text) = serde_json::to_string(&request) else {
            return Forwarded::Gone;
        };
        let Ok(mut con) = self.commands().await else {
            tokio::time::sleep(RELAY_DOWN_PAUSE).await;
            return Forwarded::CutShort;
        };
        let receivers: Result<u64, _> = redis::cmd("PUBLISH")
            .arg(self.keys.node_channel(owner))
            .arg(text)
            .query_async(&mut con)
            .await;
        match receivers {
            Ok(n) if n > 0 => {}
            // The owner is gone: the client reconnects and rejoins.
            Ok(_) => return Forwarded::Gone,
            Err(_) => {
                tokio::time::sleep(RELAY_DOWN_PAUSE).await;
                return Forwarded::CutShort;
            }
        }
        // Wait for the answer, checking every second that the owner still listens: a node
        // that stops may drop a request it received, and the client should not wait long.
        let deadline = tokio::time::Instant::now() + wait;
        tokio::pin!(rx);
        loop {
            let step = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            match tokio::time::timeout_at(step, &mut rx).await {
                Ok(Ok(answer)) => return Forwarded::Answer(answer),
                Ok(Err(_)) => break,
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Err(_) => {
                    let listening: Result<(String, u64), _> = redis::cmd("PUBSUB")
                        .arg("NUMSUB")
                        .arg(self.keys.node_channel(owner))
                        .query_async(&mut con)
                        .await;
                    if matches!(listening, Ok((_, 0))) {
                        break;
                    }
                }
            }
        }
        Forwarded::Gone
    }

    /// Queues a join for the broker task, unless its connection already has
    /// `per_connection` joins here or the queue is full: then it is answered at once with an
    /// error reply saying why (counted as a `rate_limit` refusal), and the connection goes on.
    pub fn join(&self, mut req: JoinRequest) {
        let slot = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(req.conn_handle.id).or_insert(0);
            if *n >= self.per_connection {
                drop(map);
                self.metrics.refused(crate::metrics::Refusal::RateLimit);
                let reason = format!(
                    "too many joins in progress on this connection (at most {} waiting for \
                     Redis); retry later",
                    self.per_connection
                );
                (req.done)(Err(reason));
                return;
            }
            *n += 1;
            InFlightSlot {
                map: self.in_flight.clone(),
                id: req.conn_handle.id,
            }
        };
        // However the join ends (answered, or dropped at shutdown), the slot is freed after.
        let done = req.done;
        req.done = Box::new(move |result| {
            done(result);
            drop(slot);
        });
        if let Err(e) = self.joins.try_send(req) {
            let req = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            self.metrics.refused(crate::metrics::Refusal::RateLimit);
            (req.done)(Err(
                "broker busy (too many joins waiting for Redis on this node); retry later".into(),
            ));
        }
    }

    /// The topic's position in Redis. `seen` is the last position this node has seen of it:
    /// when Redis holds that epoch at an older offset it lost acknowledged writes, and the
    /// script starts a new epoch (see `redis/position.lua`).
    async fn position(
        &self,
        con: &mut ConnectionManager,
        topic: &str,
        seen: Option<&hub::Position>,
    ) -> Result<(String, u64), redis::RedisError> {
        let (epoch, offset): (String, u64) = self
            .position_invocation(topic, seen)
            .invoke_async(con)
            .await?;
        Ok((epoch, offset))
    }

    fn position_invocation(
        &self,
        topic: &str,
        seen: Option<&hub::Position>,
    ) -> redis::ScriptInvocation<'_> {
        let mut i = self.position_script.prepare_invoke();
        i.key(self.meta_key(topic))
            .key(self.stream_key(topic))
            .arg(self.history.max_age_secs);
        if let Some(p) = seen {
            i.arg(&*p.epoch).arg(p.offset);
        }
        i
    }

    /// Stream entries with offsets in `from..=to`, as (offset, raw message).
    async fn range(
        &self,
        con: &mut ConnectionManager,
        topic: &str,
        from: u64,
        to: Option<u64>,
    ) -> Result<Vec<(u64, u64, String)>, redis::RedisError> {
        let end = to.map(|t| format!("{t}-0")).unwrap_or_else(|| "+".into());
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.stream_key(topic))
            .arg(format!("{from}-0"))
            .arg(end)
            .query_async(con)
            .await?;
        Ok(entries(reply))
    }
}

/// Stream entries as (offset, milliseconds, raw message).
fn entries(reply: redis::streams::StreamRangeReply) -> Vec<(u64, u64, String)> {
    let mut out = Vec::with_capacity(reply.ids.len());
    for id in reply.ids {
        let offset = id
            .id
            .split('-')
            .next()
            .and_then(|o| o.parse().ok())
            .unwrap_or(0);
        let ms: u64 = id.get("t").unwrap_or(0);
        let msg: String = id.get("m").unwrap_or_default();
        out.push((offset, ms, msg));
    }
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the subscriber side until shutdown: connect, resubscribe, catch up, serve.
pub async fn run(app: Arc<App>, broker: Arc<RedisBroker>) {
    let Some(mut joins) = broker
        .join_queue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return;
    };
    let mut backoff = BACKOFF_FIRST;
    let mut first = true;
    loop {
        if app.shutdown.is_cancelled() {
            return;
        }
        if !first {
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
            tokio::select! {
                _ = app.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
        first = false;
        let session = async {
            let client = broker.master().await?;
            if broker.sentinel() {
                // Follow the master the sentinels name now: a new command connection too
                // (publishes and presence fail with 503 until this point after a failover).
                let con = broker.connect_commands(client.clone()).await?;
                *broker.commands.lock().unwrap_or_else(|e| e.into_inner()) = Some(con);
            }
            // Which Redis process this is (a restart or failover changes it), asked on a
            // connection of its own: the shared one may still hold a socket to the old one.
            let mut probe = client.get_multiplexed_async_connection().await?;
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut probe)
                .await?;
            match info
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map(str::trim)
            {
                Some(run_id) => broker.connected_to(run_id),
                None => tracing::warn!("redis: INFO server has no run_id"),
            }
            drop(probe);
            let pubsub = client.get_async_pubsub().await?;
            let con = broker.commands().await?;
            Ok::<_, redis::RedisError>((pubsub, con))
        };
        let (pubsub, mut con) = match tokio::time::timeout(Duration::from_secs(3), session).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                broker.set_status(Err(format!("redis: cannot connect: {e}")));
                tracing::warn!(error = %e, "redis connect failed");
                continue;
            }
            Err(_) => {
                broker.set_status(Err("redis: connect timed out".into()));
                tracing::warn!("redis connect timed out");
                continue;
            }
        };
        // Load the publish script so backends can call it by SHA (EVALSHA) at once.
        let loaded: Result<String, _> = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(PUBLISH_SCRIPT)
            .query_async(&mut con)
            .await;
        match loaded {
            Ok(sha) => {
                tracing::info!(sha = %sha, "redis: publish script loaded; backends may call it with EVALSHA (see README)")
            }
            Err(e) => tracing::warn!(error = %e, "redis: could not load the publish script"),
        }
        let (mut sink, mut stream) = pubsub.split();
        match tokio::time::timeout(
            RESUBSCRIBE_TIMEOUT,
            resubscribe(&app, &broker, &mut sink, &mut con),
        )
        .await
        {
            Ok(Ok(n)) => {
                if n > 0 {
                    tracing::info!(topics = n, "redis: resubscribed");
                }
            }
            Ok(Err(e)) => {
                broker.set_status(Err(format!("redis: resubscribe failed: {e}")));
                tracing::warn!(error = %e, "redis resubscribe failed");
                app.hub.mark_all_down();
                continue;
            }
            Err(_) => {
                broker.set_status(Err("redis: resubscribe timed out".into()));
                tracing::warn!("redis resubscribe timed out");
                app.hub.mark_all_down();
                continue;
            }
        }
        broker.set_status(Ok(()));
        app.metrics.redis_connected.store(1, Relaxed);
        backoff = BACKOFF_FIRST;
        tracing::info!("redis: subscriber connected");
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                _ = app.shutdown.cancelled() => return,
                msg = stream.next() => match msg {
                    Some(m) => on_message(&app, &broker, &mut con, m).await,
                    None => break "redis: subscriber connection lost".to_string(),
                },
                Some(req) = joins.recv() => {
                    let mut batch = Vec::with_capacity(JOIN_BATCH.min(joins.len() + 1));
                    batch.push(req);
                    while batch.len() < JOIN_BATCH {
                        match joins.try_recv() {
                            Ok(req) => batch.push(req),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = on_joins(&app, &broker, &mut sink, &mut con, batch).await {
                        break format!("redis: {e}");
                    }
                }
                _ = broker.idle.notified() => {
                    let idle = app.hub.take_idle_topics();
                    app.metrics.redis_subscribed_topics.fetch_sub(idle.len() as i64, Relaxed);
                    let mut failed = None;
                    for chunk in idle.chunks(SUBSCRIBE_BATCH) {
                        let channels: Vec<String> = chunk.iter().map(|t| broker.channel(t)).collect();
                        match tokio::time::timeout(SUBSCRIBER_COMMAND_TIMEOUT, sink.unsubscribe(channels)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => failed = Some(format!("redis: unsubscribe failed: {e}")),
                            Err(_) => failed = Some("redis: unsubscribe timed out".to_string()),
                        }
                    }
                    if let Some(reason) = failed {
                        break reason;
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => break format!("redis: ping failed: {e}"),
                        Err(_) => break "redis: ping timed out".to_string(),
                    }
                    // With Sentinel, a master demoted to replica (it came back after a
                    // failover) may keep our connections: leave it for the new master.
                    if broker.sentinel() {
                        let role = tokio::time::timeout(
                            PING_TIMEOUT,
                            redis::cmd("ROLE").query_async::<redis::Value>(&mut con),
                        )
                        .await;
                        if !is_master(&role) {
                            break "redis: the server is no longer the master".to_string();
                        }
                    }
                }
            }
        };
        tracing::warn!(reason = ?reason, "redis: subscriber down; reconnecting");
        broker.set_status(Err(reason));
        broker.link_losses.send_modify(|n| *n += 1);
        app.metrics.redis_connected.store(0, Relaxed);
        Metrics::add(&app.metrics.redis_reconnects, 1);
        app.metrics.redis_subscribed_topics.store(0, Relaxed);
        app.hub.mark_all_down();
    }
}

/// Whether a `ROLE` answer says master (an error or a timeout does not: reconnect).
fn is_master(
    role: &Result<Result<redis::Value, redis::RedisError>, tokio::time::error::Elapsed>,
) -> bool {
    match role {
        Ok(Ok(redis::Value::Array(items))) => matches!(
            items.first(),
            Some(redis::Value::BulkString(b)) if b.as_slice() == b"master"
        ),
        _ => false,
    }
}

/// Subscribes every topic that has local subscribers and catches each up from its stream.
async fn resubscribe(
    app: &App,
    broker: &RedisBroker,
    sink: &mut redis::aio::PubSubSink,
    con: &mut ConnectionManager,
) -> Result<usize, redis::RedisError> {
    sink.subscribe(&broker.node_channel).await?;
    let topics = app.hub.live_topics();
    for chunk in topics.chunks(SUBSCRIBE_BATCH) {
        let channels: Vec<String> = chunk.iter().map(|(t, _)| broker.channel(t)).collect();
        sink.subscribe(channels).await?;
    }
    for (topic, known) in &topics {
        let seen = (known.offset > 0).then_some(known);
        let (epoch, offset) = broker.position(con, topic, seen).await?;
        if epoch == *known.epoch {
            app.hub.go_live(topic, &epoch, known.offset);
            if offset > known.offset {
                catch_up(app, broker, con, topic, known.offset + 1, offset).await?;
            }
        } else {
            // A new epoch: the history was lost or may have been (Redis restarted, failed
            // over, lost writes this node had seen, or the topic expired). Deliver the new
            // epoch from its first message; clients holding positions of the old one get
            // `recovered: false` when they rejoin.
            if known.offset > 0 {
                tracing::warn!(
                    ?topic,
                    old = %known,
                    new_epoch = %epoch,
                    "redis: topic history was lost or recreated; continuing in a new epoch"
                );
                // First what Redis kept of the old epoch that this node had not received yet
                // (published just before Redis went away): acknowledged, so delivered.
                let tail = previous_epoch_tail(broker, con, topic, known).await?;
                if !tail.is_empty() {
                    app.hub.go_live(topic, &known.epoch, known.offset);
                    append_entries(app, topic, known.offset + 1, tail);
                }
            }
            app.hub.go_live(topic, &epoch, 0);
            if offset > 0 {
                catch_up(app, broker, con, topic, 1, offset).await?;
            }
        }
    }
    Metrics::add(&app.metrics.redis_resubscriptions, topics.len() as u64);
    app.metrics
        .redis_subscribed_topics
        .store(topics.len() as i64, Relaxed);
    Ok(topics.len())
}

/// Appends stream entries `from..=to` of `topic` to the hub.
async fn catch_up(
    app: &App,
    broker: &RedisBroker,
    con: &mut ConnectionManager,
    topic: &str,
    from: u64,
    to: u64,
) -> Result<(), redis::RedisError> {
    let entries = broker.range(con, topic, from, Some(to)).await?;
    append_entries(app, topic, from, entries);
    Ok(())
}

/// Appends stream entries (read from offset `from` on) to the hub, each in the epoch its
/// position names.
fn append_entries(app: &App, topic: &str, from: u64, entries: Vec<(u64, u64, String)>) {
    let mut expected = from;
    for (offset, _, raw) in entries {
        let Ok(env) = serde_json::from_str::<Envelope>(&raw) else {
            continue;
        };
        let Some((epoch, _)) = env.position() else {
            continue;
        };
        if offset != expected {
            Metrics::add(&app.metrics.redis_gaps, 1);
            app.hub
                .append_remote_after_gap(topic, epoch, offset, env.broadcast(&app.node_id));
        } else {
            app.hub
                .append_remote(topic, Some((epoch, offset)), env.broadcast(&app.node_id));
        }
        expected = offset + 1;
    }
}

/// The messages of `known`'s epoch after `known.offset` that Redis kept when `topic` moved to a
/// new epoch (the old epoch's stream, kept beside the new one: see `redis/publish.lua`). Empty
/// when the topic's previous epoch is another one or its stream is gone.
async fn previous_epoch_tail(
    broker: &RedisBroker,
    con: &mut ConnectionManager,
    topic: &str,
    known: &hub::Position,
) -> Result<Vec<(u64, u64, String)>, redis::RedisError> {
    let (prev, tail): (Option<String>, redis::streams::StreamRangeReply) = redis::pipe()
        .cmd("HGET")
        .arg(broker.meta_key(topic))
        .arg("prev")
        .cmd("XRANGE")
        .arg(broker.keys.old_stream(topic))
        .arg(format!("{}-0", known.offset + 1))
        .arg("+")
        .query_async(con)
        .await?;
    if prev.as_deref() != Some(&*known.epoch) {
        return Ok(Vec::new());
    }
    Ok(entries(tail))
}

async fn on_message(
    app: &Arc<App>,
    broker: &RedisBroker,
    con: &mut ConnectionManager,
    msg: redis::Msg,
) {
    let channel = msg.get_channel_name();
    if channel == broker.node_channel {
        on_routed(app, broker, msg.get_payload_bytes());
        return;
    }
    let Some(topic) = broker.keys.topic_of(channel) else {
        return;
    };
    let payload = msg.get_payload_bytes();
    let env = match Envelope::decode(payload) {
        Ok(e) => e,
        Err(e) => {
            Metrics::add(&app.metrics.redis_bad_messages, 1);
            tracing::debug!(?topic, error = ?e.to_string(), "redis: message is not {{\"event\", \"payload\"}} JSON; dropped");
            return;
        }
    };
    let position = env.position();
    let message = env.broadcast(&app.node_id);
    match app.hub.append_remote(topic, position, message) {
        RemoteAppend::Gap(from) => {
            let Some((epoch, offset)) = position else {
                return;
            };
            // Fill the gap from the stream (it includes this message), then go on.
            if catch_up(app, broker, con, topic, from, offset)
                .await
                .is_err()
                || app.hub.append_remote(topic, position, message) == RemoteAppend::Gap(from)
            {
                Metrics::add(&app.metrics.redis_gaps, 1);
                app.hub
                    .append_remote_after_gap(topic, epoch, offset, message);
            }
        }
        RemoteAppend::Appended | RemoteAppend::Duplicate | RemoteAppend::NotLive => {}
    }
}

/// A LongPoll request for one of our sessions, or the answer to one we forwarded.
fn on_routed(app: &Arc<App>, broker: &RedisBroker, payload: &[u8]) {
    let Ok(m) = serde_json::from_slice::<Routed>(payload) else {
        return;
    };
    if m.t == "rep" {
        let tx = broker
            .replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&m.id);
        if let (Some(tx), Some(body)) = (tx, m.body) {
            let _ = tx.send(body);
        }
        return;
    }
    // A request: serve it like a local one (a GET may be held), then answer the sender, on
    // its node channel only.
    if !m.from.starts_with(&broker.keys.node_channel("")) {
        return;
    }
    let app = app.clone();
    let commands = broker.commands_now();
    app.tracker.clone().spawn(async move {
        let answer = crate::transport::longpoll::serve_forwarded(
            app,
            &m.token,
            m.body.as_deref().map(str::as_bytes),
        )
        .await;
        let reply = Routed {
            t: "rep".into(),
            id: m.id,
            from: String::new(),
            token: String::new(),
            body: Some(String::from_utf8_lossy(&answer).into_owned()),
        };
        if let (Some(mut con), Ok(text)) = (commands, serde_json::to_string(&reply)) {
            let _: Result<u64, _> = redis::cmd("PUBLISH")
                .arg(&m.from)
                .arg(text)
                .query_async(&mut con)
                .await;
        }
    });
}

/// Completes a batch of joins (at most [`JOIN_BATCH`]) in three round trips whatever its size:
/// one SUBSCRIBE for every topic not yet live, one pipeline reading their positions, one
/// pipeline reading the history the joins need. Nothing else runs on this task meanwhile, so
/// messages arriving on new subscriptions wait in the connection's buffer: no gap, no duplicate
/// at the seam. An `Err` means the subscriber connection failed (every join is answered either
/// way).
async fn on_joins(
    app: &App,
    broker: &RedisBroker,
    sink: &mut redis::aio::PubSubSink,
    con: &mut ConnectionManager,
    batch: Vec<JoinRequest>,
) -> Result<(), String> {
    const UNAVAILABLE: &str = "broker unavailable";
    // 1. Subscribe every topic that is not live yet, in one command.
    let mut new_topics: Vec<&str> = Vec::new();
    for req in &batch {
        if req.started.is_none()
            && !new_topics.contains(&req.topic.as_str())
            && !app.hub.is_live(&req.topic)
        {
            new_topics.push(&req.topic);
        }
    }
    let mut connection_error = None;
    let mut failed_topics: Vec<String> = Vec::new();
    if !new_topics.is_empty() {
        let channels: Vec<String> = new_topics.iter().map(|t| broker.channel(t)).collect();
        match tokio::time::timeout(SUBSCRIBER_COMMAND_TIMEOUT, sink.subscribe(channels)).await {
            Ok(Ok(())) => {
                app.metrics
                    .redis_subscribed_topics
                    .fetch_add(new_topics.len() as i64, Relaxed);
                // 2. Their positions, in one pipeline.
                let mut pipe = redis::pipe();
                pipe.load_script(&broker.position_script).ignore();
                let seen: Vec<_> = new_topics
                    .iter()
                    .map(|t| app.hub.known_position(t))
                    .collect();
                let invocations: Vec<_> = new_topics
                    .iter()
                    .zip(&seen)
                    .map(|(t, seen)| broker.position_invocation(t, seen.as_ref()))
                    .collect();
                for i in &invocations {
                    pipe.invoke_script(i);
                }
                let positions: Result<Vec<(String, u64)>, _> = pipe.query_async(con).await;
                match positions {
                    Ok(positions) if positions.len() == new_topics.len() => {
                        for (t, (epoch, offset)) in new_topics.iter().zip(positions) {
                            app.hub.go_live(t, &epoch, offset);
                        }
                    }
                    _ => failed_topics = new_topics.iter().map(|t| t.to_string()).collect(),
                }
            }
            Ok(Err(e)) => connection_error = Some(format!("subscribe failed: {e}")),
            Err(_) => connection_error = Some("subscribe timed out".to_string()),
        }
    }
    if connection_error.is_some() {
        for req in batch {
            (req.done)(Err(UNAVAILABLE.into()));
        }
        return Err(connection_error.unwrap_or_default());
    }
    // 3. Join each at the live end; those that need history wait for one pipeline of XRANGEs.
    struct NeedsHistory {
        topic: String,
        sub: hub::Subscription,
        position: hub::Position,
        since: u64,
        done: Box<dyn FnOnce(Result<Joined, String>) + Send>,
    }
    let mut needs = Vec::new();
    for req in batch {
        let JoinRequest {
            topic,
            since,
            conn_handle,
            started,
            done,
        } = req;
        let (sub, position, since_offset) = match started {
            Some(s) => s,
            None if failed_topics.contains(&topic) => {
                done(Err(UNAVAILABLE.into()));
                continue;
            }
            None => match app.hub.join_live(&topic, conn_handle, since.as_deref()) {
                LiveJoin::Done(sub, info) => {
                    done(Ok((sub, info, Vec::new())));
                    continue;
                }
                LiveJoin::NotLive => {
                    done(Err(UNAVAILABLE.into()));
                    continue;
                }
                LiveJoin::NeedsHistory(sub, position, since_offset) => {
                    (sub, position, since_offset)
                }
            },
        };
        needs.push(NeedsHistory {
            topic,
            sub,
            position,
            since: since_offset,
            done,
        });
    }
    if needs.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for n in &needs {
        pipe.cmd("XRANGE")
            .arg(broker.stream_key(&n.topic))
            .arg(format!("{}-0", n.since + 1))
            .arg(format!("{}-0", n.position.offset));
    }
    let ranges: Option<Vec<redis::streams::StreamRangeReply>> = pipe
        .query_async(con)
        .await
        .ok()
        .filter(|r: &Vec<_>| r.len() == needs.len());
    let mut ranges = ranges.map(Vec::into_iter);
    for n in needs {
        // A history that cannot be read is not recovered (never a silent skip).
        let recovered = ranges
            .as_mut()
            .and_then(Iterator::next)
            .map(entries)
            .and_then(|entries| {
                replay(
                    &n.topic,
                    &entries,
                    n.since,
                    n.position.offset,
                    broker.history.max_age_secs,
                )
            });
        let info = |recovered| JoinInfo {
            position: n.position.to_string(),
            recovered: Some(recovered),
        };
        (n.done)(Ok(match recovered {
            Some(frames) => (n.sub, info(true), frames),
            None => (n.sub, info(false), Vec::new()),
        }))
    }
    Ok(())
}

/// The replay frames for offsets `(since, until]`, or `None` when the stream no longer has
/// all of them.
fn replay(
    topic: &str,
    entries: &[(u64, u64, String)],
    since: u64,
    until: u64,
    max_age_secs: u64,
) -> Option<Vec<Vec<u8>>> {
    let oldest_allowed = now_ms().saturating_sub(max_age_secs * 1000);
    if entries.len() as u64 != until - since {
        return None;
    }
    let mut frames = Vec::with_capacity(entries.len());
    for (i, (offset, ms, raw)) in entries.iter().enumerate() {
        if *offset != since + 1 + i as u64 || *ms < oldest_allowed {
            return None;
        }
        let env: Envelope = serde_json::from_str(raw).ok()?;
        let mut f = Vec::with_capacity(raw.len() + topic.len() + 16);
        protocol::push_text_frame(
            &mut f,
            None,
            env.position.as_deref(),
            topic,
            &env.event,
            env.payload.get().as_bytes(),
        );
        frames.push(f);
    }
    Some(frames)
}

#[cfg(test)]
mod tests {
    use super::{Envelope, Keys};
    use std::collections::HashMap;

    /// Found by the fuzz target `redis_envelope`: a message whose `exclude` (or `position`)
    /// held a JSON escape could not be borrowed and was dropped whole.
    #[test]
    fn escaped_strings_in_a_channel_message_are_decoded() {
        let raw = br#"{"position":"e\u0031:7","event":"x","payload":1,"exclude":"n\/1.5"}"#;
        let env = Envelope::decode(raw).expect("decodes");
        assert_eq!(env.position(), Some(("e1", 7)));
        assert_eq!(env.broadcast("n/1").exclude, 5);
    }

    /// Topics that look like other topics' keys or like the nodes' own names.
    fn hostile_topics(nodes: &[&str]) -> Vec<String> {
        let mut t: Vec<String> = [
            "",
            "a",
            "a}:m",
            "a}:s",
            "a}:p",
            "a}:m{b",
            "{a}:m",
            "{a",
            "}",
            "{",
            "}:m",
            ":m",
            "presence:nodes",
            "nodes",
            "node:",
            ".internal:",
            ".internal:node:x",
            "internal:",
            "pushgate:",
            "pushgate.internal:node:x",
            "room:lobby",
            "room:lobby}:s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for n in nodes {
            t.push(format!("node:{n}"));
            t.push(format!("presence:node:{n}"));
            t.push(format!(".internal:node:{n}"));
        }
        t.sort();
        t.dedup();
        t
    }

    #[test]
    fn no_topic_reaches_another_topic_s_keys_or_the_nodes_own() {
        let nodes = ["0badc0de", "deadbeef", "", "x}:m"];
        for (prefix, internal) in [
            ("pushgate:", "pushgate.internal:"),
            ("app1:", "app1.internal:"),
            ("internal:app:", "app-internal:"),
        ] {
            let k = Keys::new(prefix, internal);
            // Keys and channels are separate namespaces in Redis; each must be injective.
            let mut keys: HashMap<String, String> = HashMap::new();
            let mut channels: HashMap<String, String> = HashMap::new();
            let add = |map: &mut HashMap<String, String>, name: String, what: String| {
                if let Some(other) = map.insert(name.clone(), what.clone()) {
                    panic!("{name:?} is both {other} and {what}");
                }
            };
            for n in nodes {
                add(&mut keys, k.node_alive(n), format!("node_alive({n})"));
                add(&mut keys, k.node_topics(n), format!("node_topics({n})"));
                add(
                    &mut channels,
                    k.node_channel(n),
                    format!("node_channel({n})"),
                );
            }
            add(&mut keys, k.nodes(), "nodes".into());
            for name in keys.keys().chain(channels.keys()) {
                assert!(!name.starts_with(prefix), "{name:?} is under {prefix:?}");
            }
            for t in hostile_topics(&nodes) {
                add(&mut keys, k.meta(&t), format!("meta({t})"));
                add(&mut keys, k.stream(&t), format!("stream({t})"));
                add(&mut keys, k.old_stream(&t), format!("old_stream({t})"));
                add(&mut keys, k.presence(&t), format!("presence({t})"));
                add(&mut channels, k.channel(&t), format!("channel({t})"));
                assert_eq!(k.topic_of(&k.channel(&t)), Some(t.as_str()));
            }
            assert_eq!(k.channel("room:lobby"), format!("{prefix}room:lobby"));
            assert_eq!(k.stream("room:lobby"), format!("{prefix}{{room:lobby}}:s"));
        }
    }
}
