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
//! (see [`Waker`] and [`Direct`]).
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A message to append to a topic.
#[derive(Debug, Clone, Copy)]
pub struct Broadcast<'a> {
    pub event: &'a str,
    /// JSON text.
    pub payload: &'a [u8],
    /// The [`Waker::id`] of a connection of this node that must not get it, or 0.
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
    frame: Bytes,
    text_start: u8,
    /// Bytes appended to the topic before this entry (for lag accounting).
    cum_start: u64,
    at: Instant,
    /// The text as a JSON string literal (how a LongPoll answer carries it), made by the first
    /// LongPoll subscriber that takes the entry and shared by the rest.
    json_string: std::sync::OnceLock<Bytes>,
    /// The [`Waker::id`] of the connection this message is not for ("send to others"; the
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

/// Writes bytes straight to a connection's socket, without waiting (see [`Waker::park`]).
pub trait DirectSink: Send + Sync {
    /// Writes what the socket takes at once; `WouldBlock` when it takes nothing.
    fn try_send(&self, frame: &[u8]) -> std::io::Result<usize>;
    /// Reads the handle's own memory and nothing else. A sweep calls it for a group of
    /// subscribers before writing to them, so that their cache misses overlap instead of each
    /// one waiting behind the previous subscriber's send.
    fn prefetch(&self) {}
}

/// Where a publish writes a parked connection's frames (see [`Waker::set_sink`]).
pub enum Sink {
    /// The connection's own socket, held in the waker itself, so that a publish reaches it
    /// without following one more pointer per subscriber; the connection's task reads and
    /// writes it through [`Waker::tcp`].
    Tcp(tokio::net::TcpStream),
    /// Any other writer.
    Other(Arc<dyn DirectSink>),
}

impl Sink {
    fn try_send(&self, frame: &[u8]) -> std::io::Result<usize> {
        match self {
            // Straight to the socket: if it takes nothing, the woken task finds that out
            // through tokio's readiness and waits for writability itself.
            Sink::Tcp(s) => socket2::SockRef::from(s).send(frame),
            Sink::Other(s) => s.try_send(frame),
        }
    }

    fn prefetch(&self) {
        match self {
            Sink::Tcp(s) => {
                std::hint::black_box(std::os::fd::AsRawFd::as_raw_fd(s));
            }
            Sink::Other(s) => s.prefetch(),
        }
    }
}

/// Whether the connection is parked, and the unwritten tail of a frame a publish began.
#[derive(Default)]
struct Parked {
    on: bool,
    partial: Option<Box<(Bytes, usize)>>,
}

/// Wakes one connection's task when a topic it reads has new entries. Deduplicated: many
/// publishes before the task runs cost one wake-up. The task's waker sits in one slot (the task
/// re-registers each time it polls), so waking costs no allocation and no lock.
///
/// A connection that waits with nothing to write may also *park* here: then a publish whose
/// message is the only one a subscriber lacks writes that frame straight to the socket
/// ([`Direct::try_deliver`]), and the task is not woken at all. Waking, scheduling and
/// polling a task cost about as much as the send itself when every message goes out alone.
/// The lock decides who writes: the sweep only while the connection is parked, the task only
/// after it has unparked, so frames never interleave and a subscription's position has one
/// writer at a time.
pub struct Waker {
    /// This node's number for the connection (or LongPoll session), unique for the process's
    /// life: what a publish's `exclude` names ("send to others").
    pub id: u64,
    task: atomic_waker::AtomicWaker,
    scheduled: AtomicBool,
    /// Woken ahead of the others when a quiet topic gets a message (see [`WAKE_CHUNK`]).
    eager: AtomicBool,
    /// The connection's socket, when its transport can be written to directly. Set once; it
    /// lives as long as the waker, which outlives the connection's task by at most the sweep
    /// in progress or a broker join in flight (bounded by the broker's timeouts).
    sink: std::sync::OnceLock<Sink>,
    parked: Mutex<Parked>,
}

impl Default for Waker {
    fn default() -> Waker {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Waker {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            task: Default::default(),
            scheduled: Default::default(),
            eager: Default::default(),
            sink: Default::default(),
            parked: Default::default(),
        }
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker")
            .field("scheduled", &self.scheduled)
            .field("eager", &self.eager)
            .finish_non_exhaustive()
    }
}

impl Waker {
    /// Gives publishes the connection's socket to write to while the connection is parked.
    pub fn set_sink(&self, sink: Sink) {
        let _ = self.sink.set(sink);
    }

    /// The connection's socket, when the waker holds it ([`Sink::Tcp`]).
    pub fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        match self.sink.get() {
            Some(Sink::Tcp(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether publishes can write to this connection's socket (see [`Waker::set_sink`]).
    pub fn has_sink(&self) -> bool {
        self.sink.get().is_some()
    }

    /// The connection waits with nothing queued to write: a publish may write to its socket
    /// directly until [`Waker::unpark`]. (Without a socket, parking changes nothing.)
    pub fn park(&self) {
        let mut p = self.parked_slot();
        // A wake-up already pending means the task runs again at once: nothing to gain, and a
        // frame handed over by [`Waker::hold`]'s caller must not be overtaken meanwhile.
        p.on = !self.scheduled.load(Ordering::Acquire);
    }

    /// The connection runs again. Returns the frame a publish could only partly write and how
    /// much of it went out: the rest must be written before anything else.
    pub fn unpark(&self) -> Option<(Bytes, usize)> {
        let mut p = self.parked_slot();
        p.on = false;
        p.partial.take().map(|b| *b)
    }

    /// Stops publishes from writing directly until the task has run (and parked again): for a
    /// frame handed to the task from elsewhere (a mailbox), which must go out before any later
    /// broadcast. Call after [`Waker::wake`] (a task that parks from then on sees the pending
    /// wake-up and does not park). A partly written frame stays for the task's [`Waker::unpark`].
    pub fn hold(&self) {
        self.parked_slot().on = false;
    }

    fn parked_slot(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the subscriber as one whose delivery provokes a request (a LongPoll poll).
    pub fn set_eager(&self) {
        self.eager.store(true, Ordering::Relaxed);
    }

    pub fn is_eager(&self) -> bool {
        self.eager.load(Ordering::Relaxed)
    }

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

/// One subscription as its topic sees it.
#[derive(Debug, Clone)]
enum Subscriber {
    /// Woken to read for itself (LongPoll; WebSockets over TLS or HTTP/2). Its position stays
    /// in its [`Subscription`], so a sweep touches nothing but the waker.
    Wake(Arc<Waker>),
    /// Its connection can be written to directly (see [`Direct`]).
    Direct(Arc<Direct>),
}

impl Subscriber {
    fn waker(&self) -> &Arc<Waker> {
        match self {
            Subscriber::Wake(w) => w,
            Subscriber::Direct(d) => &d.waker,
        }
    }

    /// Delivers entry `newest` directly if possible, wakes the connection otherwise. Returns
    /// whether it was delivered directly.
    fn deliver_or_wake(&self, newest: Option<&Newest>) -> bool {
        if let (Subscriber::Direct(d), Some(n)) = (self, newest)
            && d.try_deliver(n)
        {
            return true;
        }
        self.waker().wake();
        false
    }

    fn prefetch(&self, seq: u64) {
        if let Subscriber::Direct(d) = self {
            d.prefetch(seq);
        }
    }
}

/// A subscription whose connection a publish may write to directly: shared between the topic
/// and the connection's [`Subscription`], it holds the sequence number of the last entry taken.
#[derive(Debug)]
pub struct Direct {
    waker: Arc<Waker>,
    last: AtomicU64,
    /// Set once the join's reply is queued ([`Subscription::allow_direct`]): only then may a
    /// publish write to this subscriber directly, after that reply.
    allowed: AtomicBool,
}

impl Direct {
    /// Writes entry `seq` (`frame`) straight to the subscriber's socket when its connection is
    /// parked and `seq` is the only entry it lacks. `true` when that delivered it whole (or
    /// skipped it: the entry excludes this connection); `false` when the connection must be
    /// woken instead (also after a partial write, whose tail the connection then writes first).
    fn try_deliver(&self, newest: &Newest) -> bool {
        let Newest {
            seq,
            ref frame,
            exclude,
            ..
        } = *newest;
        // Cheap checks first; the position is checked again under the lock.
        if !self.allowed.load(Ordering::Relaxed) || self.last.load(Ordering::Relaxed) + 1 != seq {
            return false;
        }
        let Some(sink) = self.waker.sink.get() else {
            return false;
        };
        let Ok(mut p) = self.waker.parked.try_lock() else {
            return false; // the connection is parking or unparking right now
        };
        if !p.on || p.partial.is_some() || self.last.load(Ordering::Relaxed) + 1 != seq {
            return false;
        }
        if exclude != 0 && exclude == self.waker.id {
            self.last.store(seq, Ordering::Relaxed);
            return true;
        }
        match sink.try_send(frame) {
            Ok(n) if n == frame.len() => {
                self.last.store(seq, Ordering::Relaxed);
                true
            }
            Ok(n) if n > 0 => {
                p.partial = Some(Box::new((frame.clone(), n)));
                self.last.store(seq, Ordering::Relaxed);
                false
            }
            // Nothing went out (full socket buffer, or an error the task will meet itself).
            _ => false,
        }
    }

    /// Reads what [`Direct::try_deliver`] of entry `seq` will read, without waiting on it.
    fn prefetch(&self, seq: u64) {
        if self.allowed.load(Ordering::Relaxed) && self.last.load(Ordering::Relaxed) + 1 == seq {
            std::hint::black_box(self.waker.scheduled.load(Ordering::Relaxed));
            if let Some(sink) = self.waker.sink.get() {
                sink.prefetch();
            }
        }
    }
}

/// Subscribers a sweep prefetches before writing to them (see [`DirectSink::prefetch`]).
const PREFETCH_GROUP: usize = 16;

/// What a direct delivery writes: the newest entry's sequence number and frame, and whom it
/// skips.
#[derive(Debug)]
struct Newest {
    seq: u64,
    frame: Bytes,
    exclude: u64,
    /// When it entered this node (for `pushgate_delivery_seconds`).
    at: Instant,
}

/// Delivers the newest entry to each of `subs` directly where it can, wakes the others;
/// returns how many were delivered directly. Works on a copy of the subscriber list, so no
/// lock is held while it writes.
fn deliver_all(subs: &[Subscriber], newest: Option<&Newest>) -> u64 {
    let mut direct = 0;
    for group in subs.chunks(PREFETCH_GROUP) {
        if let Some(n) = newest {
            for s in group {
                s.prefetch(n.seq);
            }
        }
        for s in group {
            direct += u64::from(s.deliver_or_wake(newest));
        }
    }
    direct
}

#[derive(Debug)]
struct TopicState {
    epoch: Arc<str>,
    /// Public offset of the last message with one.
    last_offset: u64,
    /// Local sequence number of the last entry.
    last_seq: u64,
    /// The node receives this topic's messages: always with the embedded broker; with Redis,
    /// once the broker has subscribed to its channel and learned its position.
    live: bool,
    entries: VecDeque<Entry>,
    /// Bytes ever appended in this epoch.
    total_bytes: u64,
    subscribers: Slab<Subscriber>,
    /// Set when the sweeper removed the topic from the map; publishers then look it up again.
    removed: bool,
    /// A message other than a presence diff was appended: the history is worth keeping after
    /// the last subscriber has gone (a topic that only announced joins and leaves is not).
    app_messages: bool,
}

#[derive(Debug)]
pub struct Topic {
    name: Arc<str>,
    state: RwLock<TopicState>,
    /// A fanout task is sweeping this topic's subscribers (see [`Hub::publish`]).
    fanout_scheduled: AtomicBool,
    /// The hub's idle-topic notifier (external broker only).
    idle: Option<Arc<tokio::sync::Notify>>,
}

/// Topics with at most this many local subscribers are woken inline by the publisher.
const INLINE_WAKE_MAX: usize = 64;
/// A fanout task wakes this many subscribers, then yields so that they write and other work
/// (the next publish, above all) gets in between chunks. Eager subscribers (LongPoll polls) of
/// a topic that was quiet are all woken first, at once: each answer provokes the client's next
/// request, which then queues behind every other answer instead of in between them.
const WAKE_CHUNK: usize = 256;
/// When messages kept arriving during a sweep (the topic is busy), the next sweep waits this
/// long to gather more, so each subscriber writes more messages per `writev`. A sweep that
/// starts after a quiet moment never waits: sparse traffic is not delayed.
const BUSY_BATCH_WINDOW: Duration = Duration::from_millis(2);

/// Wakes every subscriber of a large topic, a chunk at a time, and sweeps again as long as
/// messages arrived during the sweep. Publishes that land while a sweep runs wake nobody
/// themselves: the next sweep covers them, so under load each subscriber takes many messages
/// per wake-up (and per write), while a lone message is still delivered at once.
async fn fanout(topic: Arc<Topic>, metrics: Arc<Metrics>) {
    let mut busy = false;
    // What the previous sweep covered; the first sweep is timed by the newest entry alone (the
    // publish that started it).
    let mut swept: Option<u64> = None;
    loop {
        let (covered, newest, subs, oldest) = {
            let st = topic.read_lock();
            let newest = st.newest();
            let oldest = match swept {
                Some(seq) => st.oldest_after(seq),
                None => newest.as_ref().map(|n| (n.at, 1)),
            };
            (st.last_seq, newest, st.snapshot(), oldest)
        };
        if !busy {
            // Only LongPoll polls are eager, and they are woken, never written to directly:
            // the others' wakers are not read here.
            for s in &subs {
                if let Subscriber::Wake(w) = s
                    && w.is_eager()
                {
                    w.wake();
                }
            }
        }
        // (Waking an eager subscriber again below is a no-op until it has run.)
        let mut direct = 0;
        for chunk in subs.chunks(WAKE_CHUNK) {
            direct += deliver_all(chunk, newest.as_ref());
            tokio::task::yield_now().await;
        }
        if direct > 0 {
            Metrics::add(&metrics.messages_delivered, direct);
        }
        if let Some((at, n)) = oldest {
            topic.delivery_histogram(&metrics).observe(at.elapsed(), n);
        }
        swept = Some(covered);
        drop(subs);
        busy = topic.read_lock().last_seq != covered;
        if busy {
            // Busy: gather for a moment before the next sweep (publishers see the sweep as
            // still scheduled and wake nobody themselves).
            tokio::time::sleep(BUSY_BATCH_WINDOW).await;
            continue;
        }
        topic.fanout_scheduled.store(false, Ordering::Release);
        if topic.read_lock().last_seq == covered {
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
    last: Last,
}

/// Where a subscription keeps the sequence number of the last entry it took.
#[derive(Debug)]
enum Last {
    Own(u64),
    /// Shared with the topic, which may deliver to it directly.
    Shared(Arc<Direct>),
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

    /// Where this topic's delivery times go: after the publish (embedded broker), or after
    /// the receipt from Redis (only an external broker's topics have an idle notifier).
    fn delivery_histogram<'m>(&self, metrics: &'m Metrics) -> &'m crate::metrics::Histogram {
        if self.idle.is_some() {
            &metrics.delivery_after_redis
        } else {
            &metrics.delivery_after_publish
        }
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
enum Start {
    /// At the current end (no `since`).
    Now,
    /// After the entry with this sequence number: everything from there on is the gap.
    After(u64),
    /// `since` is of this epoch but older than the buffer: the broker's history may have it.
    NotCovered(u64),
    /// `since` is from another epoch, malformed, or ahead of the stream.
    Unrecoverable,
}

impl TopicState {
    /// The newest entry: what a direct delivery writes.
    fn newest(&self) -> Option<Newest> {
        self.entries.back().map(|e| Newest {
            seq: e.seq,
            frame: e.frame.clone(),
            exclude: e.exclude,
            at: e.at,
        })
    }

    /// When the oldest of the entries after `seq` entered this node, and how many there are
    /// (for `pushgate_delivery_seconds`; entries already trimmed are not counted).
    fn oldest_after(&self, seq: u64) -> Option<(Instant, u64)> {
        let n = self.last_seq.checked_sub(seq).filter(|&n| n > 0)?;
        let kept = (n as usize).min(self.entries.len());
        let first = self.entries.get(self.entries.len() - kept)?;
        Some((first.at, kept as u64))
    }

    fn snapshot(&self) -> Vec<Subscriber> {
        self.subscribers.iter().map(|(_, s)| s.clone()).collect()
    }

    /// Encodes and appends one broadcast; `offset` 0 means it has no position.
    fn append(&mut self, name: &str, offset: u64, message: Broadcast<'_>, history: &HistoryConfig) {
        let Broadcast {
            event,
            payload,
            exclude,
        } = message;
        let position = (offset > 0).then(|| format!("{}:{}", self.epoch, offset));
        let mut buf = Vec::with_capacity(
            ws::MAX_HEADER + 40 + self.epoch.len() + name.len() + event.len() + payload.len(),
        );
        buf.resize(ws::MAX_HEADER, 0);
        protocol::push_text_frame(&mut buf, None, position.as_deref(), name, event, payload);
        let start = ws::frame_in_place(&mut buf, ws::OP_TEXT);
        let frame = Bytes::from(buf).slice(start..);
        let text_start = (ws::MAX_HEADER - start) as u8;
        let len = frame.len() as u64;
        let now = Instant::now();
        self.app_messages |= event != crate::presence::DIFF_EVENT;
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

    /// Follows the broker into a new epoch (its history was lost or recreated) with the
    /// position `offset`. Entries of the old epoch stay readable by the subscribers that have
    /// not taken them yet, but lose their offsets, so that no position of the new epoch can
    /// ever be located among them. Returns whether the node had a position in the old epoch.
    fn switch_epoch(&mut self, epoch: &str, offset: u64) -> bool {
        let had = self.last_offset > 0;
        self.epoch = Arc::from(epoch);
        self.last_offset = offset;
        for e in self.entries.iter_mut() {
            e.offset = 0;
        }
        had
    }

    fn locate(&self, since: Option<&str>) -> Start {
        let Some(since) = since else {
            return Start::Now;
        };
        match parse_position(since) {
            Some((epoch, offset)) if epoch == &*self.epoch => {
                if offset == self.last_offset {
                    Start::After(self.last_seq)
                } else if offset > self.last_offset {
                    Start::Unrecoverable
                } else if let Some(e) = self.entries.iter().find(|e| e.offset == offset + 1)
                    && self
                        .entries
                        .iter()
                        .rev()
                        .find(|e| e.offset > 0)
                        .map(|e| e.offset)
                        == Some(self.last_offset)
                {
                    // The buffer reaches the current offset: the gap is all here. (It does not
                    // when the topic went live again further on, `go_live`, with older entries
                    // kept: then the broker's history has what the buffer lacks.)
                    Start::After(e.seq - 1)
                } else {
                    Start::NotCovered(offset)
                }
            }
            _ => Start::Unrecoverable,
        }
    }

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

/// Wakes a topic's subscribers after a publish (or writes the message to them directly, see
/// [`Waker::park`]): inline for small topics (or outside a runtime), through a [`fanout`] task
/// for large ones.
fn wake_subscribers(topic: &Arc<Topic>, metrics: &Arc<Metrics>) {
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
            // Outside the lock: a direct delivery is a socket write.
            let (newest, subs) = (st.newest(), st.snapshot());
            drop(st);
            let direct = deliver_all(&subs, newest.as_ref());
            if direct > 0 {
                Metrics::add(&metrics.messages_delivered, direct);
            }
            if let Some(n) = newest.as_ref().filter(|_| !subs.is_empty()) {
                topic.delivery_histogram(metrics).observe(n.at.elapsed(), 1);
            }
        }
        Some(handle) => {
            drop(st);
            if !topic.fanout_scheduled.swap(true, Ordering::AcqRel) {
                handle.spawn(fanout(topic.clone(), metrics.clone()));
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
}

/// What became of a message from the broker (see [`Hub::append_remote`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteAppend {
    Appended,
    /// Already have it (an offset at or below the topic's current one).
    Duplicate,
    /// Offsets between the topic's current one and this message's are missing; the broker
    /// should fetch from this offset on first.
    Gap(u64),
    /// No local interest in this topic.
    NotLive,
}

fn new_epoch() -> Arc<str> {
    // 48 random bits: a restarted node or a recreated topic gets a new epoch, so an old
    // position can never be mistaken for a current one.
    let r: u64 = rand::random();
    Arc::from(format!("{:012x}", r & 0xFFFF_FFFF_FFFF))
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
        let topic = Arc::new(Topic {
            name: name.clone(),
            state: RwLock::new(TopicState {
                epoch: new_epoch(),
                last_offset: 0,
                last_seq: 0,
                live: self.embedded,
                entries: VecDeque::new(),
                total_bytes: 0,
                subscribers: Slab::new(),
                removed: false,
                app_messages: false,
            }),
            fanout_scheduled: AtomicBool::new(false),
            idle: self.idle.clone(),
        });
        map.insert(name, topic.clone());
        self.metrics
            .topics
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        topic
    }

    /// Subscribes `waker` to `name`, starting after `since` when it is honoured
    /// (embedded broker: the local buffer is the whole history).
    pub fn subscribe(
        &self,
        name: &str,
        waker: Arc<Waker>,
        since: Option<&str>,
    ) -> (Subscription, JoinInfo) {
        match self.join_live(name, waker, since) {
            LiveJoin::Done(sub, info) => (sub, info),
            LiveJoin::NeedsHistory(sub, position, _) => (
                sub,
                JoinInfo {
                    position: position.to_string(),
                    recovered: Some(false),
                },
            ),
            LiveJoin::NotLive => unreachable!("embedded topics are always live"),
        }
    }

    /// Joins against the local buffer if the topic is live here (see [`LiveJoin`]).
    pub fn join_live(&self, name: &str, waker: Arc<Waker>, since: Option<&str>) -> LiveJoin {
        let mut map = self.map();
        let topic = self.get_or_create(&mut map, name);
        let mut st = topic.write();
        drop(map);
        if !st.live {
            return LiveJoin::NotLive;
        }
        st.trim(&self.history, Instant::now());
        let (start, recovered, needs) = match st.locate(since) {
            Start::Now => (st.last_seq, None, None),
            Start::After(seq) => (seq, Some(true), None),
            Start::Unrecoverable => (st.last_seq, Some(false), None),
            Start::NotCovered(offset) => (st.last_seq, None, Some(offset)),
        };
        // Only a connection with a socket to write to shares its position with the topic.
        let (entry, last) = if waker.has_sink() && !waker.is_eager() {
            let d = Arc::new(Direct {
                waker: waker.clone(),
                last: AtomicU64::new(start),
                allowed: AtomicBool::new(false),
            });
            (Subscriber::Direct(d.clone()), Last::Shared(d))
        } else {
            (Subscriber::Wake(waker.clone()), Last::Own(start))
        };
        let key = st.subscribers.insert(entry);
        let position = Position {
            epoch: st.epoch.clone(),
            offset: st.last_offset,
        };
        drop(st);
        let sub = Subscription { topic, key, last };
        if recovered == Some(true) {
            waker.wake(); // the replay is waiting in the buffer
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

    /// Whether the node receives `name` (always true with the embedded broker).
    pub fn is_live(&self, name: &str) -> bool {
        self.embedded || self.map().get(name).is_some_and(|t| t.read_lock().live)
    }

    /// The broker subscribed to `name` and read its position: messages after `offset` follow.
    pub fn go_live(&self, name: &str, epoch: &str, offset: u64) {
        let mut map = self.map();
        let topic = self.get_or_create(&mut map, name);
        drop(map);
        let mut st = topic.write();
        if &*st.epoch != epoch {
            if st.switch_epoch(epoch, offset) {
                Metrics::add(&self.metrics.redis_epoch_changes, 1);
            }
        } else if offset > st.last_offset {
            st.last_offset = offset;
        }
        st.live = true;
    }

    /// The last position this node has seen of `name`, if it has seen one (passed to Redis,
    /// which starts a new epoch when its own offset of that epoch is behind it).
    pub fn known_position(&self, name: &str) -> Option<Position> {
        let topic = self.map().get(name).cloned()?;
        let st = topic.read_lock();
        (st.last_offset > 0).then(|| Position {
            epoch: st.epoch.clone(),
            offset: st.last_offset,
        })
    }

    /// Live topics with local subscribers and their positions (resubscribed after a reconnect).
    pub fn live_topics(&self) -> Vec<(Arc<str>, Position)> {
        self.map()
            .iter()
            .filter_map(|(name, t)| {
                let st = t.read_lock();
                (st.live || !st.subscribers.is_empty()).then(|| {
                    (
                        name.clone(),
                        Position {
                            epoch: st.epoch.clone(),
                            offset: st.last_offset,
                        },
                    )
                })
            })
            .collect()
    }

    /// Marks every topic as not received (the broker connection dropped).
    pub fn mark_all_down(&self) {
        for t in self.map().values() {
            t.write().live = false;
        }
    }

    /// Takes live topics that have no local subscriber left out of live state and returns
    /// them (the broker unsubscribes). A join after this goes through the broker again.
    pub fn take_idle_topics(&self) -> Vec<Arc<str>> {
        self.map()
            .iter()
            .filter_map(|(name, t)| {
                let mut st = t.write();
                (st.live && st.subscribers.is_empty()).then(|| {
                    st.live = false;
                    name.clone()
                })
            })
            .collect()
    }

    /// Appends a message that arrived from the broker, keeping offsets contiguous.
    pub fn append_remote(
        &self,
        name: &str,
        position: Option<(&str, u64)>,
        message: Broadcast<'_>,
    ) -> RemoteAppend {
        let Some(topic) = self.map().get(name).cloned() else {
            return RemoteAppend::NotLive;
        };
        let mut st = topic.write();
        if !st.live {
            return RemoteAppend::NotLive;
        }
        let offset = match position {
            None => 0,
            Some((epoch, offset)) => {
                if &*st.epoch != epoch {
                    // The stream was recreated (history lost): follow the new epoch from its
                    // first message, fetching any we have not seen.
                    if st.switch_epoch(epoch, 0) {
                        Metrics::add(&self.metrics.redis_epoch_changes, 1);
                    }
                    if offset > 1 {
                        return RemoteAppend::Gap(1);
                    }
                } else if offset <= st.last_offset {
                    return RemoteAppend::Duplicate;
                } else if offset > st.last_offset + 1 {
                    return RemoteAppend::Gap(st.last_offset + 1);
                }
                offset
            }
        };
        st.append(name, offset, message, &self.history);
        drop(st);
        wake_subscribers(&topic, &self.metrics);
        Metrics::add(&self.metrics.messages_published, 1);
        RemoteAppend::Appended
    }

    /// Appends a message even though offsets before it are missing (they are no longer in
    /// the broker's history either).
    pub fn append_remote_after_gap(
        &self,
        name: &str,
        epoch: &str,
        offset: u64,
        message: Broadcast<'_>,
    ) {
        if let Some(topic) = self.map().get(name).cloned() {
            let mut st = topic.write();
            if &*st.epoch == epoch && offset > st.last_offset {
                st.last_offset = offset - 1;
            }
            drop(st);
            self.append_remote(name, Some((epoch, offset)), message);
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
            // Embedded: the buffer is the history, keep it, unless it holds nothing but
            // presence diffs (nobody is left to be announced; a flood of presence joins would
            // otherwise keep a topic each for `history.max_age_secs`). External broker: the
            // history is the broker's; keep a topic only while it has subscribers or is
            // subscribed.
            let keep = !st.subscribers.is_empty()
                || if self.embedded {
                    !st.entries.is_empty() && st.app_messages
                } else {
                    st.live
                };
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

    fn texts(sub: &mut Subscription) -> Result<Vec<String>, Lag> {
        let mut got = Vec::new();
        sub.read(u64::MAX, usize::MAX, &mut |e| {
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
    fn since_replays_exactly_the_gap_then_live() {
        let h = hub(10);
        let p1 = h.publish("t", "e", b"1");
        h.publish("t", "e", b"2");
        h.publish("t", "e", b"3");
        let (mut sub, info) = h.subscribe("t", Arc::new(Waker::default()), Some(&p1.to_string()));
        assert_eq!(info.recovered, Some(true));
        h.publish("t", "e", b"4");
        let got = texts(&mut sub).unwrap();
        let payloads: Vec<_> = got.iter().map(|t| &t[t.len() - 2..t.len() - 1]).collect();
        assert_eq!(payloads, ["2", "3", "4"]);
    }

    #[test]
    fn a_new_epoch_is_never_located_among_the_old_one_s_entries() {
        let h = Hub::with_broker(
            HistoryConfig::default(),
            Arc::new(Metrics::default()),
            Arc::new(tokio::sync::Notify::new()),
        );
        h.go_live("t", "old", 0);
        for n in 1..=5u64 {
            let payload = n.to_string();
            let msg = Broadcast {
                event: "n",
                payload: payload.as_bytes(),
                exclude: 0,
            };
            h.append_remote("t", Some(("old", n)), msg);
        }
        // Redis lost data: the topic continues in a new epoch from offset 2.
        h.go_live("t", "new", 2);
        let w = Arc::new(Waker::default());
        // Offset 2 of the new epoch is not in the buffer (the old epoch's 2 must not count):
        // it has to come from the broker's history.
        match h.join_live("t", w.clone(), Some("new:1")) {
            LiveJoin::NeedsHistory(_, position, 1) => assert_eq!(position.to_string(), "new:2"),
            other => panic!("new:1 was located in the old epoch's entries: {other:?}"),
        }
        let (_sub, info) = h.subscribe("t", w, Some("old:5"));
        assert_eq!(info.recovered, Some(false), "{info:?}");
    }

    #[test]
    fn a_topic_live_again_after_missing_messages_replays_them_from_the_broker() {
        // Found by the soak (SOAK.md): a node stops receiving a topic (its last local subscriber
        // left), messages 4 and 5 are published meanwhile, and a join makes it live again at
        // offset 5 with its old entries 1 to 3 still in the buffer. A join with `since` 1 must
        // not be replayed 2 and 3 only and told `recovered: true`.
        let h = Hub::with_broker(
            HistoryConfig::default(),
            Arc::new(Metrics::default()),
            Arc::new(tokio::sync::Notify::new()),
        );
        h.go_live("t", "e", 0);
        for n in 1..=3u64 {
            let payload = n.to_string();
            let msg = Broadcast {
                event: "n",
                payload: payload.as_bytes(),
                exclude: 0,
            };
            h.append_remote("t", Some(("e", n)), msg);
        }
        assert_eq!(h.take_idle_topics().len(), 1);
        h.go_live("t", "e", 5);
        match h.join_live("t", Arc::new(Waker::default()), Some("e:1")) {
            LiveJoin::NeedsHistory(_, position, 1) => assert_eq!(position.to_string(), "e:5"),
            other => panic!("e:1 was replayed from a buffer that lacks 4 and 5: {other:?}"),
        }
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
        assert_eq!(texts(&mut sub), Err(Lag::FellOffHistory));
        let (mut sub2, _) = h.subscribe("t", Arc::new(Waker::default()), None);
        h.publish("t", "e", b"123456");
        let r = sub2.read(10, usize::MAX, &mut |_| {});
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

    /// A socket stand-in: takes up to `room` bytes per write and records them.
    #[derive(Default)]
    struct FakeSocket {
        room: std::sync::atomic::AtomicUsize,
        got: Mutex<Vec<u8>>,
    }

    impl DirectSink for FakeSocket {
        fn try_send(&self, frame: &[u8]) -> std::io::Result<usize> {
            let n = frame.len().min(self.room.load(Ordering::Relaxed));
            if n == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            self.got.lock().unwrap().extend_from_slice(&frame[..n]);
            Ok(n)
        }
    }

    fn sink(room: usize) -> (Arc<FakeSocket>, Arc<dyn DirectSink>) {
        let s = Arc::new(FakeSocket::default());
        s.room.store(room, Ordering::Relaxed);
        (s.clone(), s)
    }

    #[test]
    fn a_parked_connection_gets_a_lone_message_written_without_a_wake_up() {
        let h = hub(10);
        let w = Arc::new(Waker::default());
        let (got, dyn_sink) = sink(usize::MAX);
        w.set_sink(Sink::Other(dyn_sink));
        let (mut sub, _) = h.subscribe("t", w.clone(), None);
        // Before the join's reply is queued, nothing is written directly.
        w.park();
        h.publish("t", "e", b"1");
        assert!(w.scheduled.load(Ordering::Acquire));
        assert!(got.got.lock().unwrap().is_empty());
        let texts1 = texts(&mut sub).unwrap();
        assert!(
            texts1.len() == 1 && texts1[0].ends_with("\"e\",1]"),
            "{texts1:?}"
        );
        w.clear();
        sub.allow_direct();
        // Parked, and the new message is the only one missing: written, no wake-up.
        h.publish("t", "e", b"2");
        assert!(!w.scheduled.load(Ordering::Acquire));
        let frame = got.got.lock().unwrap().clone();
        assert_eq!(usize::from(frame[1]), frame.len() - 2, "one whole frame");
        assert!(frame.ends_with(b"\"e\",2]"));
        assert_eq!(h.metrics.messages_delivered.load(Ordering::Relaxed), 1);
        assert!(texts(&mut sub).unwrap().is_empty(), "taken once only");
        // Unparked (the task runs): woken, nothing written behind its back.
        assert_eq!(w.unpark(), None);
        h.publish("t", "e", b"3");
        assert!(w.scheduled.load(Ordering::Acquire));
        assert_eq!(got.got.lock().unwrap().len(), frame.len());
        w.clear();
        // Parked again but two messages behind: woken to write both in one go.
        w.park();
        h.publish("t", "e", b"4");
        assert!(w.scheduled.load(Ordering::Acquire));
        assert_eq!(texts(&mut sub).unwrap().len(), 2);
    }

    #[test]
    fn a_connection_without_a_socket_is_always_woken() {
        let h = hub(10);
        let w = Arc::new(Waker::default());
        let (mut sub, _) = h.subscribe("t", w.clone(), None);
        sub.allow_direct();
        w.park();
        h.publish("t", "e", b"1");
        assert!(w.scheduled.load(Ordering::Acquire));
        assert_eq!(texts(&mut sub).unwrap().len(), 1);
    }

    #[test]
    fn a_partly_written_frame_is_finished_by_the_connection_first() {
        let h = hub(10);
        let w = Arc::new(Waker::default());
        let (got, dyn_sink) = sink(5);
        w.set_sink(Sink::Other(dyn_sink));
        let (mut sub, _) = h.subscribe("t", w.clone(), None);
        sub.allow_direct();
        w.park();
        h.publish("t", "e", b"1");
        assert!(
            w.scheduled.load(Ordering::Acquire),
            "woken to write the rest"
        );
        let (frame, written) = w.unpark().expect("the started frame");
        assert_eq!(written, 5);
        assert_eq!(&frame[..5], &got.got.lock().unwrap()[..]);
        assert!(
            texts(&mut sub).unwrap().is_empty(),
            "the frame is the connection's now"
        );
        // A socket that takes nothing: woken, and the message still waits in the buffer.
        w.clear();
        got.room.store(0, Ordering::Relaxed);
        w.park();
        h.publish("t", "e", b"2");
        assert!(w.scheduled.load(Ordering::Acquire));
        assert_eq!(w.unpark(), None);
        assert_eq!(got.got.lock().unwrap().len(), 5);
        assert_eq!(texts(&mut sub).unwrap().len(), 1);
    }

    #[test]
    fn sweep_forgets_topics_whose_history_is_only_presence_diffs() {
        let h = hub(10).with_max_topics(3);
        let (sub, _) = h.subscribe("watched", Arc::new(Waker::default()), None);
        for t in ["watched", "diffs", "mixed"] {
            h.publish(t, crate::presence::DIFF_EVENT, b"{}");
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
