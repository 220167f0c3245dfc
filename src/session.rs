//! One client's Phoenix session, independent of transport: joined channels and their join_refs,
//! heartbeat replies, the stale-join_ref filter, and the frames waiting to go out.
//!
//! A transport feeds it parsed messages ([`Session::handle`]) and, when it can write, takes the
//! queued frames ([`Session::pop_queued`]) and then the broadcasts from the topic buffers
//! ([`Session::collect_broadcasts`]). Queued frames go first, so a join reply always precedes the
//! messages the join replays.
//!
//! Architecture Invariant: no I/O and no `.await` here; the session never touches a socket and
//! never talks to a broker other than through the [`Hub`](crate::hub::Hub) (and a join request
//! the broker completes), nor to the app other than through a forward
//! [`Lane`](crate::forward::Lane) (a task that does the HTTP); presence changes go to the
//! presence task's queue ([`crate::presence`]). All three answer through the mailbox.

use crate::app::App;
use crate::auth::ConnectInfo;
use crate::hub::{ConnHandle, Entry, Lag, LiveJoin, Subscription};
use crate::metrics::Metrics;
use crate::protocol::{self, Inbound, ParseError, Payload};
use std::collections::VecDeque;
use std::sync::Arc;

/// A frame addressed to this client alone (a reply, `phx_close`, ...): JSON text.
pub type QueuedFrame = Vec<u8>;

#[derive(Debug)]
struct Channel {
    join_ref: String,
    sub: Subscription,
    /// Set on a presence topic; dropping the channel untracks it. (Boxed: 8 bytes on every
    /// channel, presence or not.)
    _presence: Option<Box<crate::presence::Tracked>>,
}

#[derive(Debug)]
pub struct Session {
    app: Arc<App>,
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
    lane: Option<crate::forward::Lane>,
    /// Joins this connection may still make now (`limits.join_rate_per_connection`).
    join_budget: crate::admission::JoinBucket,
}

#[derive(Debug)]
struct PendingJoin {
    topic: String,
    join_ref: String,
    msg_ref: Option<String>,
    presence: Option<crate::presence::Prepared>,
}

type JoinDone = (String, String, Result<crate::broker::Joined, String>);

/// Completed joins handed back by the broker's task, and replies to forwarded pushes.
#[derive(Default)]
struct Mailbox {
    any: std::sync::atomic::AtomicBool,
    done: std::sync::Mutex<Vec<JoinDone>>,
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
#[derive(serde::Deserialize)]
struct JoinParams {
    since: Option<String>,
    presence: Option<Box<serde_json::value::RawValue>>,
}

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
            && n.len() <= 32
            && n.bytes().all(|b| b.is_ascii_alphanumeric())
            && id.parse::<u64>().is_ok_and(|i| i > 0)
    })
}

impl Session {
    pub fn new(app: Arc<App>, connect: ConnectInfo) -> Session {
        Session::with_conn_handle(app, connect, Arc::new(ConnHandle::default()))
    }

    /// A session woken through `conn_handle` (which may already hold the connection's socket).
    pub fn with_conn_handle(
        app: Arc<App>,
        connect: ConnectInfo,
        conn_handle: Arc<ConnHandle>,
    ) -> Session {
        let join_budget = app.admission.join_bucket();
        Session {
            app,
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

    /// The connection handle topics use to tell this session's transport that broadcasts are
    /// waiting.
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
        Metrics::add(&self.app.metrics.bad_messages, 1);
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
        Metrics::add(&self.app.metrics.join_errors, 1);
        self.reply(protocol::encode_error_reply(
            join_ref,
            msg.msg_ref.as_deref(),
            &msg.topic,
            reason,
        ));
    }

    fn join(&mut self, msg: Inbound) {
        // For a join, join_ref == ref; accept either being absent.
        let Some(join_ref) = msg.join_ref.clone().or_else(|| msg.msg_ref.clone()) else {
            self.join_error(&msg, None, "join requires a ref");
            return;
        };
        if !self.app.admission.may_join(&mut self.join_budget) {
            self.app.metrics.refused(crate::metrics::Refusal::RateLimit);
            self.join_error(&msg, Some(&join_ref), "rate limited");
            return;
        }
        if msg.topic.is_empty()
            || msg.topic.len() > protocol::MAX_FIELD_BYTES
            || msg.topic == protocol::PHOENIX_TOPIC
        {
            self.join_error(
                &msg,
                Some(&join_ref),
                "invalid topic: must be 1 to 255 bytes and not \"phoenix\"",
            );
            return;
        }
        if let Err(refusal) = self.app.auth.may_join(&self.connect, &msg.topic) {
            Metrics::add(&self.app.metrics.join_errors, 1);
            tracing::debug!(topic = ?msg.topic, detail = ?refusal.0, "join refused: unauthorized");
            self.reply(protocol::encode_reply(
                Some(&join_ref),
                msg.msg_ref.as_deref(),
                &msg.topic,
                "error",
                &protocol::reason_and_detail("unauthorized", &refusal.0),
            ));
            return;
        }
        let (since, presence_param) = match &msg.payload {
            Payload::Json(raw) => match raw.get() {
                "null" => (None, None),
                text => match serde_json::from_str::<JoinParams>(text) {
                    Ok(p) => (p.since, p.presence),
                    Err(_) => {
                        self.join_error(
                            &msg,
                            Some(&join_ref),
                            "join params must be an object; \"since\" must be a position string",
                        );
                        return;
                    }
                },
            },
            Payload::Binary(_) => {
                self.join_error(&msg, Some(&join_ref), "join params must be JSON");
                return;
            }
        };
        let presence = match self.app.presence.as_ref().filter(|p| p.tracks(&msg.topic)) {
            None => None,
            Some(p) => match p.prepare(
                self.app.auth.subject(&self.connect),
                presence_param.as_deref(),
            ) {
                Ok(prepared) => Some(prepared),
                Err(reason) => {
                    self.join_error(&msg, Some(&join_ref), &reason);
                    return;
                }
            },
        };
        if !self.app.hub.has_room_for(&msg.topic) {
            self.app.metrics.refused(crate::metrics::Refusal::TopicCap);
            tracing::debug!(topic = %msg.topic, "join refused: limits.max_topics reached");
            self.join_error(
                &msg,
                Some(&join_ref),
                "too many topics on this node (limits.max_topics)",
            );
            return;
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
            >= self.app.config.limits.max_topics_per_connection
        {
            self.join_error(
                &msg,
                Some(&join_ref),
                "too many topics on this connection (limits.max_topics_per_connection)",
            );
            return;
        }
        let live = if self.app.hub.is_embedded() {
            let (sub, info) =
                self.app
                    .hub
                    .subscribe(&msg.topic, self.conn_handle.clone(), since.as_deref());
            LiveJoin::Done(sub, info)
        } else {
            self.app
                .hub
                .join_live(&msg.topic, self.conn_handle.clone(), since.as_deref())
        };
        let started = match live {
            LiveJoin::Done(sub, info) => {
                self.finish_join(
                    join_ref,
                    msg.msg_ref,
                    msg.topic,
                    sub,
                    info,
                    Vec::new(),
                    presence,
                );
                return;
            }
            LiveJoin::NotLive => None,
            LiveJoin::NeedsHistory(sub, position, since_offset) => {
                Some((sub, position, since_offset))
            }
        };
        // The broker completes this join (subscribe, position, history); see `settle`.
        let mailbox = self.mailbox.get_or_insert_with(Default::default).clone();
        let conn_handle = self.conn_handle.clone();
        let (topic, jr) = (msg.topic.clone(), join_ref.clone());
        self.pending.push(PendingJoin {
            topic: msg.topic.clone(),
            join_ref,
            msg_ref: msg.msg_ref,
            presence,
        });
        self.app.broker.join(crate::broker::JoinRequest {
            topic: msg.topic,
            since,
            conn_handle: self.conn_handle.clone(),
            started,
            done: Box::new(move |result| {
                mailbox
                    .done
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((topic, jr, result));
                mailbox
                    .any
                    .store(true, std::sync::atomic::Ordering::Release);
                conn_handle.wake();
            }),
        });
    }

    /// Answers a join and starts delivering: the reply, then `replay` (missed messages from
    /// the broker's history), then live broadcasts from the subscription. On a presence topic
    /// the channel is tracked: its `presence_state` comes through the mailbox.
    #[allow(clippy::too_many_arguments)]
    fn finish_join(
        &mut self,
        join_ref: String,
        msg_ref: Option<String>,
        topic: String,
        sub: crate::hub::Subscription,
        info: crate::hub::JoinInfo,
        replay: Vec<QueuedFrame>,
        presence: Option<crate::presence::Prepared>,
    ) {
        let mut response = Vec::with_capacity(64);
        response.extend_from_slice(b"{\"position\":");
        protocol::push_json_str(&mut response, &info.position);
        match info.recovered {
            Some(true) => {
                response.extend_from_slice(b",\"recovered\":true");
                Metrics::add(&self.app.metrics.recoveries, 1);
            }
            Some(false) => {
                response.extend_from_slice(b",\"recovered\":false");
                Metrics::add(&self.app.metrics.recovery_failures, 1);
            }
            None => {}
        }
        response.push(b'}');
        self.reply(protocol::encode_reply(
            Some(&join_ref),
            msg_ref.as_deref(),
            &topic,
            "ok",
            &response,
        ));
        for frame in replay {
            self.reply(frame);
        }
        Metrics::add(&self.app.metrics.joins, 1);
        sub.allow_direct();
        let tracked = match (presence, self.app.presence.clone()) {
            (Some(prepared), Some(p)) => {
                let deliver = self.mailbox_sender();
                p.start(prepared, &topic, &join_ref, Arc::new(deliver))
                    .map(Box::new)
            }
            _ => None,
        };
        if self.channels.capacity() == 0 {
            // Most connections join one topic: room for one, not the four a first push makes.
            self.channels.reserve_exact(1);
        }
        self.channels.push(Channel {
            join_ref,
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
        if !mailbox.any.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let replies =
            std::mem::take(&mut *mailbox.replies.lock().unwrap_or_else(|e| e.into_inner()));
        let done = std::mem::take(&mut *mailbox.done.lock().unwrap_or_else(|e| e.into_inner()));
        for frame in replies {
            self.reply(frame);
        }
        for (topic, join_ref, result) in done {
            let Some(i) = self
                .pending
                .iter()
                .position(|p| p.topic == topic && p.join_ref == join_ref)
            else {
                continue; // left or rejoined meanwhile: the subscription is dropped here
            };
            let p = self.pending.swap_remove(i);
            match result {
                Ok((sub, info, replay)) => self.finish_join(
                    p.join_ref, p.msg_ref, p.topic, sub, info, replay, p.presence,
                ),
                Err(reason) => {
                    Metrics::add(&self.app.metrics.join_errors, 1);
                    self.reply(protocol::encode_error_reply(
                        Some(&p.join_ref),
                        p.msg_ref.as_deref(),
                        &p.topic,
                        &reason,
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
        let forwarder = self.app.forward.clone();
        if let Some(fwd) =
            forwarder.filter(|f| !msg.event.starts_with("phx_") && f.forwards(&msg.topic))
        {
            let refuse = match msg.payload {
                Payload::Binary(_) => Some("binary pushes are not forwarded"),
                Payload::Json(payload) => {
                    let job = crate::forward::Job {
                        join_ref: join_ref.clone(),
                        msg_ref: msg.msg_ref.clone(),
                        topic: msg.topic.clone(),
                        event: msg.event,
                        payload,
                        token: crate::auth::connect_token(&self.connect).map(str::to_string),
                        sender: sender_id(&self.app.node_id, &self.conn_handle),
                    };
                    let lane = match self.lane.take() {
                        Some(lane) => lane,
                        None => self.open_lane(&fwd),
                    };
                    let queued = lane.send(job);
                    self.lane = Some(lane);
                    (!queued).then_some("too many pushes waiting for the app (forward.max_queued)")
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
            return;
        }
        self.reply(protocol::encode_error_reply(
            Some(&join_ref),
            msg.msg_ref.as_deref(),
            &msg.topic,
            "client pushes are not accepted on this topic",
        ));
    }

    /// A lane to the app whose replies come back through the mailbox, like completed joins.
    fn open_lane(&mut self, fwd: &Arc<crate::forward::Forwarder>) -> crate::forward::Lane {
        let deliver = self.mailbox_sender();
        fwd.lane(&self.app.tracker, deliver)
    }

    /// Hands frames to this session from another task (forward replies, `presence_state`):
    /// they go out with the next `settle`.
    fn mailbox_sender(&mut self) -> impl Fn(QueuedFrame) + Send + Sync + 'static {
        let mailbox = self.mailbox.get_or_insert_with(Default::default).clone();
        let conn_handle = self.conn_handle.clone();
        move |frame| {
            mailbox
                .replies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(frame);
            mailbox
                .any
                .store(true, std::sync::atomic::Ordering::Release);
            conn_handle.wake();
            conn_handle.hold();
        }
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
        let max_pending = self.app.config.limits.max_pending_bytes;
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
        let max_pending = self.app.config.limits.max_pending_bytes;
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
                // Come back for the rest: the connection handle stays set so the transport loops
                // again.
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
