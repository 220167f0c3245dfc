//! Topic buffers and positions: a topic's epoch and offsets, the broadcasts it has encoded
//! once and shares with every subscriber ([`Entry`]), where a join starts in the buffer, and
//! history reads (the same read serves catching up and live delivery).

use super::delivery::{DirectSubscriber, Lag, Subscriber};
use crate::config::HistoryConfig;
use crate::protocol;
use crate::ws;
use bytes::Bytes;
use slab::Slab;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Room reserved when encoding a broadcast, beyond its epoch, topic, event and payload: the 17
/// bytes of JSON around them (`[null,"<epoch>:<offset>","<topic>","<event>",<payload>]`) and
/// up to 20 digits of offset, rounded up. Only a capacity hint: a topic or event with escaped
/// characters grows the buffer once more.
const BROADCAST_TEXT_OVERHEAD: usize = 40;

/// An epoch is this many random bits (48), written as 12 hex digits: a restarted node or a
/// recreated topic gets a new epoch, so an old position can never be mistaken for a current
/// one.
const EPOCH_MASK: u64 = 0xFFFF_FFFF_FFFF;

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

/// A message to append to a topic.
#[derive(Debug, Clone, Copy)]
pub struct Broadcast<'a> {
    pub event: &'a str,
    /// JSON text.
    pub payload: &'a [u8],
    /// The [`ConnHandle::id`] of a connection of this node that must not get it, or 0.
    pub exclude: u64,
}

/// One broadcast, encoded once and shared by every subscriber.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Local sequence number in this node's buffer (what subscribers' read positions count).
    pub seq: u64,
    /// Public offset in the topic's stream; 0 for a message without one (a plain Redis
    /// PUBLISH). With the embedded broker `offset == seq`.
    pub offset: u64,
    /// The complete WebSocket text frame; `frame[text_start..]` is the bare JSON text.
    pub(super) frame: Bytes,
    text_start: u8,
    /// Bytes appended to the topic before this entry (for lag accounting).
    cum_start: u64,
    pub(super) at: Instant,
    /// The text as a JSON string literal (how a LongPoll answer carries it), made by the first
    /// LongPoll subscriber that takes the entry and shared by the rest.
    json_string: std::sync::OnceLock<Bytes>,
    /// The [`ConnHandle::id`] of the connection this message is not for ("send to others"; the
    /// publish's `exclude`), or 0.
    pub exclude: u64,
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

    /// The text as a JSON string literal, escaped once per entry.
    pub fn json_string(&self) -> Bytes {
        self.json_string
            .get_or_init(|| crate::protocol::json_string(&self.frame[self.text_start as usize..]))
            .clone()
    }
}

#[derive(Debug)]
pub(super) struct TopicState {
    pub(super) epoch: Arc<str>,
    /// Public offset of the last message with one.
    pub(super) last_offset: u64,
    /// Local sequence number of the last entry.
    pub(super) last_seq: u64,
    /// The node receives this topic's messages: always with the embedded broker; with Redis,
    /// once the broker has subscribed to its channel and learned its position.
    pub(super) live: bool,
    pub(super) entries: VecDeque<Entry>,
    /// Bytes ever appended in this epoch.
    pub(super) total_bytes: u64,
    pub(super) subscribers: Slab<Subscriber>,
    /// Set when the sweeper removed the topic from the map; publishers then look it up again.
    pub(super) removed: bool,
    /// A message other than a presence diff was appended: the history is worth keeping after
    /// the last subscriber has gone (a topic that only announced joins and leaves is not).
    pub(super) app_messages: bool,
}

#[derive(Debug)]
pub struct Topic {
    pub(super) name: Arc<str>,
    pub(super) state: RwLock<TopicState>,
    /// A fanout task is sweeping this topic's subscribers (see [`Hub::publish`]).
    pub(super) fanout_scheduled: AtomicBool,
    /// The hub's idle-topic notifier (external broker only).
    pub(super) idle: Option<Arc<tokio::sync::Notify>>,
}

/// A subscriber's hold on a topic. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub(super) topic: Arc<Topic>,
    pub(super) key: usize,
    pub(super) last: Last,
}

/// Where a subscription keeps the sequence number of the last entry it took.
#[derive(Debug)]
pub(super) enum Last {
    Own(u64),
    /// Shared with the topic, which may deliver to it directly.
    Shared(Arc<DirectSubscriber>),
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.topic.write();
        if st.subscribers.contains(self.key) {
            st.subscribers.remove(self.key);
        }
        let now_idle = st.subscribers.is_empty() && st.live;
        drop(st);
        if now_idle && let Some(idle) = &self.topic.idle {
            idle.notify_one();
        }
    }
}

impl Subscription {
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }

    /// Sequence number of the last entry taken.
    pub fn last(&self) -> u64 {
        match &self.last {
            Last::Own(n) => *n,
            Last::Shared(d) => d.last.load(Ordering::Relaxed),
        }
    }

    fn set_last(&mut self, seq: u64) {
        match &mut self.last {
            Last::Own(n) => *n = seq,
            Last::Shared(d) => d.last.store(seq, Ordering::Relaxed),
        }
    }

    /// Hands `emit` the entries after the last one taken (see [`Topic::read`]) and moves on.
    pub fn read(
        &mut self,
        max_pending: u64,
        budget: usize,
        emit: &mut dyn FnMut(&Entry),
    ) -> Result<usize, Lag> {
        let mut last = self.last();
        let r = self.topic.read(&mut last, max_pending, budget, emit);
        self.set_last(last);
        r
    }

    /// The join's reply is queued ahead of anything else this connection writes: from now on
    /// a publish may write to this subscriber directly while its connection is parked (when
    /// its connection can be written to at all).
    pub fn allow_direct(&self) {
        if let Last::Shared(d) = &self.last {
            d.allowed.store(true, Ordering::Relaxed);
        }
    }
}

impl Topic {
    /// A topic without entries or subscribers, in a new epoch; `live` when the node receives
    /// it from birth (the embedded broker).
    pub(super) fn new(name: Arc<str>, live: bool, idle: Option<Arc<tokio::sync::Notify>>) -> Topic {
        Topic {
            name,
            state: RwLock::new(TopicState {
                epoch: new_epoch(),
                last_offset: 0,
                last_seq: 0,
                live,
                entries: VecDeque::new(),
                total_bytes: 0,
                subscribers: Slab::new(),
                removed: false,
                app_messages: false,
            }),
            fanout_scheduled: AtomicBool::new(false),
            idle,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub(super) fn write(&self) -> std::sync::RwLockWriteGuard<'_, TopicState> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than losing the node, so poisoning is ignored.
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, TopicState> {
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
        let mut last = sub.last();
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
        if *last >= st.last_seq {
            return Ok(0);
        }
        let Some(front) = st.entries.front() else {
            return Err(Lag::FellOffHistory);
        };
        if *last + 1 < front.seq {
            return Err(Lag::FellOffHistory);
        }
        let first = (*last + 1 - front.seq) as usize;
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
            *last = e.seq;
            n += 1;
            bytes += e.frame.len();
            if bytes >= budget {
                break;
            }
        }
        Ok(n)
    }
}

/// Where a joining subscriber starts, as far as this node's buffer can tell.
pub(super) enum Start {
    /// At the current end (no `since`).
    Now,
    /// After the entry with this sequence number: everything from there on is the gap.
    After(u64),
    /// `since` is of this epoch but older than the buffer: the broker's history may have it.
    NotCovered(u64),
    /// `since` is of this epoch but ahead of this node's position: with an external broker,
    /// this node may just not have received what the client has seen on another node.
    Ahead(u64),
    /// `since` is from another epoch or malformed.
    Unrecoverable,
}

impl Start {
    /// The sequence number a joining subscriber starts after, whether its `since` was honoured
    /// (what [`JoinInfo::recovered`](super::JoinInfo::recovered) says), and the offset from
    /// which the broker's history must replay the gap, if it must.
    pub(super) fn resolve(self, last_seq: u64) -> (u64, Option<bool>, Option<u64>) {
        match self {
            Start::Now => (last_seq, None, None),
            Start::After(seq) => (seq, Some(true), None),
            Start::Unrecoverable | Start::Ahead(_) => (last_seq, Some(false), None),
            Start::NotCovered(offset) => (last_seq, None, Some(offset)),
        }
    }
}

impl TopicState {
    /// Encodes and appends one broadcast; `offset` 0 means it has no position.
    pub(super) fn append(
        &mut self,
        name: &str,
        offset: u64,
        message: Broadcast<'_>,
        history: &HistoryConfig,
    ) {
        let Broadcast {
            event,
            payload,
            exclude,
        } = message;
        let (frame, text_start) = self.encode_frame(name, offset, event, payload);
        let len = frame.len() as u64;
        let now = Instant::now();
        self.app_messages |= event != protocol::PRESENCE_DIFF_EVENT;
        self.last_seq += 1;
        let cum_start = self.total_bytes;
        self.entries.push_back(Entry {
            seq: self.last_seq,
            offset,
            frame,
            text_start,
            cum_start,
            at: now,
            json_string: std::sync::OnceLock::new(),
            exclude,
        });
        self.total_bytes += len;
        if offset > 0 {
            self.last_offset = offset;
        }
        self.trim(history, now);
    }

    /// The WebSocket text frame of a broadcast at `offset` of this epoch (0: without a
    /// position), encoded once for every subscriber, and where its JSON text starts in it.
    fn encode_frame(&self, name: &str, offset: u64, event: &str, payload: &[u8]) -> (Bytes, u8) {
        let position = (offset > 0).then(|| format!("{}:{}", self.epoch, offset));
        let mut buf = Vec::with_capacity(
            ws::MAX_HEADER
                + BROADCAST_TEXT_OVERHEAD
                + self.epoch.len()
                + name.len()
                + event.len()
                + payload.len(),
        );
        buf.resize(ws::MAX_HEADER, 0);
        protocol::push_text_frame(&mut buf, None, position.as_deref(), name, event, payload);
        let start = ws::frame_in_place(&mut buf, ws::OP_TEXT);
        let frame = Bytes::from(buf).slice(start..);
        let text_start = (ws::MAX_HEADER - start) as u8;
        (frame, text_start)
    }

    /// Follows the broker into a new epoch (its history was lost or recreated) with the
    /// position `offset`. Entries of the old epoch stay readable by the subscribers that have
    /// not taken them yet, but lose their offsets, so that no position of the new epoch can
    /// ever be located among them. Returns whether the node had a position in the old epoch.
    pub(super) fn switch_epoch(&mut self, epoch: &str, offset: u64) -> bool {
        let had = self.last_offset > 0;
        self.epoch = Arc::from(epoch);
        self.last_offset = offset;
        for e in self.entries.iter_mut() {
            e.offset = 0;
        }
        had
    }

    pub(super) fn locate(&self, since: Option<&str>) -> Start {
        let Some(since) = since else {
            return Start::Now;
        };
        match parse_position(since) {
            Some((epoch, offset)) if epoch == &*self.epoch => {
                if offset == self.last_offset {
                    Start::After(self.last_seq)
                } else if offset > self.last_offset {
                    Start::Ahead(offset)
                } else if let Some(i) = self.entries.iter().position(|e| e.offset == offset + 1)
                    && self.holds_every_offset_from(i, offset + 1)
                {
                    // The gap is all here. (It is not when the topic went live again further
                    // on, `go_live`, with older entries kept: then the buffer has a hole, or
                    // stops short of the current offset, and the broker's history has what it
                    // lacks.)
                    Start::After(self.entries[i].seq - 1)
                } else {
                    Start::NotCovered(offset)
                }
            }
            _ => Start::Unrecoverable,
        }
    }

    /// Whether the entries from index `i` on (whose offset is `first`) hold every offset from
    /// `first` to the topic's current one, without a hole. Offsets only grow within an epoch
    /// (entries without one, 0, are not counted), so counting them is enough. Per join, not per
    /// message.
    fn holds_every_offset_from(&self, i: usize, first: u64) -> bool {
        self.last_buffered_offset() == Some(self.last_offset)
            && self.entries.range(i..).filter(|e| e.offset > 0).count() as u64
                == self.last_offset + 1 - first
    }

    /// The offset of the newest entry that has one (entries of an old epoch have none).
    fn last_buffered_offset(&self) -> Option<u64> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.offset > 0)
            .map(|e| e.offset)
    }

    /// Whether the periodic sweep keeps this topic (see [`Hub::sweep`](super::Hub::sweep)).
    pub(super) fn worth_keeping(&self, embedded: bool) -> bool {
        // Embedded: the buffer is the history, keep it, unless it holds nothing but
        // presence diffs (nobody is left to be announced; a flood of presence joins would
        // otherwise keep a topic each for `history.max_age_secs`). External broker: the
        // history is the broker's; keep a topic only while it has subscribers or is
        // subscribed.
        !self.subscribers.is_empty()
            || if embedded {
                !self.entries.is_empty() && self.app_messages
            } else {
                self.live
            }
    }

    pub(super) fn trim(&mut self, history: &HistoryConfig, now: Instant) {
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

fn new_epoch() -> Arc<str> {
    // 48 random bits (see [`EPOCH_MASK`]), 12 hex digits.
    let r: u64 = rand::random();
    Arc::from(format!("{:012x}", r & EPOCH_MASK))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ConnHandle;
    use crate::hub::tests::{hub, texts};

    #[test]
    fn since_replays_exactly_the_gap_then_live() {
        let h = hub(10);
        let p1 = h.publish("t", "e", b"1");
        h.publish("t", "e", b"2");
        h.publish("t", "e", b"3");
        let (mut sub, info) =
            h.subscribe("t", Arc::new(ConnHandle::default()), Some(&p1.to_string()));
        assert_eq!(info.recovered, Some(true));
        h.publish("t", "e", b"4");
        let got = texts(&mut sub).unwrap();
        let payloads: Vec<_> = got.iter().map(|t| &t[t.len() - 2..t.len() - 1]).collect();
        assert_eq!(payloads, ["2", "3", "4"]);
    }

    #[test]
    fn since_outside_history_or_epoch_is_not_recovered() {
        let h = hub(2);
        let p1 = h.publish("t", "e", b"1");
        h.publish("t", "e", b"2");
        h.publish("t", "e", b"3");
        let w = Arc::new(ConnHandle::default());
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
        let (mut sub, _) = h.subscribe("t", Arc::new(ConnHandle::default()), None);
        for i in 0..5 {
            h.publish("t", "e", i.to_string().as_bytes());
        }
        assert_eq!(texts(&mut sub), Err(Lag::FellOffHistory));
        let (mut sub2, _) = h.subscribe("t", Arc::new(ConnHandle::default()), None);
        h.publish("t", "e", b"123456");
        let r = sub2.read(10, usize::MAX, &mut |_| {});
        assert_eq!(r, Err(Lag::TooManyPendingBytes));
    }

    #[test]
    fn a_broadcast_frame_is_a_valid_websocket_frame_around_the_text() {
        let h = hub(10);
        let (mut sub, _) = h.subscribe("t", Arc::new(ConnHandle::default()), None);
        h.publish("t", "e", &vec![b'1'; 300]);
        sub.read(u64::MAX, usize::MAX, &mut |e| {
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
