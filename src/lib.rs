//! pushgate: a small, fast real-time push gateway speaking the Phoenix Channels V2 protocol.
//!
//! Map of the crate (see ARCHITECTURE.md for the bird's-eye view):
//! - [`config`]: the configuration sections, defaults, environment overlay and validation.
//! - [`server`]: the node's tasks started and drained; per-connection HTTP on the plain listener.
//! - [`listener`]: binding, the accept loop (connection limit, backoff), the per-connection span.
//! - [`conn`]: what a handler knows of its connection (slot, edge, open streams).
//! - [`respond`]: the shapes of HTTP answers (JSON errors, header sets), shared by both HTTP paths.
//! - [`http1`]: the lean HTTP/1.1 loop for publish and LongPoll connections (hyper does the rest).
//! - [`router`]: path to handler; `/healthz`, `/readyz`, `/metrics`, demo page, HTTP-01.
//! - [`api`]: `POST /api/publish`.
//! - [`deadline`]: read deadlines where hyper has none (stalled request bodies).
//! - [`protocol`]: Phoenix V2 frames, parse and encode, no I/O.
//! - [`ws`]: our RFC 6455 frame layer, no I/O.
//! - [`query`]: query strings of connect requests (`vsn`, tokens), no I/O.
//! - [`client_tls`]: the TLS client configuration for outgoing HTTPS (forward, ACME): public
//!   roots plus a CA file.
//! - [`session`]: one client's channels and replies, transport-neutral, no I/O.
//! - [`auth`]: private topics and the connect tokens (JWT) that open them; what a client
//!   presented at connect (`ConnectInfo`), no I/O.
//! - [`forward`]: client pushes forwarded to the application over HTTP, in order per connection.
//! - [`transport`]: drives a session over a WebSocket.
//! - [`hub`]: topics, their shared history buffers, positions and local subscribers.
//! - [`broker`]: the Redis broker (cross-node fanout, history streams); embedded otherwise.
//! - [`metrics`]: counters rendered for Prometheus.
//! - [`admission`]: per-client limits (the client address, connections and new connections
//!   per address, joins per connection).
//! - [`origin`]: `server.allowed_origins`, which web pages may connect, no I/O.
//! - [`app`]: the shared state handed to every connection.
//! - [`acme`]: certificates from Let's Encrypt (ACME), export for nginx.
//! - [`challenges`]: the ACME challenges open now (HTTP-01 answers, the TLS resolver).
//! - [`tls`]: at the edge, TLS with the ACME certificate or one from files (HTTP/1.1 and
//!   HTTP/2), HTTPS redirect.
//! - [`proxy_protocol`]: the PROXY protocol header an edge behind a TCP proxy reads first.
//! - [`server_cert`]: the edge's certificate from files (`tls.cert_file`), loaded and checked.
//! - [`systemd`]: socket activation, readiness/stopping notifications and watchdog pings.
//! - `fuzzing` (hidden): views of internal parsers for the fuzz targets in `fuzz/`.
#![forbid(unsafe_code)]
// The edge's connection future (TLS, hyper, the shutdown and idle deadlines) is deeper than the
// default limit lets the compiler prove `Send` for.
#![recursion_limit = "256"]

pub mod acme;
pub mod admission;
pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod challenges;
pub mod client_tls;
pub mod config;
pub mod conn;
pub mod deadline;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod http1;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod origin;
pub mod presence;
pub mod protocol;
pub mod proxy_protocol;
pub mod query;
pub mod respond;
pub mod router;
pub mod server;
pub mod server_cert;
pub mod session;
pub mod systemd;
pub mod tls;
pub mod transport;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use app::App;
pub use config::Config;

/// Serves already-bound `listeners` with `config` until `shutdown` completes, then drains.
/// Returns `true` when every connection closed within `shutdown.grace_ms`.
pub async fn run(
    listeners: Vec<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let token = CancellationToken::new();
    let app = App::new(config, token.clone());
    run_app(listeners, app, shutdown).await
}

/// Like [`run`], with an [`App`] built by the caller (tests use it to reach the hub).
pub async fn run_app(
    listeners: Vec<TcpListener>,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    run_app_passed(listeners, tls::Passed::default(), app, shutdown).await
}

/// Like [`run_app`], with the edge's sockets that systemd passed (the binary's path).
pub async fn run_app_passed(
    listeners: Vec<TcpListener>,
    passed: tls::Passed,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let edge = match tls::Listeners::bind(&app.config, passed).await {
        Ok(edge) => edge,
        Err(e) => {
            tracing::error!("{e}");
            return false;
        }
    };
    let token = app.shutdown.clone();
    let served = server::run(listeners, app, edge);
    tokio::pin!(served);
    tokio::select! {
        done = &mut served => return done,
        _ = shutdown => token.cancel(),
    }
    served.await
}
