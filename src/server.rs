//! The accept loop and per-connection HTTP serving.
//!
//! A connection slot (a semaphore permit) is taken *before* accepting, so at most
//! `server.max_connections` sockets are open; a WebSocket upgrade carries its slot into the
//! WebSocket task. Accept errors (such as running out of file descriptors) back off and retry.
//! Each connection is served by hyper's HTTP/1 with upgrades, inside its own tracked task.
//! On shutdown, HTTP connections finish their current request (`graceful_shutdown`, then we
//! keep polling them), WebSocket tasks close themselves with 1012, and [`run`] waits for every
//! tracked task up to `shutdown.grace_ms`.

use crate::app::App;
use crate::router;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How often old history is trimmed and empty topics are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `listeners` until `app.shutdown` is cancelled, then drains and returns.
/// Returns `true` when every task ended within the grace period.
pub async fn run(listeners: Vec<TcpListener>, app: Arc<App>, edge: crate::tls::Listeners) -> bool {
    let slots = Arc::new(Semaphore::new(app.config.server.max_connections));
    edge.spawn(&app, &slots);
    for listener in listeners {
        app.tracker
            .spawn(accept_loop(listener, app.clone(), slots.clone()));
    }
    if let crate::broker::Broker::Redis(r) = &app.broker {
        app.tracker
            .spawn(crate::broker::redis::run(app.clone(), r.clone()));
    }
    if app.config.acme.enabled {
        app.tracker.spawn(crate::acme::run(app.clone()));
    }
    let sweeper_app = app.clone();
    app.tracker.spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweeper_app.shutdown.cancelled() => break,
                _ = tick.tick() => sweeper_app.hub.sweep(),
            }
        }
    });
    let longpoll_app = app.clone();
    app.tracker.spawn(async move {
        // Check often enough that a session outlives its timeout by at most a quarter of it.
        let every = Duration::from_millis(longpoll_app.config.longpoll.session_timeout_ms / 4);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = longpoll_app.shutdown.cancelled() => break,
                _ = tick.tick() => longpoll_app.longpoll.sweep(&longpoll_app),
            }
        }
        longpoll_app.longpoll.close_all();
    });
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

async fn accept_loop(listener: TcpListener, app: Arc<App>, slots: Arc<Semaphore>) {
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
        let conn_app = app.clone();
        app.tracker.spawn(async move {
            serve_connection(conn_app, stream, permit).await;
            tracing::trace!(%peer, "connection done");
        });
    }
}

async fn serve_connection(
    app: Arc<App>,
    stream: TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // The slot moves into a WebSocket task on upgrade; otherwise it is released when this
    // connection ends.
    let slot = Arc::new(std::sync::Mutex::new(Some(permit)));
    let svc_app = app.clone();
    let service = service_fn(move |req| {
        let app = svc_app.clone();
        let slot = slot.clone();
        async move { Ok::<_, std::convert::Infallible>(router::route(app, req, &slot).await) }
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
