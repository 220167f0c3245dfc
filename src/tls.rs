//! At the edge: pushgate terminates TLS itself (`tls.listen`), with the certificate from
//! [`crate::acme`] or from files (`tls.cert_file`, `tls.key_file`, see
//! [`crate::server_cert`]), and serves HTTP/1.1 and HTTP/2 by ALPN; optionally a plain-HTTP
//! listener (`tls.redirect_listen`) redirects to HTTPS and answers HTTP-01 challenges.
//!
//! A certificate from files is checked for changes every [`CERT_FILES_CHECK_INTERVAL`] by a
//! task of its own (never on the handshake path) and loaded again once the files have stopped
//! changing; a pair that does not load leaves the certificate in use in place (logged, and
//! counted in `pushgate_tls_certificate_reloads_total{result="error"}`).
//!
//! Under systemd the edge's sockets may come from `pushgate.socket` like the plain ones
//! ([`Passed`]: a passed socket whose address is `tls.listen`'s or `tls.redirect_listen`'s
//! serves it), so a restart refuses no connection at the edge either, and systemd, not
//! pushgate, binds ports below 1024.
//!
//! Each connection's TLS handshake runs inside its own tracked task under
//! `tls.handshake_timeout_ms`, never in the accept loop. With `tls.proxy_protocol` every
//! connection first sends a PROXY protocol header ([`crate::proxy_protocol`]), read under the
//! same deadline; the client it names is the connection's peer from then on (its span, the
//! per-address limits), and a connection without one is closed and counted. A ClientHello
//! that offers only the `acme-tls/1` protocol is a TLS-ALPN-01 validation: it gets the
//! challenge certificate from the ACME resolver and the connection ends after the handshake. Everything else is served by
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
use crate::http1::Rewind;
use crate::listener::{accept_loop, accept_loop_spanned, conn_span};
use crate::metrics::{Metrics, Refusal};
use crate::proxy_protocol::{self, Source};
use crate::respond::error_response;
use crate::router;
use crate::server_cert::FileCert;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_acme::rustls::ServerConfig;
use rustls_acme::rustls::server::Acceptor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// HTTPS's default port: a redirect to it names no port.
const HTTPS_PORT: u16 = 443;

/// How often the certificate files are checked for a change (two `stat`s). A change is loaded
/// once the files look the same on two checks in a row, so a renewal written in several steps
/// (certbot moves two links) is read once it is complete: within two intervals.
pub const CERT_FILES_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The edge listeners, bound before serving (an address in use stops the start), and the
/// certificate from files when `tls.cert_file` is set (loaded before serving: a bad pair
/// stops the start).
#[derive(Debug, Default)]
pub struct Listeners {
    pub https: Option<TcpListener>,
    pub redirect: Option<TcpListener>,
    pub cert_files: Option<CertFiles>,
}

/// The edge's sockets among those systemd passed (`LISTEN_FDS`): `pushgate.socket` with a
/// `ListenStream=` for `tls.listen` (and `tls.redirect_listen`) keeps them listening across
/// restarts, as it keeps `server.listen`'s, and binds them for pushgate.
#[derive(Debug, Default)]
pub struct Passed {
    https: Option<TcpListener>,
    redirect: Option<TcpListener>,
}

impl Passed {
    /// Takes out of `listeners` (the sockets systemd passed) the one whose local address is
    /// `tls.listen` and the one whose address is `tls.redirect_listen`; the others stay, for
    /// the plain listener's part.
    pub fn take(listeners: &mut Vec<TcpListener>, tls: &crate::config::TlsConfig) -> Passed {
        fn take_one(listeners: &mut Vec<TcpListener>, addr: &str) -> Option<TcpListener> {
            let wanted: std::net::SocketAddr = addr.parse().ok()?;
            let i = listeners
                .iter()
                .position(|l| l.local_addr().is_ok_and(|a| a == wanted))?;
            Some(listeners.remove(i))
        }
        Passed {
            https: take_one(listeners, &tls.listen),
            redirect: take_one(listeners, &tls.redirect_listen),
        }
    }
}

/// The certificate from files as loaded at start, with what the files looked like just before
/// (so that a renewal landing while they were read is loaded again by the reload task).
#[derive(Debug)]
pub struct CertFiles {
    cert: Arc<FileCert>,
    stamps: (FileStamp, FileStamp),
    not_after: i64,
}

/// Where the edge's certificates come from: the files when `tls.cert_file` is set (with
/// `acme.enabled` too: they are then ACME's export, and TLS-ALPN-01 is refused by the
/// configuration), else the ACME resolver.
#[derive(Clone)]
enum Certs {
    /// The ACME task's resolver (which also answers TLS-ALPN-01).
    Acme,
    /// `tls.cert_file`: one server configuration, its resolver swapped on renewal.
    Files(Arc<ServerConfig>),
}

impl Listeners {
    /// Binds `tls.listen` and `tls.redirect_listen` when set, unless systemd passed their
    /// sockets (`passed`).
    pub async fn bind(
        config: &crate::config::Config,
        passed: Passed,
    ) -> std::io::Result<Listeners> {
        async fn one(
            key: &str,
            addr: &str,
            passed: Option<TcpListener>,
        ) -> std::io::Result<Option<TcpListener>> {
            if addr.is_empty() {
                return Ok(None);
            }
            if let Some(l) = passed {
                tracing::info!(addr = %l.local_addr()?, "listening ({key}, the socket passed by systemd)");
                return Ok(Some(l));
            }
            let l = crate::listener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("binding {addr} ({key}): {e}"))
            })?;
            tracing::info!(addr = %l.local_addr()?, "listening ({key})");
            Ok(Some(l))
        }
        let tls = &config.tls;
        let cert_files = if tls.has_cert_files() && !tls.listen.is_empty() {
            let (cert, key) = (Path::new(&tls.cert_file), Path::new(&tls.key_file));
            let stamps = stamps(cert, key);
            let loaded = crate::server_cert::load(cert, key).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("tls.cert_file: {e}"),
                )
            })?;
            tracing::info!(cert_file = %tls.cert_file, not_after = loaded.not_after, "tls: certificate loaded from files");
            Some(CertFiles {
                cert: Arc::new(FileCert::new(loaded.key)),
                stamps,
                not_after: loaded.not_after,
            })
        } else {
            None
        };
        Ok(Listeners {
            https: one("tls.listen", &tls.listen, passed.https).await?,
            redirect: one("tls.redirect_listen", &tls.redirect_listen, passed.redirect).await?,
            cert_files,
        })
    }

    /// Spawns their accept loops on `app.tracker`; the HTTPS one shares `slots`.
    pub fn spawn(self, app: &Arc<App>, slots: &Arc<Semaphore>) {
        if let Some(l) = self.https {
            let https_port = l.local_addr().map_or(HTTPS_PORT, |a| a.port());
            let certs = match self.cert_files {
                Some(files) => match file_server_config(files.cert.clone()) {
                    Some(config) => {
                        app.tracker.spawn(watch_cert_files(app.clone(), files));
                        Certs::Files(config)
                    }
                    None => {
                        tracing::error!(
                            "tls: the crypto provider supports no safe TLS version; not serving tls.listen"
                        );
                        return;
                    }
                },
                None => Certs::Acme,
            };
            if app.config.tls.proxy_protocol {
                // The connection's span is made once the header names the client.
                app.tracker.spawn(accept_loop_spanned(
                    l,
                    app.clone(),
                    slots.clone(),
                    false,
                    move |app, stream, peer, permit| {
                        serve_proxied(app, stream, peer, permit, certs.clone())
                    },
                ));
            } else {
                app.tracker.spawn(accept_loop(
                    l,
                    app.clone(),
                    slots.clone(),
                    move |app, stream, peer, permit| {
                        let deadline = handshake_deadline(&app);
                        serve_tls(app, stream, peer, permit, certs.clone(), deadline)
                    },
                ));
            }
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

/// The server configuration for a certificate from files (ALPN `h2`, `http/1.1`), built once.
fn file_server_config(files: Arc<FileCert>) -> Option<Arc<ServerConfig>> {
    let provider = Arc::new(rustls_acme::rustls::crypto::ring::default_provider());
    let mut c = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_no_client_auth()
        .with_cert_resolver(files);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Some(Arc::new(c))
}

/// What identifies a file's content without reading it: its modification time, size and inode
/// (the file a link points to: certbot renews by pointing `live/` links at new files).
type FileStamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamps(cert: &Path, key: &Path) -> (FileStamp, FileStamp) {
    use std::os::unix::fs::MetadataExt;
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    };
    (one(cert), one(key))
}

/// Reloads `tls.cert_file` and `tls.key_file` when they change (see
/// [`CERT_FILES_CHECK_INTERVAL`]), until shutdown. A pair that does not load keeps the
/// certificate in use.
async fn watch_cert_files(app: Arc<App>, files: CertFiles) {
    let metrics = &app.metrics;
    let cert = PathBuf::from(&app.config.tls.cert_file);
    let key = PathBuf::from(&app.config.tls.key_file);
    metrics.tls_cert_files.store(1, Relaxed);
    let stat = || {
        let (cert, key) = (cert.clone(), key.clone());
        async move {
            tokio::task::spawn_blocking(move || stamps(&cert, &key))
                .await
                .unwrap_or((None, None))
        }
    };
    // What the files looked like when last loaded, and at the last check.
    let mut loaded = files.stamps;
    metrics.tls_cert_not_after.store(files.not_after, Relaxed);
    let mut last = loaded;
    loop {
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            () = tokio::time::sleep(CERT_FILES_CHECK_INTERVAL) => {}
        }
        let now = stat().await;
        if now != last {
            // Still changing, or just changed: read it once it holds still.
            last = now;
            continue;
        }
        if now == loaded {
            continue;
        }
        loaded = now;
        let (c, k) = (cert.clone(), key.clone());
        let result = tokio::task::spawn_blocking(move || crate::server_cert::load(&c, &k)).await;
        match result {
            Ok(Ok(l)) => {
                files.cert.replace(l.key);
                metrics.tls_cert_not_after.store(l.not_after, Relaxed);
                Metrics::add(&metrics.tls_cert_reloads_ok, 1);
                tracing::info!(cert_file = %cert.display(), not_after = l.not_after, "tls: certificate reloaded from files");
            }
            Ok(Err(e)) => {
                Metrics::add(&metrics.tls_cert_reloads_failed, 1);
                tracing::error!(error = %e, "tls.cert_file: the changed files do not load; the certificate in use stays until they change again");
            }
            Err(e) => {
                Metrics::add(&metrics.tls_cert_reloads_failed, 1);
                tracing::error!(error = %e, "tls.cert_file: loading failed");
            }
        }
    }
}

fn handshake_deadline(app: &App) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(app.config.tls.handshake_timeout_ms)
}

/// A connection from a proxy (`tls.proxy_protocol`): its PROXY header, then TLS, both before
/// the handshake deadline. The header's client is the peer from here on; a connection without
/// a valid header is closed.
async fn serve_proxied(
    app: Arc<App>,
    mut stream: TcpStream,
    socket_peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    certs: Certs,
) {
    let deadline = handshake_deadline(&app);
    let header = tokio::time::timeout_at(deadline, proxy_protocol::read_header(&mut stream));
    let (peer, rest) = match header.await {
        Ok(Ok((Source::Client(client), rest))) => (client, rest),
        Ok(Ok((Source::Local, rest))) => (socket_peer, rest),
        // A connection that ends (or fails) before a header is not refused, only gone: as
        // a failed TLS handshake, logged and not counted (a port check connects and closes).
        Ok(Err(e @ (proxy_protocol::Error::Closed | proxy_protocol::Error::Io(_)))) => {
            tracing::debug!(peer = %socket_peer, error = %e, "connection ended before its proxy protocol header");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %socket_peer, error = %e, "connection refused");
            app.metrics.refused(Refusal::ProxyProtocol);
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %socket_peer, "proxy protocol header timed out");
            app.metrics.refused(Refusal::Timeout);
            return;
        }
    };
    let span = conn_span(peer);
    let stream = Rewind::new(rest, stream);
    serve_tls(app, stream, peer, permit, certs, deadline)
        .instrument(span)
        .await;
}

async fn serve_tls<S>(
    app: Arc<App>,
    stream: S,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    certs: Certs,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (challenge, normal) = match certs {
        Certs::Files(config) => (None, config),
        Certs::Acme => match server_configs(&app) {
            Some((challenge, normal)) => (Some(challenge), normal),
            None => {
                tracing::debug!(%peer, "tls: no certificate source yet; closing");
                return;
            }
        },
    };
    let handshake = async {
        let start = tokio_rustls::LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
        let challenge =
            challenge.filter(|_| rustls_acme::is_tls_alpn_challenge(&start.client_hello()));
        let is_challenge = challenge.is_some();
        let config = challenge.unwrap_or(normal);
        start.into_stream(config).await.map(|s| (s, is_challenge))
    };
    let tls = match tokio::time::timeout_at(deadline, handshake).await {
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
async fn serve_https<S>(
    app: Arc<App>,
    tls: tokio_rustls::server::TlsStream<S>,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
    let drain = Duration::from_millis(app.config.shutdown.drain_ms);
    let shutdown = crate::conn::shutdown_after_a_late_request(&app.shutdown, drain, open.clone());
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
        () = shutdown => {
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
