//! The state every connection shares: configuration, the hub, metrics, the publish token, and
//! the shutdown signal with the tracker that waits for every long-lived task.

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub hub: Hub,
    pub broker: crate::broker::Broker,
    /// This node's LongPoll sessions.
    pub longpoll: crate::transport::longpoll::Registry,
    /// Connection slots, `server.max_connections` of them: each TCP connection holds one (taken
    /// before accept; a WebSocket keeps its socket's), and so does each LongPoll session.
    pub slots: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<Metrics>,
    /// The ACME task's open challenges (`[acme]`).
    pub acme: crate::challenges::Challenges,
    /// Private topics and connect tokens (`[auth]`).
    pub auth: crate::auth::Auth,
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
        let (hub, broker) = if config.redis.url.is_empty() {
            (
                Hub::new(config.history.clone(), metrics.clone())
                    .with_max_topics(config.limits.max_topics),
                crate::broker::Broker::Embedded,
            )
        } else {
            // `Config::validate` has checked the URL.
            let r = crate::broker::redis::RedisBroker::new(
                &config.redis,
                crate::broker::redis::Keys::new(
                    &config.redis.prefix,
                    &config.redis.internal_prefix(),
                ),
                config.history.clone(),
                &node_id,
                config.limits.max_topics_per_connection,
                metrics.clone(),
            )
            .expect("redis.url was validated");
            (
                Hub::with_broker(config.history.clone(), metrics.clone(), r.idle.clone())
                    .with_max_topics(config.limits.max_topics),
                crate::broker::Broker::Redis(Arc::new(r)),
            )
        };
        let forward = crate::forward::Forwarder::new(
            &config.forward,
            &publish_token,
            config.limits.max_frame_bytes,
            metrics.clone(),
        )
        .map(Arc::new);
        let presence = crate::presence::Presence::new(&config.presence, &node_id).map(Arc::new);
        Arc::new(App {
            presence,
            hub,
            broker,
            longpoll: Default::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(config.server.max_connections)),
            metrics,
            acme: Default::default(),
            auth: crate::auth::Auth::new(&config.auth),
            admission: crate::admission::Admission::new(&config),
            origins: crate::origin::Origins::new(&config.server.allowed_origins),
            forward,
            publish_token,
            node_id,
            config,
            shutdown,
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            connections: Default::default(),
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

/// 32 hex characters from the OS random source.
pub fn generate_token() -> String {
    let a: u128 = rand::random();
    format!("{a:032x}")
}
