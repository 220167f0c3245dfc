//! Entry points for the fuzz targets in `fuzz/` (FUZZING.md). Not an API, hidden from the docs:
//! each is a thin view of an internal parser, so the targets exercise the code the server runs.
//! The other parsers they use are public already: [`crate::ws::MessageReader`],
//! [`crate::protocol::parse_text`] and [`crate::protocol::parse_binary`],
//! [`crate::api::publish_body`], [`crate::transport::longpoll::post`],
//! [`crate::config::Config::load_text`], [`crate::auth`], [`crate::broker::redis::Envelope`].

use crate::http1::{self, Parsed, Route};

/// What the lean HTTP/1.1 loop (`http1::serve`) makes of the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum LeanHead {
    /// More bytes are needed.
    Partial,
    /// The connection goes to hyper, with these bytes.
    Hyper,
    /// One of the lean loop's requests.
    Ours(LeanRequest),
}

/// A request head the lean loop serves itself, with what it reads from it.
#[derive(Debug, PartialEq, Eq)]
pub struct LeanRequest {
    pub method: &'static str,
    pub path: &'static str,
    /// Bytes of the head; the body follows.
    pub head_len: usize,
    pub content_length: u64,
    /// `Connection: close`.
    pub close: bool,
    pub query: Vec<u8>,
    pub authorization: Option<Vec<u8>>,
    pub longpoll_token: Option<Vec<u8>>,
    pub auth_token: Option<Vec<u8>>,
    pub forwarded_for: Option<Vec<u8>>,
    pub origin: Option<Vec<u8>>,
}

fn method_path(route: Route) -> (&'static str, &'static str) {
    match route {
        Route::Publish => ("POST", "/api/publish"),
        Route::LongPollGet => ("GET", "/socket/longpoll"),
        Route::LongPollPost => ("POST", "/socket/longpoll"),
    }
}

/// The lean loop's parse of `buf` (`longpoll`: `longpoll.enabled`).
pub fn lean_head(buf: &[u8], longpoll: bool) -> LeanHead {
    let field = |r: &Option<std::ops::Range<usize>>| r.clone().map(|r| buf[r].to_vec());
    match http1::parse(longpoll, buf) {
        Parsed::Partial => LeanHead::Partial,
        Parsed::Hyper => LeanHead::Hyper,
        Parsed::Ours(h) => {
            let (method, path) = method_path(h.route);
            LeanHead::Ours(LeanRequest {
                method,
                path,
                head_len: h.len,
                content_length: h.content_length,
                close: h.close,
                query: buf[h.query.clone()].to_vec(),
                authorization: field(&h.authorization),
                longpoll_token: field(&h.longpoll_token),
                auth_token: field(&h.auth_token),
                forwarded_for: field(&h.forwarded_for),
                origin: field(&h.origin),
            })
        }
    }
}

/// What the accept path (`http1::first`) decides from the first bytes a connection sends:
/// `Some((method, path))` when it hands the connection to the lean loop.
pub fn lean_peek(first: &[u8], longpoll: bool) -> Option<(&'static str, &'static str)> {
    let first = &first[..first.len().min(http1::PEEK_BYTES)];
    http1::request_line(first)
        .and_then(|(method, path)| http1::route(longpoll, method, path))
        .map(method_path)
}

/// Drops every LongPoll session of `app`, which the sessions would otherwise keep alive (each
/// holds its `App`), when a fuzz target is done with it.
pub fn drop_longpoll_sessions(app: &crate::App) {
    app.longpoll.clear();
}
