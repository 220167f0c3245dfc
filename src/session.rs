//! One client's Phoenix session, independent of transport: joined channels and their join_refs,
//! heartbeat replies, the stale-join_ref filter, and the frames waiting to go out.
//!
//! A transport feeds it parsed messages ([`Session::handle`]) and, when it can write, takes the
//! direct frames ([`Session::pop_direct`]) and then the broadcasts from the topic buffers
//! ([`Session::collect_broadcasts`]). Direct frames go first, so a join reply always precedes the
//! messages the join replays.
//!
//! Architecture Invariant: no I/O and no `.await` here; the session never touches a socket and
//! never talks to a broker other than through the [`Hub`](crate::hub::Hub).

use crate::app::App;
use crate::hub::{Entry, Lag, Subscription, Waker};
use crate::metrics::Metrics;
use crate::protocol::{self, Inbound, ParseError, Payload};
use std::collections::VecDeque;
use std::sync::Arc;

/// A frame addressed to this client alone (a reply, `phx_close`, ...): JSON text.
pub type DirectFrame = Vec<u8>;

#[derive(Debug)]
struct Channel {
    join_ref: String,
    sub: Subscription,
}

/// What the client presented when connecting; kept for authorization.
#[derive(Debug, Default, Clone)]
pub struct ConnectInfo {
    /// The raw query string of the connect request.
    pub query: String,
    /// The phoenix.js `authToken`, if one was offered.
    pub auth_token: Option<String>,
}

#[derive(Debug)]
pub struct Session {
    app: Arc<App>,
    waker: Arc<Waker>,
    channels: Vec<Channel>,
    direct: VecDeque<DirectFrame>,
    /// Bytes in `direct`.
    direct_bytes: usize,
    #[allow(dead_code)] // read by topic authorization, which is a later issue
    connect: ConnectInfo,
}

/// `since` from join params; other keys are the application's and are ignored.
#[derive(serde::Deserialize)]
struct JoinParams {
    since: Option<String>,
}

impl Session {
    pub fn new(app: Arc<App>, connect: ConnectInfo) -> Session {
        Session {
            app,
            waker: Arc::new(Waker::default()),
            channels: Vec::new(),
            direct: VecDeque::new(),
            direct_bytes: 0,
            connect,
        }
    }

    /// The waker topics use to tell this session's transport that broadcasts are waiting.
    pub fn waker(&self) -> &Arc<Waker> {
        &self.waker
    }

    /// Number of joined channels.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    fn reply(&mut self, frame: DirectFrame) {
        self.direct_bytes += frame.len();
        self.direct.push_back(frame);
    }

    /// Answers a message that could not be parsed, with whatever ref could be recovered.
    pub fn handle_parse_error(&mut self, err: ParseError) {
        Metrics::add(&self.app.metrics.bad_messages, 1);
        tracing::debug!(reason = %err.reason, "bad client message");
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
        let since = match &msg.payload {
            Payload::Json(raw) => match raw.get() {
                "null" => None,
                text => match serde_json::from_str::<JoinParams>(text) {
                    Ok(p) => p.since,
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
        if let Some(i) = self.channel_index(&msg.topic) {
            // Joining a topic that is already joined: close the old channel first (the client
            // drops this as stale), then join afresh, as Phoenix does.
            let old = self.channels.swap_remove(i);
            self.reply(protocol::encode_close(&old.join_ref, &msg.topic));
        } else if self.channels.len() >= self.app.config.limits.max_topics_per_connection {
            self.join_error(
                &msg,
                Some(&join_ref),
                "too many topics on this connection (limits.max_topics_per_connection)",
            );
            return;
        }
        let (sub, info) = self
            .app
            .hub
            .subscribe(&msg.topic, self.waker.clone(), since.as_deref());
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
            msg.msg_ref.as_deref(),
            &msg.topic,
            "ok",
            &response,
        ));
        Metrics::add(&self.app.metrics.joins, 1);
        self.channels.push(Channel { join_ref, sub });
        // Replayed messages (if any) are waiting in the topic buffer.
        if info.recovered == Some(true) {
            self.waker.wake();
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
        self.reply(protocol::encode_error_reply(
            Some(&join_ref),
            msg.msg_ref.as_deref(),
            &msg.topic,
            "client pushes are not accepted on this topic",
        ));
    }

    /// Takes the oldest direct frame.
    pub fn pop_direct(&mut self) -> Option<DirectFrame> {
        let f = self.direct.pop_front();
        if let Some(f) = &f {
            self.direct_bytes -= f.len();
        } else if self.direct.capacity() > 0 {
            self.direct = VecDeque::new(); // an idle session holds no queue
        }
        f
    }

    pub fn has_direct(&self) -> bool {
        !self.direct.is_empty()
    }

    /// Bytes of direct frames waiting (replies the client has not collected).
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
        for ch in &mut self.channels {
            let topic = ch.sub.topic().clone();
            let remaining = budget.saturating_sub(bytes);
            let mut count_bytes = |e: &Entry| {
                bytes += e.ws_frame().len();
                emit(e)
            };
            total += topic.read(&mut ch.sub.last, max_pending, remaining, &mut count_bytes)?;
            if bytes >= budget {
                // Come back for the rest: the waker stays set so the transport loops again.
                self.waker.wake();
                break;
            }
        }
        Ok(total)
    }
}
