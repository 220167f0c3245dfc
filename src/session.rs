//! One client's Phoenix session, independent of transport: joined channels and their join_refs,
//! heartbeat replies, the stale-join_ref filter, and the frames waiting to go out.
//!
//! A transport feeds it parsed messages ([`Session::handle`]) and, when it can write, takes the
//! queued frames ([`Session::pop_queued`]) and then the broadcasts from the topic buffers
//! ([`Session::collect_broadcasts`]). Queued frames go first, so a join reply always precedes the
//! messages the join replays.
//!
//! A session is built on a [`Context`]: what it needs from the layers below it (the hub, auth,
//! admission, metrics, the node id and limits) and, as the [`Services`] trait, what it asks of
//! the layers above it (brokers and services): joins the local buffer cannot complete, presence
//! tracking, and forwarding client pushes. Those calls happen once per join or per push, never
//! per delivered message.
//!
//! Architecture Invariant: no I/O and no `.await` here; the session never touches a socket, and
//! knows neither which broker runs (embedded or Redis) nor how presence or forwarding work. A
//! join the broker completes, a forwarded push's reply and a `presence_state` come back through
//! the session's mailbox.

use crate::admission::{Admission, JoinBucket};
use crate::auth::{Auth, ConnectInfo};
use crate::hub::{ConnHandle, Entry, Hub, JoinInfo, Lag, LiveJoin, Position, Subscription};
use crate::metrics::Metrics;
use crate::protocol::{self, Inbound, ParseError, Payload};
use serde_json::value::RawValue;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A frame addressed to this client alone (a reply, `phx_close`, ...): JSON text.
pub type QueuedFrame = Vec<u8>;

/// Hands frames to one session from another task (through its mailbox): a forwarded push's
/// reply, a `presence_state`. They go out with the session's next [`Session::settle`].
pub type Deliver = Arc<dyn Fn(QueuedFrame) + Send + Sync>;

/// What a session needs, shared by every session of a node.
pub struct Context {
    pub hub: Arc<Hub>,
    /// Private topics and connect tokens (`[auth]`).
    pub auth: Arc<Auth>,
    /// The join rate (`limits.join_rate_per_connection`).
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
    /// This node's id: the first half of every [`sender_id`].
    pub node_id: String,
    pub limits: Limits,
    /// What the session asks of the layers above it.
    pub services: Box<dyn Services>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("node_id", &self.node_id)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The `[limits]` a session applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `limits.max_topics_per_connection`: channels joined or joining at once.
    pub max_topics_per_connection: usize,
    /// `limits.max_pending_bytes`: how far behind its topics a subscriber may fall.
    pub max_pending_bytes: u64,
}

impl From<&crate::config::LimitsConfig> for Limits {
    fn from(l: &crate::config::LimitsConfig) -> Limits {
        Limits {
            max_topics_per_connection: l.max_topics_per_connection,
            max_pending_bytes: l.max_pending_bytes,
        }
    }
}

/// What a session asks of the layers above it (the broker, presence, forwarding), implemented
/// there. Called once per join or per push, never per delivered message.
pub trait Services: Send + Sync {
    /// Joins `topic` against the local buffer: [`LiveJoin::Done`] when that is all there is
    /// to it, otherwise what the broker must complete ([`Services::complete_join`]). Whether a
    /// topic's buffer is its whole history (the embedded broker) is the broker's to know.
    fn start_join(
        &self,
        topic: &str,
        conn_handle: Arc<ConnHandle>,
        since: Option<&str>,
    ) -> LiveJoin;

    /// Hands a join the local buffer could not complete to the broker; `request.done` is
    /// called exactly once with the outcome.
    fn complete_join(&self, request: JoinRequest);

    /// Whether joins of `topic` are tracked by presence.
    fn tracks_presence(&self, topic: &str) -> bool;

    /// Checks a tracked join's `presence` param before the join goes ahead (`subject`: the
    /// verified connect token's `sub`); the error is the join's error reason.
    fn prepare_presence(
        &self,
        subject: Option<String>,
        param: Option<&RawValue>,
    ) -> Result<PresenceEntry, Box<dyn std::error::Error + Send + Sync>>;

    /// Tracks a channel that has just been joined: `state_to` gets its `presence_state`
    /// (addressed to `join_ref`). `None` when it goes untracked.
    fn track_presence(
        &self,
        entry: PresenceEntry,
        topic: &str,
        join_ref: &str,
        state_to: Deliver,
    ) -> Option<Tracking>;

    /// Whether client pushes on `topic` are forwarded to the app.
    fn forwards(&self, topic: &str) -> bool;

    /// A lane to the app for this session's pushes, whose replies go to `deliver`; `None`
    /// when nothing is forwarded.
    fn open_lane(&self, deliver: Deliver) -> Option<PushLane>;
}

/// A joined topic: the subscription, what to answer, and the missed messages to replay
/// (from the broker's history) before live ones.
#[derive(Debug)]
pub struct Joined {
    pub subscription: Subscription,
    pub info: JoinInfo,
    pub replay: Vec<QueuedFrame>,
}

/// Why the broker could not complete a join: the reason of the join's error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The broker cannot be reached (or its subscriber connection failed meanwhile).
    #[error("broker unavailable")]
    Unavailable,
    /// The connection already has this many joins waiting for the broker.
    #[error(
        "too many joins in progress on this connection (at most {0} waiting for Redis); retry later"
    )]
    TooManyInProgress(usize),
    /// The node's queue of joins waiting for the broker is full.
    #[error("broker busy (too many joins waiting for Redis on this node); retry later")]
    Busy,
    /// The embedded broker never defers a join.
    #[error("the embedded broker joins inline")]
    Inline,
}

/// Called exactly once with a deferred join's outcome (from the broker's task).
pub type JoinDone = Box<dyn FnOnce(Result<Joined, JoinError>) + Send>;

/// A join the local buffer could not complete.
pub struct JoinRequest {
    pub topic: String,
    pub since: Option<String>,
    pub conn_handle: Arc<ConnHandle>,
    /// Set when the topic is live here: already subscribed at the current end, and what
    /// history the client needs. `None`: the broker must subscribe first.
    pub started: Option<Started>,
    /// Called exactly once with the outcome (from the broker's task).
    pub done: JoinDone,
}

/// A join subscribed at the live end whose client needs the gap `(since_offset,
/// position.offset]` from the broker's history.
#[derive(Debug)]
pub struct Started {
    pub subscription: Subscription,
    /// The topic's position when subscribed.
    pub position: Position,
    /// The last offset the client has.
    pub since_offset: u64,
}

/// A presence entry to be: the key (the verified `sub`, if any) and the meta from the join's
/// `presence` param, checked before the join goes ahead and tracked once it is answered.
#[derive(Debug, Default)]
pub struct PresenceEntry {
    pub key: Option<String>,
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// Held while a channel is tracked by presence; dropping it (leave, rejoin, connection gone)
/// untracks the channel.
pub struct Tracking(pub Box<dyn Send + Sync>);

impl std::fmt::Debug for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracking")
    }
}

/// One client push on its way to the app (`[forward]`).
#[derive(Debug)]
pub struct Push {
    pub join_ref: String,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Box<RawValue>,
    pub token: Option<String>,
    /// The pushing connection's [`sender_id`].
    pub sender: String,
}

/// One session's pushes, in order, to the app; the task behind it ends when the lane is dropped.
#[derive(Debug)]
pub struct PushLane {
    tx: tokio::sync::mpsc::Sender<Push>,
}

impl PushLane {
    /// A lane holding at most `max_queued` pushes, and the receiving end for its task.
    pub fn channel(max_queued: usize) -> (PushLane, tokio::sync::mpsc::Receiver<Push>) {
        let (tx, rx) = tokio::sync::mpsc::channel(max_queued);
        (PushLane { tx }, rx)
    }

    /// Queues `push`; false when `forward.max_queued` pushes are already waiting.
    pub fn send(&self, push: Push) -> bool {
        self.tx.try_send(push).is_ok()
    }
}

#[derive(Debug)]
struct Channel {
    join_ref: String,
    sub: Subscription,
    /// Set on a presence topic; dropping the channel untracks it. (Boxed: 8 bytes on every
    /// channel, presence or not.)
    _presence: Option<Box<Tracking>>,
}

#[derive(Debug)]
pub struct Session {
    ctx: Arc<Context>,
    conn_handle: Arc<ConnHandle>,
    channels: Vec<Channel>,
    /// Joins the broker is completing (Redis only).
    pending: Vec<PendingJoin>,
    /// Where the broker leaves completed joins; created on the first deferred join.
    mailbox: Option<Arc<Mailbox>>,
    queued: VecDeque<QueuedFrame>,
    /// Bytes in `queued`.
    direct_bytes: usize,
    /// Checked by [`Auth::may_join`](crate::auth::Auth::may_join) for private topics.
    connect: ConnectInfo,
    /// Pushes on their way to the app (`[forward]`); opened by the first forwarded push.
    lane: Option<PushLane>,
    /// Joins this connection may still make now (`limits.join_rate_per_connection`).
    join_budget: JoinBucket,
}

/// A join being answered: who asked, and the presence entry to track once it is joined.
#[derive(Debug)]
struct PendingJoin {
    topic: String,
    join_ref: String,
    msg_ref: Option<String>,
    presence: Option<PresenceEntry>,
}

/// A deferred join's outcome, as the broker's task leaves it in the mailbox.
struct JoinOutcome {
    topic: String,
    join_ref: String,
    result: Result<Joined, JoinError>,
}

/// Completed joins handed back by the broker's task, and replies to forwarded pushes.
#[derive(Default)]
struct Mailbox {
    any: AtomicBool,
    done: std::sync::Mutex<Vec<JoinOutcome>>,
    /// Replies to pushes the app has answered (`[forward]`).
    replies: std::sync::Mutex<Vec<QueuedFrame>>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mailbox")
    }
}

/// `since` and `presence` (the meta, on a presence topic) from join params; other keys are the
/// application's and are ignored.
#[derive(serde::Deserialize, Default)]
struct JoinParams {
    since: Option<String>,
    presence: Option<Box<RawValue>>,
}

/// Longest node id a [`sender_id`] may carry (ours are 8 hex digits; other nodes' are taken as
/// they come, within this).
const MAX_NODE_ID_BYTES: usize = 32;

/// Bytes reserved for a join's `{"position":...,"recovered":...}` response: a position
/// (12 hex digits, a colon, an offset) and the flag fit without growing.
const JOIN_RESPONSE_CAPACITY: usize = 64;

/// A connection's sender id, `<node>.<connection>`: what a forwarded push carries as `sender`,
/// and what a publish's `exclude` names to leave that connection out ("send to others").
pub fn sender_id(node: &str, conn_handle: &ConnHandle) -> String {
    format!("{node}.{}", conn_handle.id)
}

/// The connection (its [`ConnHandle::id`]) a publish's `exclude` names on node `node`: 0 for none
/// here (no exclusion, or another node's connection).
pub fn local_exclude(exclude: Option<&str>, node: &str) -> u64 {
    exclude
        .and_then(|sender| sender.split_once('.'))
        .filter(|(n, _)| *n == node)
        .and_then(|(_, id)| id.parse().ok())
        .unwrap_or(0)
}

/// Whether `sender` has the shape of a sender id (any node's).
pub fn is_sender_id(sender: &str) -> bool {
    sender.split_once('.').is_some_and(|(n, id)| {
        !n.is_empty()
            && n.len() <= MAX_NODE_ID_BYTES
            && n.bytes().all(|b| b.is_ascii_alphanumeric())
            && id.parse::<u64>().is_ok_and(|i| i > 0)
    })
}

impl Session {
    pub fn new(ctx: Arc<Context>, connect: ConnectInfo) -> Session {
        Session::with_conn_handle(ctx, connect, Arc::new(ConnHandle::default()))
    }

    /// A session woken through `conn_handle` (which may already hold the connection's socket).
    pub fn with_conn_handle(
        ctx: Arc<Context>,
        connect: ConnectInfo,
        conn_handle: Arc<ConnHandle>,
    ) -> Session {
        let join_budget = ctx.admission.join_bucket();
        Session {
            ctx,
            conn_handle,
            channels: Vec::new(),
            pending: Vec::new(),
            mailbox: None,
            queued: VecDeque::new(),
            direct_bytes: 0,
            connect,
            lane: None,
            join_budget,
        }
    }

    /// The connection handle topics use to tell this session's transport that broadcasts are waiting.
    pub fn conn_handle(&self) -> &Arc<ConnHandle> {
        &self.conn_handle
    }

    /// Number of joined channels.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    fn reply(&mut self, frame: QueuedFrame) {
        self.direct_bytes += frame.len();
        self.queued.push_back(frame);
    }

    /// Answers a message that could not be parsed, with whatever ref could be recovered.
    pub fn handle_parse_error(&mut self, err: ParseError) {
        Metrics::add(&self.ctx.metrics.bad_messages, 1);
        tracing::debug!(reason = ?err.reason, "bad client message");
        let topic = err.topic.as_deref().unwrap_or(protocol::PHOENIX_TOPIC);
        self.reply(protocol::encode_error_reply(
            err.join_ref.as_deref(),
            err.msg_ref.as_deref(),
            topic,
            &err.reason,
        ));
    }

    /// Handles one client message.
    pub fn handle(&mut self, msg: Inbound) {
        match msg.event.as_str() {
            "heartbeat" if msg.topic == protocol::PHOENIX_TOPIC => {
                self.reply(protocol::encode_reply(
                    msg.join_ref.as_deref(),
                    msg.msg_ref.as_deref(),
                    protocol::PHOENIX_TOPIC,
                    "ok",
                    b"{}",
                ));
            }
            "phx_join" => self.join(msg),
            "phx_leave" => self.leave(msg),
            _ => self.push(msg),
        }
    }

    fn channel_index(&self, topic: &str) -> Option<usize> {
        self.channels
            .iter()
            .position(|c| c.sub.topic().name() == topic)
    }

    fn join_error(&mut self, msg: &Inbound, join_ref: Option<&str>, reason: &str) {
        Metrics::add(&self.ctx.metrics.join_errors, 1);
        self.reply(protocol::encode_error_reply(
            join_ref,
            msg.msg_ref.as_deref(),
            &msg.topic,
            reason,
        ));
    }

    /// A `phx_join`: checked (rate, topic, authorization, params, presence meta, room), then
    /// started against the local buffer, or handed to the broker. Each refusal is an error reply.
    fn join(&mut self, msg: Inbound) {
        // For a join, join_ref == ref; accept either being absent.
        let Some(join_ref) = msg.join_ref.clone().or_else(|| msg.msg_ref.clone()) else {
            self.join_error(&msg, None, "join requires a ref");
            return;
        };
        if !self.may_join(&msg, &join_ref) {
            return;
        }
        let Some(params) = self.join_params(&msg, &join_ref) else {
            return;
        };
        let Ok(presence) = self.prepare_presence(&msg, &join_ref, params.presence.as_deref())
        else {
            return;
        };
        if !self.make_room(&msg, &join_ref) {
            return;
        }
        let pending = PendingJoin {
            topic: msg.topic,
            join_ref,
            msg_ref: msg.msg_ref,
            presence,
        };
        self.start_join(pending, params.since);
    }

    /// Whether this connection may join `msg.topic` now: its join rate, the topic's shape,
    /// and authorization (private topics). Answers a refusal.
    fn may_join(&mut self, msg: &Inbound, join_ref: &str) -> bool {
        if !self.ctx.admission.may_join(&mut self.join_budget) {
            self.ctx.metrics.refused(crate::metrics::Refusal::RateLimit);
            self.join_error(msg, Some(join_ref), "rate limited");
            return false;
        }
        if msg.topic.is_empty()
            || msg.topic.len() > protocol::MAX_FIELD_BYTES
            || msg.topic == protocol::PHOENIX_TOPIC
        {
            self.join_error(
                msg,
                Some(join_ref),
                "invalid topic: must be 1 to 255 bytes and not \"phoenix\"",
            );
            return false;
        }
        if let Err(refusal) = self.ctx.auth.may_join(&self.connect, &msg.topic) {
            Metrics::add(&self.ctx.metrics.join_errors, 1);
            tracing::debug!(topic = ?msg.topic, detail = ?refusal.0, "join refused: unauthorized");
            self.reply(protocol::encode_reply(
                Some(join_ref),
                msg.msg_ref.as_deref(),
                &msg.topic,
                "error",
                &protocol::reason_and_detail("unauthorized", &refusal.0),
            ));
            return false;
        }
        true
    }

    /// The join's params (`since`, `presence`), or `None` after answering why they are wrong.
    fn join_params(&mut self, msg: &Inbound, join_ref: &str) -> Option<JoinParams> {
        match &msg.payload {
            Payload::Json(raw) => match raw.get() {
                "null" => Some(JoinParams::default()),
                text => match serde_json::from_str::<JoinParams>(text) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        self.join_error(
                            msg,
                            Some(join_ref),
                            "join params must be an object; \"since\" must be a position string",
                        );
                        None
                    }
                },
            },
            Payload::Binary(_) => {
                self.join_error(msg, Some(join_ref), "join params must be JSON");
                None
            }
        }
    }

    /// On a presence topic, the entry to track once joined (`Ok(None)` elsewhere); `Err` after
    /// answering why the `presence` param is refused.
    fn prepare_presence(
        &mut self,
        msg: &Inbound,
        join_ref: &str,
        param: Option<&RawValue>,
    ) -> Result<Option<PresenceEntry>, ()> {
        if !self.ctx.services.tracks_presence(&msg.topic) {
            return Ok(None);
        }
        let subject = self.ctx.auth.subject(&self.connect);
        match self.ctx.services.prepare_presence(subject, param) {
            Ok(entry) => Ok(Some(entry)),
            Err(reason) => {
                self.join_error(msg, Some(join_ref), &reason.to_string());
                Err(())
            }
        }
    }

    /// Makes room for the join: `limits.max_topics` on the node; a join of the same topic in
    /// progress, or a channel already joined, is closed first (as Phoenix does); otherwise
    /// `limits.max_topics_per_connection`. `false` after answering a refusal.
    fn make_room(&mut self, msg: &Inbound, join_ref: &str) -> bool {
        if !self.ctx.hub.has_room_for(&msg.topic) {
            self.ctx.metrics.refused(crate::metrics::Refusal::TopicCap);
            tracing::debug!(topic = %msg.topic, "join refused: limits.max_topics reached");
            self.join_error(
                msg,
                Some(join_ref),
                "too many topics on this node (limits.max_topics)",
            );
            return false;
        }
        if let Some(i) = self.pending.iter().position(|p| p.topic == msg.topic) {
            // A join still in progress is superseded; its outcome will be dropped.
            let old = self.pending.swap_remove(i);
            self.reply(protocol::encode_close(&old.join_ref, &msg.topic));
        }
        if let Some(i) = self.channel_index(&msg.topic) {
            // Joining a topic that is already joined: close the old channel first (the client
            // drops this as stale), then join afresh, as Phoenix does.
            let old = self.channels.swap_remove(i);
            self.reply(protocol::encode_close(&old.join_ref, &msg.topic));
        } else if self.channels.len() + self.pending.len()
            >= self.ctx.limits.max_topics_per_connection
        {
            self.join_error(
                msg,
                Some(join_ref),
                "too many topics on this connection (limits.max_topics_per_connection)",
            );
            return false;
        }
        true
    }

    /// Joins against the local buffer; what it cannot complete goes to the broker.
    fn start_join(&mut self, pending: PendingJoin, since: Option<String>) {
        let live = self.ctx.services.start_join(
            &pending.topic,
            self.conn_handle.clone(),
            since.as_deref(),
        );
        let started = match live {
            LiveJoin::Done(subscription, info) => {
                let joined = Joined {
                    subscription,
                    info,
                    replay: Vec::new(),
                };
                self.finish_join(pending, joined);
                return;
            }
            // The broker subscribes first, or reads what this node lacks, then joins.
            LiveJoin::NotLive | LiveJoin::Behind { .. } => None,
            LiveJoin::NeedsHistory(sub, position, since_offset) => Some(Started {
                subscription: sub,
                position,
                since_offset,
            }),
        };
        self.defer_join(pending, since, started);
    }

    /// Hands the join to the broker (subscribe, position, history); its outcome comes back
    /// through the mailbox (see `settle`).
    fn defer_join(
        &mut self,
        pending: PendingJoin,
        since: Option<String>,
        started: Option<Started>,
    ) {
        let mailbox = self.mailbox.get_or_insert_with(Default::default).clone();
        let conn_handle = self.conn_handle.clone();
        let (topic, join_ref) = (pending.topic.clone(), pending.join_ref.clone());
        let request = JoinRequest {
            topic: pending.topic.clone(),
            since,
            conn_handle: self.conn_handle.clone(),
            started,
            done: Box::new(move |result| {
                mailbox
                    .done
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(JoinOutcome {
                        topic,
                        join_ref,
                        result,
                    });
                mailbox.any.store(true, Ordering::Release);
                conn_handle.wake();
            }),
        };
        self.pending.push(pending);
        self.ctx.services.complete_join(request);
    }

    /// Answers a join and starts delivering: the reply, then the replay (missed messages from
    /// the broker's history), then live broadcasts from the subscription. On a presence topic
    /// the channel is tracked: its `presence_state` comes through the mailbox.
    fn finish_join(&mut self, join: PendingJoin, joined: Joined) {
        let Joined {
            subscription: sub,
            info,
            replay,
        } = joined;
        let mut response = Vec::with_capacity(JOIN_RESPONSE_CAPACITY);
        response.extend_from_slice(b"{\"position\":");
        protocol::push_json_str(&mut response, &info.position);
        match info.recovered {
            Some(true) => {
                response.extend_from_slice(b",\"recovered\":true");
                Metrics::add(&self.ctx.metrics.recoveries, 1);
            }
            Some(false) => {
                response.extend_from_slice(b",\"recovered\":false");
                Metrics::add(&self.ctx.metrics.recovery_failures, 1);
            }
            None => {}
        }
        response.push(b'}');
        self.reply(protocol::encode_reply(
            Some(&join.join_ref),
            join.msg_ref.as_deref(),
            &join.topic,
            "ok",
            &response,
        ));
        for frame in replay {
            self.reply(frame);
        }
        Metrics::add(&self.ctx.metrics.joins, 1);
        sub.allow_direct();
        let tracked = match join.presence {
            Some(entry) => {
                let deliver = self.mailbox_sender();
                self.ctx
                    .services
                    .track_presence(entry, &join.topic, &join.join_ref, deliver)
                    .map(Box::new)
            }
            None => None,
        };
        if self.channels.capacity() == 0 {
            // Most connections join one topic: room for one, not the four a first push makes.
            self.channels.reserve_exact(1);
        }
        self.channels.push(Channel {
            join_ref: join.join_ref,
            sub,
            _presence: tracked,
        });
        // Replayed messages (if any) are waiting in the topic buffer.
        if info.recovered == Some(true) {
            self.conn_handle.wake();
        }
    }

    /// Takes in joins the broker has completed. Transports call this before taking frames.
    pub fn settle(&mut self) {
        let Some(mailbox) = &self.mailbox else {
            return;
        };
        if !mailbox.any.swap(false, Ordering::AcqRel) {
            return;
        }
        let replies =
            std::mem::take(&mut *mailbox.replies.lock().unwrap_or_else(|e| e.into_inner()));
        let done = std::mem::take(&mut *mailbox.done.lock().unwrap_or_else(|e| e.into_inner()));
        for frame in replies {
            self.reply(frame);
        }
        for outcome in done {
            let Some(i) = self
                .pending
                .iter()
                .position(|p| p.topic == outcome.topic && p.join_ref == outcome.join_ref)
            else {
                continue; // left or rejoined meanwhile: the subscription is dropped here
            };
            let p = self.pending.swap_remove(i);
            match outcome.result {
                Ok(joined) => self.finish_join(p, joined),
                Err(reason) => {
                    Metrics::add(&self.ctx.metrics.join_errors, 1);
                    self.reply(protocol::encode_error_reply(
                        Some(&p.join_ref),
                        p.msg_ref.as_deref(),
                        &p.topic,
                        &reason.to_string(),
                    ));
                }
            }
        }
    }

    fn leave(&mut self, msg: Inbound) {
        let ok = protocol::encode_reply(
            msg.join_ref.as_deref(),
            msg.msg_ref.as_deref(),
            &msg.topic,
            "ok",
            b"{}",
        );
        if let Some(i) = self.pending.iter().position(|p| p.topic == msg.topic) {
            let p = self.pending.swap_remove(i);
            self.reply(ok);
            self.reply(protocol::encode_close(&p.join_ref, &msg.topic));
            return;
        }
        match self.channel_index(&msg.topic) {
            None => self.reply(ok),
            Some(i) => {
                if msg
                    .join_ref
                    .as_deref()
                    .is_some_and(|r| r != self.channels[i].join_ref)
                {
                    return; // a leave for an older incarnation of this channel
                }
                let ch = self.channels.swap_remove(i);
                self.reply(ok);
                self.reply(protocol::encode_close(&ch.join_ref, &msg.topic));
            }
        }
    }

    fn push(&mut self, msg: Inbound) {
        let Some(i) = self.channel_index(&msg.topic) else {
            self.reply(protocol::encode_error_reply(
                None,
                msg.msg_ref.as_deref(),
                &msg.topic,
                "unmatched topic",
            ));
            return;
        };
        if msg
            .join_ref
            .as_deref()
            .is_some_and(|r| r != self.channels[i].join_ref)
        {
            return; // stale: sent for an earlier join of this topic
        }
        let join_ref = self.channels[i].join_ref.clone();
        let refuse = if msg.event.starts_with("phx_") || !self.ctx.services.forwards(&msg.topic) {
            Some("client pushes are not accepted on this topic")
        } else {
            match msg.payload {
                Payload::Binary(_) => Some("binary pushes are not forwarded"),
                Payload::Json(payload) => {
                    let push = Push {
                        join_ref: join_ref.clone(),
                        msg_ref: msg.msg_ref.clone(),
                        topic: msg.topic.clone(),
                        event: msg.event,
                        payload,
                        token: crate::auth::connect_token(&self.connect).map(str::to_string),
                        sender: sender_id(&self.ctx.node_id, &self.conn_handle),
                    };
                    self.forward(push)
                }
            }
        };
        if let Some(reason) = refuse {
            self.reply(protocol::encode_error_reply(
                Some(&join_ref),
                msg.msg_ref.as_deref(),
                &msg.topic,
                reason,
            ));
        }
    }

    /// Queues a push on this session's lane to the app (opened by the first push, its replies
    /// coming back through the mailbox like completed joins); the refusal, if any.
    fn forward(&mut self, push: Push) -> Option<&'static str> {
        let lane = match self.lane.take() {
            Some(lane) => lane,
            None => {
                let deliver = self.mailbox_sender();
                match self.ctx.services.open_lane(deliver) {
                    Some(lane) => lane,
                    None => return Some("client pushes are not accepted on this topic"),
                }
            }
        };
        let queued = lane.send(push);
        self.lane = Some(lane);
        (!queued).then_some("too many pushes waiting for the app (forward.max_queued)")
    }

    /// Hands frames to this session from another task (forward replies, `presence_state`):
    /// they go out with the next `settle`.
    fn mailbox_sender(&mut self) -> Deliver {
        let mailbox = self.mailbox.get_or_insert_with(Default::default).clone();
        let conn_handle = self.conn_handle.clone();
        Arc::new(move |frame| {
            mailbox
                .replies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(frame);
            mailbox.any.store(true, Ordering::Release);
            conn_handle.wake();
            conn_handle.hold();
        })
    }

    /// Takes the oldest queued frame.
    pub fn pop_queued(&mut self) -> Option<QueuedFrame> {
        let f = self.queued.pop_front();
        if let Some(f) = &f {
            self.direct_bytes -= f.len();
        } else if self.queued.capacity() > 0 {
            self.queued = VecDeque::new(); // an idle session holds no queue
        }
        f
    }

    pub fn has_direct(&self) -> bool {
        !self.queued.is_empty()
    }

    /// Bytes of queued frames waiting (replies the client has not collected).
    pub fn direct_bytes(&self) -> usize {
        self.direct_bytes
    }

    /// Reports whether this subscriber has fallen behind, without taking anything. Used while
    /// its socket is not draining and nothing new can be taken.
    pub fn check_lag(&self) -> Result<(), Lag> {
        let max_pending = self.ctx.limits.max_pending_bytes;
        for ch in &self.channels {
            ch.sub.topic().lag(&ch.sub, max_pending)?;
        }
        Ok(())
    }

    /// Hands `emit` the broadcasts waiting in this session's topics, up to about `budget` bytes.
    /// Returns the number emitted, or the lag that makes this a slow consumer.
    pub fn collect_broadcasts(
        &mut self,
        budget: usize,
        emit: &mut dyn FnMut(&Entry),
    ) -> Result<usize, Lag> {
        let max_pending = self.ctx.limits.max_pending_bytes;
        let mut total = 0;
        let mut bytes = 0usize;
        let me = self.conn_handle.id;
        for ch in &mut self.channels {
            let remaining = budget.saturating_sub(bytes);
            let mut skipped = 0;
            let mut count_bytes = |e: &Entry| {
                if e.exclude == me {
                    skipped += 1; // "send to others": not for this connection
                    return;
                }
                bytes += e.ws_frame().len();
                emit(e)
            };
            total += ch.sub.read(max_pending, remaining, &mut count_bytes)? - skipped;
            if bytes >= budget {
                // Come back for the rest: the connection handle stays set so the transport loops again.
                self.conn_handle.wake();
                break;
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The lanes a session opened: the receiving end of each, and where its replies go.
    type Lanes = Arc<Mutex<Vec<(tokio::sync::mpsc::Receiver<Push>, Deliver)>>>;

    /// Services that record what the session asks: joins are done at once on `hub` (as the
    /// embedded broker does), or, with `defer`, handed over for the test to complete; `room:*`
    /// pushes are forwarded into a lane whose other end the test holds.
    struct FakeServices {
        hub: Arc<Hub>,
        defer: bool,
        deferred: Arc<Mutex<Vec<JoinRequest>>>,
        lanes: Lanes,
    }

    impl Services for FakeServices {
        fn start_join(
            &self,
            topic: &str,
            conn_handle: Arc<ConnHandle>,
            since: Option<&str>,
        ) -> LiveJoin {
            if self.defer {
                return LiveJoin::NotLive;
            }
            let (sub, info) = self.hub.subscribe(topic, conn_handle, since);
            LiveJoin::Done(sub, info)
        }

        fn complete_join(&self, request: JoinRequest) {
            self.deferred.lock().unwrap().push(request);
        }

        fn tracks_presence(&self, _topic: &str) -> bool {
            false
        }

        fn prepare_presence(
            &self,
            _subject: Option<String>,
            _param: Option<&RawValue>,
        ) -> Result<PresenceEntry, Box<dyn std::error::Error + Send + Sync>> {
            unreachable!("no presence topic")
        }

        fn track_presence(
            &self,
            _entry: PresenceEntry,
            _topic: &str,
            _join_ref: &str,
            _state_to: Deliver,
        ) -> Option<Tracking> {
            unreachable!("no presence topic")
        }

        fn forwards(&self, topic: &str) -> bool {
            topic.starts_with("room:")
        }

        fn open_lane(&self, deliver: Deliver) -> Option<PushLane> {
            let (lane, rx) = PushLane::channel(4);
            self.lanes.lock().unwrap().push((rx, deliver));
            Some(lane)
        }
    }

    /// A session on a test context (no App, no runtime): `private:*` topics need a token.
    struct Harness {
        session: Session,
        hub: Arc<Hub>,
        deferred: Arc<Mutex<Vec<JoinRequest>>>,
        lanes: Lanes,
    }

    fn harness(defer: bool) -> Harness {
        let mut config = crate::config::Config::default();
        config.auth.private_topics = vec!["private:*".into()];
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::new(config.history.clone(), metrics.clone()));
        let deferred = Arc::new(Mutex::new(Vec::new()));
        let lanes = Arc::new(Mutex::new(Vec::new()));
        let ctx = Arc::new(Context {
            hub: hub.clone(),
            auth: Arc::new(Auth::new(&config.auth)),
            admission: Admission::new(&config),
            metrics,
            node_id: "0badc0de".into(),
            limits: (&config.limits).into(),
            services: Box::new(FakeServices {
                hub: hub.clone(),
                defer,
                deferred: deferred.clone(),
                lanes: lanes.clone(),
            }),
        });
        Harness {
            session: Session::new(ctx, ConnectInfo::default()),
            hub,
            deferred,
            lanes,
        }
    }

    impl Harness {
        fn send(&mut self, text: &str) {
            let msg = protocol::parse_text(text.as_bytes()).expect("a valid message");
            self.session.handle(msg);
        }

        /// Every queued frame waiting, parsed.
        fn replies(&mut self) -> Vec<serde_json::Value> {
            self.session.settle();
            std::iter::from_fn(|| self.session.pop_queued())
                .map(|f| serde_json::from_slice(&f).expect("JSON"))
                .collect()
        }
    }

    #[test]
    fn a_join_is_answered_with_the_position_and_a_leave_closes_the_channel() {
        let mut h = harness(false);
        h.send(r#"["1","1","room:a","phx_join",{}]"#);
        let replies = h.replies();
        assert_eq!(replies.len(), 1, "{replies:?}");
        let r = &replies[0];
        assert_eq!(
            (&r[0], &r[1], &r[2], &r[3]),
            (
                &"1".into(),
                &"1".into(),
                &"room:a".into(),
                &"phx_reply".into()
            )
        );
        assert_eq!(r[4]["status"], "ok");
        assert!(r[4]["response"]["position"].as_str().is_some(), "{r}");
        assert_eq!(h.session.channel_count(), 1);
        assert_eq!(h.hub.subscriber_count("room:a"), 1);

        h.send(r#"["1","2","room:a","phx_leave",{}]"#);
        let replies = h.replies();
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert_eq!(replies[0][4]["status"], "ok");
        assert_eq!(replies[1][3], "phx_close");
        assert_eq!(h.session.channel_count(), 0);
        assert_eq!(h.hub.subscriber_count("room:a"), 0);
    }

    #[test]
    fn a_heartbeat_is_answered() {
        let mut h = harness(false);
        h.send(r#"[null,"9","phoenix","heartbeat",{}]"#);
        let replies = h.replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0][1], "9");
        assert_eq!(replies[0][4]["status"], "ok");
    }

    #[test]
    fn a_join_of_a_private_topic_without_a_token_is_refused() {
        let mut h = harness(false);
        h.send(r#"["1","1","private:x","phx_join",{}]"#);
        let replies = h.replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0][4]["status"], "error");
        assert_eq!(replies[0][4]["response"]["reason"], "unauthorized");
        assert_eq!(h.session.channel_count(), 0);
        assert!(h.deferred.lock().unwrap().is_empty());
    }

    #[test]
    fn pushes_are_forwarded_where_the_services_say_and_refused_elsewhere() {
        let mut h = harness(false);
        h.send(r#"["1","1","room:a","phx_join",{}]"#);
        h.send(r#"["2","2","lobby","phx_join",{}]"#);
        assert_eq!(h.replies().len(), 2);

        h.send(r#"["2","3","lobby","shout",{"x":1}]"#);
        h.send(r#"["3","4","elsewhere","shout",{}]"#);
        let replies = h.replies();
        assert_eq!(
            replies[0][4]["response"]["reason"],
            "client pushes are not accepted on this topic"
        );
        assert_eq!(replies[1][4]["response"]["reason"], "unmatched topic");

        h.send(r#"["1","5","room:a","shout",{"x":2}]"#);
        assert!(h.replies().is_empty(), "the reply comes from the app");
        let (mut rx, deliver) = h.lanes.lock().unwrap().pop().expect("a lane opened");
        let push = rx.try_recv().expect("the push is on the lane");
        assert_eq!(
            (push.topic.as_str(), push.event.as_str()),
            ("room:a", "shout")
        );
        assert_eq!(push.payload.get(), r#"{"x":2}"#);
        assert_eq!(push.sender, sender_id("0badc0de", h.session.conn_handle()));
        deliver(protocol::encode_reply(
            Some("1"),
            Some("5"),
            "room:a",
            "ok",
            b"{}",
        ));
        let replies = h.replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0][1], "5");
    }

    #[test]
    fn a_join_the_broker_completes_replays_its_history_after_the_reply() {
        let mut h = harness(true);
        h.send(r#"["1","1","room:a","phx_join",{"since":"e1:3"}]"#);
        assert!(h.replies().is_empty(), "waiting for the broker");
        let request = h
            .deferred
            .lock()
            .unwrap()
            .pop()
            .expect("handed to the broker");
        assert_eq!(request.topic, "room:a");
        assert_eq!(request.since.as_deref(), Some("e1:3"));
        let (subscription, _) = h.hub.subscribe("room:a", request.conn_handle.clone(), None);
        (request.done)(Ok(Joined {
            subscription,
            info: JoinInfo {
                position: "e1:5".into(),
                recovered: Some(true),
            },
            replay: vec![br#"[null,null,"room:a","m",{"n":4}]"#.to_vec()],
        }));
        let replies = h.replies();
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert_eq!(replies[0][4]["response"]["position"], "e1:5");
        assert_eq!(replies[0][4]["response"]["recovered"], true);
        assert_eq!(replies[1][4]["n"], 4);
        assert_eq!(h.session.channel_count(), 1);

        // A join the broker cannot complete is answered with its reason.
        h.send(r#"["2","2","room:b","phx_join",{}]"#);
        let request = h
            .deferred
            .lock()
            .unwrap()
            .pop()
            .expect("handed to the broker");
        (request.done)(Err(JoinError::Unavailable));
        let replies = h.replies();
        assert_eq!(replies[0][4]["response"]["reason"], "broker unavailable");
        assert_eq!(h.session.channel_count(), 1);
    }

    #[test]
    fn sender_ids_name_a_connection_of_one_node() {
        let w = ConnHandle::default();
        let id = sender_id("3f1c0a9b", &w);
        assert!(is_sender_id(&id), "{id}");
        assert_eq!(local_exclude(Some(&id), "3f1c0a9b"), w.id);
        assert_eq!(local_exclude(Some(&id), "00000000"), 0, "another node's");
        assert_eq!(local_exclude(None, "3f1c0a9b"), 0);
        for bad in [
            "",
            "me",
            "3f1c0a9b.",
            ".7",
            "3f1c0a9b.0",
            "3f1c0a9b.x",
            "a-b.7",
        ] {
            assert!(!is_sender_id(bad), "{bad:?}");
        }
    }
}
