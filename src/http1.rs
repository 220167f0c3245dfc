//! A lean HTTP/1.1 loop for the requests a busy node answers most: `POST /api/publish` and
//! LongPoll `GET`/`POST /socket/longpoll`, each on a keep-alive connection that carries nothing
//! else. hyper serves everything else.
//!
//! Why: these requests are small and many, and hyper's general machinery (request and header
//! maps, a body channel, a timer per request, response encoding) cost about as much per request
//! as the kernel's work. Here a request head is parsed in place with `httparse` (hyper's own
//! parser), the body is read into the same buffer, and the answer's head is written from static
//! pieces together with its body in one `write`. Figures in BENCHMARKS.md.
//!
//! The scope is narrow on purpose: HTTP/1.1 requests with no body or a `Content-Length` body,
//! to the paths above, with the methods above. The first request that is anything else (another
//! path or method, HTTP/1.0, `Transfer-Encoding`, `Expect`, `Upgrade`, a malformed or oversized
//! head) hands the connection, with the bytes already read, to hyper, which serves it exactly as
//! it would have from the start. A connection whose first request is not one of ours never
//! enters this loop: its request line is peeked, not read, so a WebSocket upgrade still reaches
//! hyper with the bare socket (and keeps the zero-buffer WebSocket path).

use crate::app::App;
use crate::metrics::Refusal;
use crate::transport::longpoll;
use crate::{api, respond};
use hyper::StatusCode;
use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Write};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::Instrument;

/// Headers a request may carry here (more: hyper takes it).
const MAX_HEADERS: usize = 48;
/// A head larger than this goes to hyper (which answers 431 when it is too large for it too).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// While a poll is held, bytes the client sends ahead (a pipelined request) are kept up to
/// this much; beyond it we stop reading until the answer is out.
const MAX_AHEAD_BYTES: usize = 64 * 1024;
/// A connection's read buffer starts with this much room, and grows by as much when a head
/// needs more (most heads and bodies of ours fit in the first).
const READ_BUFFER_BYTES: usize = 4096;
/// The answer buffer's first size: a poll answer's head, and a small body.
const ANSWER_BUFFER_BYTES: usize = 512;
/// Room kept for an answer's head besides its body (status line, headers, date).
const ANSWER_HEAD_BYTES: usize = 160;
/// Bytes peeked to read the first request line.
pub(crate) const PEEK_BYTES: usize = 256;

/// What a connection's first request line says.
pub enum First {
    /// One of ours: serve the connection with [`serve`].
    Lean(Kind),
    /// Anything else, or a request line not complete in the first segment: hyper.
    Hyper(Kind),
    /// The client went away, or the node is shutting down.
    Closed,
}

/// What a connection's first request asks for: the `transport` of its `conn` span
/// (`crate::listener::conn_span`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    WebSocket,
    LongPoll,
    /// Anything else (publish, health checks, metrics), or a request line not read yet.
    Http,
}

impl Kind {
    fn of(path: &[u8]) -> Kind {
        match path {
            b"/socket/websocket" => Kind::WebSocket,
            b"/socket/longpoll" => Kind::LongPoll,
            _ => Kind::Http,
        }
    }

    /// The span field's value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::WebSocket => "websocket",
            Kind::LongPoll => "longpoll",
            Kind::Http => "http",
        }
    }
}

/// Peeks at the first request line without consuming it. A client that sends nothing within
/// `server.header_read_timeout_ms` is closed (and counted): a silent socket must not hold its
/// connection slot. At shutdown a connection that has sent nothing yet still has
/// `shutdown.drain_ms` for its request: it may have just connected, its request on the way.
pub async fn first(app: &App, stream: &TcpStream) -> First {
    let mut head = [0u8; PEEK_BYTES];
    let deadline = Duration::from_millis(app.config.server.header_read_timeout_ms);
    let drain = Duration::from_millis(app.config.shutdown.drain_ms);
    let n = tokio::select! {
        r = stream.peek(&mut head) => match r {
            Ok(0) | Err(_) => return First::Closed,
            Ok(n) => n,
        },
        () = async {
            app.shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
        } => return First::Closed,
        _ = tokio::time::sleep(deadline) => {
            tracing::debug!("no request within the header timeout; closing");
            app.metrics.refused(Refusal::Timeout);
            return First::Closed;
        }
    };
    let longpoll = app.config.longpoll.enabled;
    let Some((method, path)) = request_line(&head[..n]) else {
        return First::Hyper(Kind::Http);
    };
    match route(longpoll, method, path) {
        Some(_) => First::Lean(Kind::of(path)),
        None => First::Hyper(Kind::of(path)),
    }
}

/// `(method, path)` of a complete request line.
pub(crate) fn request_line(head: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = head.iter().position(|b| *b == b'\n')?;
    let mut parts = head[..end].split(|b| *b == b' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let path = target.split(|b| *b == b'?').next()?;
    Some((method, path))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Route {
    Publish,
    LongPollGet,
    LongPollPost,
}

/// The requests this loop takes: the one routing table for the peek and the parse.
/// `longpoll`: `longpoll.enabled`.
pub(crate) fn route(longpoll: bool, method: &[u8], path: &[u8]) -> Option<Route> {
    match (method, path) {
        (b"POST", b"/api/publish") => Some(Route::Publish),
        (b"GET", b"/socket/longpoll") if longpoll => Some(Route::LongPollGet),
        (b"POST", b"/socket/longpoll") if longpoll => Some(Route::LongPollPost),
        _ => None,
    }
}

/// What the handlers need from a parsed head, as ranges into the connection's buffer (so the
/// buffer may grow while the body is read).
pub(crate) struct Head {
    pub(crate) route: Route,
    pub(crate) len: usize,
    pub(crate) content_length: u64,
    pub(crate) close: bool,
    pub(crate) query: Range<usize>,
    pub(crate) authorization: Option<Range<usize>>,
    pub(crate) longpoll_token: Option<Range<usize>>,
    pub(crate) auth_token: Option<Range<usize>>,
    pub(crate) forwarded_for: Option<Range<usize>>,
    pub(crate) origin: Option<Range<usize>>,
}

pub(crate) enum Parsed {
    Ours(Head),
    Partial,
    /// Not ours, or not something this loop handles: hyper's turn.
    Hyper,
}

/// Where `part` (a slice of `buf`, or an empty string from elsewhere) lies in `buf`.
fn range_of(buf: &[u8], part: &[u8]) -> Range<usize> {
    match (part.as_ptr() as usize).checked_sub(buf.as_ptr() as usize) {
        Some(start) if !part.is_empty() && start + part.len() <= buf.len() => {
            start..start + part.len()
        }
        _ => 0..0,
    }
}

/// `longpoll`: `longpoll.enabled`.
pub(crate) fn parse(longpoll: bool, buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => return Parsed::Partial,
        _ => return Parsed::Hyper,
    };
    if len > MAX_HEAD_BYTES || req.version != Some(1) {
        return Parsed::Hyper;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parsed::Hyper;
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(route) = route(longpoll, method.as_bytes(), path.as_bytes()) else {
        return Parsed::Hyper;
    };
    if query.contains('#') {
        // A fragment (clients do not send one): hyper's URI parser ends the query there, so
        // hyper reads the parameters (the session token) from its path.
        return Parsed::Hyper;
    }
    let mut head = Head {
        route,
        len,
        content_length: 0,
        close: false,
        query: range_of(buf, query.as_bytes()),
        authorization: None,
        longpoll_token: None,
        auth_token: None,
        forwarded_for: None,
        origin: None,
    };
    let mut seen_length = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match n {
                Some(n) if !seen_length => head.content_length = n,
                // Repeated or malformed: hyper decides (and refuses).
                _ => return Parsed::Hyper,
            }
            seen_length = true;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parsed::Hyper;
        } else if name.eq_ignore_ascii_case("connection") {
            head.close |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if let Some(slot) = if name.eq_ignore_ascii_case("authorization") {
            Some(&mut head.authorization)
        } else if name.eq_ignore_ascii_case("x-phoenix-longpoll-token") {
            Some(&mut head.longpoll_token)
        } else if name.eq_ignore_ascii_case("x-phoenix-authtoken") {
            Some(&mut head.auth_token)
        } else {
            None
        } {
            if slot.is_some() {
                // Twice: hyper's path reads the first; let it decide.
                return Parsed::Hyper;
            }
            *slot = Some(range_of(buf, h.value));
        } else if name.eq_ignore_ascii_case("origin") {
            if head.origin.is_some() {
                // Several: hyper's path decides.
                return Parsed::Hyper;
            }
            head.origin = Some(range_of(buf, h.value));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            if head.forwarded_for.is_some() {
                // Several: hyper reads them all, in order.
                return Parsed::Hyper;
            }
            head.forwarded_for = Some(range_of(buf, h.value));
        }
    }
    Parsed::Ours(head)
}

/// The text at `r` in `buf`, if it is UTF-8.
fn text<'a>(buf: &'a [u8], r: &Option<Range<usize>>) -> Option<&'a str> {
    r.as_ref()
        .and_then(|r| std::str::from_utf8(&buf[r.clone()]).ok())
}

/// How a connection left the loop.
pub enum End {
    Closed,
    /// A request this loop does not take: hyper serves the connection from here, starting with
    /// the bytes already read.
    Hyper(Rewind),
}

/// Serves requests until the connection closes or one of them is not ours.
///
/// One loop per connection, one turn per request, in steps: [`read_head`], [`check_head`],
/// [`read_body`], [`answer`], then the answer goes out in one `write`. A step that ends the
/// connection says how ([`Exit`]); [`leave`] carries it out.
pub async fn serve(app: &Arc<App>, mut stream: TcpStream, peer: std::net::SocketAddr) -> End {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUFFER_BYTES);
    let mut out: Vec<u8> = Vec::with_capacity(ANSWER_BUFFER_BYTES);
    // Registered with the shutdown token once per connection, not once per wait. At shutdown
    // the connection is not closed at once: a request the client may be sending at that moment
    // (its connection looked idle) is still read and answered, with `Connection: close`, for
    // `shutdown.drain_ms`; a client that publishes steadily thus gets its answer and reconnects
    // (to the next process, under systemd's socket) instead of seeing its request cut off.
    let drain = Duration::from_millis(app.config.shutdown.drain_ms);
    let shutdown = async {
        app.shutdown.cancelled().await;
        tokio::time::sleep(drain).await;
    };
    tokio::pin!(shutdown);
    // The keep-alive deadline: one timer per connection, moved only when it fires early (the
    // connection answered a request since it was set), not once per request.
    let mut keepalive = KeepAlive {
        after: Duration::from_millis(app.config.server.keepalive_timeout_ms),
        since: tokio::time::Instant::now(),
    };
    let idle = tokio::time::sleep_until(keepalive.deadline());
    tokio::pin!(idle);
    loop {
        let head = match read_head(
            app,
            &mut stream,
            &mut buf,
            &mut shutdown,
            &mut idle,
            &keepalive,
        )
        .await
        {
            Ok(head) => head,
            Err(exit) => return leave(app, exit, stream, buf, &mut out, None).await,
        };
        let limit = match check_head(app, &buf, &head) {
            Ok(limit) => limit,
            Err(refused) => {
                return leave(
                    app,
                    Exit::Refused(refused),
                    stream,
                    buf,
                    &mut out,
                    Some(&head),
                )
                .await;
            }
        };
        if head.content_length > limit as u64 {
            // Only a LongPoll POST gets here (`check_head` answered a publish).
            let exit = Exit::Refused(Refused::TooLarge);
            return leave(app, exit, stream, buf, &mut out, Some(&head)).await;
        }
        let end = head.len + head.content_length as usize;
        if let Err(exit) = read_body(app, &mut stream, &mut buf, end, &mut shutdown).await {
            return leave(app, exit, stream, buf, &mut out, Some(&head)).await;
        }
        let answer = match answer(app, &mut stream, &mut buf, &head, end, peer).await {
            Ok(answer) => answer,
            Err(exit) => return leave(app, exit, stream, buf, &mut out, Some(&head)).await,
        };
        let close = head.close || app.shutdown.is_cancelled();
        answer.frame(&mut out, close, cors_of(app, &buf, &head));
        if stream.write_all(&out).await.is_err() {
            return End::Closed;
        }
        if close {
            let _ = stream.shutdown().await;
            return End::Closed;
        }
        buf.drain(..end);
        keepalive.since = tokio::time::Instant::now();
    }
}

/// The keep-alive deadline of a connection between requests: `after` its last answer.
struct KeepAlive {
    after: Duration,
    since: tokio::time::Instant,
}

impl KeepAlive {
    #[inline]
    fn deadline(&self) -> tokio::time::Instant {
        self.since + self.after
    }
}

/// How a step of [`serve`] ends the connection.
enum Exit {
    /// The client went away, a read failed, or the node shut down: close without an answer.
    Closed,
    /// A request this loop does not take: hyper serves the connection from here.
    Hyper,
    /// Answer the refusal, then close.
    Refused(Refused),
}

/// Why the lean loop refuses a request. It answers once and closes (a body, if any, stays
/// unread); [`Refused::answer`] is the one place each refusal gets its status, its metric, and
/// whether the write side is shut down after the answer.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// The rest of a head did not come within `server.header_read_timeout_ms`.
    #[error("request head not received in time")]
    HeadTimedOut,
    /// A body stalled for `server.body_timeout_ms`.
    #[error("request body not received in time")]
    BodyTimedOut,
    /// A LongPoll request from a page outside `server.allowed_origins`.
    #[error("origin not in server.allowed_origins")]
    Origin,
    /// A LongPoll POST declaring more than `longpoll.max_post_bytes`.
    #[error("longpoll post larger than longpoll.max_post_bytes")]
    TooLarge,
    /// The publish API's checks before the body ([`api::check_head`]: 401, 413).
    #[error("publish refused before its body ({})", .0.status)]
    Publish(respond::Answer),
}

impl Refused {
    /// The answer (the same bytes as hyper's path sends), the refusal counted; and whether to
    /// shut the write side down after it (after a deadline: the client hears why it ends).
    fn answer(self, app: &App) -> (Answer, bool) {
        match self {
            Refused::HeadTimedOut | Refused::BodyTimedOut => {
                app.metrics.refused(Refusal::Timeout);
                let message = self.to_string();
                let answer = respond::Answer::error(StatusCode::REQUEST_TIMEOUT, &message);
                (Answer::Publish(answer), true)
            }
            // 403 with `{"status":403}` and no CORS, as `longpoll::handle` answers.
            Refused::Origin => {
                app.metrics.refused(Refusal::Origin);
                (Answer::LongPollRefused, false)
            }
            Refused::TooLarge => (Answer::LongPoll(longpoll::status_only(413)), false),
            Refused::Publish(answer) => (Answer::Publish(answer), false),
        }
    }
}

/// Ends the connection as `exit` says: hands it to hyper with the bytes read, or answers a
/// refusal and closes, or just closes. `head`: the request's, when it was read.
async fn leave(
    app: &App,
    exit: Exit,
    mut stream: TcpStream,
    buf: Vec<u8>,
    out: &mut Vec<u8>,
    head: Option<&Head>,
) -> End {
    match exit {
        Exit::Closed => End::Closed,
        Exit::Hyper => End::Hyper(Rewind::new(buf, stream)),
        Exit::Refused(refused) => {
            tracing::debug!(reason = %refused, "request refused; closing");
            let cors = head.map_or(Cors::Open, |h| cors_of(app, &buf, h));
            let (answer, shutdown) = refused.answer(app);
            answer.frame(out, true, cors);
            let _ = stream.write_all(out).await;
            if shutdown {
                let _ = stream.shutdown().await;
            }
            End::Closed
        }
    }
}

/// Reads until `buf` holds a complete head of ours. Between requests it waits up to the
/// keep-alive deadline (`idle`, moved only when it fires early) or shutdown; once part of a head
/// arrived, the rest must come within `server.header_read_timeout_ms`.
async fn read_head<D: Future<Output = ()>>(
    app: &App,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    shutdown: &mut Pin<&mut D>,
    idle: &mut Pin<&mut tokio::time::Sleep>,
    keepalive: &KeepAlive,
) -> Result<Head, Exit> {
    let mut deadline = None;
    loop {
        match parse(app.config.longpoll.enabled, buf) {
            Parsed::Ours(head) => return Ok(head),
            Parsed::Hyper => return Err(Exit::Hyper),
            Parsed::Partial => {}
        }
        buf.reserve(READ_BUFFER_BYTES);
        let read = if buf.is_empty() {
            wait_for_request(app, stream, buf, shutdown, idle, keepalive).await?
        } else {
            let d = *deadline.get_or_insert_with(|| {
                tokio::time::Instant::now()
                    + Duration::from_millis(app.config.server.header_read_timeout_ms)
            });
            match tokio::time::timeout_at(d, stream.read_buf(buf)).await {
                Ok(r) => r,
                Err(_) => return Err(Exit::Refused(Refused::HeadTimedOut)),
            }
        };
        match read {
            Ok(0) | Err(_) => return Err(Exit::Closed),
            Ok(_) => {}
        }
    }
}

/// Between requests: the next read, unless the keep-alive deadline passes first (counted as a
/// forced close) or the node shuts down.
#[inline]
async fn wait_for_request<D: Future<Output = ()>>(
    app: &App,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    shutdown: &mut Pin<&mut D>,
    idle: &mut Pin<&mut tokio::time::Sleep>,
    keepalive: &KeepAlive,
) -> Result<io::Result<usize>, Exit> {
    loop {
        tokio::select! {
            biased;
            r = stream.read_buf(buf) => return Ok(r),
            _ = shutdown.as_mut() => return Err(Exit::Closed),
            _ = idle.as_mut() => {
                let end = keepalive.deadline();
                if tokio::time::Instant::now() >= end {
                    tracing::debug!("keep-alive connection idle too long; closing");
                    app.metrics.refused(Refusal::Timeout);
                    return Err(Exit::Closed);
                }
                idle.as_mut().reset(end);
            }
        }
    }
}

/// The checks made before the body: the publish API's (bearer token, declared size), or a
/// LongPoll request's origin (`server.allowed_origins`, as `longpoll::handle` checks it on
/// hyper's path). `Ok` carries the body size limit.
#[inline]
fn check_head(app: &App, buf: &[u8], head: &Head) -> Result<usize, Refused> {
    match head.route {
        Route::Publish => api::check_head(
            app,
            head.authorization.clone().map(|r| &buf[r]),
            Some(head.content_length),
        )
        .map_err(Refused::Publish),
        Route::LongPollPost | Route::LongPollGet
            if !app.origins.allows(head.origin.clone().map(|r| &buf[r])) =>
        {
            tracing::debug!(
                origin = ?String::from_utf8_lossy(head.origin.clone().map_or(&b""[..], |r| &buf[r])),
                "longpoll request refused: origin not in server.allowed_origins"
            );
            Err(Refused::Origin)
        }
        Route::LongPollPost => Ok(app.config.longpoll.max_post_bytes),
        Route::LongPollGet => Ok(0),
    }
}

/// Reads the rest of the body, up to `end` in `buf`: each wait for more bytes ends at
/// `server.body_timeout_ms` (one timer per body, moved when bytes come), and a stalled body
/// does not hold up a shutdown. A body that came with its head never waits here.
async fn read_body<D: Future<Output = ()>>(
    app: &App,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    end: usize,
    shutdown: &mut Pin<&mut D>,
) -> Result<(), Exit> {
    if buf.len() >= end {
        return Ok(());
    }
    let stall = Duration::from_millis(app.config.server.body_timeout_ms);
    let timer = tokio::time::sleep(stall);
    tokio::pin!(timer);
    while buf.len() < end {
        buf.reserve(end - buf.len());
        let read = tokio::select! {
            biased;
            r = stream.read_buf(buf) => r,
            _ = shutdown.as_mut() => return Err(Exit::Closed),
            _ = timer.as_mut() => return Err(Exit::Refused(Refused::BodyTimedOut)),
        };
        match read {
            Ok(0) | Err(_) => return Err(Exit::Closed),
            Ok(_) => timer.as_mut().reset(tokio::time::Instant::now() + stall),
        }
    }
    Ok(())
}

/// The answer to a request whose head and body (`buf[head.len..end]`) are read. A LongPoll
/// request runs inside its session's span (`longpoll::session_span`).
async fn answer(
    app: &Arc<App>,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &Head,
    end: usize,
    peer: std::net::SocketAddr,
) -> Result<Answer, Exit> {
    Ok(match head.route {
        Route::Publish => Answer::Publish(api::publish_body(app, &buf[head.len..end]).await),
        Route::LongPollPost => {
            let query = std::str::from_utf8(&buf[head.query.clone()]).unwrap_or("");
            let token = longpoll::session_token(text(buf, &head.longpoll_token), query);
            let post = longpoll::post(app, token, &buf[head.len..end]);
            Answer::LongPoll(post.instrument(longpoll::session_span(token)).await)
        }
        Route::LongPollGet => {
            let query = std::str::from_utf8(&buf[head.query.clone()]).unwrap_or("");
            let token = longpoll::session_token(text(buf, &head.longpoll_token), query);
            let span = longpoll::session_span(token);
            let client = app.admission.client_ip(
                peer.ip(),
                head.forwarded_for.iter().map(|r| &buf[r.clone()]),
            );
            let get = span.in_scope(|| {
                longpoll::Get::begin(app, token, query, text(buf, &head.auth_token), Some(client))
            });
            let body = match get {
                longpoll::Get::Done(body) => body,
                held => hold(app, stream, buf, end, held).instrument(span).await?,
            };
            Answer::LongPoll(body)
        }
    })
}

/// A held LongPoll GET: a client that goes away ends the poll (and frees its session's listener
/// slot); bytes it sends ahead (a pipelined request) wait in the buffer, up to
/// [`MAX_AHEAD_BYTES`].
async fn hold(
    app: &Arc<App>,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    end: usize,
    held: longpoll::Get,
) -> Result<bytes::Bytes, Exit> {
    let finish = held.finish(app.clone());
    tokio::pin!(finish);
    loop {
        tokio::select! {
            biased;
            body = &mut finish => return Ok(body),
            r = stream.read_buf(buf), if buf.len() < end + MAX_AHEAD_BYTES => {
                match r {
                    Ok(0) | Err(_) => return Err(Exit::Closed),
                    Ok(_) => {}
                }
            }
        }
    }
}

enum Answer {
    Publish(respond::Answer),
    /// Always HTTP 200; the LongPoll status is in the body.
    LongPoll(bytes::Bytes),
    /// An origin outside `server.allowed_origins`: 403, `{"status":403}`, no CORS.
    LongPollRefused,
}

/// The CORS headers of a LongPoll answer: `*` while `server.allowed_origins` is empty, else the
/// request's own (allowed) origin, with `Vary: Origin`, as `longpoll::handle` answers.
#[derive(Clone, Copy)]
enum Cors<'a> {
    Open,
    Restricted(Option<&'a [u8]>),
}

fn cors_of<'a>(app: &App, buf: &'a [u8], head: &Head) -> Cors<'a> {
    if app.origins.is_open() {
        Cors::Open
    } else {
        Cors::Restricted(head.origin.clone().map(|r| &buf[r]))
    }
}

impl Answer {
    /// The whole response, head and body, into `out`. The headers are the ones the hyper path
    /// sends ([`respond::JSON_HEADERS`], [`longpoll::ANSWER_HEADERS`]).
    fn frame(&self, out: &mut Vec<u8>, close: bool, cors: Cors) {
        let refused = longpoll::status_only(403);
        let restricted = matches!(cors, Cors::Restricted(_));
        let (status, headers, body): (_, &[(&str, &str)], &[u8]) = match self {
            Answer::Publish(a) => (a.status, a.headers(), &a.body),
            Answer::LongPoll(body) if restricted => {
                (StatusCode::OK, longpoll::ANSWER_HEADERS_NO_CORS, body)
            }
            Answer::LongPoll(body) => (StatusCode::OK, longpoll::ANSWER_HEADERS, body),
            Answer::LongPollRefused => (
                StatusCode::FORBIDDEN,
                longpoll::ANSWER_HEADERS_NO_CORS,
                &refused,
            ),
        };
        out.clear();
        out.reserve(ANSWER_HEAD_BYTES + body.len());
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if let (Cors::Restricted(origin), Answer::LongPoll(_)) = (cors, self) {
            if let Some(o) = origin {
                out.extend_from_slice(b"access-control-allow-origin: ");
                out.extend_from_slice(o);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"vary: origin\r\n");
        }
        let _ = write!(out, "content-length: {}\r\ndate: ", body.len());
        with_date(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
    }
}

thread_local! {
    /// The `date` header value, formatted once per second per thread.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

fn with_date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DATE.with(|cell| {
        let mut d = cell.borrow_mut();
        if d.0 != secs {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        f(d.1.as_bytes());
    });
}

/// A connection handed to hyper mid-stream: the bytes already read come first.
pub struct Rewind {
    read: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl Rewind {
    /// `inner`, with `read` (bytes already taken from it) to be read first. An empty `read`
    /// is dropped at once: its buffer would otherwise stay for the connection's life (the
    /// PROXY header reader's 536 bytes, when nothing followed the header yet).
    pub(crate) fn new(read: Vec<u8>, inner: TcpStream) -> Rewind {
        Rewind {
            read: if read.is_empty() { Vec::new() } else { read },
            pos: 0,
            inner,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.read.len() {
            let n = buf.remaining().min(self.read.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.read[start..start + n]);
            self.pos += n;
            if self.pos == self.read.len() {
                self.read = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            request_line(b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"),
            Some((&b"POST"[..], &b"/api/publish"[..]))
        );
        assert_eq!(
            request_line(b"GET /socket/longpoll?vsn=2.0.0&token=a HTTP/1.1\r\n"),
            Some((&b"GET"[..], &b"/socket/longpoll"[..]))
        );
        assert_eq!(request_line(b"GET /socket/longpoll?vsn=2.0"), None);
    }

    /// Found by the fuzz target `http1_head`: with a header given twice the lean loop read the
    /// last value, hyper's handlers (`HeaderMap::get`) the first.
    #[test]
    fn a_header_the_loop_reads_given_twice_goes_to_hyper() {
        for name in [
            "Authorization",
            "X-Phoenix-LongPoll-Token",
            "X-Phoenix-AuthToken",
        ] {
            let head = format!(
                "POST /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\n{name}: a\r\n{name}: b\r\n\r\n"
            );
            assert!(
                matches!(parse(true, head.as_bytes()), Parsed::Hyper),
                "{name}"
            );
            let head = format!("POST /socket/longpoll?vsn=2.0.0 HTTP/1.1\r\n{name}: a\r\n\r\n");
            assert!(
                matches!(parse(true, head.as_bytes()), Parsed::Ours(_)),
                "{name}"
            );
        }
    }

    /// Found by the fuzz target `http1_head`: the lean loop read the query past a `#`, where
    /// hyper's URI ends it, so the two paths read different session tokens from one request.
    #[test]
    fn a_fragment_in_the_target_goes_to_hyper() {
        let head = b"GET /socket/longpoll?vsn=2.0.0#x&token=lp0123 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(parse(true, head), Parsed::Hyper));
        let head = b"GET /socket/longpoll?vsn=2.0.0&token=lp0123 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(parse(true, head), Parsed::Ours(_)));
    }
}
