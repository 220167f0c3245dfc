//! Brokers carry messages between nodes and keep topic history.
//!
//! - The **embedded** broker is the [`Hub`](crate::hub::Hub) itself: one node, history in the
//!   topic buffers. It needs no code here.
//! - The **Redis** broker ([`redis`]) publishes through a Lua script that assigns positions and
//!   appends to a capped stream per topic, subscribes per topic for local subscribers, and
//!   replays history from the streams.
//!
//! Architecture Invariant: transports never talk to a broker; sessions reach it only through
//! [`Broker::join`] for joins the local buffer cannot answer.

pub mod redis;

use crate::hub::{ConnHandle, JoinInfo, Position, Subscription};
use crate::session::QueuedFrame;
use std::sync::Arc;

/// The broker this node runs with.
pub enum Broker {
    Embedded,
    Redis(Arc<redis::RedisBroker>),
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Broker::Embedded => "Broker::Embedded",
            Broker::Redis(_) => "Broker::Redis",
        })
    }
}

/// A joined topic: the subscription, what to answer, and the missed messages to replay
/// (from the broker's history) before live ones.
pub type Joined = (Subscription, JoinInfo, Vec<QueuedFrame>);

/// A join the local buffer could not complete.
pub struct JoinRequest {
    pub topic: String,
    pub since: Option<String>,
    pub conn_handle: Arc<ConnHandle>,
    /// Already subscribed at the current end, with the offset after which history is needed.
    pub started: Option<(Subscription, Position, u64)>,
    /// Called exactly once with the outcome (from the broker's task).
    pub done: Box<dyn FnOnce(Result<Joined, String>) + Send>,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker cannot be reached: the caller should retry later (HTTP 503).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the message (HTTP 400).
    #[error("{0}")]
    Rejected(String),
}

/// One message to publish.
pub struct Message<'a> {
    pub topic: &'a str,
    pub event: &'a str,
    pub payload: &'a str,
    /// A connection that must not get it ("send to others"): a sender id,
    /// `<node>.<connection>` ([`crate::session::sender_id`]).
    pub exclude: Option<&'a str>,
}

impl Broker {
    /// Publishes in order; returns each position.
    pub async fn publish(
        &self,
        app: &crate::app::App,
        messages: &[Message<'_>],
    ) -> Result<Vec<String>, PublishError> {
        match self {
            Broker::Embedded => Ok(messages
                .iter()
                .map(|m| {
                    let message = crate::hub::Broadcast {
                        event: m.event,
                        payload: m.payload.as_bytes(),
                        exclude: crate::session::local_exclude(m.exclude, &app.node_id),
                    };
                    app.hub.publish_message(m.topic, message).to_string()
                })
                .collect()),
            Broker::Redis(r) => r.publish(messages).await,
        }
    }

    /// Hands a join to the broker; `req.done` is called when it completes.
    pub fn join(&self, req: JoinRequest) {
        match self {
            Broker::Embedded => (req.done)(Err("the embedded broker joins inline".into())),
            Broker::Redis(r) => r.join(req),
        }
    }

    /// `Err(reason)` while the node cannot deliver messages from other nodes.
    pub fn readiness(&self) -> Result<(), String> {
        match self {
            Broker::Embedded => Ok(()),
            Broker::Redis(r) => r.readiness(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Broker::Embedded => "embedded",
            Broker::Redis(_) => "redis",
        }
    }
}
