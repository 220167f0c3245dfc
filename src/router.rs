//! Path to handler. Every HTTP answer that is not a handler's own success is built here or in
//! [`crate::api`]'s error helpers, so status codes are decided in one place.

use crate::api::{self, error_response, json_response};
use crate::app::App;
use crate::metrics::Refusal;
use crate::transport::{longpoll, websocket};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const DEMO_PAGE: &str = include_str!("demo.html");

/// What a request's handler knows of its connection.
pub struct Conn {
    /// The connection's slot (`server.max_connections`); an HTTP/1.1 WebSocket upgrade takes
    /// it over, since the connection becomes that WebSocket.
    pub slot: Mutex<Option<OwnedSemaphorePermit>>,
    /// Where the slots come from: each RFC 8441 WebSocket on an HTTP/2 connection takes one
    /// more, so every client holds a slot.
    pub slots: Arc<Semaphore>,
    /// At the edge (`tls.listen`): only [`public`] paths, unless `tls.serve_api_and_metrics`.
    pub edge: bool,
    /// At the edge: counts this connection's open requests and WebSockets, for its idle
    /// deadline (`crate::tls`).
    pub busy: Option<Busy>,
}

impl Conn {
    pub fn new(permit: OwnedSemaphorePermit, edge: bool, busy: Option<Busy>) -> Conn {
        Conn {
            slots: permit.semaphore().clone(),
            slot: Mutex::new(Some(permit)),
            edge,
            busy,
        }
    }
}

/// Requests and WebSockets of one connection: how many are open, and how many ever opened (so
/// that one that opens and ends between two looks is still seen). A `watch` channel, so that
/// the connection task can wait for "none open" and for "one opened".
#[derive(Clone)]
pub struct Busy(Arc<tokio::sync::watch::Sender<Streams>>);

/// What [`Busy`] counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Streams {
    pub open: usize,
    pub opened: u64,
}

/// One open request or WebSocket, counted in its connection's [`Busy`] while it lives.
pub struct BusyGuard(Busy);

impl Busy {
    pub fn new() -> (Busy, tokio::sync::watch::Receiver<Streams>) {
        let (tx, rx) = tokio::sync::watch::channel(Streams::default());
        (Busy(Arc::new(tx)), rx)
    }

    pub fn enter(&self) -> BusyGuard {
        self.0.send_modify(|s| {
            s.open += 1;
            s.opened += 1;
        });
        BusyGuard(self.clone())
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.0.send_modify(|s| s.open -= 1);
    }
}

/// Paths the edge listener serves by default: what browsers and the CA need.
fn public(app: &App, path: &str) -> bool {
    matches!(
        path,
        "/socket/websocket" | "/socket/longpoll" | "/healthz" | "/readyz"
    ) || (path == "/" && app.config.demo.enabled)
        || path.starts_with(crate::acme::CHALLENGE_PATH_PREFIX)
}

/// Routes one request on connection `conn`.
pub async fn route(app: Arc<App>, req: Request<Incoming>, conn: &Conn) -> Response<Full<Bytes>> {
    if conn.edge && !app.config.tls.serve_api_and_metrics && !public(&app, req.uri().path()) {
        return error_response(StatusCode::NOT_FOUND, "not found");
    }
    match req.uri().path() {
        "/socket/websocket" if app.config.websocket.enabled => {
            let h2 = req.version() == hyper::Version::HTTP_2;
            let metrics = app.metrics.clone();
            websocket::upgrade(app, req, || {
                // HTTP/1.1: the connection's own slot. HTTP/2 (RFC 8441): a slot of its own,
                // as the connection goes on serving other streams.
                let own = match h2 {
                    true => None,
                    false => conn.slot.lock().unwrap_or_else(|e| e.into_inner()).take(),
                };
                let permit = match own {
                    Some(p) => p,
                    None => match conn.slots.clone().try_acquire_owned() {
                        Ok(p) => p,
                        Err(_) => {
                            metrics.refused(Refusal::SessionCap);
                            tracing::debug!("websocket refused: server.max_connections reached");
                            return None;
                        }
                    },
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
        p if p.starts_with(crate::acme::CHALLENGE_PATH_PREFIX) => {
            crate::acme::challenge_response(&app, p)
        }
        _ => error_response(StatusCode::NOT_FOUND, "not found"),
    }
}
