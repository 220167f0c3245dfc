//! The connection's handle the hub wakes and writes through: its wake-up slot, the socket a
//! publish may write to while the connection is parked, and the parked state itself.

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Writes bytes straight to a connection's socket, without waiting (see [`ConnHandle::park`]).
pub trait DirectSink: Send + Sync {
    /// Writes what the socket takes at once; `WouldBlock` when it takes nothing.
    fn try_send(&self, frame: &[u8]) -> std::io::Result<usize>;
    /// Reads the handle's own memory and nothing else. A sweep calls it for a group of
    /// subscribers before writing to them, so that their cache misses overlap instead of each
    /// one waiting behind the previous subscriber's send.
    fn prefetch(&self) {}
}

/// Where a publish writes a parked connection's frames (see [`ConnHandle::set_sink`]).
pub enum Sink {
    /// The connection's own socket, held in the connection handle itself, so that a publish reaches
    /// it without following one more pointer per subscriber; the connection's task reads and writes
    /// it through [`ConnHandle::tcp`].
    Tcp(tokio::net::TcpStream),
    /// Any other writer.
    Other(Arc<dyn DirectSink>),
}

impl Sink {
    pub(super) fn try_send(&self, frame: &[u8]) -> std::io::Result<usize> {
        match self {
            // Straight to the socket: if it takes nothing, the woken task finds that out
            // through tokio's readiness and waits for writability itself.
            Sink::Tcp(s) => socket2::SockRef::from(s).send(frame),
            Sink::Other(s) => s.try_send(frame),
        }
    }

    pub(super) fn prefetch(&self) {
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
pub(super) struct Parked {
    pub(super) on: bool,
    pub(super) partial: Option<Box<(Bytes, usize)>>,
}

/// Wakes one connection's task when a topic it reads has new entries. Deduplicated: many
/// publishes before the task runs cost one wake-up. The task's waker sits in one slot (the task
/// re-registers each time it polls), so waking costs no allocation and no lock.
///
/// A connection that waits with nothing to write may also *park* here: then a publish whose
/// message is the only one a subscriber lacks writes that frame straight to the socket
/// ([`DirectSubscriber::try_deliver`]), and the task is not woken at all. Waking, scheduling and
/// polling a task cost about as much as the send itself when every message goes out alone.
/// The lock decides who writes: the sweep only while the connection is parked, the task only
/// after it has unparked, so frames never interleave and a subscription's position has one
/// writer at a time.
pub struct ConnHandle {
    /// This node's number for the connection (or LongPoll session), unique for the process's
    /// life: what a publish's `exclude` names ("send to others").
    pub id: u64,
    task: atomic_waker::AtomicWaker,
    pub(super) scheduled: AtomicBool,
    /// Woken ahead of the others when a quiet topic gets a message (see [`WAKE_CHUNK`]).
    eager: AtomicBool,
    /// The connection's socket, when its transport can be written to directly. Set once; it
    /// lives as long as the connection handle, which outlives the connection's task by at most the
    /// sweep in progress or a broker join in flight (bounded by the broker's timeouts).
    pub(super) sink: std::sync::OnceLock<Sink>,
    pub(super) parked: Mutex<Parked>,
}

impl Default for ConnHandle {
    fn default() -> ConnHandle {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        ConnHandle {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            task: Default::default(),
            scheduled: Default::default(),
            eager: Default::default(),
            sink: Default::default(),
            parked: Default::default(),
        }
    }
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("scheduled", &self.scheduled)
            .field("eager", &self.eager)
            .finish_non_exhaustive()
    }
}

impl ConnHandle {
    /// Gives publishes the connection's socket to write to while the connection is parked.
    pub fn set_sink(&self, sink: Sink) {
        let _ = self.sink.set(sink);
    }

    /// The connection's socket, when the connection handle holds it ([`Sink::Tcp`]).
    pub fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        match self.sink.get() {
            Some(Sink::Tcp(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether publishes can write to this connection's socket (see [`ConnHandle::set_sink`]).
    pub fn has_sink(&self) -> bool {
        self.sink.get().is_some()
    }

    /// The connection waits with nothing queued to write: a publish may write to its socket
    /// directly until [`ConnHandle::unpark`]. (Without a socket, parking changes nothing.)
    pub fn park(&self) {
        let mut p = self.parked_slot();
        // A wake-up already pending means the task runs again at once: nothing to gain, and a
        // frame handed over by [`ConnHandle::hold`]'s caller must not be overtaken meanwhile.
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
    /// broadcast. Call after [`ConnHandle::wake`] (a task that parks from then on sees the pending
    /// wake-up and does not park). A partly written frame stays for the task's
    /// [`ConnHandle::unpark`].
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

    /// Ready when a wake-up came since the last [`ConnHandle::clear`]; registers the task
    /// otherwise.
    pub fn poll_woken(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.task.register(cx.waker());
        if self.scheduled.load(Ordering::Acquire) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Waits for a wake-up (returns at once if one came since the last [`ConnHandle::clear`]).
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await
    }

    /// Call before reading topics, so a publish that lands during the read wakes us again.
    pub fn clear(&self) {
        self.scheduled.store(false, Ordering::Release);
    }
}
