//! This node's LongPoll sessions: the registry (keyed by token), each session's state (the
//! [`Session`], the listening GET, the frames the client has not acknowledged), the token
//! shapes, and expiry. The transport ([`super`]) drives them per request; the registry is
//! held by the app, below the transports, so it knows nothing of HTTP.
//!
//! Architecture Invariant: no I/O and no `.await` here.

use crate::hub::ConnHandle;
use crate::metrics::Metrics;
use crate::session::Session;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

/// A session that no GET has polled since the one that created it is dropped after this (or
/// `longpoll.session_timeout_ms`, if shorter). phoenix.js polls again the moment it has its
/// token, so only a client that never meant to use the session (a flood of session-creating
/// GETs) is this slow; such sessions hold their slots for seconds, not the session timeout.
pub const UNPOLLED_TIMEOUT: Duration = Duration::from_secs(5);
/// How often never-polled sessions are looked for (a queue of new sessions, not a scan).
pub(super) const UNPOLLED_SWEEP: Duration = Duration::from_secs(1);
/// A full sweep (every session checked for expiry) runs at most once per this fraction of
/// `longpoll.session_timeout_ms`: a session outlives its timeout by at most a quarter of it.
pub(super) const FULL_SWEEPS_PER_TIMEOUT: u32 = 4;
/// The queue of never-polled sessions gives its memory back once empty if it grew past this
/// many (a flood of session-creating GETs does not pin its peak).
const FRESH_SHRINK_MIN_CAPACITY: usize = 1024;
/// What every session token starts with.
pub(super) const TOKEN_PREFIX: &str = "lp";
/// A session's token: `lp` and 32 hex digits.
pub(super) const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 32;
/// A poll answer's token: the session's, then the number of the last frame answered (8 hex).
pub(super) const ACK_TOKEN_LEN: usize = TOKEN_LEN + 8;

/// This node's LongPoll sessions, keyed by the 128 bits their token's hex digits spell (the
/// table holds the key itself, so a lookup reads no string off the heap).
#[derive(Debug)]
pub struct Registry {
    sessions: Mutex<HashMap<u128, Arc<LpSession>>>,
    /// Sessions in order of creation (32 bytes each), checked after [`UNPOLLED_TIMEOUT`] for a
    /// poll: the sessions created in the last few seconds, each of which needed a free slot, so
    /// about `server.max_connections` at most unless sessions also end that fast.
    fresh: Mutex<VecDeque<(Instant, u128)>>,
    /// When the last full sweep (`longpoll.session_timeout_ms`) ran.
    last_full_sweep: Mutex<Option<Instant>>,
    /// `longpoll.session_timeout_ms`.
    session_timeout: Duration,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
pub struct LpSession {
    /// Held inline: every poll's answer carries it.
    pub(super) token: [u8; TOKEN_LEN],
    pub(super) inner: Mutex<Inner>,
    /// The session's connection handle: topics (and POSTs) wake the waiting GET through it.
    pub(super) conn_handle: Arc<ConnHandle>,
    /// Its place in its client address's count, given back when the session goes.
    pub(super) _admitted: Option<crate::admission::Admitted>,
    /// The session's connection slot (`server.max_connections`), released when the session is
    /// gone (the last held poll of a removed session has let go of it).
    pub(super) _slot: OwnedSemaphorePermit,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) session: Session,
    /// Generation of the GET that is listening (0 when none).
    pub(super) listener: u64,
    pub(super) generations: u64,
    /// When the last GET started or ended; sessions idle past `longpoll.session_timeout_ms`
    /// without a GET pending are dropped.
    pub(super) last_seen: Instant,
    /// A GET has polled the session (not only the one that created it).
    pub(super) polled: bool,
    pub(super) closed: bool,
    /// The listening GET's task, woken when a newer GET supersedes it or the session closes
    /// (the session's connection handle has one slot, which the newer GET takes).
    pub(super) held: Option<std::task::Waker>,
    /// Frames handed to poll answers that the client has not acknowledged yet.
    pub(super) unacked: Unacked,
}

/// The frames a session has handed to poll answers and the client has not acknowledged yet,
/// oldest first, as the JSON strings the answers carried; the first is frame number
/// `acked + 1`. Empty (no allocation) while the client is up to date.
#[derive(Debug, Default)]
pub(super) struct Unacked {
    pub(super) frames: Vec<Bytes>,
    /// Number of the last frame the client acknowledged (wrapping).
    pub(super) acked: u32,
}

impl Unacked {
    /// A poll arrived with `ack` (the number in its token; `None`: the short token form, which
    /// acknowledges everything handed out). Frames up to it leave the session. A number behind
    /// `acked` (a stale request, the client has moved on) or beyond what was handed out
    /// acknowledges nothing.
    pub(super) fn acknowledge(&mut self, ack: Option<u32>) {
        let n = match ack {
            None => self.frames.len(),
            Some(c) => {
                let d = c.wrapping_sub(self.acked) as usize;
                if d <= self.frames.len() { d } else { 0 }
            }
        };
        if n == 0 {
            return;
        }
        if n == self.frames.len() {
            self.frames = Vec::new();
        } else {
            self.frames.drain(..n);
        }
        self.acked = self.acked.wrapping_add(n as u32);
    }

    /// The number of the last frame handed out.
    pub(super) fn last_sent(&self) -> u32 {
        self.acked.wrapping_add(self.frames.len() as u32)
    }
}

impl LpSession {
    pub(super) fn token(&self) -> &str {
        // Made by `new_token`: ASCII.
        std::str::from_utf8(&self.token).unwrap_or_default()
    }

    /// The session's state (a panic elsewhere while holding it does not lose the session).
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Registry {
    /// An empty registry; sessions expire after `session_timeout` without a poll.
    pub fn new(session_timeout: Duration, metrics: Arc<Metrics>) -> Registry {
        Registry {
            sessions: Default::default(),
            fresh: Default::default(),
            last_full_sweep: Default::default(),
            session_timeout,
            metrics,
        }
    }

    /// Adds a new session (counted, and checked for a poll after [`UNPOLLED_TIMEOUT`]).
    pub(super) fn insert(&self, key: u128, lp: Arc<LpSession>) {
        self.map().insert(key, lp);
        self.fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((Instant::now(), key));
        self.metrics.connections_longpoll.fetch_add(1, Relaxed);
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u128, Arc<LpSession>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn get(&self, token: &str) -> Option<Arc<LpSession>> {
        self.map().get(&token_key(token)?).cloned()
    }

    pub(super) fn remove(&self, token: &str) {
        let Some(key) = token_key(token) else { return };
        if self.map().remove(&key).is_some() {
            self.metrics.connections_longpoll.fetch_sub(1, Relaxed);
        }
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a GET is held for the session `token`, as its listener: the state a test waits
    /// for before it publishes or posts (read from the session; nothing is kept for it).
    pub fn is_held(&self, token: &str) -> bool {
        self.get(token).is_some_and(|lp| lp.lock().listener != 0)
    }

    /// Sessions with a GET waiting for frames (a scan: for tests and diagnostics).
    pub fn held(&self) -> usize {
        self.map()
            .values()
            .filter(|s| s.lock().listener != 0)
            .count()
    }

    /// Drops sessions never polled since their creation, older than [`UNPOLLED_TIMEOUT`]; then,
    /// every quarter of `longpoll.session_timeout_ms`, sessions with no GET pending whose last
    /// poll is older than the timeout. Run every [`sweep_interval`](super::sweep_interval).
    pub fn sweep(&self) {
        let timeout = self.session_timeout;
        let now = Instant::now();
        self.sweep_unpolled(now, UNPOLLED_TIMEOUT.min(timeout));
        {
            let mut last = self
                .last_full_sweep
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| now.duration_since(t) < timeout / FULL_SWEEPS_PER_TIMEOUT) {
                return;
            }
            *last = Some(now);
        }
        let mut expired = Vec::new();
        self.map().retain(|_, s| {
            let inner = s.lock();
            let keep = inner.listener != 0 || now.duration_since(inner.last_seen) < timeout;
            if !keep {
                expired.push(s.clone());
            }
            keep
        });
        for s in expired {
            self.metrics.connections_longpoll.fetch_sub(1, Relaxed);
            Metrics::add(&self.metrics.longpoll_sessions_expired, 1);
            close(&s);
        }
    }

    /// Drops the sessions created more than `after` ago that no GET has polled since.
    fn sweep_unpolled(&self, now: Instant, after: Duration) {
        let mut due = Vec::new();
        {
            let mut fresh = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(&(created, key)) = fresh.front() {
                if now.duration_since(created) < after {
                    break;
                }
                fresh.pop_front();
                due.push(key);
            }
            if fresh.is_empty() && fresh.capacity() > FRESH_SHRINK_MIN_CAPACITY {
                fresh.shrink_to_fit();
            }
        }
        if due.is_empty() {
            return;
        }
        let mut expired = Vec::new();
        {
            let mut map = self.map();
            for key in due {
                let unpolled = map.get(&key).is_some_and(|s| {
                    let inner = s.lock();
                    !inner.polled && inner.listener == 0
                });
                if unpolled && let Some(s) = map.remove(&key) {
                    expired.push(s);
                }
            }
        }
        if !expired.is_empty() {
            tracing::debug!(
                sessions = expired.len(),
                "never-polled longpoll sessions dropped"
            );
        }
        for s in expired {
            self.metrics.connections_longpoll.fetch_sub(1, Relaxed);
            Metrics::add(&self.metrics.longpoll_sessions_expired, 1);
            close(&s);
        }
    }

    /// Closes every session (shutdown): waiting GETs answer at once.
    /// Closes and drops every session (for the fuzz targets, which make an `App` per input: a
    /// session holds its `App`, so one left in the registry would keep both alive).
    pub(crate) fn clear(&self) {
        self.close_all();
        self.map().clear();
    }

    pub fn close_all(&self) {
        for s in self.map().values() {
            close(s);
        }
    }
}

/// Marks the session closed and wakes its listening GET, which answers `{"status":500}`.
pub(super) fn close(s: &LpSession) {
    let held = {
        let mut inner = s.lock();
        inner.closed = true;
        inner.held.take()
    };
    if let Some(w) = held {
        w.wake();
    }
}

/// `lp`, this node's id (8 hex digits), then 24 random hex digits.
pub(super) fn new_token(node_id: &str) -> String {
    let r: u128 = rand::random();
    format!("{TOKEN_PREFIX}{node_id}{:024x}", r >> 32)
}

/// The registry key of a token of our shape: the session's 32 hex digits as a number.
pub(super) fn token_key(token: &str) -> Option<u128> {
    if !looks_like_ours(token) {
        return None;
    }
    u128::from_str_radix(&token[TOKEN_PREFIX.len()..TOKEN_LEN], 16).ok()
}

/// The acknowledgement a token of our shape carries: the number of the last frame the client
/// got, or `None` for the session's own (short) token.
pub(super) fn token_ack(token: &str) -> Option<u32> {
    if token.len() != ACK_TOKEN_LEN {
        return None;
    }
    u32::from_str_radix(&token[TOKEN_LEN..], 16).ok()
}

/// `lp` and 32 hex digits (a session), optionally followed by 8 (an acknowledgement).
pub(super) fn looks_like_ours(token: &str) -> bool {
    (token.len() == TOKEN_LEN || token.len() == ACK_TOKEN_LEN)
        && token.starts_with(TOKEN_PREFIX)
        && token[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_only_when_acknowledged_whatever_the_numbers_do() {
        let f = |n: u8| Bytes::from(vec![n]);
        // Near the wrap: numbers go on modulo 2^32.
        let mut u = Unacked {
            frames: Vec::new(),
            acked: u32::MAX - 1,
        };
        u.frames.extend([f(1), f(2), f(3)]);
        assert_eq!(u.last_sent(), 1);
        u.acknowledge(Some(u32::MAX - 2)); // stale: behind what was acknowledged
        assert_eq!(u.frames.len(), 3);
        u.acknowledge(Some(7)); // beyond what was handed out: made up
        assert_eq!(u.frames.len(), 3);
        u.acknowledge(Some(u32::MAX)); // the first frame
        assert_eq!((u.frames.clone(), u.acked), (vec![f(2), f(3)], u32::MAX));
        u.acknowledge(Some(1)); // across the wrap: everything
        assert!(
            u.frames.is_empty() && u.frames.capacity() == 0,
            "no allocation kept"
        );
        assert_eq!(u.acked, 1);
        u.frames.push(f(4));
        u.acknowledge(None); // the short token: everything handed out
        assert_eq!((u.frames.len(), u.acked), (0, 2));
    }
}
