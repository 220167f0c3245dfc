//! Path to handler. Every HTTP answer that is not a handler's own success is built here or in
//! [`crate::api`]'s error helpers, so status codes are decided in one place.

use crate::api::{self, error_response, json_response};
use crate::app::App;
use crate::transport::{longpoll, websocket};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

const DEMO_PAGE: &str = include_str!("demo.html");

/// Routes one request. `permit` is the connection's slot; a WebSocket upgrade takes it over.
pub async fn route(
    app: Arc<App>,
    req: Request<Incoming>,
    permit: &std::sync::Mutex<Option<OwnedSemaphorePermit>>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/socket/websocket" if app.config.websocket.enabled => {
            let permit = permit.lock().unwrap_or_else(|e| e.into_inner()).take();
            websocket::upgrade(app, req, permit)
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
                app.broker.readiness()
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
