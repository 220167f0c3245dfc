//! Topics on this node: each topic's history buffer, its position, and its local subscribers.
//!
//! One shared buffer per topic serves both history (recovery by position) and live fanout:
//! a broadcast is encoded once into a [`Entry`] (its WebSocket frame, whose tail is the bare JSON
//! text for LongPoll), appended to the topic's buffer, and every subscriber is woken. Each
//! subscriber keeps only the offset of the last entry it has taken ([`Subscription::last`]) and
//! copies out reference-counted handles to the shared bytes when its connection is ready to write.
//! So there is no queue per subscriber, nothing is copied per subscriber, and catching up from
//! history and receiving live messages are the same operation: there is no seam between them.
//!
//! Slow-consumer policy (written down once, here): a subscriber whose next entry has left the
//! buffer (trimmed by `history.size` or `history.max_age_secs`), or whose pending bytes exceed
//! `limits.max_pending_bytes`, gets [`Lag`] from [`Topic::read`]; its transport closes it
//! (WebSocket 1013) and the client recovers by position when it rejoins. Publishers never wait.
//!
//! Locking: the topic map is a std mutex held only to look up, create or remove a topic. Each
//! topic has a std `RwLock`: publishing appends under the write lock; reading and waking take the
//! read lock. No lock is held across an `.await`.
//!
//! Architecture Invariant: the hub knows no transport and no protocol beyond encoding a broadcast
//! frame; it never blocks on a subscriber.

use crate::config::HistoryConfig;
use crate::metrics::Metrics;
use crate::protocol;
use crate::ws;
use bytes::Bytes;
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A position in a topic's stream: `<epoch>:<offset>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Arc<str>,
    pub offset: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

/// Parses `<epoch>:<offset>`; `None` when it is not of that shape.
pub fn parse_position(s: &str) -> Option<(&str, u64)> {
    let (epoch, offset) = s.rsplit_once(':')?;
    if epoch.is_empty() {
        return None;
    }
    Some((epoch, offset.parse().ok()?))
}

/// One broadcast, encoded once and shared by every subscriber.
#[derive(Debug, Clone)]
pub struct Entry {
    pub offset: u64,
    /// The complete WebSocket text frame; `frame[text_start..]` is the bare JSON text.
    frame: Bytes,
    text_start: u8,
    /// Bytes appended to the topic before this entry (for lag accounting).
    cum_start: u64,
    at: Instant,
}

impl Entry {
    /// The WebSocket frame (header and text).
    pub fn ws_frame(&self) -> &Bytes {
        &self.frame
    }

    /// The JSON text `[null,"<position>",topic,event,payload]`.
    pub fn text(&self) -> Bytes {
        self.frame.slice(self.text_start as usize..)
    }
}

/// Wakes one connection's task when a topic it reads has new entries. Deduplicated: many
/// publishes before the task runs cost one wake-up. The task's waker sits in one slot (the task
/// re-registers each time it polls), so waking costs no allocation and no lock.
#[derive(Debug, Default)]
pub struct Waker {
    task: atomic_waker::AtomicWaker,
    scheduled: AtomicBool,
}

impl Waker {
    pub fn wake(&self) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.task.wake();
        }
    }

    /// Ready when a wake-up came since the last [`Waker::clear`]; registers the task otherwise.
    pub fn poll_woken(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.task.register(cx.waker());
        if self.scheduled.load(Ordering::Acquire) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Waits for a wake-up (returns at once if one came since the last [`Waker::clear`]).
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await
    }

    /// Call before reading topics, so a publish that lands during the read wakes us again.
    pub fn clear(&self) {
        self.scheduled.store(false, Ordering::Release);
    }
}

/// Why a subscriber cannot continue: it fell behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    /// Its next message is no longer in the buffer.
    FellOffHistory,
    /// More than `limits.max_pending_bytes` are waiting for it.
    TooManyPendingBytes,
}

#[derive(Debug)]
struct TopicState {
    epoch: Arc<str>,
    last_offset: u64,
    entries: VecDeque<Entry>,
    /// Bytes ever appended in this epoch.
    total_bytes: u64,
    subscribers: Slab<Arc<Waker>>,
    /// Set when the sweeper removed the topic from the map; publishers then look it up again.
    removed: bool,
}

#[derive(Debug)]
pub struct Topic {
    name: Arc<str>,
    state: RwLock<TopicState>,
    /// A fanout task is sweeping this topic's subscribers (see [`Hub::publish`]).
    fanout_scheduled: AtomicBool,
}

/// Topics with at most this many local subscribers are woken inline by the publisher.
const INLINE_WAKE_MAX: usize = 64;
/// A fanout task wakes this many subscribers, then yields so that they write and other work
/// (the next publish, above all) gets in between chunks.
const WAKE_CHUNK: usize = 256;

/// Wakes every subscriber of a large topic, a chunk at a time, and sweeps again as long as
/// messages arrived during the sweep. Publishes that land while a sweep runs wake nobody
/// themselves: the next sweep covers them, so under load each subscriber takes many messages
/// per wake-up (and per write), while a lone message is still delivered at once.
async fn fanout(topic: Arc<Topic>) {
    loop {
        let (covered, wakers): (u64, Vec<Arc<Waker>>) = {
            let st = topic.read_lock();
            (
                st.last_offset,
                st.subscribers.iter().map(|(_, w)| w.clone()).collect(),
            )
        };
        for chunk in wakers.chunks(WAKE_CHUNK) {
            for w in chunk {
                w.wake();
            }
            tokio::task::yield_now().await;
        }
        drop(wakers);
        topic.fanout_scheduled.store(false, Ordering::Release);
        if topic.read_lock().last_offset == covered {
            return;
        }
        if topic.fanout_scheduled.swap(true, Ordering::AcqRel) {
            return; // a publisher started the next sweep
        }
    }
}

/// A subscriber's hold on a topic. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    topic: Arc<Topic>,
    key: usize,
    /// Offset of the last entry taken.
    pub last: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.topic.write();
        if st.subscribers.contains(self.key) {
            st.subscribers.remove(self.key);
        }
    }
}

impl Subscription {
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }
}

/// What a join learns about its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinInfo {
    /// The topic's current position (the last published message, or offset 0).
    pub position: String,
    /// `Some(true)` when `since` was honoured, `Some(false)` when the gap is not in history,
    /// `None` when the join had no `since`.
    pub recovered: Option<bool>,
}

impl Topic {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, TopicState> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than losing the node, so poisoning is ignored.
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, TopicState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The current position.
    pub fn position(&self) -> Position {
        let st = self.read_lock();
        Position {
            epoch: st.epoch.clone(),
            offset: st.last_offset,
        }
    }

    /// `Err` when `sub` has fallen behind (see the slow-consumer policy above).
    pub fn lag(&self, sub: &Subscription, max_pending: u64) -> Result<(), Lag> {
        let mut last = sub.last;
        self.read(&mut last, max_pending, 0, &mut |_| {})
            .map(|_| ())
    }

    /// Hands `emit` every entry after `*last`, oldest first, until about `budget` bytes, and
    /// advances `*last`. Returns how many entries were emitted.
    pub fn read(
        &self,
        last: &mut u64,
        max_pending: u64,
        budget: usize,
        emit: &mut dyn FnMut(&Entry),
    ) -> Result<usize, Lag> {
        let st = self.read_lock();
        if *last >= st.last_offset {
            return Ok(0);
        }
        let Some(front) = st.entries.front() else {
            return Err(Lag::FellOffHistory);
        };
        if *last + 1 < front.offset {
            return Err(Lag::FellOffHistory);
        }
        let first = (*last + 1 - front.offset) as usize;
        if st.total_bytes - st.entries[first].cum_start > max_pending {
            return Err(Lag::TooManyPendingBytes);
        }
        let mut bytes = 0;
        let mut n = 0;
        if budget == 0 {
            return Ok(0);
        }
        for e in st.entries.range(first..) {
            emit(e);
            *last = e.offset;
            n += 1;
            bytes += e.frame.len();
            if bytes >= budget {
                break;
            }
        }
        Ok(n)
    }
}

impl TopicState {
    fn trim(&mut self, history: &HistoryConfig, now: Instant) {
        while self.entries.len() > history.size {
            self.entries.pop_front();
        }
        let max_age = Duration::from_secs(history.max_age_secs);
        while let Some(front) = self.entries.front() {
            if now.duration_since(front.at) > max_age {
                self.entries.pop_front();
            } else {
                break;
            }
        }
        if self.entries.is_empty() && self.entries.capacity() > 0 {
            self.entries = VecDeque::new();
        }
    }
}

/// Wakes a topic's subscribers after a publish: inline for small topics (or outside a
/// runtime), through a [`fanout`] task for large ones.
fn wake_subscribers(topic: &Arc<Topic>) {
    if topic.fanout_scheduled.load(Ordering::Acquire) {
        return; // the running sweep will cover this message
    }
    let st = topic.read_lock();
    let handle = if st.subscribers.len() > INLINE_WAKE_MAX {
        tokio::runtime::Handle::try_current().ok()
    } else {
        None
    };
    match handle {
        None => {
            for (_, w) in st.subscribers.iter() {
                w.wake();
            }
        }
        Some(handle) => {
            drop(st);
            if !topic.fanout_scheduled.swap(true, Ordering::AcqRel) {
                handle.spawn(fanout(topic.clone()));
            }
        }
    }
}

/// All topics of this node.
#[derive(Debug)]
pub struct Hub {
    topics: Mutex<HashMap<Arc<str>, Arc<Topic>>>,
    history: HistoryConfig,
    metrics: Arc<Metrics>,
}

fn new_epoch() -> Arc<str> {
    // 48 random bits: a restarted node or a recreated topic gets a new epoch, so an old
    // position can never be mistaken for a current one.
    let r: u64 = rand::random();
    Arc::from(format!("{:012x}", r & 0xFFFF_FFFF_FFFF))
}

impl Hub {
    pub fn new(history: HistoryConfig, metrics: Arc<Metrics>) -> Hub {
        Hub {
            topics: Mutex::new(HashMap::new()),
            history,
            metrics,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Topic>>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_or_create(&self, map: &mut HashMap<Arc<str>, Arc<Topic>>, name: &str) -> Arc<Topic> {
        if let Some(t) = map.get(name) {
            return t.clone();
        }
        let name: Arc<str> = Arc::from(name);
        let topic = Arc::new(Topic {
            name: name.clone(),
            state: RwLock::new(TopicState {
                epoch: new_epoch(),
                last_offset: 0,
                entries: VecDeque::new(),
                total_bytes: 0,
                subscribers: Slab::new(),
                removed: false,
            }),
            fanout_scheduled: AtomicBool::new(false),
        });
        map.insert(name, topic.clone());
        self.metrics
            .topics
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        topic
    }

    /// Subscribes `waker` to `name`, starting after `since` when it is honoured.
    pub fn subscribe(
        &self,
        name: &str,
        waker: Arc<Waker>,
        since: Option<&str>,
    ) -> (Subscription, JoinInfo) {
        let mut map = self.map();
        let topic = self.get_or_create(&mut map, name);
        let mut st = topic.write();
        st.trim(&self.history, Instant::now());
        let current = st.last_offset;
        let oldest = st.entries.front().map(|e| e.offset).unwrap_or(current + 1);
        let (start, recovered) = match since {
            None => (current, None),
            Some(since) => match parse_position(since) {
                Some((epoch, offset))
                    if epoch == &*st.epoch && offset <= current && offset + 1 >= oldest =>
                {
                    (offset, Some(true))
                }
                _ => (current, Some(false)),
            },
        };
        let key = st.subscribers.insert(waker);
        let info = JoinInfo {
            position: format!("{}:{}", st.epoch, current),
            recovered,
        };
        drop(st);
        drop(map);
        (
            Subscription {
                topic,
                key,
                last: start,
            },
            info,
        )
    }

    /// Publishes one message to a topic of this node; returns its position.
    /// `payload` must be valid JSON text.
    pub fn publish(&self, name: &str, event: &str, payload: &[u8]) -> Position {
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
            let position = Position {
                epoch: st.epoch.clone(),
                offset,
            };
            let pos_text = position.to_string();
            let mut buf = Vec::with_capacity(
                ws::MAX_HEADER + 24 + pos_text.len() + name.len() + event.len() + payload.len(),
            );
            buf.resize(ws::MAX_HEADER, 0);
            protocol::push_broadcast(&mut buf, &pos_text, name, event, payload);
            let start = ws::frame_in_place(&mut buf, ws::OP_TEXT);
            let frame = Bytes::from(buf).slice(start..);
            let text_start = (ws::MAX_HEADER - start) as u8;
            let len = frame.len() as u64;
            let now = Instant::now();
            let cum_start = st.total_bytes;
            st.entries.push_back(Entry {
                offset,
                frame,
                text_start,
                cum_start,
                at: now,
            });
            st.total_bytes += len;
            st.last_offset = offset;
            st.trim(&self.history, now);
            drop(st);
            wake_subscribers(&topic);
            Metrics::add(&self.metrics.messages_published, 1);
            return position;
        }
    }

    /// Trims old history and forgets topics with neither subscribers nor history.
    /// Run periodically by the server.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, topic| {
            let mut st = topic.write();
            st.trim(&self.history, now);
            let keep = !st.subscribers.is_empty() || !st.entries.is_empty();
            if !keep {
                st.removed = true;
            }
            keep
        });
        let removed = before - map.len();
        if map.capacity() > 64 && map.len() < map.capacity() / 4 {
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

    fn hub(size: usize) -> Hub {
        Hub::new(
            HistoryConfig {
                size,
                max_age_secs: 60,
            },
            Arc::new(Metrics::default()),
        )
    }

    fn texts(topic: &Topic, sub: &mut Subscription) -> Result<Vec<String>, Lag> {
        let mut got = Vec::new();
        topic.read(&mut sub.last, u64::MAX, usize::MAX, &mut |e| {
            got.push(String::from_utf8(e.text().to_vec()).unwrap())
        })?;
        Ok(got)
    }

    #[test]
    fn live_subscribers_get_each_message_once_in_order() {
        let h = hub(10);
        let (mut sub, info) = h.subscribe("t", Arc::new(Waker::default()), None);
        assert!(info.position.ends_with(":0"));
        let p1 = h.publish("t", "e", b"1");
        let p2 = h.publish("t", "e", b"2");
        assert_eq!(p1.offset + 1, p2.offset);
        let topic = sub.topic().clone();
        let got = texts(&topic, &mut sub).unwrap();
        assert_eq!(
            got,
            [
                format!("[null,\"{p1}\",\"t\",\"e\",1]"),
                format!("[null,\"{p2}\",\"t\",\"e\",2]")
            ]
        );
        assert!(texts(&topic, &mut sub).unwrap().is_empty());
    }

    #[test]
    fn since_replays_exactly_the_gap_then_live() {
        let h = hub(10);
        let p1 = h.publish("t", "e", b"1");
        h.publish("t", "e", b"2");
        h.publish("t", "e", b"3");
        let (mut sub, info) = h.subscribe("t", Arc::new(Waker::default()), Some(&p1.to_string()));
        assert_eq!(info.recovered, Some(true));
        h.publish("t", "e", b"4");
        let topic = sub.topic().clone();
        let got = texts(&topic, &mut sub).unwrap();
        let payloads: Vec<_> = got.iter().map(|t| &t[t.len() - 2..t.len() - 1]).collect();
        assert_eq!(payloads, ["2", "3", "4"]);
    }

    #[test]
    fn since_outside_history_or_epoch_is_not_recovered() {
        let h = hub(2);
        let p1 = h.publish("t", "e", b"1");
        h.publish("t", "e", b"2");
        h.publish("t", "e", b"3");
        let w = Arc::new(Waker::default());
        // p1's successor (offset 2) is still there: recoverable.
        assert_eq!(
            h.subscribe("t", w.clone(), Some(&p1.to_string()))
                .1
                .recovered,
            Some(true)
        );
        let p0 = format!("{}:0", p1.epoch);
        assert_eq!(
            h.subscribe("t", w.clone(), Some(&p0)).1.recovered,
            Some(false)
        );
        assert_eq!(
            h.subscribe("t", w.clone(), Some("other:1")).1.recovered,
            Some(false)
        );
        assert_eq!(
            h.subscribe("t", w.clone(), Some(&format!("{}:99", p1.epoch)))
                .1
                .recovered,
            Some(false)
        );
        assert_eq!(
            h.subscribe("t", w, Some("garbage")).1.recovered,
            Some(false)
        );
    }

    #[test]
    fn a_subscriber_that_falls_off_the_buffer_lags() {
        let h = hub(3);
        let (mut sub, _) = h.subscribe("t", Arc::new(Waker::default()), None);
        for i in 0..5 {
            h.publish("t", "e", i.to_string().as_bytes());
        }
        let topic = sub.topic().clone();
        assert_eq!(texts(&topic, &mut sub), Err(Lag::FellOffHistory));
        let (mut sub2, _) = h.subscribe("t", Arc::new(Waker::default()), None);
        h.publish("t", "e", b"123456");
        let r = topic.read(&mut sub2.last, 10, usize::MAX, &mut |_| {});
        assert_eq!(r, Err(Lag::TooManyPendingBytes));
    }

    #[test]
    fn publishing_wakes_subscribers_once_and_drop_unsubscribes() {
        let h = hub(10);
        let w = Arc::new(Waker::default());
        let (sub, _) = h.subscribe("t", w.clone(), None);
        h.publish("t", "e", b"1");
        h.publish("t", "e", b"2");
        assert!(w.scheduled.load(Ordering::Acquire));
        assert_eq!(h.subscriber_count("t"), 1);
        drop(sub);
        assert_eq!(h.subscriber_count("t"), 0);
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
        let (sub, info1) = h.subscribe("t", Arc::new(Waker::default()), None);
        h.sweep();
        assert_eq!(h.subscriber_count("t"), 1);
        drop(sub);
        h.sweep();
        let (_sub, info2) = h.subscribe("t", Arc::new(Waker::default()), None);
        assert_ne!(info1.position, info2.position);
    }

    #[test]
    fn a_broadcast_frame_is_a_valid_websocket_frame_around_the_text() {
        let h = hub(10);
        let (mut sub, _) = h.subscribe("t", Arc::new(Waker::default()), None);
        h.publish("t", "e", &vec![b'1'; 300]);
        let topic = sub.topic().clone();
        topic
            .read(&mut sub.last, u64::MAX, usize::MAX, &mut |e| {
                let f = e.ws_frame();
                assert_eq!(f[0], 0x81);
                assert_eq!(f[1], 126);
                let len = u16::from_be_bytes([f[2], f[3]]) as usize;
                assert_eq!(len, e.text().len());
                assert_eq!(&f[4..], &e.text()[..]);
            })
            .unwrap();
    }
}
