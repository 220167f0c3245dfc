//! Brokers carry messages between nodes and keep topic history.
//!
//! - The **embedded** broker is the [`Hub`] itself: one node, history in the topic buffers.
//! - The **Redis** broker ([`redis`]) publishes through a Lua script that assigns positions and
//!   appends to a capped stream per topic, subscribes per topic for local subscribers, and
//!   replays history from the streams.
//!
//! Which of the two runs is decided here and nowhere else: a session starts its joins through
//! [`Broker::start_join`] and hands those the local buffer cannot complete to [`Broker::join`].
//!
//! Architecture Invariant: transports never talk to a broker other than through a
//! [`LongPollRelay`] they register (node-to-node LongPoll routing); sessions reach it only
//! through the session's [`Services`](crate::session::Services).

pub mod redis;

use crate::hub::{ConnHandle, Hub, LiveJoin};
use std::sync::Arc;

pub use crate::session::{JoinError, JoinRequest, Joined};

/// The broker this node runs with.
#[derive(Clone)]
pub enum Broker {
    Embedded(Embedded),
    Redis(Arc<redis::RedisBroker>),
}

/// The embedded broker: publishes straight into this node's hub.
#[derive(Clone)]
pub struct Embedded {
    hub: Arc<Hub>,
    /// This node's id, to find the connection a publish's `exclude` names.
    node_id: String,
}

impl Embedded {
    pub fn new(hub: Arc<Hub>, node_id: &str) -> Embedded {
        Embedded {
            hub,
            node_id: node_id.to_string(),
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Broker::Embedded(_) => "Broker::Embedded",
            Broker::Redis(_) => "Broker::Redis",
        })
    }
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

/// The handler a transport registers for LongPoll requests another node relays to this one
/// (for a session this node owns): the broker carries requests and answers, the transport
/// serves them. Called once per relayed request.
pub trait LongPollRelay: Send + Sync {
    /// Serves a relayed request for session `token` (`post_body`: a POST's body, `None` for a
    /// GET); resolves to the answer's JSON body.
    fn serve(
        &self,
        token: String,
        post_body: Option<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bytes::Bytes> + Send>>;
}

impl Broker {
    /// Publishes in order; returns each position.
    pub async fn publish(&self, messages: &[Message<'_>]) -> Result<Vec<String>, PublishError> {
        match self {
            Broker::Embedded(e) => Ok(messages
                .iter()
                .map(|m| {
                    let message = crate::hub::Broadcast {
                        event: m.event,
                        payload: m.payload.as_bytes(),
                        exclude: crate::session::local_exclude(m.exclude, &e.node_id),
                    };
                    e.hub.publish_message(m.topic, message).to_string()
                })
                .collect()),
            Broker::Redis(r) => r.publish(messages).await,
        }
    }

    /// Joins `topic` against `hub`'s buffer. With the embedded broker that buffer is the whole
    /// history, so the join is always done here; with Redis the topic may not be live yet, or
    /// the client's position may need history from the broker ([`Broker::join`]).
    pub fn start_join(
        &self,
        hub: &Hub,
        topic: &str,
        conn_handle: Arc<ConnHandle>,
        since: Option<&str>,
    ) -> LiveJoin {
        match self {
            Broker::Embedded(_) => {
                let (sub, info) = hub.subscribe(topic, conn_handle, since);
                LiveJoin::Done(sub, info)
            }
            Broker::Redis(_) => hub.join_live(topic, conn_handle, since),
        }
    }

    /// Hands a join to the broker; `req.done` is called when it completes.
    pub fn join(&self, req: JoinRequest) {
        match self {
            Broker::Embedded(_) => (req.done)(Err(JoinError::Inline)),
            Broker::Redis(r) => r.join(req),
        }
    }

    /// `Err(reason)` while the node cannot deliver messages from other nodes.
    pub fn readiness(&self) -> Result<(), redis::LinkDown> {
        match self {
            Broker::Embedded(_) => Ok(()),
            Broker::Redis(r) => r.readiness(),
        }
    }

    /// Registers the transport's handler for LongPoll requests relayed from other nodes (a
    /// no-op with the embedded broker: there are no other nodes).
    pub fn serve_longpoll_relays(&self, relay: Arc<dyn LongPollRelay>) {
        if let Broker::Redis(r) = self {
            r.set_longpoll_relay(relay);
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Broker::Embedded(_) => "embedded",
            Broker::Redis(_) => "redis",
        }
    }
}
