//! Listening sockets and the accept loop every listener shares (the plain one of
//! [`crate::server`] and the edge ones of [`crate::tls`]).
//!
//! A connection slot (a permit of `App::slots`) is taken *before* accepting, so sockets and
//! LongPoll sessions (which hold a slot each) number at most `server.max_connections`. Accept
//! errors (such as running out of file descriptors) back off and retry. Each accepted connection
//! gets an id and a `conn` span (see [`conn_span`]) and is served in its own tracked task.

use crate::app::App;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// Listen backlog asked for (the kernel caps it at `net.core.somaxconn`, 4096 by default), as
/// nginx does: a connection storm then waits in the kernel's queue instead of having its SYNs
/// dropped and retried a second later. (tokio's default is 1024.)
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening socket (`SO_REUSEADDR`, like tokio's own `bind`) with [`LISTEN_BACKLOG`].
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}

/// The first pause after a failed accept (typically EMFILE: out of file descriptors); each
/// failure in a row doubles it, up to [`ACCEPT_BACKOFF_MAX`]. Short, because a connection
/// closing elsewhere frees a descriptor at once.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
/// The longest pause between two failed accepts: the kernel keeps queueing connections
/// meanwhile (up to [`LISTEN_BACKLOG`]), so waiting a second loses none.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Connection ids, for the `conn` span: numbered from 1 by this process, never reused.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// The span of one connection: its id, its peer address, and its `transport` (recorded once it
/// is known: `websocket`, `longpoll` or `http` for a plain connection, from its first request;
/// `https` or `h2` at the edge). At DEBUG level, so that at the default `info` the span is
/// never created (no registry entry per connection; see README, Logs, and the measurements in
/// the commit that added it).
pub fn conn_span(peer: std::net::SocketAddr) -> tracing::Span {
    let id = NEXT_CONNECTION_ID.fetch_add(1, Relaxed);
    tracing::debug_span!("conn", id, %peer, transport = tracing::field::Empty)
}

/// Accepts on `listener` until shutdown, a connection slot taken before each accept; transient
/// accept errors (typically EMFILE) back off and retry. Each connection is handed to `serve` in
/// its own tracked task, inside its [`conn_span`], with the slot it holds. Shared by the plain
/// listener and the edge listeners (`crate::tls`).
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    app: Arc<App>,
    slots: Arc<Semaphore>,
    serve: F,
) where
    F: Fn(Arc<App>, TcpStream, std::net::SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    accept_loop_spanned(listener, app, slots, true, serve).await
}

/// [`accept_loop`], where `span: false` leaves the [`conn_span`] to `serve` (the edge behind a
/// PROXY protocol proxy makes it once the header names the client).
pub(crate) async fn accept_loop_spanned<F, Fut>(
    listener: TcpListener,
    app: Arc<App>,
    slots: Arc<Semaphore>,
    span: bool,
    serve: F,
) where
    F: Fn(Arc<App>, TcpStream, std::net::SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let permit = tokio::select! {
            _ = app.shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = loop {
            tokio::select! {
                _ = app.shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(s) => {
                        backoff = ACCEPT_BACKOFF_FIRST;
                        break s;
                    }
                    Err(e) => {
                        // Typically EMFILE: wait for connections to close, then retry.
                        tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                },
            }
        };
        app.metrics.connections_accepted.fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true);
        let task = serve(app.clone(), stream, peer, permit);
        if span {
            app.tracker.spawn(task.instrument(conn_span(peer)));
        } else {
            app.tracker.spawn(task);
        }
    }
}
