//! Drives a [`Session`] over a WebSocket: the upgrade handshake, then one task per connection
//! that reads frames, answers them, and writes everything pending in one `writev`.
//!
//! Memory while idle: the task holds the session (a few words per joined channel), an empty
//! frame reader and an empty outbox. Reads go into a buffer on the stack of a plain function
//! (not held across an `.await`), so an idle connection owns no read or write buffer.
//!
//! Architecture Invariant: the transport never talks to a broker and never parses Phoenix
//! frames itself (that is [`crate::protocol`]); it moves bytes and enforces WebSocket rules.

use crate::app::App;
use crate::auth::{ConnectInfo, Oversized};
use crate::hub::{ConnHandle, Lag, Sink};
use crate::metrics::{Metrics, Refusal};
use crate::protocol;
use crate::query::query_param;
use crate::respond::plain_response;
use crate::session::Session;
use crate::ws::{self, Flow, Message, MessageReader, close_code};
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::future::Future as _;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

/// Bytes of broadcasts gathered for one `writev` round. Large enough to batch a busy topic,
/// small enough that one connection cannot hog a worker.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Stop reading from a client while this much is waiting to be written to it: a client that
/// floods requests but does not read the replies is not allowed to grow our memory.
const READ_PAUSE_BYTES: usize = 512 * 1024;
/// Slices per `writev` (IOV_MAX is 1024 on Linux; 64 frames per call is plenty).
const MAX_IOVECS: usize = 64;
/// Stack read buffer per read call.
const READ_CHUNK: usize = 8 * 1024;
/// Reads of [`READ_CHUNK`] per wake-up at most (32 KiB): then the task yields, so a flooding
/// client does not hold its worker thread.
const READS_PER_WAKE: usize = 4;
/// The WebSocket version we speak (RFC 6455), as `Sec-WebSocket-Version` says it.
const WEBSOCKET_VERSION: &str = "13";
/// The subprotocol phoenix.js offers, answered when offered.
const PHOENIX_SUBPROTOCOL: &str = "phoenix";
/// The subprotocol prefix phoenix.js passes its auth token in (`base64url.bearer.phx.<B>`).
const AUTH_TOKEN_SUBPROTOCOL: &str = "base64url.bearer.phx.";
/// After we send a close frame, how long we wait for the client's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Decodes the token phoenix.js puts in `base64url.bearer.phx.<B>` (standard base64 without
/// padding, despite the name; we accept the URL-safe alphabet too).
fn decode_auth_token(b: &str) -> Option<String> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let b = b.trim_end_matches('=');
    let bytes = STANDARD_NO_PAD
        .decode(b)
        .or_else(|_| URL_SAFE_NO_PAD.decode(b))
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// What a WebSocket holds while it lives: its `server.max_connections` slot, and at the edge
/// its place among its connection's open streams (`crate::conn::Busy`).
pub struct Hold {
    pub permit: OwnedSemaphorePermit,
    pub busy: Option<crate::conn::BusyGuard>,
}

/// Why a WebSocket upgrade is refused (nothing is spawned; a refused upgrade leaves its
/// connection's slot in place). [`Refused::response`] is the one place each refusal gets its
/// status, its body (the message, then a newline) and its refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("expected a WebSocket upgrade (GET with Upgrade: websocket)")]
    NotAnUpgrade,
    /// A page outside `server.allowed_origins`.
    #[error("origin not allowed (server.allowed_origins)")]
    Origin,
    /// `Sec-WebSocket-Version` other than 13.
    #[error("unsupported WebSocket version")]
    WebSocketVersion,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    /// `vsn` other than 2.x.
    #[error("unsupported protocol version: pushgate speaks Phoenix V2 (vsn=2.0.0)")]
    PhoenixVersion,
    /// The node is shutting down.
    #[error("draining")]
    Draining,
    /// `limits.max_connections_per_address` (counted by `crate::admission` itself).
    #[error("too many connections from this address")]
    PerAddress,
    /// No free slot (`server.max_connections`).
    #[error("too many connections (server.max_connections)")]
    NoSlot,
    /// A query string or auth token longer than a connection keeps.
    #[error("{}", .0.reason())]
    Oversized(Oversized),
}

impl Refused {
    /// The HTTP status of each refusal.
    pub fn status(self) -> StatusCode {
        match self {
            Refused::NotAnUpgrade | Refused::MissingKey => StatusCode::BAD_REQUEST,
            Refused::Origin | Refused::PhoenixVersion => StatusCode::FORBIDDEN,
            Refused::WebSocketVersion => StatusCode::UPGRADE_REQUIRED,
            Refused::Draining | Refused::NoSlot => StatusCode::SERVICE_UNAVAILABLE,
            Refused::PerAddress => StatusCode::TOO_MANY_REQUESTS,
            Refused::Oversized(Oversized::Query) => StatusCode::URI_TOO_LONG,
            Refused::Oversized(Oversized::AuthToken) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The refusal metric's cause, where this transport counts it (`PerAddress` is counted by
    /// `crate::admission` when it refuses).
    fn cause(self) -> Option<Refusal> {
        match self {
            Refused::Origin => Some(Refusal::Origin),
            Refused::NoSlot => Some(Refusal::SessionCap),
            _ => None,
        }
    }

    /// The answer: plain text, the message and a newline; a 426 names the version we speak.
    pub fn response(self, app: &App) -> Response<Full<Bytes>> {
        if let Some(cause) = self.cause() {
            app.metrics.refused(cause);
        }
        tracing::debug!(reason = %self, "websocket upgrade refused");
        let mut r = plain_response(self.status(), format!("{self}\n"));
        if self == Refused::WebSocketVersion {
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                header::HeaderValue::from_static(WEBSOCKET_VERSION),
            );
        }
        r
    }
}

/// What a valid upgrade request asks for, read from its head.
struct Handshake {
    /// RFC 8441: an HTTP/2 extended CONNECT, answered 200 without the key/accept exchange.
    h2_connect: bool,
    key: Option<header::HeaderValue>,
    query: String,
}

/// Answers a WebSocket upgrade request at `/socket/websocket` and spawns the session. `hold`
/// is asked for the WebSocket's slot only once the request is a valid upgrade (a refused one
/// leaves its connection's slot in place); without one the answer is 503.
pub fn upgrade(
    app: Arc<App>,
    mut req: Request<Incoming>,
    hold: impl FnOnce() -> Option<Hold>,
) -> Response<Full<Bytes>> {
    match accept(&app, &mut req, hold) {
        Ok((resp, admitted, hold, connect, h2)) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            drop(req);
            let m = &app.metrics;
            Metrics::add(
                match h2 {
                    true => &m.websocket_upgrades_http2,
                    false => &m.websocket_upgrades_http1,
                },
                1,
            );
            spawn(app, on_upgrade, admitted, hold, connect);
            resp
        }
        Err(refused) => refused.response(&app),
    }
}

/// The checks of an upgrade, in order (the first that fails decides the answer), then its
/// admission and slot; `Ok` carries the 101 (or RFC 8441's 200) and what the session keeps.
#[allow(clippy::type_complexity)]
fn accept(
    app: &App,
    req: &mut Request<Incoming>,
    hold: impl FnOnce() -> Option<Hold>,
) -> Result<
    (
        Response<Full<Bytes>>,
        Option<crate::admission::Admitted>,
        Hold,
        ConnectInfo,
        bool,
    ),
    Refused,
> {
    let handshake = check_request(app, req)?;
    if app.is_draining() {
        return Err(Refused::Draining);
    }
    let client = app.admission.client_of(req);
    let admitted = app
        .admission
        .admit_or_count(client, &app.metrics)
        .map_err(|_| Refused::PerAddress)?;
    let hold = hold().ok_or(Refused::NoSlot)?;
    let (offered_phoenix, auth_token) = offered_protocols(req);
    // Kept for the connection's life: bounded, refused before the upgrade like a bad `vsn`.
    let connect = ConnectInfo::bounded(&handshake.query, auth_token.as_deref())
        .map_err(Refused::Oversized)?;
    let h2 = handshake.h2_connect;
    Ok((
        switching(handshake, offered_phoenix),
        admitted,
        hold,
        connect,
        h2,
    ))
}

/// The request-level checks: an upgrade (or an RFC 8441 CONNECT), an allowed origin, WebSocket
/// version 13, a key, Phoenix V2.
fn check_request(app: &App, req: &Request<Incoming>) -> Result<Handshake, Refused> {
    let h2_connect = req.method() == hyper::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !h2_connect
        && (req.method() != hyper::Method::GET
            || !header_has_token(req, header::UPGRADE, "websocket")
            || !header_has_token(req, header::CONNECTION, "upgrade"))
    {
        return Err(Refused::NotAnUpgrade);
    }
    // Once per upgrade: a page outside `server.allowed_origins` may not open sockets.
    let origin = req.headers().get(header::ORIGIN);
    if !app.origins.allows(origin.map(|v| v.as_bytes())) {
        tracing::debug!(
            origin = ?String::from_utf8_lossy(origin.map_or(&b""[..], |v| v.as_bytes())),
            "websocket upgrade refused: origin not in server.allowed_origins"
        );
        return Err(Refused::Origin);
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != WEBSOCKET_VERSION.as_bytes())
    {
        return Err(Refused::WebSocketVersion);
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    if key.is_none() && !h2_connect {
        return Err(Refused::MissingKey);
    }
    let query = req.uri().query().unwrap_or("").to_string();
    if !query_param(&query, "vsn").is_some_and(|v| v.starts_with("2.")) {
        return Err(Refused::PhoenixVersion);
    }
    Ok(Handshake {
        h2_connect,
        key,
        query,
    })
}

/// Whether the client offered the `phoenix` subprotocol, and the auth token phoenix.js passes
/// as a subprotocol (`base64url.bearer.phx.<token>`).
fn offered_protocols(req: &Request<Incoming>) -> (bool, Option<String>) {
    let mut offered_phoenix = false;
    let mut auth_token = None;
    for v in req.headers().get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        for p in v.to_str().unwrap_or("").split(',').map(str::trim) {
            if p == PHOENIX_SUBPROTOCOL {
                offered_phoenix = true;
            } else if let Some(b) = p.strip_prefix(AUTH_TOKEN_SUBPROTOCOL) {
                auth_token = decode_auth_token(b);
            }
        }
    }
    (offered_phoenix, auth_token)
}

/// The answer that opens the WebSocket: 101 with the accept key over HTTP/1.1, 200 over
/// HTTP/2 (RFC 8441); `phoenix` as the subprotocol when offered.
fn switching(handshake: Handshake, offered_phoenix: bool) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    let h = resp.headers_mut();
    if let Some(key) = handshake.key.filter(|_| !handshake.h2_connect) {
        h.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        if let Ok(accept) = header::HeaderValue::from_str(&ws::accept_key(key.as_bytes())) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    if offered_phoenix {
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static(PHOENIX_SUBPROTOCOL),
        );
    }
    resp
}

/// Spawns the WebSocket task on `app.tracker`, in the connection's span: it waits for hyper to
/// hand the stream over (with a deadline: a client that does not take the answer does not keep
/// the task and its slot), then [`run`]s the session.
fn spawn(
    app: Arc<App>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    admitted: Option<crate::admission::Admitted>,
    hold: Hold,
    connect: ConnectInfo,
) {
    let task_app = app.clone();
    let handshake = Duration::from_millis(app.config.server.header_read_timeout_ms);
    let task = async move {
        let _hold = hold;
        let _admitted = admitted;
        let upgraded = match tokio::time::timeout(handshake, on_upgrade).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
            Err(_) => {
                tracing::debug!("websocket handshake not completed in time");
                task_app.metrics.refused(crate::metrics::Refusal::Timeout);
                return;
            }
        };
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let stream = parts.io.into_inner();
                // Copy what the client sent right after the handshake (usually nothing) and
                // let go of hyper's read buffer, which `read_buf` would otherwise keep alive
                // for the whole life of the connection.
                let initial = parts.read_buf.to_vec();
                drop(parts.read_buf);
                run(task_app, SharedTcp::new(stream), initial, connect).await;
            }
            // TLS at the edge, or an HTTP/2 stream (RFC 8441): the polled adapter.
            // Boxed, so that this branch does not enlarge every plain-TCP connection's task.
            Err(upgraded) => {
                let io = Polled::new(TokioIo::new(upgraded));
                Box::pin(run(task_app, io, Vec::new(), connect)).await
            }
        }
    };
    app.tracker.spawn(task.instrument(tracing::Span::current()));
}

/// What the WebSocket task needs from its byte stream: readiness plus non-blocking reads and
/// vectored writes, the shape of `TcpStream`'s own API. The plain-TCP path (behind nginx) uses
/// the stream directly and so keeps no buffer while idle; [`Polled`] adapts any other stream
/// (TLS at the edge, an HTTP/2 stream for RFC 8441) at the cost of staging buffers.
pub trait WsIo {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Bytes accepted by `try_write_vectored` still to be pushed out (see [`Polled`]).
    fn wants_flush(&self) -> bool {
        false
    }
    /// The connection handle that holds the connection's socket, so that publishes may write to it
    /// while the connection is parked (see [`ConnHandle::park`]); `None` when writes must go
    /// through the task.
    fn conn_handle(&self) -> Option<Arc<ConnHandle>> {
        None
    }
    /// Ends the stream once the task is done with it: TLS says `close_notify`, an HTTP/2 stream
    /// ends. A plain socket simply closes when dropped.
    fn poll_close(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The plain-TCP path: the socket lives in the connection handle ([`Sink::Tcp`]), which
/// the task and the hub's sweeps share.
pub struct SharedTcp(Arc<ConnHandle>);

impl SharedTcp {
    fn new(stream: TcpStream) -> SharedTcp {
        let conn_handle = Arc::new(ConnHandle::default());
        conn_handle.set_sink(Sink::Tcp(stream));
        SharedTcp(conn_handle)
    }

    fn stream(&self) -> &TcpStream {
        self.0
            .tcp()
            .expect("SharedTcp::new put the socket in the connection handle")
    }
}

impl WsIo for SharedTcp {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_read_ready(cx)
    }
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream().try_read(buf)
    }
    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_write_ready(cx)
    }
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // `sendmsg` rather than `writev`: the socket call skips the VFS layer (file position
        // lock, permission hooks), a measurable share of a small send on this path.
        let s = self.stream();
        s.try_io(tokio::io::Interest::WRITABLE, || {
            socket2::SockRef::from(s).send_vectored(bufs)
        })
    }
    fn conn_handle(&self) -> Option<Arc<ConnHandle>> {
        Some(self.0.clone())
    }
}

/// Bytes [`Polled`] accepts for writing before it reports `WouldBlock` (like a socket buffer).
const POLLED_WRITE_STAGE: usize = 64 * 1024;
/// [`Polled`]'s read chunk.
const POLLED_READ_CHUNK: usize = 8 * 1024;

/// Adapts any `AsyncRead + AsyncWrite` stream to [`WsIo`]: reads are staged in a buffer filled
/// when readiness is polled; writes are copied into a staging buffer that readiness polling
/// pushes out and flushes.
pub struct Polled<S> {
    io: S,
    read: Vec<u8>,
    read_start: usize,
    read_end: usize,
    eof: bool,
    write: Vec<u8>,
    write_start: usize,
}

impl<S> Polled<S> {
    pub fn new(io: S) -> Polled<S> {
        Polled {
            io,
            read: Vec::new(),
            read_start: 0,
            read_end: 0,
            eof: false,
            write: Vec::new(),
            write_start: 0,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo for Polled<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.read_start < self.read_end || self.eof {
            return Poll::Ready(Ok(()));
        }
        if self.read.len() < POLLED_READ_CHUNK {
            self.read.resize(POLLED_READ_CHUNK, 0);
        }
        let mut rb = ReadBuf::new(&mut self.read);
        match std::pin::Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.read_start = 0;
                self.read_end = n;
                self.eof = n == 0;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read_start < self.read_end {
            let n = buf.len().min(self.read_end - self.read_start);
            buf[..n].copy_from_slice(&self.read[self.read_start..self.read_start + n]);
            self.read_start += n;
            return Ok(n);
        }
        if self.eof {
            return Ok(0);
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.write_start < self.write.len() {
            match std::pin::Pin::new(&mut self.io).poll_write(cx, &self.write[self.write_start..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.write_start += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        match std::pin::Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.write.clear();
                self.write_start = 0;
                if self.write.capacity() > POLLED_WRITE_STAGE {
                    self.write = Vec::new();
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let room = POLLED_WRITE_STAGE.saturating_sub(self.write.len() - self.write_start);
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut taken = 0;
        for b in bufs {
            let n = b.len().min(room - taken);
            self.write.extend_from_slice(&b[..n]);
            taken += n;
            if taken == room {
                break;
            }
        }
        Ok(taken)
    }

    fn wants_flush(&self) -> bool {
        !self.write.is_empty()
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Frames waiting to be written, each complete; `offset` bytes of the front one are written.
#[derive(Default)]
struct Outbox {
    frames: VecDeque<Bytes>,
    offset: usize,
    bytes: usize,
}

impl Outbox {
    fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Queues the rest of a frame whose first `written` bytes a publish wrote directly; only
    /// on an empty outbox (the connection parks only then).
    fn push_started(&mut self, frame: Bytes, written: usize) {
        debug_assert!(self.frames.is_empty() && written < frame.len());
        self.bytes += frame.len() - written;
        self.frames.push_back(frame);
        self.offset = written;
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Drops every frame not yet started (keeping a partly written one, so the stream stays
    /// well-formed), so that a close frame queued next goes out as soon as the peer reads.
    fn discard_unstarted(&mut self) {
        let keep = usize::from(self.offset > 0);
        while self.frames.len() > keep {
            if let Some(f) = self.frames.pop_back() {
                self.bytes -= f.len();
            }
        }
    }

    /// Writes as much as the socket takes. `Ok(true)` when everything was written.
    fn write_to<S: WsIo>(&mut self, stream: &mut S) -> io::Result<bool> {
        while !self.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, f) in self.frames.iter().take(MAX_IOVECS).enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &f[self.offset..] } else { &f[..] });
                n += 1;
            }
            match stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    self.bytes -= written;
                    while written > 0 {
                        let left = self.frames[0].len() - self.offset;
                        if written >= left {
                            written -= left;
                            self.frames.pop_front();
                            self.offset = 0;
                        } else {
                            self.offset += written;
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if self.frames.capacity() > 0 {
            self.frames = VecDeque::new(); // an idle connection holds no queue
        }
        Ok(true)
    }
}

/// What one round of reading produced.
enum ReadOutcome {
    /// Read something (or nothing yet); keep going.
    Open,
    /// Read as much as one round may and the socket may hold more: keep going after letting
    /// other tasks run (a flooding client must not hold its worker thread).
    Full,
    /// The peer closed the TCP connection.
    Eof,
    /// The peer sent a close frame with this code.
    PeerClose(Option<u16>),
    /// The peer broke the WebSocket protocol; close with this code.
    Violation(u16, &'static str),
}

/// Reads what the socket has into a stack buffer and processes every complete message.
/// A plain function, so the buffer lives on the stack only while it runs.
fn read_ready<S: WsIo>(
    stream: &mut S,
    reader: &mut MessageReader,
    session: &mut Session,
    outbox: &mut Outbox,
    max_message: usize,
    discard: bool,
) -> io::Result<ReadOutcome> {
    let mut buf = [0u8; READ_CHUNK];
    // A few reads per wake-up at most, so a flooding client yields to others.
    for _ in 0..READS_PER_WAKE {
        let n = match stream.try_read(&mut buf) {
            Ok(0) => return Ok(ReadOutcome::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadOutcome::Open),
            Err(e) => return Err(e),
        };
        let outcome = process(&mut buf[..n], reader, session, outbox, max_message, discard);
        if !matches!(outcome, ReadOutcome::Open) {
            return Ok(outcome);
        }
        if n < buf.len() {
            return Ok(ReadOutcome::Open);
        }
    }
    Ok(ReadOutcome::Full)
}

fn process(
    data: &mut [u8],
    reader: &mut MessageReader,
    session: &mut Session,
    outbox: &mut Outbox,
    max_message: usize,
    discard: bool,
) -> ReadOutcome {
    let mut peer_close = None;
    let result = reader.feed(data, max_message, &mut |m| match m {
        // The conformance build (Cargo feature `autobahn-echo`) echoes data messages.
        Message::Text(t) if cfg!(feature = "autobahn-echo") => {
            outbox.push(Bytes::from(ws::encode_frame(ws::OP_TEXT, t)));
            Flow::Continue
        }
        Message::Binary(b) if cfg!(feature = "autobahn-echo") => {
            outbox.push(Bytes::from(ws::encode_frame(ws::OP_BINARY, b)));
            Flow::Continue
        }
        Message::Text(t) => {
            if !discard {
                match protocol::parse_text(t) {
                    Ok(msg) => session.handle(msg),
                    Err(e) => session.handle_parse_error(e),
                }
            }
            Flow::Continue
        }
        Message::Binary(b) => {
            if !discard {
                match protocol::parse_binary(b) {
                    Ok(msg) => session.handle(msg),
                    Err(e) => session.handle_parse_error(e),
                }
            }
            Flow::Continue
        }
        Message::Ping(p) => {
            outbox.push(Bytes::from(ws::encode_frame(ws::OP_PONG, p)));
            Flow::Continue
        }
        Message::Pong => Flow::Continue,
        Message::Close(code, _) => {
            peer_close = Some(code);
            Flow::Stop
        }
    });
    match result {
        Err(e) => ReadOutcome::Violation(e.code, e.reason),
        Ok(_) => match peer_close {
            Some(code) => ReadOutcome::PeerClose(code),
            None => ReadOutcome::Open,
        },
    }
}

/// Why we close a WebSocket. [`State::close`] is the one place each gets its close code, its
/// reason and its metric.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum Closing {
    /// The peer's close frame: we answer with its own code (which the parser has checked).
    #[error("peer closed")]
    Reply(Option<u16>),
    /// The peer broke the WebSocket protocol (counted as a bad message).
    #[error("{1}")]
    Violation(u16, &'static str),
    /// The topics left the client behind: 1013, counted as a slow-consumer close.
    #[error("{}", slow_consumer_reason(*.0))]
    SlowConsumer(Lag),
    /// The drain: 1012.
    #[error("server restart")]
    Restart,
    /// `server.idle_timeout_ms` without a read: 1001, counted as a timeout.
    #[error("idle timeout")]
    IdleTimeout,
}

fn slow_consumer_reason(lag: Lag) -> &'static str {
    match lag {
        Lag::FellOffHistory => "slow consumer: fell off the topic history",
        Lag::TooManyPendingBytes => "slow consumer: too many pending bytes",
    }
}

/// The close a read's outcome calls for: the reply to the peer's close, or ours for a protocol
/// violation. Either way nothing more from the peer is worth reading. The bytes that came with
/// the upgrade and later reads go through here alike.
#[inline]
fn closing_of(outcome: &ReadOutcome) -> Option<Closing> {
    match *outcome {
        ReadOutcome::Open | ReadOutcome::Full | ReadOutcome::Eof => None,
        ReadOutcome::PeerClose(code) => Some(Closing::Reply(code)),
        ReadOutcome::Violation(code, reason) => Some(Closing::Violation(code, reason)),
    }
}

/// Counts the connection in the gauge and registers it for the drain while it lives.
struct Registration {
    app: Arc<App>,
    key: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.app.metrics.connections_websocket.fetch_sub(1, Relaxed);
        self.app.unregister_connection(self.key);
    }
}

/// What woke the connection task.
enum Event {
    Shutdown,
    Timer,
    Writable(io::Result<()>),
    Readable(io::Result<()>),
    Woken,
}

/// A connection's state between wake-ups, besides its session, stream and timer.
struct State {
    reader: MessageReader,
    outbox: Outbox,
    /// Our close frame is queued (nothing else is written after it).
    close_sent: bool,
    /// The peer's close frame came, or it broke the protocol: nothing more is read.
    peer_closed: bool,
    /// The drain has begun; the timer holds this connection's moment to close.
    draining: bool,
    last_activity: Instant,
}

impl State {
    /// Closes the connection for `why`: its side effects (metric, log, what is dropped), then
    /// its close frame, queued unless ours is already out; the timer then bounds the wait for
    /// the peer's answer ([`CLOSE_TIMEOUT`]).
    fn close(&mut self, app: &App, why: Closing, timer: &mut Pin<&mut Sleep>) {
        let frame = match why {
            Closing::Reply(code) => {
                self.peer_closed = true;
                ws::encode_close_reply(code)
            }
            Closing::Violation(code, reason) => {
                Metrics::add(&app.metrics.bad_messages, 1);
                tracing::debug!(code, reason, "websocket protocol violation");
                self.peer_closed = true;
                ws::encode_close(code, reason)
            }
            Closing::SlowConsumer(lag) => {
                Metrics::add(&app.metrics.slow_consumer_closes, 1);
                let why = slow_consumer_reason(lag);
                tracing::debug!(reason = why, "closing websocket");
                self.outbox.discard_unstarted();
                ws::encode_close(close_code::TRY_AGAIN_LATER, why)
            }
            Closing::Restart => ws::encode_close(close_code::RESTART, "server restart"),
            Closing::IdleTimeout => {
                app.metrics.refused(Refusal::Timeout);
                ws::encode_close(close_code::GOING_AWAY, "idle timeout")
            }
        };
        if !self.close_sent {
            self.outbox.push(Bytes::from(frame));
            self.close_sent = true;
            timer.as_mut().reset(Instant::now() + CLOSE_TIMEOUT);
        }
    }

    /// Takes what is pending for the client into the outbox: queued frames first (a join reply
    /// precedes what the join replays), then broadcasts, within [`WRITE_BATCH_BYTES`]. Returns
    /// whether the topics were left unread because a write batch is still in flight.
    #[inline]
    fn collect(
        &mut self,
        app: &App,
        session: &mut Session,
        conn_handle: &ConnHandle,
        timer: &mut Pin<&mut Sleep>,
    ) -> bool {
        let outbox = &mut self.outbox;
        session.settle();
        while let Some(f) = session.pop_queued() {
            let (h, n) = ws::header(ws::OP_TEXT, f.len());
            let mut framed = Vec::with_capacity(n + f.len());
            framed.extend_from_slice(&h[..n]);
            framed.extend_from_slice(&f);
            outbox.push(Bytes::from(framed));
        }
        conn_handle.clear();
        let mut took_nothing = false;
        let collected = if outbox.bytes < WRITE_BATCH_BYTES {
            let budget = WRITE_BATCH_BYTES - outbox.bytes;
            session.collect_broadcasts(budget, &mut |e| outbox.push(e.ws_frame().clone()))
        } else {
            // The socket is not draining; see whether the topics have left us behind.
            took_nothing = true;
            session.check_lag().map(|()| 0)
        };
        match collected {
            Ok(0) => {}
            Ok(n) => Metrics::add(&app.metrics.messages_delivered, n as u64),
            Err(lag) => self.close(app, Closing::SlowConsumer(lag), timer),
        }
        took_nothing
    }

    /// Done once both close frames have crossed and ours is out: on a staged stream (TLS, an
    /// HTTP/2 stream) an empty outbox only means the bytes are staged, not yet flushed.
    #[inline]
    fn finished<S: WsIo>(&self, stream: &S) -> bool {
        self.close_sent && self.outbox.is_empty() && !stream.wants_flush() && self.peer_closed
    }

    /// The timer fired: the close deadline, the drain moment, or the idle deadline (moved
    /// when reads came meanwhile). `false`: the peer never answered our close; stop.
    fn on_timer(&mut self, app: &App, idle_timeout: Duration, timer: &mut Pin<&mut Sleep>) -> bool {
        if self.close_sent {
            return false;
        }
        if self.draining {
            self.close(app, Closing::Restart, timer);
        } else if self.last_activity + idle_timeout > Instant::now() {
            timer.as_mut().reset(self.last_activity + idle_timeout);
        } else {
            self.close(app, Closing::IdleTimeout, timer);
        }
        true
    }

    /// The drain began: spread closes over `shutdown.drain_ms` so clients do not reconnect all
    /// at once.
    fn on_shutdown(&mut self, app: &App, timer: &mut Pin<&mut Sleep>) {
        self.draining = true;
        let drain_ms = app.config.shutdown.drain_ms.max(1);
        let jitter = Duration::from_millis(rand::random::<u64>() % drain_ms);
        timer.as_mut().reset(Instant::now() + jitter);
    }
}

/// What a wait listens to on the socket, decided before it.
#[derive(Clone, Copy)]
struct Wants {
    read: bool,
    write: bool,
}

/// Waits for whichever comes first: the drain beginning, the timer, the socket writable (when
/// there is something to write) or readable (when reading), or a topic waking us. Every future
/// polled lives as long as the connection, so a wait registers nothing new.
#[inline]
fn poll_event<S: WsIo>(
    cx: &mut Context<'_>,
    app: &App,
    state: &State,
    stream: &mut S,
    timer: &mut Pin<&mut Sleep>,
    conn_handle: &ConnHandle,
    wants: Wants,
) -> Poll<Event> {
    if !state.draining && !state.close_sent && app.is_draining() {
        return Poll::Ready(Event::Shutdown);
    }
    if timer.as_mut().poll(cx).is_ready() {
        return Poll::Ready(Event::Timer);
    }
    if wants.write
        && let Poll::Ready(r) = stream.poll_write_ready(cx)
    {
        return Poll::Ready(Event::Writable(r));
    }
    if wants.read
        && let Poll::Ready(r) = stream.poll_read_ready(cx)
    {
        return Poll::Ready(Event::Readable(r));
    }
    if !state.close_sent && conn_handle.poll_woken(cx).is_ready() {
        return Poll::Ready(Event::Woken);
    }
    Poll::Pending
}

/// Runs one WebSocket connection until it closes.
///
/// One task, one loop: take what is pending (queued frames, then broadcasts) and write it at
/// once; then wait for whichever comes first of the socket becoming readable or writable, a
/// topic waking us, the timer (idle timeout, drain moment, close deadline), or shutdown. The
/// wait is a single `poll_fn` over futures that live as long as the connection, so an
/// iteration registers nothing new: readiness uses the stream's own waker slots, the hub's
/// [`ConnHandle`](crate::hub::ConnHandle) one atomic slot, and the drain wakes us through that same
/// connection handle ([`App::set_draining`]).
pub async fn run<S: WsIo>(app: Arc<App>, mut stream: S, initial: Vec<u8>, connect: ConnectInfo) {
    let session_conn_handle = stream.conn_handle();
    let direct = session_conn_handle.is_some();
    let mut session = match session_conn_handle {
        Some(w) => Session::with_conn_handle(app.session.clone(), connect, w),
        None => Session::new(app.session.clone(), connect),
    };
    let conn_handle = session.conn_handle().clone();
    app.metrics.connections_websocket.fetch_add(1, Relaxed);
    let _registration = Registration {
        app: app.clone(),
        key: app.register_connection(conn_handle.clone()),
    };
    let max_message = app.config.limits.max_frame_bytes;
    let idle_timeout = Duration::from_millis(app.config.server.idle_timeout_ms);
    let mut state = State {
        reader: MessageReader::default(),
        outbox: Outbox::default(),
        close_sent: false,
        peer_closed: false,
        draining: false,
        last_activity: Instant::now(),
    };
    let timer = tokio::time::sleep_until(state.last_activity + idle_timeout);
    tokio::pin!(timer);

    if !initial.is_empty() {
        let mut data = initial;
        let outcome = process(
            &mut data,
            &mut state.reader,
            &mut session,
            &mut state.outbox,
            max_message,
            false,
        );
        if let Some(why) = closing_of(&outcome) {
            state.close(&app, why, &mut timer);
        }
    }

    loop {
        let took_nothing =
            !state.close_sent && state.collect(&app, &mut session, &conn_handle, &mut timer);
        // Write at once: usually the socket takes it all and no readiness wait is needed.
        if !state.outbox.is_empty()
            && let Err(e) = state.outbox.write_to(&mut stream)
        {
            tracing::debug!(error = %e, "websocket write failed");
            break;
        }
        if took_nothing && state.outbox.bytes < WRITE_BATCH_BYTES {
            // The socket drained: come back for what waited in the topics meanwhile (no
            // publish may come to wake us for it).
            conn_handle.wake();
        }
        if state.finished(&stream) {
            break;
        }
        let wants = Wants {
            read: !state.peer_closed && state.outbox.bytes < READ_PAUSE_BYTES,
            write: !state.outbox.is_empty() || stream.wants_flush(),
        };
        // Nothing queued: park, so that a lone new broadcast is written by the publish itself.
        let parked = direct && !state.close_sent && state.outbox.is_empty();
        if parked {
            conn_handle.park();
        }
        let event = std::future::poll_fn(|cx| {
            poll_event(
                cx,
                &app,
                &state,
                &mut stream,
                &mut timer,
                &conn_handle,
                wants,
            )
        })
        .await;
        if parked && let Some((frame, written)) = conn_handle.unpark() {
            state.outbox.push_started(frame, written);
        }
        match event {
            Event::Woken => {}
            Event::Shutdown => state.on_shutdown(&app, &mut timer),
            Event::Timer => {
                if !state.on_timer(&app, idle_timeout, &mut timer) {
                    break;
                }
            }
            // The write happens at the top of the loop.
            Event::Writable(r) => {
                if r.is_err() {
                    break;
                }
            }
            Event::Readable(r) => {
                if r.is_err() {
                    break;
                }
                state.last_activity = Instant::now();
                let read = read_ready(
                    &mut stream,
                    &mut state.reader,
                    &mut session,
                    &mut state.outbox,
                    max_message,
                    state.close_sent,
                );
                match read {
                    Ok(ReadOutcome::Eof) | Err(_) => break,
                    // Readiness is still set, so the next wait returns at once and never
                    // yields: yield here, or a flood would keep the tasks this one woke (the
                    // Redis broker's, queued behind it on this worker) from running.
                    Ok(ReadOutcome::Full) => tokio::task::yield_now().await,
                    Ok(outcome) => {
                        if let Some(why) = closing_of(&outcome) {
                            state.close(&app, why, &mut timer);
                        }
                    }
                }
            }
        }
    }
    // A staged stream (TLS, HTTP/2) ends properly, a plain socket at once; bounded: the peer
    // may be gone.
    let _ = tokio::time::timeout(
        CLOSE_TIMEOUT,
        std::future::poll_fn(|cx| stream.poll_close(cx)),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statuses and bodies of the refusals, as they were before they were typed (the
    /// integration tests check a few of them on the wire).
    #[test]
    fn each_refusal_has_its_status_and_message() {
        let cases = [
            (
                Refused::NotAnUpgrade,
                400,
                "expected a WebSocket upgrade (GET with Upgrade: websocket)",
            ),
            (
                Refused::Origin,
                403,
                "origin not allowed (server.allowed_origins)",
            ),
            (
                Refused::WebSocketVersion,
                426,
                "unsupported WebSocket version",
            ),
            (Refused::MissingKey, 400, "missing Sec-WebSocket-Key"),
            (
                Refused::PhoenixVersion,
                403,
                "unsupported protocol version: pushgate speaks Phoenix V2 (vsn=2.0.0)",
            ),
            (Refused::Draining, 503, "draining"),
            (
                Refused::PerAddress,
                429,
                "too many connections from this address",
            ),
            (
                Refused::NoSlot,
                503,
                "too many connections (server.max_connections)",
            ),
            (
                Refused::Oversized(Oversized::Query),
                414,
                &Oversized::Query.reason(),
            ),
            (
                Refused::Oversized(Oversized::AuthToken),
                431,
                &Oversized::AuthToken.reason(),
            ),
        ];
        for (refused, status, message) in cases {
            assert_eq!(refused.status().as_u16(), status, "{refused:?}");
            assert_eq!(refused.to_string(), message, "{refused:?}");
        }
        assert_eq!(Refused::Origin.cause(), Some(Refusal::Origin));
        assert_eq!(Refused::NoSlot.cause(), Some(Refusal::SessionCap));
        assert_eq!(
            Refused::PerAddress.cause(),
            None,
            "counted by crate::admission"
        );
    }

    #[test]
    fn auth_tokens_decode_from_either_alphabet() {
        assert_eq!(
            decode_auth_token("bXktYXV0aC10b2s").as_deref(),
            Some("my-auth-tok")
        );
        // "??>" encodes to "Pz8+" in the standard alphabet and "Pz8-" in the URL-safe one.
        assert_eq!(decode_auth_token("Pz8+").as_deref(), Some("??>"));
        assert_eq!(decode_auth_token("Pz8-").as_deref(), Some("??>"));
    }
}
