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

use super::{JoinError, JoinRequest, Joined, LongPollRelay, Message, PublishError};
use crate::config::HistoryConfig;
use crate::hub::{self, Hub, JoinInfo, LiveJoin, RemoteAppend};
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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
/// Reconnect backoff: the first wait after a failed connection; it doubles up to
/// [`BACKOFF_CAP`], each wait jittered by up to [`BACKOFF_JITTER`] of itself.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest reconnect backoff (before jitter).
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The largest share of a backoff added as random jitter (so nodes that lost the same Redis do
/// not all come back at the same instant).
const BACKOFF_JITTER: f64 = 0.5;
/// How often the subscriber connection is pinged, so that a silent Redis turns `/readyz` red
/// within a couple of seconds.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How long a ping (and, with Sentinel, a `ROLE` check) may take before the connection is
/// treated as dead.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for the sentinels to name the master.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the subscriber side to connect (master, `INFO`, pub/sub and command
/// connections) before the attempt counts as failed and backs off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The command connection's connect timeout and per-command response timeout: a publish fails
/// (HTTP 503) within this rather than hanging on a silent Redis.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries of a command connection's reconnect before the command fails.
const COMMAND_RETRIES: usize = 1;
/// While a relayed LongPoll request waits for its answer, how often this node checks that the
/// owner still listens (a node that stops may drop a request it received).
const RELAY_LISTENER_CHECK: Duration = Duration::from_secs(1);
/// Longest wait for one subscriber-connection command (SUBSCRIBE/UNSUBSCRIBE); past it the
/// connection is treated as dead, so a stalled Redis never stalls the node.
const SUBSCRIBER_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest resubscription and catch-up after a reconnect before trying again.
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the Redis broker cannot deliver messages from other nodes now: `/readyz` answers 503
/// with this as its reason (and the log says it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkDown {
    /// Not connected yet since the start.
    #[error("redis: connecting")]
    Connecting,
    #[error("redis: cannot connect: {0}")]
    CannotConnect(String),
    #[error("redis: connect timed out")]
    ConnectTimedOut,
    #[error("redis: resubscribe failed: {0}")]
    ResubscribeFailed(String),
    #[error("redis: resubscribe timed out")]
    ResubscribeTimedOut,
    #[error("redis: subscriber connection lost")]
    SubscriberLost,
    #[error("redis: subscribe failed: {0}")]
    SubscribeFailed(String),
    #[error("redis: subscribe timed out")]
    SubscribeTimedOut,
    #[error("redis: unsubscribe failed: {0}")]
    UnsubscribeFailed(String),
    #[error("redis: unsubscribe timed out")]
    UnsubscribeTimedOut,
    #[error("redis: ping failed: {0}")]
    PingFailed(String),
    #[error("redis: ping timed out")]
    PingTimedOut,
    /// A command on the command connection (a join's history, a gap's catch-up) timed out or
    /// lost its connection: Redis is as unreachable as a failed ping would say.
    #[error("redis: command failed: {0}")]
    CommandFailed(String),
    /// With Sentinel: the server was demoted to a replica.
    #[error("redis: the server is no longer the master")]
    NotMaster,
}

/// Why the Redis broker could not be set up from `[redis]`.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("redis.tls_ca_file: {0}")]
    CaFile(std::io::Error),
    #[error(transparent)]
    Client(#[from] redis::RedisError),
    /// A `redis.sentinels` address that is not `host:port`.
    #[error(transparent)]
    Sentinel(#[from] crate::config::BadSentinelAddress),
}

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

    /// `redis.prefix`, which every topic's keys start with (`redis/reap.lua` builds presence
    /// hash names from it).
    pub fn topic_prefix(&self) -> &str {
        &self.topic
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
    status: Mutex<Result<(), LinkDown>>,
    /// This node's channel, where other nodes send LongPoll requests for our sessions and
    /// answers to the requests we forwarded.
    node_channel: String,
    /// The transport's handler for requests relayed to this node's LongPoll sessions
    /// ([`Broker::serve_longpoll_relays`](super::Broker::serve_longpoll_relays)).
    longpoll_relay: std::sync::OnceLock<Arc<dyn LongPollRelay>>,
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

/// A LongPoll request or answer travelling between nodes, on the receiving node's channel.
///
/// The JSON is pinned (nodes of other versions may share the Redis): an object whose `t` is
/// `"req"` or `"rep"`, then `id`, then (requests) `from` and `token`, then `body` when there is
/// one; empty strings and absent bodies are left out, and a missing field reads as empty.
#[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
#[serde(tag = "t")]
enum Routed {
    /// A request for one of the receiving node's sessions.
    #[serde(rename = "req")]
    Request {
        id: u64,
        /// The channel of the node to answer.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        from: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        token: String,
        /// The POST body (absent for a GET).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
    },
    /// The answer to a request the receiving node relayed.
    #[serde(rename = "rep")]
    Reply {
        id: u64,
        /// The JSON answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
    },
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
    ) -> Result<RedisBroker, SetupError> {
        let client = if config.tls_ca_file.is_empty() {
            redis::Client::open(config.url.as_str())
        } else {
            let root = std::fs::read(&config.tls_ca_file).map_err(SetupError::CaFile)?;
            redis::Client::build_with_tls(
                config.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                },
            )
        }?;
        let target = if config.sentinels.is_empty() {
            Target::Direct(client)
        } else {
            let sentinels = config
                .sentinels
                .iter()
                .map(|a| crate::config::sentinel_url(a, &config.sentinel_password))
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
            )?;
            Target::Sentinel(tokio::sync::Mutex::new(sentinel))
        };
        let (tx, rx) = mpsc::channel(JOIN_QUEUE);
        Ok(RedisBroker {
            node_channel: keys.node_channel(node_id),
            longpoll_relay: std::sync::OnceLock::new(),
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
            status: Mutex::new(Err(LinkDown::Connecting)),
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

    fn set_status(&self, s: Result<(), LinkDown>) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// `Err(reason)` while the subscriber connection is down.
    pub fn readiness(&self) -> Result<(), LinkDown> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Registers the handler for LongPoll requests relayed to this node (the first one stays).
    pub fn set_longpoll_relay(&self, relay: Arc<dyn LongPollRelay>) {
        let _ = self.longpoll_relay.set(relay);
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
                tokio::time::timeout(SENTINEL_TIMEOUT, s.async_get_client())
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
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(COMMAND_RETRIES);
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
        let request = Routed::Request {
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
        // Wait for the answer, checking every [`RELAY_LISTENER_CHECK`] that the owner still
        // listens: a node that stops may drop a request it received, and the client should not
        // wait long.
        let deadline = tokio::time::Instant::now() + wait;
        tokio::pin!(rx);
        loop {
            let step = (tokio::time::Instant::now() + RELAY_LISTENER_CHECK).min(deadline);
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
                (req.done)(Err(JoinError::TooManyInProgress(self.per_connection)));
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
            (req.done)(Err(JoinError::Busy));
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

/// What the broker task needs from the node.
#[derive(Clone)]
pub struct Context {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// This node's id (to find the connection a message's `exclude` names).
    pub node_id: String,
    /// Cancelled when the node starts to shut down: the task ends.
    pub shutdown: CancellationToken,
    /// Where relayed LongPoll requests are served.
    pub tracker: TaskTracker,
}

/// The subscriber side while it is up: the pub/sub connection, split, and a command
/// connection to the same master.
struct Link {
    sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
    con: ConnectionManager,
}

/// Runs the subscriber side until shutdown: connect, resubscribe, catch up, serve; when the
/// link drops, back off and start again.
pub async fn run(ctx: Context, broker: Arc<RedisBroker>) {
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
        if ctx.shutdown.is_cancelled() {
            return;
        }
        if !first && !back_off(&ctx.shutdown, &mut backoff).await {
            return;
        }
        first = false;
        let Some(mut link) = link_up(&ctx, &broker).await else {
            continue;
        };
        broker.set_status(Ok(()));
        ctx.metrics.redis_connected.store(1, Relaxed);
        backoff = BACKOFF_FIRST;
        tracing::info!("redis: subscriber connected");
        let Some(reason) = serve(&ctx, &broker, &mut link, &mut joins).await else {
            return; // shutdown
        };
        link_lost(&ctx, &broker, reason);
    }
}

/// Waits out `backoff` (plus jitter) and doubles it up to the cap; `false` when shutdown
/// came first.
async fn back_off(shutdown: &CancellationToken, backoff: &mut Duration) -> bool {
    let jitter = backoff.mul_f64(rand::random::<f64>() * BACKOFF_JITTER);
    tokio::select! {
        _ = shutdown.cancelled() => return false,
        _ = tokio::time::sleep(*backoff + jitter) => {}
    }
    *backoff = (*backoff * 2).min(BACKOFF_CAP);
    true
}

/// Connects the subscriber side, loads the publish script, resubscribes every topic with
/// local subscribers and catches each up. `None` (the status says why) when any step failed.
async fn link_up(ctx: &Context, broker: &RedisBroker) -> Option<Link> {
    let (pubsub, mut con) = match tokio::time::timeout(CONNECT_TIMEOUT, connect(broker)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            broker.set_status(Err(LinkDown::CannotConnect(e.to_string())));
            tracing::warn!(error = %e, "redis connect failed");
            return None;
        }
        Err(_) => {
            broker.set_status(Err(LinkDown::ConnectTimedOut));
            tracing::warn!("redis connect timed out");
            return None;
        }
    };
    load_publish_script(&mut con).await;
    let (mut sink, stream) = pubsub.split();
    match tokio::time::timeout(
        RESUBSCRIBE_TIMEOUT,
        resubscribe(ctx, broker, &mut sink, &mut con),
    )
    .await
    {
        Ok(Ok(n)) => {
            if n > 0 {
                tracing::info!(topics = n, "redis: resubscribed");
            }
        }
        Ok(Err(e)) => {
            broker.set_status(Err(LinkDown::ResubscribeFailed(e.to_string())));
            tracing::warn!(error = %e, "redis resubscribe failed");
            ctx.hub.mark_all_down();
            return None;
        }
        Err(_) => {
            broker.set_status(Err(LinkDown::ResubscribeTimedOut));
            tracing::warn!("redis resubscribe timed out");
            ctx.hub.mark_all_down();
            return None;
        }
    }
    Some(Link { sink, stream, con })
}

/// The pub/sub connection and the command connection to the master (with Sentinel, the one
/// the sentinels name now), noting which Redis process it is.
async fn connect(
    broker: &RedisBroker,
) -> Result<(redis::aio::PubSub, ConnectionManager), redis::RedisError> {
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
    Ok((pubsub, con))
}

/// Loads the publish script so backends can call it by SHA (EVALSHA) at once.
async fn load_publish_script(con: &mut ConnectionManager) {
    let loaded: Result<String, _> = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(PUBLISH_SCRIPT)
        .query_async(con)
        .await;
    match loaded {
        Ok(sha) => {
            tracing::info!(sha = %sha, "redis: publish script loaded; backends may call it with EVALSHA (see README)")
        }
        Err(e) => tracing::warn!(error = %e, "redis: could not load the publish script"),
    }
}

/// Serves the link until it fails (its reason) or the node shuts down (`None`): messages,
/// joins, idle topics, pings.
async fn serve(
    ctx: &Context,
    broker: &RedisBroker,
    link: &mut Link,
    joins: &mut mpsc::Receiver<JoinRequest>,
) -> Option<LinkDown> {
    // The ping is due every PING_EVERY whatever else arrives: it is checked before each step,
    // so a steady stream of joins or messages (each of which may wait out a command timeout
    // on a silent Redis) never holds it back.
    let mut ping_due = tokio::time::Instant::now() + PING_EVERY;
    let failed = loop {
        if tokio::time::Instant::now() >= ping_due {
            if let Err(e) = check_link(broker, link).await {
                break e;
            }
            ping_due = tokio::time::Instant::now() + PING_EVERY;
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return None,
            msg = link.stream.next() => match msg {
                Some(m) => if let Err(e) = on_message(ctx, broker, &mut link.con, m).await {
                    break e;
                },
                None => break LinkDown::SubscriberLost,
            },
            Some(req) = joins.recv() => {
                let batch = join_batch(req, joins);
                if let Err(e) = on_joins(ctx, broker, &mut link.sink, &mut link.con, batch).await {
                    break e;
                }
            }
            _ = broker.idle.notified() => {
                if let Err(e) = unsubscribe_idle(ctx, broker, &mut link.sink).await {
                    break e;
                }
            }
            _ = tokio::time::sleep_until(ping_due) => {}
        }
    };
    Some(failed)
}

/// `first` and the joins waiting behind it, at most [`JOIN_BATCH`].
fn join_batch(first: JoinRequest, joins: &mut mpsc::Receiver<JoinRequest>) -> Vec<JoinRequest> {
    let mut batch = Vec::with_capacity(JOIN_BATCH.min(joins.len() + 1));
    batch.push(first);
    while batch.len() < JOIN_BATCH {
        match joins.try_recv() {
            Ok(req) => batch.push(req),
            Err(_) => break,
        }
    }
    batch
}

/// Unsubscribes the topics that lost their last local subscriber, [`SUBSCRIBE_BATCH`] per
/// command.
async fn unsubscribe_idle(
    ctx: &Context,
    broker: &RedisBroker,
    sink: &mut redis::aio::PubSubSink,
) -> Result<(), LinkDown> {
    let idle = ctx.hub.take_idle_topics();
    ctx.metrics
        .redis_subscribed_topics
        .fetch_sub(idle.len() as i64, Relaxed);
    let mut failed = None;
    for chunk in idle.chunks(SUBSCRIBE_BATCH) {
        let channels: Vec<String> = chunk.iter().map(|t| broker.channel(t)).collect();
        match tokio::time::timeout(SUBSCRIBER_COMMAND_TIMEOUT, sink.unsubscribe(channels)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(LinkDown::UnsubscribeFailed(e.to_string())),
            Err(_) => failed = Some(LinkDown::UnsubscribeTimedOut),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Pings the subscriber connection; with Sentinel, also checks that the server is still the
/// master (a master demoted to replica, back after a failover, may keep our connections:
/// leave it for the new master).
async fn check_link(broker: &RedisBroker, link: &mut Link) -> Result<(), LinkDown> {
    match tokio::time::timeout(PING_TIMEOUT, link.sink.ping::<redis::Value>()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(LinkDown::PingFailed(e.to_string())),
        Err(_) => return Err(LinkDown::PingTimedOut),
    }
    if broker.sentinel() {
        let role = tokio::time::timeout(
            PING_TIMEOUT,
            redis::cmd("ROLE").query_async::<redis::Value>(&mut link.con),
        )
        .await;
        if !is_master(&role) {
            return Err(LinkDown::NotMaster);
        }
    }
    Ok(())
}

/// Whether a command's error says Redis cannot be reached (timed out, connection refused or
/// dropped), as opposed to an answer it gave (a script or type error): the link is then down.
fn unreachable(e: &redis::RedisError) -> bool {
    e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// [`LinkDown::CommandFailed`] when `e` says Redis cannot be reached.
fn link_down_by(e: &redis::RedisError) -> Option<LinkDown> {
    unreachable(e).then(|| LinkDown::CommandFailed(e.to_string()))
}

/// The link dropped: `/readyz` turns 503 with `reason`, relayed LongPoll requests waiting for
/// an answer on it give up, and every topic is marked not live until resubscribed.
fn link_lost(ctx: &Context, broker: &RedisBroker, reason: LinkDown) {
    tracing::warn!(reason = ?reason.to_string(), "redis: subscriber down; reconnecting");
    broker.set_status(Err(reason));
    broker.link_losses.send_modify(|n| *n += 1);
    ctx.metrics.redis_connected.store(0, Relaxed);
    Metrics::add(&ctx.metrics.redis_reconnects, 1);
    ctx.metrics.redis_subscribed_topics.store(0, Relaxed);
    ctx.hub.mark_all_down();
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
    ctx: &Context,
    broker: &RedisBroker,
    sink: &mut redis::aio::PubSubSink,
    con: &mut ConnectionManager,
) -> Result<usize, redis::RedisError> {
    sink.subscribe(&broker.node_channel).await?;
    let topics = ctx.hub.live_topics();
    for chunk in topics.chunks(SUBSCRIBE_BATCH) {
        let channels: Vec<String> = chunk.iter().map(|(t, _)| broker.channel(t)).collect();
        sink.subscribe(channels).await?;
    }
    for (topic, known) in &topics {
        let seen = (known.offset > 0).then_some(known);
        let (epoch, offset) = broker.position(con, topic, seen).await?;
        if epoch == *known.epoch {
            ctx.hub.go_live(topic, &epoch, known.offset);
            if offset > known.offset {
                catch_up(ctx, broker, con, topic, known.offset + 1, offset).await?;
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
                    ctx.hub.go_live(topic, &known.epoch, known.offset);
                    append_entries(ctx, topic, known.offset + 1, tail);
                }
            }
            ctx.hub.go_live(topic, &epoch, 0);
            if offset > 0 {
                catch_up(ctx, broker, con, topic, 1, offset).await?;
            }
        }
    }
    Metrics::add(&ctx.metrics.redis_resubscriptions, topics.len() as u64);
    ctx.metrics
        .redis_subscribed_topics
        .store(topics.len() as i64, Relaxed);
    Ok(topics.len())
}

/// Appends stream entries `from..=to` of `topic` to the hub.
async fn catch_up(
    ctx: &Context,
    broker: &RedisBroker,
    con: &mut ConnectionManager,
    topic: &str,
    from: u64,
    to: u64,
) -> Result<(), redis::RedisError> {
    let entries = broker.range(con, topic, from, Some(to)).await?;
    append_entries(ctx, topic, from, entries);
    Ok(())
}

/// Appends stream entries (read from offset `from` on) to the hub, each in the epoch its
/// position names.
fn append_entries(ctx: &Context, topic: &str, from: u64, entries: Vec<(u64, u64, String)>) {
    let mut expected = from;
    for (offset, _, raw) in entries {
        let Ok(env) = serde_json::from_str::<Envelope>(&raw) else {
            continue;
        };
        let Some((epoch, _)) = env.position() else {
            continue;
        };
        if offset != expected {
            Metrics::add(&ctx.metrics.redis_gaps, 1);
            ctx.hub
                .append_remote_after_gap(topic, epoch, offset, env.broadcast(&ctx.node_id));
        } else {
            ctx.hub
                .append_remote(topic, Some((epoch, offset)), env.broadcast(&ctx.node_id));
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
    ctx: &Context,
    broker: &RedisBroker,
    con: &mut ConnectionManager,
    msg: redis::Msg,
) -> Result<(), LinkDown> {
    let channel = msg.get_channel_name();
    if channel == broker.node_channel {
        on_routed(ctx, broker, msg.get_payload_bytes());
        return Ok(());
    }
    let Some(topic) = broker.keys.topic_of(channel) else {
        return Ok(());
    };
    let payload = msg.get_payload_bytes();
    let env = match Envelope::decode(payload) {
        Ok(e) => e,
        Err(e) => {
            Metrics::add(&ctx.metrics.redis_bad_messages, 1);
            tracing::debug!(?topic, error = ?e.to_string(), "redis: message is not {{\"event\", \"payload\"}} JSON; dropped");
            return Ok(());
        }
    };
    let position = env.position();
    let message = env.broadcast(&ctx.node_id);
    match ctx.hub.append_remote(topic, position, message) {
        RemoteAppend::Gap(from) => {
            let Some((epoch, offset)) = position else {
                return Ok(());
            };
            // Fill the gap from the stream (it includes this message), then go on. When Redis
            // cannot be reached, the link is down: every topic goes down and its resubscription
            // catches up from here, rather than this node leaving a hole.
            let filled = match catch_up(ctx, broker, con, topic, from, offset).await {
                Ok(()) => {
                    ctx.hub.append_remote(topic, position, message) != RemoteAppend::Gap(from)
                }
                Err(e) => {
                    if let Some(down) = link_down_by(&e) {
                        return Err(down);
                    }
                    false
                }
            };
            if !filled {
                Metrics::add(&ctx.metrics.redis_gaps, 1);
                ctx.hub
                    .append_remote_after_gap(topic, epoch, offset, message);
            }
        }
        RemoteAppend::Appended | RemoteAppend::Duplicate | RemoteAppend::NotLive => {}
    }
    Ok(())
}

/// A LongPoll request for one of our sessions, or the answer to one we forwarded.
fn on_routed(ctx: &Context, broker: &RedisBroker, payload: &[u8]) {
    match serde_json::from_slice::<Routed>(payload) {
        Ok(Routed::Reply { id, body }) => {
            let tx = broker
                .replies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            if let (Some(tx), Some(body)) = (tx, body) {
                let _ = tx.send(body);
            }
        }
        Ok(Routed::Request {
            id,
            from,
            token,
            body,
        }) => serve_relayed(ctx, broker, id, from, token, body),
        Err(_) => {}
    }
}

/// Serves a relayed request like a local one, through the transport's handler (a GET may be
/// held), then answers the sender, on its node channel only.
fn serve_relayed(
    ctx: &Context,
    broker: &RedisBroker,
    id: u64,
    from: String,
    token: String,
    body: Option<String>,
) {
    if !from.starts_with(&broker.keys.node_channel("")) {
        return;
    }
    let Some(relay) = broker.longpoll_relay.get().cloned() else {
        return; // no transport serves LongPoll here: the sender gives up after its wait
    };
    let commands = broker.commands_now();
    ctx.tracker.spawn(async move {
        let answer = relay.serve(token, body).await;
        let reply = Routed::Reply {
            id,
            body: Some(String::from_utf8_lossy(&answer).into_owned()),
        };
        if let (Some(mut con), Ok(text)) = (commands, serde_json::to_string(&reply)) {
            let _: Result<u64, _> = redis::cmd("PUBLISH")
                .arg(&from)
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
    ctx: &Context,
    broker: &RedisBroker,
    sink: &mut redis::aio::PubSubSink,
    con: &mut ConnectionManager,
    batch: Vec<JoinRequest>,
) -> Result<(), LinkDown> {
    let new_topics = not_live(ctx, &batch);
    let failed_topics = match subscribe_new_topics(ctx, broker, sink, con, &new_topics).await {
        Ok(failed) => failed,
        Err(e) => {
            for req in batch {
                (req.done)(Err(JoinError::Unavailable));
            }
            return Err(e);
        }
    };
    let (mut needs, behind) = join_at_live_end(ctx, batch, &failed_topics.topics);
    // Once Redis could not be reached, the rest fail at once: each further step would wait out
    // its own timeout, and together they would hide the cut from `/readyz` for as long.
    let mut down = failed_topics.down;
    if !behind.is_empty() {
        match down {
            None => down = catch_up_then_join(ctx, broker, con, behind, &mut needs).await,
            Some(_) => behind
                .into_iter()
                .for_each(|b| (b.done)(Err(JoinError::Unavailable))),
        }
    }
    if !needs.is_empty() {
        match down {
            None => down = answer_with_history(broker, con, needs).await,
            Some(_) => needs
                .into_iter()
                .for_each(|n| (n.done)(Err(JoinError::Unavailable))),
        }
    }
    down.map_or(Ok(()), Err)
}

/// The topics whose positions could not be read (their joins fail as unavailable), and
/// whether that was because Redis could not be reached.
struct FailedTopics {
    topics: Vec<String>,
    down: Option<LinkDown>,
}

/// The topics of `batch` that are not live here yet (each once).
fn not_live<'a>(ctx: &Context, batch: &'a [JoinRequest]) -> Vec<&'a str> {
    let mut new_topics: Vec<&str> = Vec::new();
    for req in batch {
        if req.started.is_none()
            && !new_topics.contains(&req.topic.as_str())
            && !ctx.hub.is_live(&req.topic)
        {
            new_topics.push(&req.topic);
        }
    }
    new_topics
}

/// Steps 1 and 2 of [`on_joins`]: subscribes `new_topics` in one command, then reads their
/// positions in one pipeline and makes them live. Returns the topics whose positions could
/// not be read (their joins fail); `Err` when the subscriber connection failed.
async fn subscribe_new_topics(
    ctx: &Context,
    broker: &RedisBroker,
    sink: &mut redis::aio::PubSubSink,
    con: &mut ConnectionManager,
    new_topics: &[&str],
) -> Result<FailedTopics, LinkDown> {
    if new_topics.is_empty() {
        return Ok(FailedTopics {
            topics: Vec::new(),
            down: None,
        });
    }
    let channels: Vec<String> = new_topics.iter().map(|t| broker.channel(t)).collect();
    match tokio::time::timeout(SUBSCRIBER_COMMAND_TIMEOUT, sink.subscribe(channels)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(LinkDown::SubscribeFailed(e.to_string())),
        Err(_) => return Err(LinkDown::SubscribeTimedOut),
    }
    ctx.metrics
        .redis_subscribed_topics
        .fetch_add(new_topics.len() as i64, Relaxed);
    let mut pipe = redis::pipe();
    pipe.load_script(&broker.position_script).ignore();
    let seen: Vec<_> = new_topics
        .iter()
        .map(|t| ctx.hub.known_position(t))
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
    let all_failed = |down| FailedTopics {
        topics: new_topics.iter().map(|t| t.to_string()).collect(),
        down,
    };
    match positions {
        Ok(positions) if positions.len() == new_topics.len() => {
            for (t, (epoch, offset)) in new_topics.iter().zip(positions) {
                ctx.hub.go_live(t, &epoch, offset);
            }
            Ok(FailedTopics {
                topics: Vec::new(),
                down: None,
            })
        }
        Ok(_) => Ok(all_failed(None)),
        Err(e) => Ok(all_failed(link_down_by(&e))),
    }
}

/// A join subscribed at the live end whose client needs the gap `(since, position.offset]`
/// from the topic's stream.
struct NeedsHistory {
    topic: String,
    sub: hub::Subscription,
    position: hub::Position,
    since: u64,
    done: crate::session::JoinDone,
}

/// A join whose `since` is ahead of this node's position (see [`LiveJoin::Behind`]).
struct Behind {
    topic: String,
    since: Option<String>,
    conn_handle: Arc<hub::ConnHandle>,
    from: u64,
    to: u64,
    done: crate::session::JoinDone,
}

/// Step 3 of [`on_joins`]: joins each request at the live end, answering those that are done
/// (or failed); returns those that need history, and those whose client is ahead of this node.
fn join_at_live_end(
    ctx: &Context,
    batch: Vec<JoinRequest>,
    failed_topics: &[String],
) -> (Vec<NeedsHistory>, Vec<Behind>) {
    let mut needs = Vec::new();
    let mut behind = Vec::new();
    for req in batch {
        let JoinRequest {
            topic,
            since,
            conn_handle,
            started,
            done,
        } = req;
        let (sub, position, since_offset) = match started {
            Some(s) => (s.subscription, s.position, s.since_offset),
            None if failed_topics.contains(&topic) => {
                done(Err(JoinError::Unavailable));
                continue;
            }
            None => match ctx.hub.join_live(&topic, conn_handle, since.as_deref()) {
                LiveJoin::Behind {
                    conn_handle,
                    from,
                    to,
                } => {
                    behind.push(Behind {
                        topic,
                        since,
                        conn_handle,
                        from,
                        to,
                        done,
                    });
                    continue;
                }
                LiveJoin::Done(subscription, info) => {
                    done(Ok(Joined {
                        subscription,
                        info,
                        replay: Vec::new(),
                    }));
                    continue;
                }
                LiveJoin::NotLive => {
                    done(Err(JoinError::Unavailable));
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
    (needs, behind)
}

/// Step 4 of [`on_joins`]: for joins whose client has seen more than this node has received
/// (a message on its way here, or lost on the way), reads the missing offsets from the streams
/// in one pipeline and appends them as the live stream would have (every subscriber of the
/// topic gets them; the live copies, when they come, are duplicates and dropped), then joins.
/// A `since` that Redis does not reach either is not recovered; when Redis cannot be read, the
/// join fails as unavailable (phoenix.js joins again), and when it cannot be reached, the link
/// is down (returned).
async fn catch_up_then_join(
    ctx: &Context,
    broker: &RedisBroker,
    con: &mut ConnectionManager,
    behind: Vec<Behind>,
    needs: &mut Vec<NeedsHistory>,
) -> Option<LinkDown> {
    let mut pipe = redis::pipe();
    for b in &behind {
        pipe.cmd("XRANGE")
            .arg(broker.stream_key(&b.topic))
            .arg(format!("{}-0", b.from))
            .arg(format!("{}-0", b.to));
    }
    let (ranges, down) = read_ranges(pipe, con, behind.len()).await;
    let Some(ranges) = ranges else {
        // This node cannot tell now (Redis does not answer): the client tries again later
        // rather than hear `recovered: false` for what Redis may well hold.
        for b in behind {
            (b.done)(Err(JoinError::Unavailable));
        }
        return down;
    };
    for (b, range) in behind.into_iter().zip(ranges) {
        append_entries(ctx, &b.topic, b.from, entries(range));
        match ctx
            .hub
            .join_caught_up(&b.topic, b.conn_handle, b.since.as_deref())
        {
            LiveJoin::Done(subscription, info) => (b.done)(Ok(Joined {
                subscription,
                info,
                replay: Vec::new(),
            })),
            LiveJoin::NeedsHistory(sub, position, since) => needs.push(NeedsHistory {
                topic: b.topic,
                sub,
                position,
                since,
                done: b.done,
            }),
            LiveJoin::NotLive | LiveJoin::Behind { .. } => (b.done)(Err(JoinError::Unavailable)),
        }
    }
    None
}

/// Runs a pipeline of `n` XRANGEs: their replies, or `None` when it failed, with the link's
/// failure when Redis could not be reached.
async fn read_ranges(
    pipe: redis::Pipeline,
    con: &mut ConnectionManager,
    n: usize,
) -> (
    Option<Vec<redis::streams::StreamRangeReply>>,
    Option<LinkDown>,
) {
    match pipe
        .query_async::<Vec<redis::streams::StreamRangeReply>>(con)
        .await
    {
        Ok(r) if r.len() == n => (Some(r), None),
        Ok(_) => (None, None),
        Err(e) => (None, link_down_by(&e)),
    }
}

/// The last step of [`on_joins`]: reads every gap in one pipeline of XRANGEs and answers each
/// join with its replay (`recovered: true`), or `recovered: false` when the stream no longer
/// holds its history whole (never a silent skip). When Redis does not answer, the joins fail
/// as unavailable (phoenix.js joins again) rather than hear `recovered: false` for history
/// Redis may well hold; when it cannot be reached, the link is down (returned).
async fn answer_with_history(
    broker: &RedisBroker,
    con: &mut ConnectionManager,
    needs: Vec<NeedsHistory>,
) -> Option<LinkDown> {
    let mut pipe = redis::pipe();
    for n in &needs {
        pipe.cmd("XRANGE")
            .arg(broker.stream_key(&n.topic))
            .arg(format!("{}-0", n.since + 1))
            .arg(format!("{}-0", n.position.offset));
    }
    let (ranges, down) = read_ranges(pipe, con, needs.len()).await;
    let Some(ranges) = ranges else {
        for n in needs {
            (n.done)(Err(JoinError::Unavailable));
        }
        return down;
    };
    for (n, range) in needs.into_iter().zip(ranges) {
        let recovered = replay(
            &n.topic,
            &entries(range),
            n.since,
            n.position.offset,
            broker.history.max_age_secs,
        );
        let info = |recovered| JoinInfo {
            position: n.position.to_string(),
            recovered: Some(recovered),
        };
        let (info, replay) = match recovered {
            Some(frames) => (info(true), frames),
            None => (info(false), Vec::new()),
        };
        (n.done)(Ok(Joined {
            subscription: n.sub,
            info,
            replay,
        }))
    }
    None
}

/// Bytes a replayed frame adds to its stored message and topic (the Phoenix array's brackets,
/// quotes, commas and nulls), reserved so that building it does not grow the buffer.
const REPLAY_FRAME_OVERHEAD: usize = 16;

/// Milliseconds in a second (`history.max_age_secs` against stream entries' times in ms).
const MS_PER_SEC: u64 = 1000;

/// The replay frames for offsets `(since, until]`, or `None` when the stream no longer has
/// all of them.
fn replay(
    topic: &str,
    entries: &[(u64, u64, String)],
    since: u64,
    until: u64,
    max_age_secs: u64,
) -> Option<Vec<Vec<u8>>> {
    let oldest_allowed = now_ms().saturating_sub(max_age_secs * MS_PER_SEC);
    if entries.len() as u64 != until - since {
        return None;
    }
    let mut frames = Vec::with_capacity(entries.len());
    for (i, (offset, ms, raw)) in entries.iter().enumerate() {
        if *offset != since + 1 + i as u64 || *ms < oldest_allowed {
            return None;
        }
        let env: Envelope = serde_json::from_str(raw).ok()?;
        let mut f = Vec::with_capacity(raw.len() + topic.len() + REPLAY_FRAME_OVERHEAD);
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
    use super::{Envelope, Keys, Routed};
    use std::collections::HashMap;

    /// Nodes of other versions share the Redis: the JSON between nodes is pinned, byte for
    /// byte, to what the `Routed` struct with a `t: String` wrote and read.
    #[test]
    fn routed_messages_keep_their_wire_format() {
        let request = Routed::Request {
            id: 7,
            from: "pushgate.internal:node:0badc0de".into(),
            token: "lp0badc0de".into(),
            body: Some("[\"x\"]".into()),
        };
        let text = r#"{"t":"req","id":7,"from":"pushgate.internal:node:0badc0de","token":"lp0badc0de","body":"[\"x\"]"}"#;
        assert_eq!(serde_json::to_string(&request).unwrap(), text);
        assert_eq!(serde_json::from_str::<Routed>(text).unwrap(), request);
        let get = Routed::Request {
            id: 8,
            from: "n".into(),
            token: "t".into(),
            body: None,
        };
        assert_eq!(
            serde_json::to_string(&get).unwrap(),
            r#"{"t":"req","id":8,"from":"n","token":"t"}"#
        );
        let reply = Routed::Reply {
            id: 7,
            body: Some("{\"status\":200}".into()),
        };
        let text = r#"{"t":"rep","id":7,"body":"{\"status\":200}"}"#;
        assert_eq!(serde_json::to_string(&reply).unwrap(), text);
        assert_eq!(serde_json::from_str::<Routed>(text).unwrap(), reply);
        // What an older node reads and writes: empty fields left out, missing ones empty.
        assert_eq!(
            serde_json::from_str::<Routed>(r#"{"t":"req","id":9}"#).unwrap(),
            Routed::Request {
                id: 9,
                from: String::new(),
                token: String::new(),
                body: None
            }
        );
        assert!(serde_json::from_str::<Routed>(r#"{"id":9}"#).is_err());
    }

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
