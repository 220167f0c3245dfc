//! The shapes of an HTTP answer, shared by every handler and both HTTP paths (hyper's and the
//! lean loop of [`crate::http1`]): the static header sets, a JSON `{"error": ...}` answer, and
//! [`Answer`], an answer not yet framed. No handler logic: what status a request gets is
//! decided by its handler (see [`crate::router`] for where each is).
//!
//! Architecture Invariant: this module imports nothing of the transports and HTTP layer, so
//! every module of that layer may use it without forming a cycle.

use crate::protocol;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

/// The headers of a JSON answer (both HTTP paths send exactly these).
pub const JSON_HEADERS: &[(&str, &str)] = &[("content-type", "application/json")];
/// ... and of a 401, which names the scheme it wants.
pub const CHALLENGE_HEADERS: &[(&str, &str)] = &[
    ("content-type", "application/json"),
    ("www-authenticate", "Bearer"),
];

/// A hyper response with `headers` (static names and values).
pub fn response_with(
    status: StatusCode,
    headers: &'static [(&'static str, &'static str)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    for (name, value) in headers {
        r.headers_mut().insert(
            header::HeaderName::from_static(name),
            header::HeaderValue::from_static(value),
        );
    }
    r
}

/// A JSON response with `content-type: application/json`.
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    response_with(status, JSON_HEADERS, body)
}

/// `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    Answer::error(status, message).into_response()
}

/// A plain-text answer (`text/plain; charset=utf-8`), as the WebSocket upgrade refuses.
pub fn plain_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON answer before it is framed (by hyper, or by [`crate::http1`]): the publish API's, and
/// every `{"error": ...}`.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// `{"position": ...}`, `{"positions": [...]}` or `{"error": ...}`.
    pub body: Vec<u8>,
    /// A 401 names the scheme it wants (`www-authenticate: Bearer`).
    pub bearer_challenge: bool,
}

impl Answer {
    pub fn error(status: StatusCode, message: &str) -> Answer {
        let mut body = Vec::with_capacity(16 + message.len());
        body.extend_from_slice(b"{\"error\":");
        protocol::push_json_str(&mut body, message);
        body.push(b'}');
        Answer {
            status,
            body,
            bearer_challenge: false,
        }
    }

    /// The header set this answer is sent with ([`JSON_HEADERS`] or [`CHALLENGE_HEADERS`]).
    pub fn headers(&self) -> &'static [(&'static str, &'static str)] {
        if self.bearer_challenge {
            CHALLENGE_HEADERS
        } else {
            JSON_HEADERS
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        response_with(self.status, self.headers(), self.body)
    }
}
