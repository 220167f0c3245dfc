//! Path to handler: which handler answers a request, and the answers of the small endpoints
//! (`/healthz`, `/readyz`, `/metrics`, the demo page, HTTP-01 challenges, 404).
//!
//! Where each status is decided (one place per path; the shapes of the answers are in
//! [`crate::respond`]):
//! - here: 404 (unknown path, a non-public path at the edge, a challenge not open), `/readyz`'s
//!   503;
//! - WebSocket upgrade refusals (400, 403, 414, 426, 429, 431, 503):
//!   `transport::websocket::Refused::response`; its close codes: `transport::websocket::Closing`;
//! - LongPoll: every answer is HTTP 200 with the status in the body, decided in
//!   `transport::longpoll` (403 origin, 410/500 session states, 413); the lean loop's refusals
//!   (408, and the same 403/413): `http1::Refused::answer`;
//! - the publish and presence API (400, 401, 405, 413, 503): `crate::api`;
//! - a stalled request body on hyper's path (408): `crate::deadline::body_timed_out`;
//! - the HTTPS redirect (301, 400): `crate::tls`.

use crate::api;
use crate::app::App;
use crate::challenges::CHALLENGE_PATH_PREFIX;
use crate::conn::{Busy, Conn};
use crate::respond::{error_response, json_response};
use crate::transport::{longpoll, websocket};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use std::sync::Arc;

const DEMO_PAGE: &str = include_str!("demo.html");

/// Paths the edge listener serves by default: what browsers and the CA need.
fn public(app: &App, path: &str) -> bool {
    matches!(
        path,
        "/socket/websocket" | "/socket/longpoll" | "/healthz" | "/readyz"
    ) || (path == "/" && app.config.demo.enabled)
        || path.starts_with(CHALLENGE_PATH_PREFIX)
}

/// Routes one request on connection `conn`.
pub async fn route(app: Arc<App>, req: Request<Incoming>, conn: &Conn) -> Response<Full<Bytes>> {
    if conn.edge && !app.config.tls.serve_api_and_metrics && !public(&app, req.uri().path()) {
        return error_response(StatusCode::NOT_FOUND, "not found");
    }
    match req.uri().path() {
        "/socket/websocket" if app.config.websocket.enabled => {
            let h2 = req.version() == hyper::Version::HTTP_2;
            websocket::upgrade(app, req, || {
                // HTTP/1.1: the connection's own slot. HTTP/2 (RFC 8441): a slot of its own,
                // as the connection goes on serving other streams. None: the upgrade answers
                // 503 (`websocket::Refused::NoSlot`, counted there).
                let own = match h2 {
                    true => None,
                    false => conn.slot.lock().unwrap_or_else(|e| e.into_inner()).take(),
                };
                let permit = match own {
                    Some(p) => p,
                    None => conn.slots.clone().try_acquire_owned().ok()?,
                };
                let busy = conn.busy.as_ref().map(Busy::enter);
                Some(websocket::Hold { permit, busy })
            })
        }
        "/socket/longpoll" if app.config.longpoll.enabled => longpoll::handle(app, req).await,
        "/socket/longpoll" => longpoll::disabled(),
        "/api/publish" => api::publish(app, req).await,
        "/api/presence" => api::presence(app, req).await,
        "/healthz" => json_response(StatusCode::OK, &b"{\"status\":\"ok\"}"[..]),
        "/readyz" => {
            let reason = if app.is_draining() {
                Err("draining".to_string())
            } else {
                app.broker.readiness().map_err(|e| e.to_string())
            };
            match reason {
                Ok(()) => json_response(StatusCode::OK, &b"{\"status\":\"ready\"}"[..]),
                Err(reason) => {
                    let mut body = b"{\"status\":\"unavailable\",\"reason\":".to_vec();
                    crate::protocol::push_json_str(&mut body, &reason);
                    body.push(b'}');
                    json_response(StatusCode::SERVICE_UNAVAILABLE, body)
                }
            }
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(app.metrics.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/" if app.config.demo.enabled => {
            let page = DEMO_PAGE.replace("{{PHOENIX_JS_URL}}", &app.config.demo.phoenix_js_url);
            let mut r = Response::new(Full::new(Bytes::from(page)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        p if p.starts_with(CHALLENGE_PATH_PREFIX) => challenge_response(&app, p),
        _ => error_response(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Answers `GET /.well-known/acme-challenge/<token>` (here and on the HTTPS redirect listener):
/// the key authorization as plain text, or 404 when no such challenge is open.
pub fn challenge_response(app: &App, path: &str) -> Response<Full<Bytes>> {
    let token = path.strip_prefix(CHALLENGE_PATH_PREFIX).unwrap_or("");
    match app.acme.key_authorization(token) {
        Some(key_auth) if !token.is_empty() => {
            tracing::info!(token = ?token, "answering http-01 challenge");
            let mut r = Response::new(Full::new(Bytes::from(key_auth)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        _ => {
            tracing::debug!(token = ?token, "no open http-01 challenge for this token");
            error_response(StatusCode::NOT_FOUND, "no such challenge")
        }
    }
}
