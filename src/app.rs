//! The state every connection shares: configuration, the hub, metrics, the publish token, and
//! the shutdown signal with the tracker that waits for every long-lived task.
//!
//! It also hands each part below it the narrow context that part needs: sessions get a
//! [`session::Context`] (whose [`session::Services`] are the broker, presence and forwarding,
//! implemented here by `NodeServices`), the Redis broker's task a
//! [`crate::broker::redis::Context`], the presence task a [`crate::presence::Context`].

use crate::broker::Broker;
use crate::config::Config;
use crate::forward::Forwarder;
use crate::hub::{ConnHandle, Hub, LiveJoin};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::session::{self, Deliver, JoinRequest, PresenceEntry, PushLane, Tracking};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub broker: Broker,
    /// This node's LongPoll sessions.
    pub longpoll: crate::transport::longpoll::registry::Registry,
    /// Connection slots, `server.max_connections` of them: each TCP connection holds one (taken
    /// before accept; a WebSocket keeps its socket's), and so does each LongPoll session.
    pub slots: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<Metrics>,
    /// The ACME task's open challenges (`[acme]`).
    pub acme: crate::challenges::Challenges,
    /// Private topics and connect tokens (`[auth]`).
    pub auth: Arc<crate::auth::Auth>,
    /// Client pushes forwarded to the app (`[forward]`), when `forward.url` is set.
    pub forward: Option<Arc<crate::forward::Forwarder>>,
    /// Phoenix Presence (`[presence]`), when `presence.topics` is set.
    pub presence: Option<Arc<crate::presence::Presence>>,
    /// Per-client-address limits and the join rate (`crate::admission`).
    pub admission: Arc<crate::admission::Admission>,
    /// Web pages allowed to connect (`server.allowed_origins`), checked once per WebSocket
    /// upgrade and LongPoll request.
    pub origins: crate::origin::Origins,
    /// The bearer token `POST /api/publish` requires (configured or generated at start).
    pub publish_token: String,
    /// This node's id (8 hex digits): LongPoll tokens carry it so any node can route a
    /// request to the session's owner.
    pub node_id: String,
    /// Cancelled when the node starts to shut down.
    pub shutdown: CancellationToken,
    /// Every long-lived task (connections, WebSocket sessions, sweeper) is spawned on this.
    pub tracker: TaskTracker,
    /// What every client session is built on.
    pub session: Arc<session::Context>,
    draining: AtomicBool,
    /// Connection handles of live WebSocket connections, woken at shutdown so each starts its
    /// drain. (Cheaper per connection than a cancellation-token waiter polled on every wake-up.)
    connections: std::sync::Mutex<slab::Slab<Arc<crate::hub::ConnHandle>>>,
}

impl App {
    /// Builds the shared state. An empty `publish.token` is replaced by a random one.
    pub fn new(config: Config, shutdown: CancellationToken) -> Arc<App> {
        let metrics = Arc::new(Metrics::default());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        metrics
            .start_time
            .store(now.map_or(0, |d| d.as_secs() as i64), Ordering::Relaxed);
        let publish_token = if config.publish.token.is_empty() {
            generate_token()
        } else {
            config.publish.token.clone()
        };
        let node_id = format!("{:08x}", rand::random::<u32>());
        let (hub, broker) = hub_and_broker(&config, &node_id, &metrics);
        let forward = Forwarder::new(
            &config.forward,
            &publish_token,
            config.limits.max_frame_bytes,
            metrics.clone(),
        )
        .map(Arc::new);
        let presence = Presence::new(&config.presence, &node_id).map(Arc::new);
        let auth = Arc::new(crate::auth::Auth::new(&config.auth));
        let admission = crate::admission::Admission::new(&config);
        let tracker = TaskTracker::new();
        let session = Arc::new(session::Context {
            hub: hub.clone(),
            auth: auth.clone(),
            admission: admission.clone(),
            metrics: metrics.clone(),
            node_id: node_id.clone(),
            limits: (&config.limits).into(),
            services: Box::new(NodeServices {
                hub: hub.clone(),
                broker: broker.clone(),
                presence: presence.clone(),
                forward: forward.clone(),
                tracker: tracker.clone(),
            }),
        });
        Arc::new(App {
            presence,
            hub,
            broker,
            longpoll: crate::transport::longpoll::registry::Registry::new(
                std::time::Duration::from_millis(config.longpoll.session_timeout_ms),
                metrics.clone(),
            ),
            slots: Arc::new(tokio::sync::Semaphore::new(config.server.max_connections)),
            metrics,
            acme: Default::default(),
            auth,
            admission,
            origins: crate::origin::Origins::new(&config.server.allowed_origins),
            forward,
            publish_token,
            node_id,
            config,
            shutdown,
            tracker,
            session,
            draining: AtomicBool::new(false),
            connections: Default::default(),
        })
    }

    /// What the Redis broker's task needs ([`crate::broker::redis::run`]).
    pub fn broker_context(&self) -> crate::broker::redis::Context {
        crate::broker::redis::Context {
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            node_id: self.node_id.clone(),
            shutdown: self.shutdown.clone(),
            tracker: self.tracker.clone(),
        }
    }

    /// What the presence task needs ([`crate::presence::run`]); `None` when no topic is
    /// tracked.
    pub fn presence_context(&self) -> Option<crate::presence::Context> {
        Some(crate::presence::Context {
            presence: self.presence.clone()?,
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        })
    }

    /// True once shutdown has begun; `/readyz` then answers 503.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts the drain: `/readyz` turns 503 and every WebSocket connection is woken to close.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
        for (_, w) in self.connections().iter() {
            w.wake();
        }
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, slab::Slab<Arc<crate::hub::ConnHandle>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection's handle for the drain; returns its key.
    pub fn register_connection(&self, conn_handle: Arc<crate::hub::ConnHandle>) -> usize {
        self.connections().insert(conn_handle)
    }

    pub fn unregister_connection(&self, key: usize) {
        let mut c = self.connections();
        if c.contains(key) {
            c.remove(key);
        }
        if c.is_empty() && c.capacity() > 1024 {
            c.shrink_to_fit();
        }
    }
}

/// The hub and the broker `config` asks for: embedded without `redis.url`, else Redis (whose
/// hub learns of idle topics so the broker can unsubscribe them).
fn hub_and_broker(config: &Config, node_id: &str, metrics: &Arc<Metrics>) -> (Arc<Hub>, Broker) {
    if config.redis.url.is_empty() {
        let hub = Arc::new(
            Hub::new(config.history.clone(), metrics.clone())
                .with_max_topics(config.limits.max_topics),
        );
        let broker = Broker::Embedded(crate::broker::Embedded::new(hub.clone(), node_id));
        return (hub, broker);
    }
    // `Config::validate` has checked the URL.
    let r = crate::broker::redis::RedisBroker::new(
        &config.redis,
        crate::broker::redis::Keys::new(&config.redis.prefix, &config.redis.internal_prefix()),
        config.history.clone(),
        node_id,
        config.limits.max_topics_per_connection,
        metrics.clone(),
    )
    .expect("redis.url was validated");
    let hub = Arc::new(
        Hub::with_broker(config.history.clone(), metrics.clone(), r.idle.clone())
            .with_max_topics(config.limits.max_topics),
    );
    (hub, Broker::Redis(Arc::new(r)))
}

/// The broker, presence and forwarding, as sessions ask for them ([`session::Services`]).
struct NodeServices {
    hub: Arc<Hub>,
    broker: Broker,
    presence: Option<Arc<Presence>>,
    forward: Option<Arc<Forwarder>>,
    /// Where forwarding lanes run.
    tracker: TaskTracker,
}

impl session::Services for NodeServices {
    fn start_join(
        &self,
        topic: &str,
        conn_handle: Arc<ConnHandle>,
        since: Option<&str>,
    ) -> LiveJoin {
        self.broker.start_join(&self.hub, topic, conn_handle, since)
    }

    fn complete_join(&self, request: JoinRequest) {
        self.broker.join(request);
    }

    fn tracks_presence(&self, topic: &str) -> bool {
        self.presence.as_ref().is_some_and(|p| p.tracks(topic))
    }

    fn prepare_presence(
        &self,
        subject: Option<String>,
        param: Option<&serde_json::value::RawValue>,
    ) -> Result<PresenceEntry, Box<dyn std::error::Error + Send + Sync>> {
        match &self.presence {
            Some(p) => Ok(p.prepare(subject, param)?),
            None => Ok(PresenceEntry::default()),
        }
    }

    fn track_presence(
        &self,
        entry: PresenceEntry,
        topic: &str,
        join_ref: &str,
        state_to: Deliver,
    ) -> Option<Tracking> {
        let tracked = self
            .presence
            .as_ref()?
            .start(entry, topic, join_ref, state_to)?;
        Some(Tracking(Box::new(tracked)))
    }

    fn forwards(&self, topic: &str) -> bool {
        self.forward.as_ref().is_some_and(|f| f.forwards(topic))
    }

    fn open_lane(&self, deliver: Deliver) -> Option<PushLane> {
        Some(self.forward.as_ref()?.lane(&self.tracker, deliver))
    }
}

/// 32 hex characters from the OS random source.
pub fn generate_token() -> String {
    let a: u128 = rand::random();
    format!("{a:032x}")
}
