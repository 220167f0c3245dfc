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
    /// This node's LongPoll sessions.
    pub longpoll: crate::transport::longpoll::Registry,
    pub metrics: Arc<Metrics>,
    /// The bearer token `POST /api/publish` requires (configured or generated at start).
    pub publish_token: String,
    /// Cancelled when the node starts to shut down.
    pub shutdown: CancellationToken,
    /// Every long-lived task (connections, WebSocket sessions, sweeper) is spawned on this.
    pub tracker: TaskTracker,
    draining: AtomicBool,
}

impl App {
    /// Builds the shared state. An empty `publish.token` is replaced by a random one.
    pub fn new(config: Config, shutdown: CancellationToken) -> Arc<App> {
        let metrics = Arc::new(Metrics::default());
        let publish_token = if config.publish.token.is_empty() {
            generate_token()
        } else {
            config.publish.token.clone()
        };
        Arc::new(App {
            hub: Hub::new(config.history.clone(), metrics.clone()),
            longpoll: Default::default(),
            metrics,
            publish_token,
            config,
            shutdown,
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
        })
    }

    /// True once shutdown has begun; `/readyz` then answers 503.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.shutdown.is_cancelled()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// 32 hex characters from the OS random source.
pub fn generate_token() -> String {
    let a: u128 = rand::random();
    format!("{a:032x}")
}
