//! Topics on this node: each topic's history buffer, its position, and its local subscribers.
//!
//! One shared buffer per topic serves both history (recovery by position) and live fanout:
//! a broadcast is encoded once into a [`Entry`] (its WebSocket frame, whose tail is the bare JSON
//! text for LongPoll), appended to the topic's buffer, and every subscriber is woken. Each
//! subscriber keeps only the offset of the last entry it has taken ([`Subscription::last`]) and
//! copies out reference-counted handles to the shared bytes when its connection is ready to write.
//! So there is no queue per subscriber, nothing is copied per subscriber, and catching up from
//! history and receiving live messages are the same operation: there is no seam between them.
//! When a message is the only one a subscriber lacks and its connection waits idle ("parked"),
//! the publish writes the shared frame to the socket itself instead of waking the connection
//! (see [`ConnHandle`] and [`DirectSubscriber`]).
//!
//! The files of this module:
//! - `mod.rs`: the [`Hub`] (the topic map, joins, publishing, the periodic sweep) and what a
//!   join returns ([`JoinInfo`], [`LiveJoin`]).
//! - `topic.rs`: topic buffers and positions: [`Position`] (epoch and offset), the shared
//!   encoded [`Entry`], a [`Topic`]'s buffer and where a join starts in it, history reads, and
//!   a subscriber's hold on a topic ([`Subscription`]).
//! - `handle.rs`: the connection's handle the hub wakes and writes through ([`ConnHandle`]), the
//!   socket it may write to ([`Sink`], [`DirectSink`]) and whether the connection is parked.
//! - `delivery.rs`: getting an entry to the subscribers: direct writes by the publisher
//!   ([`DirectSubscriber`]), inline wake-ups for small topics, the chunked fanout task for large
//!   ones, and the slow-consumer policy ([`Lag`]).
//! - `remote.rs`: the API the Redis broker uses: topics going live and idle, positions learned
//!   from the broker, and appending what it receives ([`Hub::append_remote`], [`RemoteAppend`]).
//!
//! Locking: the topic map is a std mutex held only to look up, create or remove a topic. Each
//! topic has a std `RwLock`: publishing appends under the write lock; reading and waking take the
//! read lock. No lock is held across an `.await`.
//!
//! Architecture Invariant: the hub knows no transport and no protocol beyond encoding a broadcast
//! frame; it never blocks on a subscriber.

mod delivery;
mod handle;
mod remote;
mod topic;

pub use delivery::{DirectSubscriber, Lag};
pub use handle::{ConnHandle, DirectSink, Sink};
pub use remote::RemoteAppend;
pub use topic::{Broadcast, Entry, Position, Subscription, Topic, parse_position};

use crate::config::HistoryConfig;
use crate::metrics::Metrics;
use delivery::{Subscriber, wake_subscribers};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use topic::Start;

/// The sweep gives memory back from a topic map of more than this many slots once fewer than
/// a quarter of them ([`TOPIC_MAP_SHRINK_DIVISOR`]) are used: a burst of topics does not pin
/// its peak forever, and a small map is not reallocated back and forth.
const TOPIC_MAP_SHRINK_MIN_CAPACITY: usize = 64;
/// See [`TOPIC_MAP_SHRINK_MIN_CAPACITY`]: the map shrinks below `capacity / 4` topics.
const TOPIC_MAP_SHRINK_DIVISOR: usize = 4;

/// What a join learns about its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinInfo {
    /// The topic's current position (the last published message, or offset 0).
    pub position: String,
    /// `Some(true)` when `since` was honoured, `Some(false)` when the gap is not in history,
    /// `None` when the join had no `since`.
    pub recovered: Option<bool>,
}

/// All topics of this node.
#[derive(Debug)]
pub struct Hub {
    topics: Mutex<HashMap<Arc<str>, Arc<Topic>>>,
    history: HistoryConfig,
    metrics: Arc<Metrics>,
    /// The embedded broker: topics are live from birth and their buffer is the history.
    embedded: bool,
    /// Told when a topic loses its last local subscriber (the Redis broker unsubscribes).
    idle: Option<Arc<tokio::sync::Notify>>,
    /// `limits.max_topics`: joins do not create topics past it ([`Hub::has_room_for`]).
    max_topics: usize,
}

/// The outcome of a join against the local buffer (see [`Hub::join_live`]).
#[derive(Debug)]
pub enum LiveJoin {
    /// Joined; nothing else to do.
    Done(Subscription, JoinInfo),
    /// The node does not receive this topic yet: the broker must subscribe first.
    NotLive,
    /// Joined at the current end; the gap `(since, position.offset]` must come from the
    /// broker's history and be replayed to this subscriber alone.
    NeedsHistory(Subscription, Position, u64),
    /// Not joined: the client's `since` is ahead of this node's position in the same epoch
    /// (it saw, on another node, messages this one has not received yet). The broker reads
    /// offsets `from..=to` into the buffer, then joins again with [`Hub::join_caught_up`].
    Behind {
        conn_handle: Arc<ConnHandle>,
        from: u64,
        to: u64,
    },
}

impl Hub {
    /// A hub for the embedded broker.
    pub fn new(history: HistoryConfig, metrics: Arc<Metrics>) -> Hub {
        Hub {
            topics: Mutex::new(HashMap::new()),
            history,
            metrics,
            embedded: true,
            idle: None,
            max_topics: usize::MAX,
        }
    }

    /// A hub fed by an external broker: topics become live when the broker says so, and
    /// `idle` is notified when a topic loses its last local subscriber.
    pub fn with_broker(
        history: HistoryConfig,
        metrics: Arc<Metrics>,
        idle: Arc<tokio::sync::Notify>,
    ) -> Hub {
        Hub {
            topics: Mutex::new(HashMap::new()),
            history,
            metrics,
            embedded: false,
            idle: Some(idle),
            max_topics: usize::MAX,
        }
    }

    /// This hub with `limits.max_topics`.
    pub fn with_max_topics(mut self, max_topics: usize) -> Hub {
        self.max_topics = max_topics;
        self
    }

    /// Whether a join of `name` may go ahead under `limits.max_topics`: the topic exists, or
    /// there is room for one more. (Checked before the join, not under the same lock: joins
    /// running at that moment on other threads may each add one topic past the cap.)
    pub fn has_room_for(&self, name: &str) -> bool {
        let map = self.map();
        map.len() < self.max_topics || map.contains_key(name)
    }

    pub fn is_embedded(&self) -> bool {
        self.embedded
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Topic>>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_or_create(&self, map: &mut HashMap<Arc<str>, Arc<Topic>>, name: &str) -> Arc<Topic> {
        if let Some(t) = map.get(name) {
            return t.clone();
        }
        let name: Arc<str> = Arc::from(name);
        let topic = Arc::new(Topic::new(name.clone(), self.embedded, self.idle.clone()));
        map.insert(name, topic.clone());
        self.metrics
            .topics
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        topic
    }

    /// Subscribes `conn_handle` to `name`, starting after `since` when it is honoured
    /// (embedded broker: the local buffer is the whole history).
    pub fn subscribe(
        &self,
        name: &str,
        conn_handle: Arc<ConnHandle>,
        since: Option<&str>,
    ) -> (Subscription, JoinInfo) {
        match self.join_live(name, conn_handle, since) {
            LiveJoin::Done(sub, info) => (sub, info),
            LiveJoin::NeedsHistory(sub, position, _) => (
                sub,
                JoinInfo {
                    position: position.to_string(),
                    recovered: Some(false),
                },
            ),
            LiveJoin::NotLive | LiveJoin::Behind { .. } => {
                unreachable!("embedded topics are always live and never behind")
            }
        }
    }

    /// Joins against the local buffer if the topic is live here (see [`LiveJoin`]).
    pub fn join_live(
        &self,
        name: &str,
        conn_handle: Arc<ConnHandle>,
        since: Option<&str>,
    ) -> LiveJoin {
        self.join_local(name, conn_handle, since, !self.embedded)
    }

    /// [`Hub::join_live`] after the broker has read what this node lacked: a `since` still
    /// ahead of the node's position is ahead of the broker too, and is not recovered.
    pub fn join_caught_up(
        &self,
        name: &str,
        conn_handle: Arc<ConnHandle>,
        since: Option<&str>,
    ) -> LiveJoin {
        self.join_local(name, conn_handle, since, false)
    }

    fn join_local(
        &self,
        name: &str,
        conn_handle: Arc<ConnHandle>,
        since: Option<&str>,
        may_be_behind: bool,
    ) -> LiveJoin {
        let mut map = self.map();
        let topic = self.get_or_create(&mut map, name);
        let mut st = topic.write();
        drop(map);
        if !st.live {
            return LiveJoin::NotLive;
        }
        st.trim(&self.history, Instant::now());
        let start = st.locate(since);
        if let Start::Ahead(to) = start
            && may_be_behind
        {
            let from = st.last_offset + 1;
            return LiveJoin::Behind {
                conn_handle,
                from,
                to,
            };
        }
        let (start, recovered, needs) = start.resolve(st.last_seq);
        let (entry, last) = Subscriber::starting_after(&conn_handle, start);
        let key = st.subscribers.insert(entry);
        let position = Position {
            epoch: st.epoch.clone(),
            offset: st.last_offset,
        };
        drop(st);
        let sub = Subscription { topic, key, last };
        if recovered == Some(true) {
            conn_handle.wake(); // the replay is waiting in the buffer
        }
        match needs {
            Some(since_offset) => LiveJoin::NeedsHistory(sub, position, since_offset),
            None => LiveJoin::Done(
                sub,
                JoinInfo {
                    position: position.to_string(),
                    recovered,
                },
            ),
        }
    }

    /// Publishes one message to a topic of this node (embedded broker); returns its position.
    /// `payload` must be valid JSON text.
    pub fn publish(&self, name: &str, event: &str, payload: &[u8]) -> Position {
        self.publish_message(
            name,
            Broadcast {
                event,
                payload,
                exclude: 0,
            },
        )
    }

    /// [`Hub::publish`] of a message that may exclude one connection.
    pub fn publish_message(&self, name: &str, message: Broadcast<'_>) -> Position {
        loop {
            let topic = {
                let mut map = self.map();
                self.get_or_create(&mut map, name)
            };
            let mut st = topic.write();
            if st.removed {
                continue;
            }
            let offset = st.last_offset + 1;
            st.append(name, offset, message, &self.history);
            let position = Position {
                epoch: st.epoch.clone(),
                offset,
            };
            drop(st);
            wake_subscribers(&topic, &self.metrics);
            Metrics::add(&self.metrics.messages_published, 1);
            return position;
        }
    }

    /// Trims old history and forgets topics with neither subscribers nor history (presence
    /// diffs alone do not count as history).
    /// Run periodically by the server.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, topic| {
            let mut st = topic.write();
            st.trim(&self.history, now);
            let keep = st.worth_keeping(self.embedded);
            if !keep {
                st.removed = true;
            }
            keep
        });
        let removed = before - map.len();
        if map.capacity() > TOPIC_MAP_SHRINK_MIN_CAPACITY
            && map.len() < map.capacity() / TOPIC_MAP_SHRINK_DIVISOR
        {
            map.shrink_to_fit();
        }
        self.metrics
            .topics
            .fetch_sub(removed as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Number of local subscribers of a topic (for tests and metrics).
    pub fn subscriber_count(&self, name: &str) -> usize {
        self.map()
            .get(name)
            .map(|t| t.read_lock().subscribers.len())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn hub(size: usize) -> Hub {
        Hub::new(
            HistoryConfig {
                size,
                max_age_secs: 60,
            },
            Arc::new(Metrics::default()),
        )
    }

    pub(super) fn texts(sub: &mut Subscription) -> Result<Vec<String>, Lag> {
        let mut got = Vec::new();
        sub.read(u64::MAX, usize::MAX, &mut |e| {
            got.push(String::from_utf8(e.text().to_vec()).unwrap())
        })?;
        Ok(got)
    }

    #[test]
    fn live_subscribers_get_each_message_once_in_order() {
        let h = hub(10);
        let (mut sub, info) = h.subscribe("t", Arc::new(ConnHandle::default()), None);
        assert!(info.position.ends_with(":0"));
        let p1 = h.publish("t", "e", b"1");
        let p2 = h.publish("t", "e", b"2");
        assert_eq!(p1.offset + 1, p2.offset);
        let got = texts(&mut sub).unwrap();
        assert_eq!(
            got,
            [
                format!("[null,\"{p1}\",\"t\",\"e\",1]"),
                format!("[null,\"{p2}\",\"t\",\"e\",2]")
            ]
        );
        assert!(texts(&mut sub).unwrap().is_empty());
    }

    #[test]
    fn sweep_forgets_topics_whose_history_is_only_presence_diffs() {
        let h = hub(10).with_max_topics(3);
        let (sub, _) = h.subscribe("watched", Arc::new(ConnHandle::default()), None);
        for t in ["watched", "diffs", "mixed"] {
            h.publish(t, crate::protocol::PRESENCE_DIFF_EVENT, b"{}");
        }
        h.publish("mixed", "news", b"{}");
        assert!(!h.has_room_for("other"), "3 topics: the cap");
        assert!(h.has_room_for("diffs"), "an existing topic may be joined");
        h.sweep();
        let mut names: Vec<String> = h.map().keys().map(|k| k.to_string()).collect();
        names.sort();
        assert_eq!(names, ["mixed", "watched"]);
        assert!(h.has_room_for("other"));
        drop(sub);
        h.sweep();
        assert_eq!(
            h.map().len(),
            1,
            "only the topic with an app message is left"
        );
    }

    #[test]
    fn sweep_forgets_empty_topics_and_a_new_incarnation_has_a_new_epoch() {
        let h = Hub::new(
            HistoryConfig {
                size: 10,
                max_age_secs: 60,
            },
            Arc::new(Metrics::default()),
        );
        let (sub, info1) = h.subscribe("t", Arc::new(ConnHandle::default()), None);
        h.sweep();
        assert_eq!(h.subscriber_count("t"), 1);
        drop(sub);
        h.sweep();
        let (_sub, info2) = h.subscribe("t", Arc::new(ConnHandle::default()), None);
        assert_ne!(info1.position, info2.position);
    }
}
