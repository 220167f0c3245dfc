//! At the edge: pushgate terminates TLS itself (`tls.listen`), with the certificate from
//! [`crate::acme`], and serves HTTP/1.1 and HTTP/2 by ALPN; optionally a plain-HTTP listener
//! (`tls.redirect_listen`) redirects to HTTPS and answers HTTP-01 challenges.
//!
//! Each connection's TLS handshake runs inside its own tracked task under
//! `tls.handshake_timeout_ms`, never in the accept loop. A ClientHello that offers only the
//! `acme-tls/1` protocol is a TLS-ALPN-01 validation: it gets the challenge certificate from
//! the ACME resolver and the connection ends after the handshake. Everything else is served by
//! hyper (HTTP/1.1 or HTTP/2) through [`crate::router`], sharing `server.max_connections`
//! with the plain listeners.
//!
//! Only what the internet needs is served here (`router::route` with `Conn::edge`): `/socket/*`,
//! health checks, ACME challenges and the demo page; `/api/*` and `/metrics` only with
//! `tls.serve_api_and_metrics`. Every read has a deadline: the handshake's, hyper's header
//! timeout for HTTP/1.1, and for both protocols a connection with no open request or WebSocket
//! (`conn::Busy`) is closed after `server.header_read_timeout_ms` before its first request and
//! `server.keepalive_timeout_ms` after one; HTTP/2 also sends PINGs and caps its streams.
//!
//! WebSockets work here too: over HTTP/1.1 by the usual upgrade, over HTTP/2 by extended
//! CONNECT (RFC 8441, enabled on the HTTP/2 side), each holding a connection slot of its own.
//! Either way the WebSocket transport runs on its polled adapter
//! (`transport::websocket::Polled`), which stages reads and writes in buffers; the zero-buffer
//! path is for plain TCP behind nginx.

use crate::app::App;
use crate::conn::{Busy, Conn, Streams};
use crate::listener::accept_loop;
use crate::metrics::Refusal;
use crate::respond::error_response;
use crate::router;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_acme::rustls::ServerConfig;
use rustls_acme::rustls::server::Acceptor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// HTTPS's default port: a redirect to it names no port.
const HTTPS_PORT: u16 = 443;

/// The edge listeners, bound before serving (an address in use stops the start).
#[derive(Debug, Default)]
pub struct Listeners {
    pub https: Option<TcpListener>,
    pub redirect: Option<TcpListener>,
}

impl Listeners {
    /// Binds `tls.listen` and `tls.redirect_listen` when set.
    pub async fn bind(config: &crate::config::Config) -> std::io::Result<Listeners> {
        async fn one(key: &str, addr: &str) -> std::io::Result<Option<TcpListener>> {
            if addr.is_empty() {
                return Ok(None);
            }
            let l = crate::listener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("binding {addr} ({key}): {e}"))
            })?;
            tracing::info!(addr = %l.local_addr()?, "listening ({key})");
            Ok(Some(l))
        }
        Ok(Listeners {
            https: one("tls.listen", &config.tls.listen).await?,
            redirect: one("tls.redirect_listen", &config.tls.redirect_listen).await?,
        })
    }

    /// Spawns their accept loops on `app.tracker`; the HTTPS one shares `slots`.
    pub fn spawn(self, app: &Arc<App>, slots: &Arc<Semaphore>) {
        if let Some(l) = self.https {
            let https_port = l.local_addr().map_or(HTTPS_PORT, |a| a.port());
            app.tracker
                .spawn(accept_loop(l, app.clone(), slots.clone(), serve_tls));
            if let Some(r) = self.redirect {
                app.tracker.spawn(accept_loop(
                    r,
                    app.clone(),
                    slots.clone(),
                    move |app, stream, _peer, permit| {
                        serve_redirect(app, stream, https_port, permit)
                    },
                ));
            }
        }
    }
}

/// Runs hyper's connection futures (HTTP/2 streams) on the tracker, so shutdown waits for them.
#[derive(Clone)]
struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// The server configurations for one handshake: the challenge one (ALPN `acme-tls/1`) and
/// the normal one (ALPN `h2`, `http/1.1`), both resolving through the ACME resolver.
fn server_configs(app: &App) -> Option<(Arc<ServerConfig>, Arc<ServerConfig>)> {
    let resolver = app.acme.resolver()?;
    let provider = Arc::new(rustls_acme::rustls::crypto::ring::default_provider());
    let build = |alpn: Vec<Vec<u8>>| {
        let mut c = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .ok()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        c.alpn_protocols = alpn;
        Some(Arc::new(c))
    };
    Some((
        build(vec![rustls_acme::acme::ACME_TLS_ALPN_NAME.to_vec()])?,
        build(vec![b"h2".to_vec(), b"http/1.1".to_vec()])?,
    ))
}

async fn serve_tls(
    app: Arc<App>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let Some((challenge, normal)) = server_configs(&app) else {
        tracing::debug!(%peer, "tls: no certificate source yet; closing");
        return;
    };
    let timeout = Duration::from_millis(app.config.tls.handshake_timeout_ms);
    let handshake = async {
        let start = tokio_rustls::LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
        let is_challenge = rustls_acme::is_tls_alpn_challenge(&start.client_hello());
        let config = if is_challenge { challenge } else { normal };
        start.into_stream(config).await.map(|s| (s, is_challenge))
    };
    let tls = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok((tls, false))) => tls,
        Ok(Ok((_, true))) => {
            tracing::info!(%peer, "answered a tls-alpn-01 challenge");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "tls handshake timed out");
            app.metrics.refused(Refusal::Timeout);
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let span = tracing::Span::current();
    span.record("transport", if h2 { "h2" } else { "https" });
    tracing::trace!(%peer, h2, "tls connection");
    // Entered anew, so that a span filter on `transport` (README, Logs) applies from here on:
    // a filter reads a span's fields when the span is entered.
    serve_https(app, tls, peer, permit).instrument(span).await;
}

/// Serves an established TLS connection with hyper, HTTP/1.1 or HTTP/2 as ALPN chose.
async fn serve_https(
    app: Arc<App>,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    // The connection holds its slot; an HTTP/1.1 WebSocket upgrade takes it over, and each
    // RFC 8441 WebSocket on an HTTP/2 connection takes one more (`router::route`). Open
    // requests and WebSockets are counted for the idle deadline below.
    let (busy, mut open) = Busy::new();
    let ctx = Arc::new(Conn::new(permit, true, Some(busy)));
    let svc_app = app.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(crate::admission::Peer(peer));
        let app = svc_app.clone();
        let ctx = ctx.clone();
        async move {
            let _open = ctx.busy.as_ref().map(Busy::enter);
            Ok::<_, std::convert::Infallible>(router::route(app, req, &ctx).await)
        }
    });
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(TrackedExecutor(app.tracker.clone()));
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            app.config.server.header_read_timeout_ms,
        ))
        .keep_alive(true);
    // RFC 8441: WebSocket over HTTP/2 by extended CONNECT. A client that stops answering
    // PINGs is closed (by hyper, which reports no error for it: not counted as a timeout);
    // streams per connection are capped.
    let ping = Duration::from_millis(app.config.tls.http2_ping_interval_ms);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .keep_alive_interval(ping)
        .keep_alive_timeout(ping)
        .max_concurrent_streams(app.config.tls.http2_max_concurrent_streams);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    // With nothing open, the connection has `server.header_read_timeout_ms` for its first
    // request (hyper's own header timeout does not cover HTTP/2, nor the protocol sniffing
    // before it) and `server.keepalive_timeout_ms` between later ones.
    let first = Duration::from_millis(app.config.server.header_read_timeout_ms);
    let later = Duration::from_millis(app.config.server.keepalive_timeout_ms);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                if is_deadline(&*e) {
                    app.metrics.refused(Refusal::Timeout);
                }
                tracing::debug!(%peer, error = %e, "https connection error");
            }
        }
        () = idle(&mut open, first, later) => {
            tracing::debug!(%peer, "https connection idle too long; closing");
            app.metrics.refused(Refusal::Timeout);
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(first, conn).await;
        }
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let grace = Duration::from_millis(app.config.shutdown.grace_ms);
            let _ = tokio::time::timeout(grace, conn).await;
        }
    }
}

/// Ends when nothing has been open on a connection for `first` (before its first request) or
/// `later` (after one), as counted by `open` (see `conn::Busy`).
async fn idle(
    streams: &mut tokio::sync::watch::Receiver<Streams>,
    first: Duration,
    later: Duration,
) {
    let mut limit = first;
    loop {
        // (The sender lives as long as the connection's service: an error cannot happen.)
        let seen = streams.wait_for(|s| s.open == 0).await.map(|s| s.opened);
        let Ok(seen) = seen else {
            return std::future::pending().await;
        };
        let opened = tokio::time::timeout(limit, streams.wait_for(|s| s.opened != seen))
            .await
            .map(|r| r.is_ok());
        match opened {
            Err(_) => return,
            Ok(false) => return std::future::pending().await,
            Ok(true) => limit = later,
        }
    }
}

/// Whether a connection ended on hyper's HTTP/1 header timeout. (An HTTP/2 PING that goes
/// unanswered ends the connection too, but hyper reports no error for it, so those closes are
/// not counted.)
fn is_deadline(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        next = e.source();
    }
    false
}

async fn serve_redirect(
    app: Arc<App>,
    stream: TcpStream,
    https_port: u16,
    _permit: OwnedSemaphorePermit,
) {
    tracing::Span::current().record("transport", "redirect");
    let svc_app = app.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let app = svc_app.clone();
        async move { Ok::<_, std::convert::Infallible>(redirect(&app, &req, https_port)) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            app.config.server.header_read_timeout_ms,
        ));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if r.is_err_and(|e| e.is_timeout()) {
                app.metrics.refused(Refusal::Timeout);
            }
        }
        _ = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let grace = Duration::from_millis(app.config.shutdown.grace_ms);
            let _ = tokio::time::timeout(grace, conn).await;
        }
    }
}

/// HTTP-01 challenges are answered; everything else is sent to the same host over HTTPS.
fn redirect(app: &App, req: &Request<Incoming>, https_port: u16) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path.starts_with(crate::challenges::CHALLENGE_PATH_PREFIX) {
        return router::challenge_response(app, path);
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_without_port)
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        });
    let Some(host) = host else {
        return error_response(StatusCode::BAD_REQUEST, "missing or bad Host header");
    };
    let port = if https_port == HTTPS_PORT {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{target}");
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    match header::HeaderValue::from_str(&location) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            r
        }
        Err(_) => error_response(StatusCode::BAD_REQUEST, "bad request target"),
    }
}

/// `example.com:80` -> `example.com`; `[::1]:80` -> `[::1]`.
fn host_without_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.find(']').map_or(h, |i| &h[..=i]);
    }
    h.rsplit_once(':').map_or(h, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::host_without_port;

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }
}
