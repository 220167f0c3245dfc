//! The node's tasks, started and drained: the plain listeners' per-connection HTTP serving,
//! the edge listeners ([`crate::tls`]), the broker, presence and ACME tasks, the periodic sweeps.
//!
//! Connections come from the accept loop of [`crate::listener`], each holding a connection slot
//! (`server.max_connections`); a WebSocket upgrade carries its socket's slot into the WebSocket
//! task (an RFC 8441 WebSocket at the edge takes a slot of its own, see `router::route`).
//! Every read has a deadline (`http1` for the lean loop and the first bytes; hyper's header
//! timeout, `deadline::Body` for request bodies), each forced close counted as
//! `Refusal::Timeout`.
//! Each connection is served by hyper's HTTP/1 with upgrades, inside its own tracked task.
//! On shutdown, HTTP connections finish their current request (`graceful_shutdown`, then we
//! keep polling them), WebSocket tasks close themselves with 1012, and [`run`] waits for every
//! tracked task up to `shutdown.grace_ms`.

use crate::app::App;
use crate::listener::accept_loop;
use crate::{conn, http1, router};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

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
    let (lean, kind) = match http1::first(&app, &stream).await {
        http1::First::Lean(kind) => (true, kind),
        http1::First::Hyper(kind) => (false, kind),
        http1::First::Closed => return,
    };
    let span = tracing::Span::current();
    span.record("transport", kind.name());
    // Entered anew, so that a span filter on `transport` (README, Logs) applies from the first
    // request on: a filter reads a span's fields when the span is entered.
    let served = async move {
        if lean {
            match http1::serve(&app, stream, peer).await {
                http1::End::Closed => {}
                http1::End::Hyper(rewound) => serve_connection(app, rewound, peer, permit).await,
            }
        } else {
            serve_connection(app, stream, peer, permit).await
        }
    };
    served.instrument(span).await;
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
    let ctx = Arc::new(conn::Conn::new(permit, false, None));
    // Open requests, for the drain (`conn::shutdown_after_a_late_request`). Held by the
    // service, not `Conn`, so a WebSocket upgraded from here keeps none of it.
    let (busy, open) = conn::Busy::new();
    let svc_app = app.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(crate::admission::Peer(peer));
        let app = svc_app.clone();
        let ctx = ctx.clone();
        let request = busy.enter();
        async move {
            let _request = request;
            Ok::<_, std::convert::Infallible>(router::route(app, req, &ctx).await)
        }
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
    let drain = Duration::from_millis(app.config.shutdown.drain_ms);
    let shutdown = conn::shutdown_after_a_late_request(&app.shutdown, drain, open);
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
        () = shutdown => {
            conn.as_mut().graceful_shutdown();
            let grace = Duration::from_millis(app.config.shutdown.grace_ms);
            let _ = tokio::time::timeout(grace, conn).await;
        }
    }
}
