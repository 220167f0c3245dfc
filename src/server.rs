//! The accept loop and per-connection HTTP serving.
//!
//! A connection slot (a permit of `App::slots`) is taken *before* accepting, so sockets and
//! LongPoll sessions (which hold a slot each) number at most `server.max_connections`; a
//! WebSocket upgrade carries its socket's slot into the WebSocket task (an RFC 8441 WebSocket
//! at the edge takes a slot of its own, see `router::route`). Accept errors (such as running
//! out of file descriptors) back off and retry.
//! Every read has a deadline (`http1` for the lean loop and the first bytes; hyper's header
//! timeout, `deadline::Body` for request bodies), each forced close counted as
//! `Refusal::Timeout`.
//! Each connection is served by hyper's HTTP/1 with upgrades, inside its own tracked task.
//! On shutdown, HTTP connections finish their current request (`graceful_shutdown`, then we
//! keep polling them), WebSocket tasks close themselves with 1012, and [`run`] waits for every
//! tracked task up to `shutdown.grace_ms`.

use crate::app::App;
use crate::{http1, router};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// How often old history is trimmed and empty topics are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `listeners` until `app.shutdown` is cancelled, then drains and returns.
/// Returns `true` when every task ended within the grace period.
pub async fn run(listeners: Vec<TcpListener>, app: Arc<App>, edge: crate::tls::Listeners) -> bool {
    // Shared with LongPoll sessions, which hold a slot each (`crate::transport::longpoll`).
    let slots = app.slots.clone();
    edge.spawn(&app, &slots);
    for listener in listeners {
        app.tracker.spawn(accept_loop(
            listener,
            app.clone(),
            slots.clone(),
            serve_plain,
        ));
    }
    crate::transport::longpoll::serve_relayed_requests(&app);
    if let crate::broker::Broker::Redis(r) = &app.broker {
        app.tracker
            .spawn(crate::broker::redis::run(app.broker_context(), r.clone()));
    }
    if let Some(presence) = app.presence_context() {
        app.tracker.spawn(crate::presence::run(presence));
    }
    if app.config.acme.enabled {
        app.tracker.spawn(crate::acme::run(app.clone()));
    }
    spawn_periodic(
        &app,
        SWEEP_INTERVAL,
        |app| {
            app.hub.sweep();
            app.admission.sweep();
        },
        |_| {},
    );
    spawn_periodic(
        &app,
        crate::transport::longpoll::sweep_interval(&app.config),
        |app| app.longpoll.sweep(),
        |app| app.longpoll.close_all(),
    );
    app.shutdown.cancelled().await;
    app.set_draining();
    tracing::info!(
        grace_ms = app.config.shutdown.grace_ms,
        "shutting down: closing connections"
    );
    app.tracker.close();
    let grace = Duration::from_millis(app.config.shutdown.grace_ms);
    let finished = tokio::time::timeout(grace, app.tracker.wait())
        .await
        .is_ok();
    if finished {
        tracing::info!("shutdown complete");
    } else {
        tracing::warn!(
            remaining = app.tracker.len(),
            "grace period over; exiting with tasks still running"
        );
    }
    finished
}

/// Accepts on `listener` until shutdown, a connection slot taken before each accept; transient
/// accept errors (typically EMFILE) back off and retry. Each connection is handed to `serve` in
/// its own tracked task, with the slot it holds. Shared by the plain listener and the edge
/// listeners (`crate::tls`).
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    app: Arc<App>,
    slots: Arc<Semaphore>,
    serve: F,
) where
    F: Fn(Arc<App>, TcpStream, std::net::SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut backoff = Duration::from_millis(5);
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
                        backoff = Duration::from_millis(5);
                        break s;
                    }
                    Err(e) => {
                        // Typically EMFILE: wait for connections to close, then retry.
                        tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                },
            }
        };
        app.metrics
            .connections_accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        app.tracker.spawn(serve(app.clone(), stream, peer, permit));
    }
}

/// Runs `tick` every `every` until shutdown, then `last` once.
fn spawn_periodic(
    app: &Arc<App>,
    every: Duration,
    tick: impl Fn(&App) + Send + 'static,
    last: impl FnOnce(&App) + Send + 'static,
) {
    let app2 = app.clone();
    app.tracker.spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = app2.shutdown.cancelled() => break,
                _ = interval.tick() => tick(&app2),
            }
        }
        last(&app2);
    });
}

/// A plain connection: publish and LongPoll connections go to the lean HTTP/1 loop
/// ([`crate::http1`]), everything else (and whatever that loop hands back) to hyper.
async fn serve_plain(
    app: Arc<App>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    match http1::first(&app, &stream).await {
        http1::First::Lean => match http1::serve(&app, stream, peer).await {
            http1::End::Closed => {}
            http1::End::Hyper(rewound) => serve_connection(app, rewound, peer, permit).await,
        },
        http1::First::Hyper => serve_connection(app, stream, peer, permit).await,
        http1::First::Closed => {}
    }
    tracing::trace!(%peer, "connection done");
}

async fn serve_connection<S>(
    app: Arc<App>,
    stream: S,
    peer: std::net::SocketAddr,
    permit: OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The slot moves into a WebSocket task on upgrade; otherwise it is released when this
    // connection ends.
    let ctx = Arc::new(router::Conn::new(permit, false, None));
    let svc_app = app.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(crate::admission::Peer(peer));
        let app = svc_app.clone();
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(router::route(app, req, &ctx).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            app.config.server.header_read_timeout_ms,
        ))
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                if e.is_timeout() {
                    // hyper's header timeout: a silent or idle connection, or a slow head.
                    app.metrics.refused(crate::metrics::Refusal::Timeout);
                }
                tracing::debug!(error = %e, "http connection error");
            }
        }
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let grace = Duration::from_millis(app.config.shutdown.grace_ms);
            let _ = tokio::time::timeout(grace, conn).await;
        }
    }
}
