//! The Redis broker: cross-node fanout through pub/sub, history in capped streams.
//!
//! Keys, for topic `T` and prefix `P` (default `pushgate:`), hash-tagged by topic so that a
//! move to Redis Cluster keeps a topic's keys in one slot:
//! - `P{T}:m`: hash with the topic's `epoch` and last `offset`;
//! - `P{T}:s`: stream of the last `history.size` messages, entry id `<offset>-0`;
//! - `PT`: the pub/sub channel. `redis/publish.lua` assigns the offset, appends to the stream,
//!   and publishes `{"position":"E:O","event":...,"payload":...}` atomically. A plain
//!   `PUBLISH PT {"event":...,"payload":...}` is delivered live, without a position.
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
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OnceCell, mpsc};

const PUBLISH_SCRIPT: &str = include_str!("../../redis/publish.lua");
const POSITION_SCRIPT: &str = include_str!("../../redis/position.lua");
/// Joins waiting for the broker task. A join beyond this gets an error reply and the client
/// rejoins on its schedule.
const JOIN_QUEUE: usize = 65_536;
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

/// Forwarded LongPoll requests waiting for the owner's answer, by request id.
type ReplySlots = Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<String>>>;

pub struct RedisBroker {
    client: redis::Client,
    prefix: String,
    history: HistoryConfig,
    publish_script: redis::Script,
    position_script: redis::Script,
    commands: OnceCell<ConnectionManager>,
    joins: mpsc::Sender<JoinRequest>,
    join_queue: Mutex<Option<mpsc::Receiver<JoinRequest>>>,
    /// Notified by the hub when a topic loses its last local subscriber.
    pub idle: Arc<Notify>,
    status: Mutex<Result<(), String>>,
    /// This node's channel, where other nodes send LongPoll requests for our sessions and
    /// answers to the requests we forwarded.
    node_channel: String,
    next_request: std::sync::atomic::AtomicU64,
    replies: ReplySlots,
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
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    position: Option<&'a str>,
    event: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    /// The sender a publish excludes ("send to others"), as `<node>.<connection>`.
    #[serde(default)]
    exclude: Option<&'a str>,
}

impl Envelope<'_> {
    /// The message for this node's hub (`node`: this node's id).
    fn broadcast(&self, node: &str) -> hub::Broadcast<'_> {
        hub::Broadcast {
            event: &self.event,
            payload: self.payload.get().as_bytes(),
            exclude: crate::session::local_exclude(self.exclude, node),
        }
    }
}

impl RedisBroker {
    /// Checks the URL; connects later (in [`run`] and on first publish).
    pub fn new(
        url: &str,
        prefix: &str,
        history: HistoryConfig,
        node_id: &str,
    ) -> Result<RedisBroker, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(JOIN_QUEUE);
        Ok(RedisBroker {
            client,
            prefix: prefix.to_string(),
            history,
            publish_script: redis::Script::new(PUBLISH_SCRIPT),
            position_script: redis::Script::new(POSITION_SCRIPT),
            commands: OnceCell::new(),
            joins: tx,
            join_queue: Mutex::new(Some(rx)),
            idle: Arc::new(Notify::new()),
            status: Mutex::new(Err("redis: connecting".into())),
            node_channel: format!("{prefix}node:{node_id}"),
            next_request: std::sync::atomic::AtomicU64::new(1),
            replies: Mutex::new(Default::default()),
        })
    }

    fn meta_key(&self, topic: &str) -> String {
        format!("{}{{{}}}:m", self.prefix, topic)
    }

    fn stream_key(&self, topic: &str) -> String {
        format!("{}{{{}}}:s", self.prefix, topic)
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}{}", self.prefix, topic)
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

    /// The key prefix (`redis.prefix`).
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The shared command connection.
    pub(crate) async fn commands(&self) -> Result<ConnectionManager, redis::RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        self.commands
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
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
                        == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
                {
                    return Err(PublishError::Rejected(e.to_string()));
                }
                Err(e) => return Err(PublishError::Unavailable(e.to_string())),
            }
        }
        Ok(out)
    }

    /// Sends a LongPoll request to the node that owns the session and waits for its answer.
    /// `None` when that node is not listening (gone) or does not answer within `wait`.
    pub async fn forward_longpoll(
        &self,
        owner: &str,
        token: &str,
        post_body: Option<&[u8]>,
        wait: Duration,
    ) -> Option<String> {
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
            return None;
        };
        let Ok(mut con) = self.commands().await else {
            return None;
        };
        let receivers: Result<u64, _> = redis::cmd("PUBLISH")
            .arg(format!("{}node:{owner}", self.prefix))
            .arg(text)
            .query_async(&mut con)
            .await;
        if !matches!(receivers, Ok(n) if n > 0) {
            return None; // the owner is gone: the client reconnects and rejoins
        }
        // Wait for the answer, checking every second that the owner still listens: a node
        // that stops may drop a request it received, and the client should not wait long.
        let deadline = tokio::time::Instant::now() + wait;
        tokio::pin!(rx);
        loop {
            let step = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            match tokio::time::timeout_at(step, &mut rx).await {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(_)) => break,
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Err(_) => {
                    let listening: Result<(String, u64), _> = redis::cmd("PUBSUB")
                        .arg("NUMSUB")
                        .arg(format!("{}node:{owner}", self.prefix))
                        .query_async(&mut con)
                        .await;
                    if matches!(listening, Ok((_, 0))) {
                        break;
                    }
                }
            }
        }
        None
    }

    /// Queues a join for the broker task.
    pub fn join(&self, req: JoinRequest) {
        if let Err(e) = self.joins.try_send(req) {
            let req = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            (req.done)(Err("broker busy; retrying".into()));
        }
    }

    async fn position(
        &self,
        con: &mut ConnectionManager,
        topic: &str,
    ) -> Result<(String, u64), redis::RedisError> {
        let (epoch, offset): (String, u64) = self
            .position_script
            .key(self.meta_key(topic))
            .key(self.stream_key(topic))
            .arg(self.history.max_age_secs)
            .invoke_async(con)
            .await?;
        Ok((epoch, offset))
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
        Ok(out)
    }
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
            let pubsub = broker.client.get_async_pubsub().await?;
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
                    if let Err(e) = on_join(&app, &broker, &mut sink, &mut con, req).await {
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
                }
            }
        };
        tracing::warn!(reason = ?reason, "redis: subscriber down; reconnecting");
        broker.set_status(Err(reason));
        app.metrics.redis_connected.store(0, Relaxed);
        Metrics::add(&app.metrics.redis_reconnects, 1);
        app.metrics.redis_subscribed_topics.store(0, Relaxed);
        app.hub.mark_all_down();
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
        let (epoch, offset) = broker.position(con, topic).await?;
        if epoch == *known.epoch {
            app.hub.go_live(topic, &epoch, known.offset);
            if offset > known.offset {
                catch_up(app, broker, con, topic, known.offset + 1, offset).await?;
            }
        } else {
            // The history was recreated (Redis restarted without persistence, or the topic
            // expired): deliver the new epoch from its first message.
            if known.offset > 0 {
                tracing::warn!(
                    ?topic,
                    "redis: topic history was recreated; continuing in the new epoch"
                );
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
    let mut expected = from;
    for (offset, _, raw) in entries {
        let Ok(env) = serde_json::from_str::<Envelope>(&raw) else {
            continue;
        };
        let Some((epoch, _)) = env.position.and_then(hub::parse_position) else {
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
    Ok(())
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
    let Some(topic) = channel.strip_prefix(&broker.prefix) else {
        return;
    };
    let payload = msg.get_payload_bytes();
    let env: Envelope = match serde_json::from_slice(payload) {
        Ok(e) => e,
        Err(e) => {
            Metrics::add(&app.metrics.redis_bad_messages, 1);
            tracing::debug!(?topic, error = ?e.to_string(), "redis: message is not {{\"event\", \"payload\"}} JSON; dropped");
            return;
        }
    };
    let position = env.position.and_then(hub::parse_position);
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
    // A request: serve it like a local one (a GET may be held), then answer the sender.
    let app = app.clone();
    let commands = broker.commands.get().cloned();
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

/// Completes a join: subscribe if needed, read the position, replay the gap from the stream.
/// An `Err` means the subscriber connection failed (the join itself is answered either way).
async fn on_join(
    app: &App,
    broker: &RedisBroker,
    sink: &mut redis::aio::PubSubSink,
    con: &mut ConnectionManager,
    req: JoinRequest,
) -> Result<(), String> {
    let JoinRequest {
        topic,
        since,
        waker,
        started,
        done,
    } = req;
    let mut connection_error = None;
    let result = async {
        let (sub, position, since_offset) = match started {
            Some(s) => s,
            None => {
                if !app.hub.is_live(&topic) {
                    let subscribed = tokio::time::timeout(
                        SUBSCRIBER_COMMAND_TIMEOUT,
                        sink.subscribe(broker.channel(&topic)),
                    )
                    .await;
                    match subscribed {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            connection_error = Some(format!("subscribe failed: {e}"));
                            return Err("broker unavailable".to_string());
                        }
                        Err(_) => {
                            connection_error = Some("subscribe timed out".to_string());
                            return Err("broker unavailable".to_string());
                        }
                    }
                    app.metrics.redis_subscribed_topics.fetch_add(1, Relaxed);
                    let (epoch, offset) = broker
                        .position(con, &topic)
                        .await
                        .map_err(|_| "broker unavailable".to_string())?;
                    app.hub.go_live(&topic, &epoch, offset);
                }
                match app.hub.join_live(&topic, waker, since.as_deref()) {
                    LiveJoin::Done(sub, info) => return Ok((sub, info, Vec::new())),
                    LiveJoin::NotLive => return Err("broker unavailable".to_string()),
                    LiveJoin::NeedsHistory(sub, position, since_offset) => {
                        (sub, position, since_offset)
                    }
                }
            }
        };
        let recovered = match broker
            .range(con, &topic, since_offset + 1, Some(position.offset))
            .await
        {
            Ok(entries) => replay(
                &topic,
                &entries,
                since_offset,
                position.offset,
                broker.history.max_age_secs,
            ),
            Err(_) => None,
        };
        let info = |recovered| JoinInfo {
            position: position.to_string(),
            recovered: Some(recovered),
        };
        Ok::<Joined, String>(match recovered {
            Some(frames) => (sub, info(true), frames),
            None => (sub, info(false), Vec::new()),
        })
    }
    .await;
    done(result);
    match connection_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
            env.position,
            topic,
            &env.event,
            env.payload.get().as_bytes(),
        );
        frames.push(f);
    }
    Some(frames)
}
