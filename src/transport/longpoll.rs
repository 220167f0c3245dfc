//! Drives a [`Session`] over Phoenix LongPoll (`/socket/longpoll`, PHOENIX-PROTOCOL.md §2).
//!
//! A session lives in this node's registry under a random token. A GET with no valid token
//! creates one and answers `{"status":410,"token":T}`; later GETs answer at once with every frame
//! waiting (queued frames first, then broadcasts from the shared topic buffers), or hold until
//! something arrives or `longpoll.window_ms` passes (`204`). A POST carries ndjson lines that
//! are handled in order before `{"status":200}`; their replies go out through the next GET.
//! Every answer is HTTP 200 with a JSON body, `cache-control: no-store` and CORS headers.
//!
//! Each session holds a slot of `server.max_connections` for its life, as each connection does
//! ([`admit`], where every check on a new session is made); a session that no GET polls after
//! the one that created it is dropped after [`UNPOLLED_TIMEOUT`], the others after
//! `longpoll.session_timeout_ms` without a poll.
//!
//! Nothing is copied per session while no GET is waiting: broadcasts stay in the topic buffers
//! and the session keeps only its read positions, exactly as a WebSocket does.
//!
//! A frame leaves the session only once the client has shown it received it, as Phoenix's own
//! LongPoll does: every poll answer carries a token ending in the number of the last frame it
//! holds, phoenix.js sends the token of the last answer it got with its next request, and that
//! poll acknowledges every frame up to that number. Until then the frames wait in the session
//! ([`Unacked`], the JSON strings the answer was made of), and a poll that comes back with
//! an older number (the answer was lost: a relaying node drained or died, the Redis link carrying
//! it dropped, a balancer retried the request on another node) gets them again, first. Whichever
//! node or path an answer travelled through, a frame is never dropped before the client has it.
//!
//! Tokens look like `lp` followed by 32 hex digits (the session: the `410` answer gives this
//! form), then, in poll answers, 8 more (the acknowledgement). A poll with the short form
//! acknowledges every frame handed out so far (a client that keeps its first token works as
//! before, without the guarantee). A token of either shape whose session is gone (expired,
//! overflowed, or from a restarted node) gets `{"status":500}`, which makes both 1.7.x and 1.8.x
//! clients reconnect and rejoin; a plain 410 would make 1.7.x adopt the new session silently and
//! lose its channels. Any other token (a user's own `token` param) starts a session.

use crate::app::App;
use crate::auth::ConnectInfo;
use crate::broker::redis::Forwarded;
use crate::hub::Lag;
use crate::metrics::{Metrics, Refusal};
use crate::protocol;
use crate::query::query_param;
use crate::respond::{error_response, response_with};
use crate::session::Session;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

pub mod registry;

use registry::{
    Inner, LpSession, TOKEN_LEN, TOKEN_PREFIX, UNPOLLED_SWEEP, Unacked, close, looks_like_ours,
    new_token, token_ack, token_key,
};
pub use registry::{Registry, UNPOLLED_TIMEOUT};

/// Bytes of frames one GET response carries at most; the rest goes with the next poll, which
/// the client sends at once.
const RESPONSE_BATCH_BYTES: usize = 256 * 1024;
/// The characters of a session token its log lines show (`lp`, the node id, 8 of the 24 random
/// hex digits): enough to tell this node's sessions apart, while the other 64 random bits stay
/// out of the logs (the token is the session's only credential).
const LOGGED_TOKEN_CHARS: usize = TOKEN_PREFIX.len() + 16;
/// How long a relayed request waits for the owner's answer beyond `longpoll.window_ms` (the
/// owner holds a GET that long): room for the two Redis hops and a busy owner.
const FORWARD_SLACK: Duration = Duration::from_secs(5);
/// How long a browser may cache a preflight's answer (`access-control-max-age`, seconds).
const PREFLIGHT_MAX_AGE: &str = "3600";

/// How often the server runs [`Registry::sweep`].
pub fn sweep_interval(config: &crate::config::Config) -> Duration {
    // A session outlives its timeout by at most a quarter of it, and a never-polled one
    // outlives [`UNPOLLED_TIMEOUT`] by at most [`UNPOLLED_SWEEP`].
    UNPOLLED_SWEEP.min(Duration::from_millis(
        config.longpoll.session_timeout_ms / registry::FULL_SWEEPS_PER_TIMEOUT as u64,
    ))
}

/// The span of one LongPoll request: `session` is its session's token prefix
/// ([`LOGGED_TOKEN_CHARS`]), recorded here for a token of our shape and by [`new_session`] for
/// a session it creates. At DEBUG level, like the connection's span (`crate::listener`).
pub fn session_span(token: Option<&str>) -> tracing::Span {
    let span = tracing::debug_span!("longpoll", session = tracing::field::Empty);
    if !span.is_disabled()
        && let Some(t) = token.filter(|t| looks_like_ours(t))
    {
        span.record("session", &t[..LOGGED_TOKEN_CHARS]);
    }
    span
}

/// The session token: the `X-Phoenix-Longpoll-Token` header, else the **last** `token` query
/// value (a user param called `token` comes first).
pub fn session_token<'a>(header: Option<&'a str>, query: &'a str) -> Option<&'a str> {
    if let Some(v) = header.filter(|v| !v.is_empty()) {
        return Some(v);
    }
    query_param(query, "token").filter(|t| !t.is_empty())
}

fn token_of(req: &Request<Incoming>) -> Option<&str> {
    session_token(
        req.headers()
            .get("x-phoenix-longpoll-token")
            .and_then(|v| v.to_str().ok()),
        req.uri().query().unwrap_or(""),
    )
}

/// The headers every LongPoll answer carries (both HTTP paths send exactly these).
pub const ANSWER_HEADERS: &[(&str, &str)] = &[
    ("content-type", "application/json; charset=utf-8"),
    ("cache-control", "no-store"),
    ("access-control-allow-origin", "*"),
];

/// [`ANSWER_HEADERS`] without CORS: a refused origin's answer (and, with the request's own
/// origin added, an answer while `server.allowed_origins` is set).
pub const ANSWER_HEADERS_NO_CORS: &[(&str, &str)] = &[
    ("content-type", "application/json; charset=utf-8"),
    ("cache-control", "no-store"),
];

/// An HTTP 200 JSON answer with [`ANSWER_HEADERS`].
fn answer(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    response_with(StatusCode::OK, ANSWER_HEADERS, body)
}

pub fn status_only(status: u16) -> Bytes {
    Bytes::from(format!("{{\"status\":{status}}}"))
}

/// A refusal: `status` (one phoenix.js handles, see [`new_session`]) and a `reason` for people
/// reading the exchange; phoenix.js reads only the status.
fn refusal(status: u16, reason: &str) -> Bytes {
    let mut body = format!("{{\"status\":{status},\"reason\":").into_bytes();
    protocol::push_json_str(&mut body, reason);
    body.push(b'}');
    Bytes::from(body)
}

/// A poll answer; `messages` are already JSON string literals, `token` is one of ours (hex
/// digits, nothing to escape), followed by `ack` (8 hex digits) when given.
fn poll_answer(status: u16, token: &str, ack: Option<u32>, messages: &[Bytes]) -> Bytes {
    let size: usize = messages.iter().map(|m| m.len() + 1).sum();
    let mut body = Vec::with_capacity(56 + token.len() + size);
    // Writing into a Vec cannot fail.
    let _ = write!(body, "{{\"status\":{status},\"token\":\"");
    body.extend_from_slice(token.as_bytes());
    if let Some(ack) = ack {
        let _ = write!(body, "{ack:08x}");
    }
    body.extend_from_slice(b"\",\"messages\":[");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(m);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// The request headers a preflight allows: those phoenix.js sends (1.8: `Accept` and
/// `X-Phoenix-AuthToken` on a GET, `Content-Type` on a POST; 1.7: `Content-Type`), never
/// whatever the preflight asks for.
const ALLOWED_HEADERS: &str = "accept, content-type, x-phoenix-authtoken";

/// Handles any request to `/socket/longpoll`. With `server.allowed_origins` set, a request from
/// another origin gets 403 and the CORS headers name the request's own (allowed) origin;
/// otherwise they say `*`. (The lean loop of [`crate::http1`] checks and answers the same way.)
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    if !app.origins.allows(origin.as_ref().map(|v| v.as_bytes())) {
        app.metrics.refused(crate::metrics::Refusal::Origin);
        tracing::debug!(
            origin = ?String::from_utf8_lossy(origin.as_ref().map_or(&b""[..], |v| v.as_bytes())),
            method = %req.method(),
            "longpoll request refused: origin not in server.allowed_origins"
        );
        // phoenix.js reads the status from the body: 403 there makes it report the error and
        // close (1008), then reconnect with backoff, instead of stalling on a body it cannot read.
        return response_with(
            StatusCode::FORBIDDEN,
            ANSWER_HEADERS_NO_CORS,
            status_only(403),
        );
    }
    let mut resp = respond(app.clone(), req).await;
    if !app.origins.is_open() {
        let h = resp.headers_mut();
        h.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
        if let Some(o) = origin {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        }
        h.insert(header::VARY, header::HeaderValue::from_static("origin"));
    }
    resp
}

async fn respond(app: Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match *req.method() {
        Method::OPTIONS => preflight(),
        Method::GET => {
            let query = req.uri().query().unwrap_or("");
            let auth_token = req
                .headers()
                .get("x-phoenix-authtoken")
                .and_then(|v| v.to_str().ok());
            let client = app.admission.client_of(&req);
            let span = session_span(token_of(&req));
            let get = span.in_scope(|| Get::begin(&app, token_of(&req), query, auth_token, client));
            // The request's head points into hyper's read buffer: let go of it before holding
            // the poll, so hyper can reuse that buffer for the next request instead of
            // allocating a new one.
            drop(req);
            answer(get.finish(app).instrument(span).await)
        }
        Method::POST => {
            let token = token_of(&req).map(str::to_string);
            let limit = app.config.longpoll.max_post_bytes;
            let body =
                crate::deadline::Body::new(req.into_body(), crate::deadline::body_stall(&app));
            let body = match Limited::new(body, limit).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if crate::deadline::is_timeout(&e) => {
                    return crate::deadline::body_timed_out(&app);
                }
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return answer(status_only(413));
                }
                Err(_) => return answer(status_only(400)),
            };
            let span = session_span(token.as_deref());
            answer(post(&app, token.as_deref(), &body).instrument(span).await)
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            r
        }
    }
}

fn preflight() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::HeaderValue::from_static(ALLOWED_HEADERS),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        header::HeaderValue::from_static(PREFLIGHT_MAX_AGE),
    );
    r
}

/// A LongPoll GET, decided from its head alone: answered at once, or held (a poll of one of
/// our sessions, or one forwarded to the node that owns the session).
pub enum Get {
    Done(Bytes),
    /// A poll of one of our sessions, with the acknowledgement its token carries.
    Poll(Arc<LpSession>, Option<u32>),
    Forward(String),
}

impl Get {
    /// `token`: the session token ([`session_token`]); `query`: the URL's query string;
    /// `auth_token`: the `X-Phoenix-AuthToken` header.
    pub fn begin(
        app: &Arc<App>,
        token: Option<&str>,
        query: &str,
        auth_token: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) -> Get {
        if let Some(t) = token {
            if let Some(lp) = app.longpoll.get(t) {
                return Get::Poll(lp, token_ack(t));
            }
            if route_elsewhere(app, t).is_some() {
                return Get::Forward(t.to_string());
            }
            if looks_like_ours(t) {
                tracing::debug!("longpoll session gone; telling the client to reconnect");
                return Get::Done(status_only(500));
            }
        }
        Get::Done(new_session(app, query, auth_token, client))
    }

    /// The answer's body.
    pub async fn finish(self, app: Arc<App>) -> Bytes {
        match self {
            Get::Done(body) => body,
            Get::Poll(lp, ack) => poll(app, lp, ack).await,
            // A token of another node whose owner does not answer: gone (see the module doc).
            Get::Forward(token) => forward(&app, &token, None)
                .await
                .unwrap_or_else(|| status_only(500)),
        }
    }
}

/// Whether a new session may start; its slot if so, else the refusal to answer.
///
/// Every check on a new session is here (limits per client address belong here too). A refused
/// client is answered `{"status":500}`: phoenix.js 1.7 and 1.8 both then close the transport
/// (1011) and reconnect with their backoff, with a fresh first GET. (403 would say the client
/// is forbidden; any status other than 200/204/403/410/500 stops phoenix.js's poll loop.)
fn admit(
    app: &Arc<App>,
    client: Option<std::net::IpAddr>,
) -> Result<(OwnedSemaphorePermit, Option<crate::admission::Admitted>), Bytes> {
    // Per client address first (`crate::admission`), so that one address's flood is refused
    // before it touches the node's slots.
    let admitted = app
        .admission
        .admit_or_count(client, &app.metrics)
        .map_err(|_| refusal(500, "too many connections from this address"))?;
    let slot = app.slots.clone().try_acquire_owned().map_err(|_| {
        app.metrics.refused(Refusal::SessionCap);
        tracing::debug!("longpoll session refused: no free slot (server.max_connections)");
        refusal(
            500,
            "too many connections and sessions on this node (server.max_connections)",
        )
    })?;
    Ok((slot, admitted))
}

fn new_session(
    app: &Arc<App>,
    query: &str,
    auth_token: Option<&str>,
    client: Option<std::net::IpAddr>,
) -> Bytes {
    if !query_param(query, "vsn").is_some_and(|v| v.starts_with("2.")) {
        return status_only(403);
    }
    // Kept for the session's life: bounded. 403 as for any refused connect (phoenix.js
    // reports the error and reconnects with backoff).
    let connect = match ConnectInfo::bounded(query, auth_token) {
        Ok(c) => c,
        Err(oversized) => {
            tracing::debug!(
                ?oversized,
                "longpoll session refused: connect info too long"
            );
            return refusal(403, &oversized.reason());
        }
    };
    if app.is_draining() {
        return status_only(500);
    }
    let (slot, admitted) = match admit(app, client) {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let session = Session::new(app.session.clone(), connect);
    session.conn_handle().set_eager();
    let token = new_token(&app.node_id);
    let lp = Arc::new(LpSession {
        token: token
            .as_bytes()
            .try_into()
            .expect("new_token makes tokens of our shape"),
        conn_handle: session.conn_handle().clone(),
        _admitted: admitted,
        inner: Mutex::new(Inner {
            session,
            listener: 0,
            generations: 0,
            last_seen: Instant::now(),
            polled: false,
            closed: false,
            held: None,
            unacked: Unacked::default(),
        }),
        _slot: slot,
    });
    let key = token_key(&token).expect("new_token makes tokens of our shape");
    app.longpoll.insert(key, lp);
    tracing::Span::current().record("session", &token[..LOGGED_TOKEN_CHARS]);
    tracing::debug!("longpoll session created");
    poll_answer(410, &token, None, &[])
}

/// Moves what is waiting for the session into `inner.unacked` (its frames are handed out from
/// there); returns the number of broadcasts among it, or reports that it fell behind.
fn take_frames(inner: &mut Inner) -> Result<usize, Lag> {
    let Inner {
        session, unacked, ..
    } = inner;
    let mut bytes = 0;
    session.settle();
    while let Some(f) = session.pop_queued() {
        bytes += f.len();
        unacked.frames.push(protocol::json_string(&f));
    }
    let budget = RESPONSE_BATCH_BYTES.saturating_sub(bytes).max(1);
    session.collect_broadcasts(budget, &mut |e| unacked.frames.push(e.json_string()))
}

/// Marks a GET as the session's listener for as long as it lives.
struct Listening<'a> {
    lp: &'a LpSession,
    generation: u64,
}

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        let mut inner = self.lp.lock();
        if inner.listener == self.generation {
            inner.listener = 0;
            inner.held = None;
        }
        inner.last_seen = Instant::now();
    }
}

/// A GET of the session; `ack`: the acknowledgement its token carries (see the module doc).
async fn poll(app: Arc<App>, lp: Arc<LpSession>, ack: Option<u32>) -> Bytes {
    let window = Duration::from_millis(app.config.longpoll.window_ms);
    let expiry = tokio::time::sleep(window);
    tokio::pin!(expiry);
    let (generation, superseded) = {
        let mut inner = lp.lock();
        inner.unacked.acknowledge(ack);
        inner.generations += 1;
        inner.listener = inner.generations;
        inner.last_seen = Instant::now();
        inner.polled = true;
        (inner.generations, inner.held.take())
    };
    // A GET already waiting for this session is finished (204) by this one.
    if let Some(w) = superseded {
        w.wake();
    }
    // However this request ends (answered, or dropped because the client went away), it stops
    // being the listener and the inactivity clock restarts, so an abandoned session expires.
    let _listening = Listening {
        lp: &lp,
        generation,
    };
    std::future::poll_fn(|cx| {
        let mut inner = lp.lock();
        loop {
            if inner.closed {
                return Poll::Ready(status_only(500));
            }
            if inner.listener != generation {
                return Poll::Ready(poll_answer(204, lp.token(), ack, &[]));
            }
            if !inner.unacked.frames.is_empty() {
                // The client has not acknowledged the last answer: it never got it. The same
                // frames again, before anything newer (at most one answer's worth is held).
                Metrics::add(
                    &app.metrics.longpoll_frames_resent,
                    inner.unacked.frames.len() as u64,
                );
                let last = inner.unacked.last_sent();
                return Poll::Ready(poll_answer(
                    200,
                    lp.token(),
                    Some(last),
                    &inner.unacked.frames,
                ));
            }
            lp.conn_handle.clear();
            match take_frames(&mut inner) {
                Ok(broadcasts) if !inner.unacked.frames.is_empty() => {
                    Metrics::add(&app.metrics.messages_delivered_longpoll, broadcasts as u64);
                    let last = inner.unacked.last_sent();
                    return Poll::Ready(poll_answer(
                        200,
                        lp.token(),
                        Some(last),
                        &inner.unacked.frames,
                    ));
                }
                Ok(_) => {}
                Err(lag) => {
                    inner.closed = true;
                    drop(inner);
                    Metrics::add(&app.metrics.slow_consumer_closes_longpoll, 1);
                    tracing::debug!(?lag, "longpoll session fell behind; closing it");
                    app.longpoll.remove(lp.token());
                    return Poll::Ready(status_only(500));
                }
            }
            // Registered under the lock: a newer GET takes both slots only after it has
            // become the listener, which this one then sees when woken.
            if !inner.held.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                inner.held = Some(cx.waker().clone());
            }
            if lp.conn_handle.poll_woken(cx).is_pending() {
                break;
            }
            // Something arrived while we read: read again.
        }
        drop(inner);
        match expiry.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(poll_answer(204, lp.token(), ack, &[])),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A LongPoll POST whose body (at most `longpoll.max_post_bytes`) has been read.
pub async fn post(app: &Arc<App>, token: Option<&str>, body: &[u8]) -> Bytes {
    let Some(token) = token else {
        return status_only(410);
    };
    match app.longpoll.get(token) {
        Some(lp) => post_lines(app, &lp, body),
        None => match forward(app, token, Some(body)).await {
            Some(answer) => answer,
            None => status_only(410),
        },
    }
}

/// Handles a POST body's ndjson lines, in order, for a session of this node.
fn post_lines(app: &Arc<App>, lp: &LpSession, body: &[u8]) -> Bytes {
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() > app.config.longpoll.max_post_lines {
        tracing::debug!(lines = lines.len(), "longpoll post has too many lines");
        return status_only(413);
    }
    let max_frame = app.config.limits.max_frame_bytes;
    {
        let mut inner = lp.lock();
        if inner.closed {
            return status_only(410);
        }
        for line in lines {
            handle_line(&mut inner.session, line, max_frame);
        }
        // A client that posts but never polls must not grow our memory.
        if inner.session.direct_bytes() as u64 > app.config.limits.max_pending_bytes {
            drop(inner);
            close(lp);
            Metrics::add(&app.metrics.slow_consumer_closes_longpoll, 1);
            app.longpoll.remove(lp.token());
            return status_only(410);
        }
    }
    lp.conn_handle.wake();
    status_only(200)
}

/// The node that created a session token (`lp` + node id + random).
fn owner(token: &str) -> Option<&str> {
    looks_like_ours(token).then(|| &token[TOKEN_PREFIX.len()..TOKEN_PREFIX.len() + 8])
}

/// A request for a session another node owns is handed to that node through Redis and its
/// answer relayed (LongPoll without sticky sessions). `None` when the token is not another
/// node's, there is no Redis, or the owner is gone.
///
/// A GET relayed here is cut short when this node starts draining or loses its Redis link (the
/// owner's answer could not come back): it answers `204` with the client's own token, so the
/// client polls again at once, through whichever node, and the owner (which keeps every frame
/// until it is acknowledged) answers with what this one could not relay. A POST cut short gets
/// `None` (its lines may or may not have reached the owner; the client reconnects).
async fn forward(app: &Arc<App>, token: &str, post_body: Option<&[u8]>) -> Option<Bytes> {
    let (r, owner) = route_elsewhere(app, token)?;
    let wait = Duration::from_millis(app.config.longpoll.window_ms) + FORWARD_SLACK;
    match r
        .forward_longpoll(owner, token, post_body, wait, &app.shutdown)
        .await
    {
        Forwarded::Answer(a) => Some(Bytes::from(a)),
        Forwarded::Gone => None,
        Forwarded::CutShort if post_body.is_none() => {
            // The token is of our shape (hex digits): echoed as it came.
            let (session, ack) = token.split_at(TOKEN_LEN);
            Some(poll_answer(
                204,
                session,
                u32::from_str_radix(ack, 16).ok(),
                &[],
            ))
        }
        Forwarded::CutShort => None,
    }
}

/// The Redis broker and the owning node, when `token` is another node's session and Redis can
/// carry the request there.
fn route_elsewhere<'a>(
    app: &'a App,
    token: &'a str,
) -> Option<(&'a crate::broker::redis::RedisBroker, &'a str)> {
    let owner = owner(token).filter(|o| *o != app.node_id)?;
    match &app.broker {
        crate::broker::Broker::Redis(r) => Some((r, owner)),
        _ => None,
    }
}

/// Serves LongPoll requests other nodes relay to this node's sessions, for the broker (which
/// carries them, [`crate::broker::LongPollRelay`]). Holds the app weakly: the broker is part
/// of it.
struct Relay(std::sync::Weak<App>);

impl crate::broker::LongPollRelay for Relay {
    fn serve(
        &self,
        token: String,
        post_body: Option<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send>> {
        let app = self.0.upgrade();
        Box::pin(async move {
            match app {
                Some(app) => {
                    serve_forwarded(app, &token, post_body.as_deref().map(str::as_bytes)).await
                }
                None => status_only(500),
            }
        })
    }
}

/// Registers this transport with the broker for requests other nodes relay to this node's
/// sessions (once, when the server starts).
pub fn serve_relayed_requests(app: &Arc<App>) {
    app.broker
        .serve_longpoll_relays(Arc::new(Relay(Arc::downgrade(app))));
}

/// Serves a LongPoll request forwarded by another node; returns the answer's JSON body.
pub async fn serve_forwarded(app: Arc<App>, token: &str, post_body: Option<&[u8]>) -> Bytes {
    let Some(lp) = app.longpoll.get(token) else {
        return match post_body {
            Some(_) => status_only(410),
            None => status_only(500),
        };
    };
    match post_body {
        None => poll(app, lp, token_ack(token)).await,
        Some(body) => post_lines(&app, &lp, body),
    }
}

fn handle_line(session: &mut Session, line: &[u8], max_frame: usize) {
    let parsed = if line.len() > max_frame {
        Err(protocol::ParseError {
            reason: format!("message larger than {max_frame} bytes (limits.max_frame_bytes)"),
            join_ref: None,
            msg_ref: None,
            topic: None,
        })
    } else if line.first() == Some(&b'[') {
        protocol::parse_text(line)
    } else {
        match base64::engine::general_purpose::STANDARD.decode(line) {
            Ok(bin) => protocol::parse_binary(&bin),
            Err(_) => Err(protocol::ParseError {
                reason: "malformed line: neither a JSON array nor base64".into(),
                join_ref: None,
                msg_ref: None,
                topic: None,
            }),
        }
    };
    match parsed {
        Ok(msg) => session.handle(msg),
        Err(e) => session.handle_parse_error(e),
    }
}

/// For the router: a JSON 404 when the transport is disabled.
pub fn disabled() -> Response<Full<Bytes>> {
    error_response(StatusCode::NOT_FOUND, "the longpoll transport is disabled")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_tokens_carry_the_last_frame_s_number() {
        let t = new_token("0123abcd");
        let body = poll_answer(200, &t, Some(0x1f), &[]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let answered = v["token"].as_str().unwrap();
        assert_eq!(answered, format!("{t}0000001f"));
        assert!(looks_like_ours(answered));
        assert_eq!(token_key(answered), token_key(&t));
        assert_eq!((token_ack(answered), token_ack(&t)), (Some(0x1f), None));
    }

    #[test]
    fn tokens_are_recognised_by_shape() {
        let t = new_token("0123abcd");
        assert!(looks_like_ours(&t));
        assert!(!looks_like_ours("user-secret"));
        assert!(!looks_like_ours(&t[..t.len() - 1]));
        assert!(!looks_like_ours(&format!("{}z", &t[..t.len() - 1])));
    }
}
