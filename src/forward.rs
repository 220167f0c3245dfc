//! Client pushes forwarded to the application (`[forward]`).
//!
//! A push on a joined topic that matches `forward.topics` (any event but the protocol's own
//! `phx_*`) is POSTed to `forward.url` as JSON `{"topic", "event", "payload", "token", "sender"}`
//! (`token`: what the client connected with, see [`crate::auth`], or null; `sender`: the
//! connection's sender id, which a publish's `exclude` names to leave the pusher out), with the
//! publish token as its
//! bearer so the app knows the request comes from pushgate. The app's answer is the push's
//! reply: a 2xx answer's JSON body is an "ok" reply's response, a 4xx answer's an "error"
//! reply's (an empty body counts as `{}`); anything else (5xx, no connection, no answer within
//! `forward.timeout_ms`, a body that is not JSON or is larger than `limits.max_frame_bytes`) is
//! an "error" reply `{"reason": "forward failed"}`: why goes to the log and to the `reason` label
//! of `pushgate_forward_failures_total`, not to the client.
//!
//! One connection's pushes go one at a time, in order (a [`PushLane`] per session with at most
//! `forward.max_queued` waiting); at most `forward.max_concurrent` requests are at the app at
//! once, over kept-alive connections (hyper-util's pooled client; `https://` through
//! hyper-rustls with [`crate::client_tls::client_config`]: the public roots and `forward.root_ca_file`).

use crate::auth::glob_match;
use crate::config::ForwardConfig;
use crate::metrics::{ForwardFailure, Metrics};
use crate::protocol;
use crate::session::{Deliver, Push, PushLane, QueuedFrame};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

/// The reply's response to a push the app did not answer properly: nothing about why.
const FAILED: &[u8] = br#"{"reason":"forward failed"}"#;

/// The `[forward]` settings with their HTTP client.
pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: Uri,
    topics: Vec<String>,
    bearer: header::HeaderValue,
    timeout: Duration,
    max_queued: usize,
    max_answer: usize,
    /// One permit per request at the app.
    slots: Semaphore,
    /// Set after a failed request, so a failing app is logged once, not once per push.
    failing: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("uri", &self.uri)
            .field("topics", &self.topics)
            .finish()
    }
}

/// One push on its way to the app (defined by the session, which makes them).
pub type Job = Push;

/// One session's pushes, in order, to the app (defined by the session, which holds it).
pub type Lane = PushLane;

impl Forwarder {
    /// `None` when `forward.url` is empty. `config` has been validated; `bearer` is the publish
    /// token; `max_answer` caps the app's answer (it becomes one frame to the client).
    pub fn new(
        config: &ForwardConfig,
        bearer: &str,
        max_answer: usize,
        metrics: Arc<Metrics>,
    ) -> Option<Forwarder> {
        if config.url.is_empty() {
            return None;
        }
        // Both checked before: the URL by `Config::validate`; a publish token that cannot be a
        // header value would fail every publish too. Said, not silently dropped, all the same.
        let (Ok(uri), Ok(bearer)) = (
            config.url.parse::<Uri>(),
            header::HeaderValue::from_str(&format!("Bearer {bearer}")),
        ) else {
            tracing::error!(
                "forward: forward.url or the publish token is unusable; client pushes get error replies"
            );
            return None;
        };
        // `Config::validate` has read forward.root_ca_file; should it have gone since, the
        // public roots still serve.
        let tls = crate::client_tls::client_config("forward.root_ca_file", &config.root_ca_file)
            .or_else(|e| {
                tracing::error!("{e}; only the public roots are trusted");
                crate::client_tls::client_config("forward.root_ca_file", "")
            })
            .ok()?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Some(Forwarder {
            client: Client::builder(TokioExecutor::new()).build(connector),
            uri,
            topics: config.topics.clone(),
            bearer,
            timeout: Duration::from_millis(config.timeout_ms),
            max_queued: config.max_queued,
            max_answer,
            slots: Semaphore::new(config.max_concurrent),
            failing: AtomicBool::new(false),
            metrics,
        })
    }

    /// Whether pushes on `topic` go to the app.
    pub fn forwards(&self, topic: &str) -> bool {
        self.topics.iter().any(|p| glob_match(p, topic))
    }

    /// Opens a lane; each push's reply frame is handed to `deliver`.
    pub fn lane(self: &Arc<Self>, tracker: &TaskTracker, deliver: Deliver) -> Lane {
        let (lane, mut rx) = PushLane::channel(self.max_queued);
        let fwd = self.clone();
        tracker.spawn(async move {
            while let Some(job) = rx.recv().await {
                let reply = fwd.answer(job).await;
                deliver(reply);
            }
        });
        lane
    }

    /// Asks the app and encodes its answer as the push's reply. A failure's detail goes to the
    /// log and its kind to `pushgate_forward_failures_total`; the client is told only
    /// `{"reason": "forward failed"}` (the detail can name hosts, addresses and TLS problems of
    /// the app's network).
    async fn answer(&self, job: Job) -> QueuedFrame {
        let outcome = tokio::time::timeout(self.timeout, self.ask(&job))
            .await
            .unwrap_or_else(|_| {
                Err((
                    ForwardFailure::Timeout,
                    "the app did not answer within forward.timeout_ms".to_string(),
                ))
            });
        let (status, response, failure) = match outcome {
            Ok((code, body)) if code.is_success() => ("ok", body, None),
            Ok((code, body)) if code.is_client_error() => ("error", body, None),
            Ok((code, _)) => (
                "error",
                FAILED.to_vec(),
                Some((ForwardFailure::Status, format!("the app answered {code}"))),
            ),
            Err(failure) => ("error", FAILED.to_vec(), Some(failure)),
        };
        let m = &self.metrics;
        match &failure {
            Some((kind, detail)) => {
                Metrics::add(&m.forward_failed, 1);
                Metrics::add(&m.forward_failures[*kind as usize], 1);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        url = %self.uri,
                        reason = kind.label(),
                        detail = ?detail,
                        "forward: a push could not be handed to the app; such pushes get error \
                         replies (pushgate_forward_failures_total counts them by reason)"
                    );
                } else {
                    tracing::debug!(reason = kind.label(), detail = ?detail, "forward failed");
                }
            }
            None => {
                Metrics::add(
                    if status == "ok" {
                        &m.forward_ok
                    } else {
                        &m.forward_refused
                    },
                    1,
                );
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(url = %self.uri, "forward: the app answers again");
                }
            }
        }
        protocol::encode_reply(
            Some(&job.join_ref),
            job.msg_ref.as_deref(),
            &job.topic,
            status,
            &response,
        )
    }

    /// One request: the app's status and its JSON answer.
    async fn ask(&self, job: &Job) -> Result<(StatusCode, Vec<u8>), (ForwardFailure, String)> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| (ForwardFailure::Other, "shutting down".to_string()))?;
        let payload = job.payload.get();
        let mut body = Vec::with_capacity(64 + job.topic.len() + job.event.len() + payload.len());
        body.extend_from_slice(b"{\"topic\":");
        protocol::push_json_str(&mut body, &job.topic);
        body.extend_from_slice(b",\"event\":");
        protocol::push_json_str(&mut body, &job.event);
        body.extend_from_slice(b",\"payload\":");
        body.extend_from_slice(payload.as_bytes());
        body.extend_from_slice(b",\"token\":");
        match &job.token {
            Some(t) => protocol::push_json_str(&mut body, t),
            None => body.extend_from_slice(b"null"),
        }
        body.extend_from_slice(b",\"sender\":");
        protocol::push_json_str(&mut body, &job.sender);
        body.push(b'}');
        let req = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, self.bearer.clone())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| (ForwardFailure::Other, e.to_string()))?;
        let resp = self.client.request(req).await.map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            let kind = match e.is_connect() {
                true => ForwardFailure::Connect,
                false => ForwardFailure::Other,
            };
            (kind, format!("cannot reach the app ({e}{cause})"))
        })?;
        let status = resp.status();
        let answer = Limited::new(resp.into_body(), self.max_answer)
            .collect()
            .await
            .map_err(|_| {
                (
                    ForwardFailure::BadAnswer,
                    "the app's answer is larger than limits.max_frame_bytes or broke off"
                        .to_string(),
                )
            })?
            .to_bytes();
        let answer = answer.trim_ascii();
        let answer = if answer.is_empty() { b"{}" } else { answer };
        if (status.is_success() || status.is_client_error())
            && serde_json::from_slice::<&RawValue>(answer).is_err()
        {
            return Err((
                ForwardFailure::BadAnswer,
                format!("the app answered {status} with a body that is not JSON"),
            ));
        }
        Ok((status, answer.to_vec()))
    }
}
