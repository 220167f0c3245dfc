//! Delivery: getting a topic's newest entry to its subscribers. A small topic's subscribers are
//! reached inline by the publisher; a large topic's by a fanout task, a chunk at a time. Either
//! way a parked connection that lacks only this entry gets it written to its socket by the
//! publisher ([`DirectSubscriber`]); every other subscriber is woken to read for itself.
//!
//! Slow-consumer policy (written down once, here): a subscriber whose next entry has left the
//! buffer (trimmed by `history.size` or `history.max_age_secs`), or whose pending bytes exceed
//! `limits.max_pending_bytes`, gets [`Lag`] from [`Topic::read`]; its transport closes it
//! (WebSocket 1013) and the client recovers by position when it rejoins. Publishers never wait.

use super::handle::ConnHandle;
use super::topic::{Last, Topic, TopicState};
use crate::metrics::Metrics;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
pub(super) enum Subscriber {
    /// Woken to read for itself (LongPoll; WebSockets over TLS or HTTP/2). Its position stays
    /// in its [`Subscription`], so a sweep touches nothing but the connection handle.
    Wake(Arc<ConnHandle>),
    /// Its connection can be written to directly (see [`DirectSubscriber`]).
    Direct(Arc<DirectSubscriber>),
}

impl Subscriber {
    /// The topic's entry for a subscription that starts after entry `start`, and where the
    /// subscription keeps its position. Only a connection with a socket to write to shares its
    /// position with the topic.
    pub(super) fn starting_after(conn_handle: &Arc<ConnHandle>, start: u64) -> (Subscriber, Last) {
        if conn_handle.has_sink() && !conn_handle.is_eager() {
            let d = Arc::new(DirectSubscriber {
                conn_handle: conn_handle.clone(),
                last: AtomicU64::new(start),
                allowed: AtomicBool::new(false),
            });
            (Subscriber::Direct(d.clone()), Last::Shared(d))
        } else {
            (Subscriber::Wake(conn_handle.clone()), Last::Own(start))
        }
    }

    fn conn_handle(&self) -> &Arc<ConnHandle> {
        match self {
            Subscriber::Wake(w) => w,
            Subscriber::Direct(d) => &d.conn_handle,
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
        self.conn_handle().wake();
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
pub struct DirectSubscriber {
    pub(super) conn_handle: Arc<ConnHandle>,
    pub(super) last: AtomicU64,
    /// Set once the join's reply is queued ([`Subscription::allow_direct`]): only then may a
    /// publish write to this subscriber directly, after that reply.
    pub(super) allowed: AtomicBool,
}

impl DirectSubscriber {
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
        let Some(sink) = self.conn_handle.sink.get() else {
            return false;
        };
        let Ok(mut p) = self.conn_handle.parked.try_lock() else {
            return false; // the connection is parking or unparking right now
        };
        if !p.on || p.partial.is_some() || self.last.load(Ordering::Relaxed) + 1 != seq {
            return false;
        }
        if exclude != 0 && exclude == self.conn_handle.id {
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

    /// Reads what [`DirectSubscriber::try_deliver`] of entry `seq` will read, without waiting on
    /// it.
    fn prefetch(&self, seq: u64) {
        if self.allowed.load(Ordering::Relaxed) && self.last.load(Ordering::Relaxed) + 1 == seq {
            std::hint::black_box(self.conn_handle.scheduled.load(Ordering::Relaxed));
            if let Some(sink) = self.conn_handle.sink.get() {
                sink.prefetch();
            }
        }
    }
}

/// Subscribers a sweep prefetches before writing to them (see
/// [`DirectSink::prefetch`](super::DirectSink::prefetch)).
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
        let Sweep {
            covered,
            newest,
            subs,
            oldest,
        } = topic.read_lock().sweep_after(swept);
        if !busy {
            wake_eager(&subs);
        }
        // (Waking an eager subscriber again below is a no-op until it has run.)
        let mut direct = 0;
        for chunk in subs.chunks(WAKE_CHUNK) {
            direct += deliver_all(chunk, newest.as_ref());
            tokio::task::yield_now().await;
        }
        record_delivery(&topic, &metrics, direct, oldest);
        swept = Some(covered);
        drop(subs);
        busy = topic.read_lock().last_seq != covered;
        if busy {
            // Busy: gather for a moment before the next sweep (publishers see the sweep as
            // still scheduled and wake nobody themselves).
            tokio::time::sleep(BUSY_BATCH_WINDOW).await;
            continue;
        }
        if !topic.end_fanout(covered) {
            return;
        }
    }
}

/// What one sweep of a [`fanout`] covers, read under the topic's lock.
struct Sweep {
    /// The last entry's sequence number when the sweep began.
    covered: u64,
    /// What a direct delivery writes.
    newest: Option<Newest>,
    /// A copy of the subscriber list, so that no lock is held while the sweep writes.
    subs: Vec<Subscriber>,
    /// When the oldest entry this sweep delivers entered this node, and how many it delivers
    /// (for `pushgate_delivery_seconds`).
    oldest: Option<(Instant, u64)>,
}

/// Wakes the eager subscribers (LongPoll polls) of a topic that was quiet, ahead of the others
/// (see [`WAKE_CHUNK`]). They are woken, never written to directly: the others' connection handles
/// are not read here.
fn wake_eager(subs: &[Subscriber]) {
    for s in subs {
        if let Subscriber::Wake(w) = s
            && w.is_eager()
        {
            w.wake();
        }
    }
}

/// Counts `direct` deliveries and times the entries delivered (`oldest`: when the oldest of
/// them entered this node, and how many there are).
fn record_delivery(topic: &Topic, metrics: &Metrics, direct: u64, oldest: Option<(Instant, u64)>) {
    if direct > 0 {
        Metrics::add(&metrics.messages_delivered, direct);
    }
    if let Some((at, n)) = oldest {
        topic.delivery_histogram(metrics).observe(at.elapsed(), n);
    }
}

impl Topic {
    /// Ends a fanout task's sweeps of this topic after one that covered entries up to
    /// `covered`. Returns whether the task must sweep again after all: an entry arrived
    /// meanwhile and no publisher has started the next sweep itself.
    fn end_fanout(&self, covered: u64) -> bool {
        self.fanout_scheduled.store(false, Ordering::Release);
        if self.read_lock().last_seq == covered {
            return false;
        }
        // `true`: a publisher started the next sweep.
        !self.fanout_scheduled.swap(true, Ordering::AcqRel)
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

    /// What the next sweep of a [`fanout`] covers: the entries after `swept` (what the
    /// previous sweep covered; the first sweep is timed by the newest entry alone).
    fn sweep_after(&self, swept: Option<u64>) -> Sweep {
        let newest = self.newest();
        let oldest = match swept {
            Some(seq) => self.oldest_after(seq),
            None => newest.as_ref().map(|n| (n.at, 1)),
        };
        Sweep {
            covered: self.last_seq,
            newest,
            subs: self.snapshot(),
            oldest,
        }
    }

    fn snapshot(&self) -> Vec<Subscriber> {
        self.subscribers.iter().map(|(_, s)| s.clone()).collect()
    }
}

/// Wakes a topic's subscribers after a publish (or writes the message to them directly, see
/// [`ConnHandle::park`]): inline for small topics (or outside a runtime), through a [`fanout`] task
/// for large ones.
pub(super) fn wake_subscribers(topic: &Arc<Topic>, metrics: &Arc<Metrics>) {
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
            let delivered = newest.as_ref().filter(|_| !subs.is_empty());
            record_delivery(topic, metrics, direct, delivered.map(|n| (n.at, 1)));
        }
        Some(handle) => {
            drop(st);
            if !topic.fanout_scheduled.swap(true, Ordering::AcqRel) {
                handle.spawn(fanout(topic.clone(), metrics.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::tests::{hub, texts};
    use crate::hub::{DirectSink, Sink};
    use std::sync::Mutex;

    #[test]
    fn publishing_wakes_subscribers_once_and_drop_unsubscribes() {
        let h = hub(10);
        let w = Arc::new(ConnHandle::default());
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
        let w = Arc::new(ConnHandle::default());
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
        let w = Arc::new(ConnHandle::default());
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
        let w = Arc::new(ConnHandle::default());
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
}
