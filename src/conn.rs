//! What a request's handler knows of the connection it came on ([`Conn`]): its connection slot
//! (`server.max_connections`), whether it is at the edge, and at the edge the count of its open
//! requests and WebSockets ([`Busy`]) that its idle deadline watches (`crate::tls`); and, for
//! every hyper connection, the drain's wait for a request on its way
//! ([`shutdown_after_a_late_request`]).
//!
//! Shared by the router (which hands a WebSocket upgrade its slot), the WebSocket transport
//! (which holds it) and the listeners (which make it); it uses none of them.

use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a request's handler knows of its connection.
pub struct Conn {
    /// The connection's slot (`server.max_connections`); an HTTP/1.1 WebSocket upgrade takes
    /// it over, since the connection becomes that WebSocket.
    pub slot: Mutex<Option<OwnedSemaphorePermit>>,
    /// Where the slots come from: each RFC 8441 WebSocket on an HTTP/2 connection takes one
    /// more, so every client holds a slot.
    pub slots: Arc<Semaphore>,
    /// At the edge (`tls.listen`): only the public paths (`crate::router`), unless `tls.serve_api_and_metrics`.
    pub edge: bool,
    /// At the edge: counts this connection's open requests and WebSockets, for its idle
    /// deadline (`crate::tls`).
    pub busy: Option<Busy>,
}

impl Conn {
    pub fn new(permit: OwnedSemaphorePermit, edge: bool, busy: Option<Busy>) -> Conn {
        Conn {
            slots: permit.semaphore().clone(),
            slot: Mutex::new(Some(permit)),
            edge,
            busy,
        }
    }
}

/// Requests and WebSockets of one connection: how many are open, and how many ever opened (so
/// that one that opens and ends between two looks is still seen). A `watch` channel, so that
/// the connection task can wait for "none open" and for "one opened".
#[derive(Clone)]
pub struct Busy(Arc<tokio::sync::watch::Sender<Streams>>);

/// What [`Busy`] counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Streams {
    pub open: usize,
    pub opened: u64,
}

/// One open request or WebSocket, counted in its connection's [`Busy`] while it lives.
pub struct BusyGuard(Busy);

impl Busy {
    pub fn new() -> (Busy, tokio::sync::watch::Receiver<Streams>) {
        let (tx, rx) = tokio::sync::watch::channel(Streams::default());
        (Busy(Arc::new(tx)), rx)
    }

    pub fn enter(&self) -> BusyGuard {
        self.0.send_modify(|s| {
            s.open += 1;
            s.opened += 1;
        });
        BusyGuard(self.clone())
    }
}

/// Ends when `shutdown` is cancelled, or later for a connection with nothing open then: it may
/// be carrying a request at that very moment (a client that has just connected, or reuses the
/// connection), so it has `drain` for that request to open. The caller then lets hyper finish
/// what is open and close, as the lean HTTP/1.1 loop does; closed at once, the client would see
/// its request cut off with no answer.
pub async fn shutdown_after_a_late_request(
    shutdown: &tokio_util::sync::CancellationToken,
    drain: std::time::Duration,
    mut streams: tokio::sync::watch::Receiver<Streams>,
) {
    shutdown.cancelled().await;
    let seen = *streams.borrow_and_update();
    if seen.open == 0 {
        let _ = tokio::time::timeout(drain, streams.wait_for(|s| s.opened != seen.opened)).await;
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.0.send_modify(|s| s.open -= 1);
    }
}
