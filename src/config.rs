//! Configuration: one struct of sections, read from TOML and overlaid with environment variables.
//!
//! Every key can come from the file or from `PUSHGATE_<SECTION>_<KEY>` (for example
//! `PUSHGATE_HISTORY_MAX_AGE_SECS=600`). Three names are fixed by DESIGN.md and map to keys of
//! their own: `PUSHGATE_LISTEN` (server.listen), `PUSHGATE_REDIS_URL` (redis.url) and
//! `PUSHGATE_PUBLISH_TOKEN` (publish.token). `PUSHGATE_LOG`, `PUSHGATE_LOG_FORMAT` and
//! `PUSHGATE_LOG_OUTPUT` are read by the binary for tracing and are not config keys. `PORT`, the container platforms' convention,
//! sets `server.listen` to `0.0.0.0:$PORT` unless `PUSHGATE_LISTEN` is set (see [`PORT_ENV`]).
//!
//! Loading ([`Config::load`]) only parses; [`Config::validate`] checks values and names each bad key.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::Path;

/// The port container platforms (AWS App Runner, DigitalOcean App Platform, Fly.io, Heroku and
/// the like) tell a container to listen on. When it is set and `PUSHGATE_LISTEN` is not,
/// `server.listen` becomes `0.0.0.0:$PORT`: every interface, because the platform's router
/// reaches the container at its own address, never at its loopback. Precedence, strongest
/// first: `--listen`, `PUSHGATE_LISTEN`, `PORT`, `server.listen` in the file, the default.
pub const PORT_ENV: &str = "PORT";

/// Environment variables with the `PUSHGATE_` prefix that are not config keys.
const NON_CONFIG_ENV: &[&str] = &["PUSHGATE_LOG", "PUSHGATE_LOG_FORMAT", "PUSHGATE_LOG_OUTPUT"];

/// Shortest value of a read or handshake deadline, in ms (`server.header_read_timeout_ms`,
/// `server.keepalive_timeout_ms`, `server.body_timeout_ms`, `tls.handshake_timeout_ms`,
/// `tls.http2_ping_interval_ms`): below it a deadline fires on ordinary network jitter.
pub const MIN_TIMEOUT_MS: u64 = 100;
/// Shortest `server.idle_timeout_ms`, in ms: phoenix.js sends a heartbeat every 30 s, so a
/// shorter idle timeout would close healthy connections; 5 s of slack for a late heartbeat.
pub const MIN_IDLE_TIMEOUT_MS: u64 = 35_000;
/// Smallest `limits.max_frame_bytes`: a join with a modest payload must fit.
pub const MIN_FRAME_BYTES: usize = 1024;
/// Smallest `limits.max_pending_bytes` (64 KiB): a subscriber must be allowed a few messages
/// in flight, or every burst would close it as a slow consumer.
pub const MIN_PENDING_BYTES: u64 = 64 * 1024;
/// Smallest request body limit, in bytes (`longpoll.max_post_bytes`,
/// `publish.max_body_bytes`): one ordinary message must fit.
pub const MIN_BODY_BYTES: usize = 1024;
/// `longpoll.window_ms`, in ms: at least a round trip's worth, at most well under the 20 s
/// after which phoenix.js gives up on a poll.
pub const LONGPOLL_WINDOW_MS: RangeInclusive<u64> = 100..=15_000;
/// How much `longpoll.session_timeout_ms` must exceed `longpoll.window_ms`, in ms: time for a
/// client to send its next poll after a held one is answered.
pub const LONGPOLL_SESSION_SLACK_MS: u64 = 1000;
/// Shortest `publish.token` set by hand, in characters: shorter tokens can be guessed.
pub const MIN_PUBLISH_TOKEN_CHARS: usize = 16;
/// Shortest `auth.secret`, in bytes: HS256 wants a 256-bit key.
pub const MIN_AUTH_SECRET_BYTES: usize = 32;
/// Most `acme.domains`: the most names Let's Encrypt puts in one certificate.
pub const MAX_ACME_DOMAINS: usize = 100;
/// Longest certificate name (`acme.domains` entry), in characters: DNS's limit.
pub const MAX_DOMAIN_CHARS: usize = 253;
/// Longest label of a certificate name, in characters: DNS's limit.
pub const MAX_DOMAIN_LABEL_CHARS: usize = 63;
/// `forward.timeout_ms`, in ms: long enough for an app's round trip, short enough that a
/// client waiting for its reply is not left hanging.
pub const FORWARD_TIMEOUT_MS: RangeInclusive<u64> = 100..=60_000;
/// `presence.max_meta_bytes`: `{}` at the least, 64 KiB at the most (every joiner receives
/// every entry's meta in `presence_state`).
pub const PRESENCE_META_BYTES: RangeInclusive<usize> = 2..=65_536;
/// `presence.node_ttl_ms`, in ms: not below the renewal cadence of a third of it at 100 ms,
/// not above an hour of ghost entries from a dead node.
pub const PRESENCE_NODE_TTL_MS: RangeInclusive<u64> = 300..=3_600_000;

/// "must be between A and B", for a bound given as a range.
fn between<T: std::fmt::Display>(r: &RangeInclusive<T>) -> String {
    format!("must be between {} and {}", r.start(), r.end())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub websocket: WebSocketConfig,
    pub longpoll: LongPollConfig,
    pub publish: PublishConfig,
    pub history: HistoryConfig,
    pub redis: RedisConfig,
    pub shutdown: ShutdownConfig,
    pub demo: DemoConfig,
    pub acme: AcmeConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub forward: ForwardConfig,
    pub presence: PresenceConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:4000` (loopback: nginx sits in front).
    /// Environment: `PUSHGATE_LISTEN`.
    pub listen: String,
    /// Most simultaneous clients: TCP connections (HTTP and WebSocket; a WebSocket is one) plus
    /// LongPoll sessions (each holds one besides its connections). Further connections wait in
    /// the kernel's accept queue; further LongPoll sessions are refused with `{"status":500}`,
    /// and phoenix.js retries with backoff. Default 50000.
    pub max_connections: usize,
    /// Time a client has to send complete HTTP request headers, in ms, counted from the
    /// connection's start for its first request (a socket that sends nothing is closed then)
    /// and from the first byte for later ones in the lean HTTP/1.1 loop; on connections hyper
    /// serves, the wait for a next request counts too. A stalled head is answered 408. Default
    /// 10000: a real client sends its head in one segment, at once; 10 s covers a slow mobile
    /// link while bounding how long a silent socket holds a connection slot.
    pub header_read_timeout_ms: u64,
    /// How long a keep-alive connection may wait, idle, for its next request before it is
    /// closed, in ms; at the edge, how long an HTTP/2 connection may have no open stream.
    /// Default 75000, nginx's `keepalive_timeout`: publishers and LongPoll clients reuse their
    /// connection well within it, and an abandoned one gives its slot back.
    pub keepalive_timeout_ms: u64,
    /// Longest wait for the next bytes of a request body, in ms (not the whole body: a slow
    /// but moving upload is fine). A body that stalls longer is answered 408 and the connection
    /// closed. Default 30000: request bodies here are small messages, and a mobile link that
    /// stalls half a minute has lost the request anyway.
    pub body_timeout_ms: u64,
    /// A WebSocket that sends nothing for this long is closed with 1001, in ms. phoenix.js sends
    /// a heartbeat every 30 s, so the default 90000 allows two missed heartbeats.
    pub idle_timeout_ms: u64,
    /// Tokio worker threads; 0 means one per core, 1 runs a single-threaded runtime (best on a
    /// one-core server). Default 0.
    pub worker_threads: usize,
    /// Peers whose `X-Forwarded-For` is believed when working out a client's address for the
    /// per-address limits: networks (`10.0.0.0/8`) or addresses. Default loopback
    /// (`127.0.0.0/8`, `::1`), where nginx sits. In `PUSHGATE_SERVER_TRUSTED_PROXIES` separated
    /// by commas; empty: always the TCP peer.
    #[serde(deserialize_with = "names_list")]
    pub trusted_proxies: Vec<String>,
    /// Web pages allowed to use the gateway, by the `Origin` their browser sends:
    /// `scheme://host[:port]`, exact (`https://app.example.com`) or any subdomain
    /// (`https://*.example.com`, not the bare domain). When set, WebSocket upgrades and LongPoll
    /// requests from other origins get 403 and LongPoll's CORS answers name only these; requests
    /// without an `Origin` (same-origin LongPoll GETs, clients that are not browsers) are let
    /// through (see [`crate::origin`]). In `PUSHGATE_SERVER_ALLOWED_ORIGINS` separated by commas.
    /// Default empty: any origin.
    #[serde(deserialize_with = "names_list")]
    pub allowed_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:4000".into(),
            max_connections: 50_000,
            header_read_timeout_ms: 10_000,
            keepalive_timeout_ms: 75_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 90_000,
            worker_threads: 0,
            trusted_proxies: vec!["127.0.0.0/8".into(), "::1".into()],
            allowed_origins: Vec::new(),
        }
    }
}

/// A `server.trusted_proxies` entry: a network (`10.0.0.0/8`) or one address.
pub fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest client message (a WebSocket frame or reassembled message), in bytes.
    /// Larger ones close the WebSocket with 1009. Default 65536.
    pub max_frame_bytes: usize,
    /// Most topics one connection may join; further joins get an error reply. With Redis, also
    /// the most joins one connection may have waiting for Redis at once (more get an error
    /// reply: a connection that joins and leaves faster than Redis answers). Default 100.
    pub max_topics_per_connection: usize,
    /// Most topics this node holds (with subscribers or history). A join that would create a
    /// topic past it gets an error reply (the connection keeps its other channels); joins of
    /// existing topics and publishes from the app are not refused. Default 100000 (an idle
    /// topic costs about 1 KiB).
    pub max_topics: usize,
    /// Most bytes of broadcasts a subscriber may have pending (published but not yet written to
    /// its socket). A subscriber past this, or one that falls off the end of a topic's history,
    /// is a slow consumer: its WebSocket is closed with 1013 and it recovers by position on
    /// rejoin. Default 4194304 (4 MiB). Pending broadcasts live in the shared topic buffer, so
    /// this bounds lag, not memory per connection.
    pub max_pending_bytes: u64,
    /// Most WebSockets and LongPoll sessions one client address may hold at once (IPv6 counted
    /// per /64); the next gets 429. 0: no limit. Default 256, room for an office or a mobile
    /// carrier's NAT.
    pub max_connections_per_address: u32,
    /// New WebSockets and LongPoll sessions one client address may open per second, in bursts
    /// of `connect_burst_per_address`; past it, 429. 0: no limit. Default 20.
    pub connect_rate_per_address: u32,
    /// See `connect_rate_per_address`. Default 100: a page reload storm after a deploy passes.
    pub connect_burst_per_address: u32,
    /// Joins one connection may make per second, in bursts of `max_topics_per_connection`;
    /// further joins get an error reply (`rate limited`) and the connection lives on. 0: no
    /// limit. Default 20.
    pub join_rate_per_connection: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: 64 * 1024,
            max_topics_per_connection: 100,
            max_topics: 100_000,
            max_pending_bytes: 4 * 1024 * 1024,
            max_connections_per_address: 256,
            connect_rate_per_address: 20,
            connect_burst_per_address: 100,
            join_rate_per_connection: 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Serve `/socket/websocket`. Default true. With false, upgrades get 404 and phoenix.js
    /// clients with `longPollFallbackMs` fall back to LongPoll (for hosts that cannot pass
    /// WebSockets).
    pub enabled: bool,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig { enabled: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LongPollConfig {
    /// Serve `/socket/longpoll`. Default true.
    pub enabled: bool,
    /// How long a GET is held when nothing is waiting, in ms. Default 10000; at most 15000,
    /// well under phoenix.js's 20 s request timeout (and App Runner's 120 s).
    pub window_ms: u64,
    /// A session with no poll for this long is dropped, in ms. Default 30000. A client always
    /// has a GET outstanding, so a gap this long means it is gone.
    pub session_timeout_ms: u64,
    /// Largest POST body, in bytes; larger ones get `{"status":413}`. Default 1048576.
    pub max_post_bytes: usize,
    /// Most ndjson lines in one POST (phoenix.js sends at most 100). Default 100.
    pub max_post_lines: usize,
}

impl Default for LongPollConfig {
    fn default() -> Self {
        LongPollConfig {
            enabled: true,
            window_ms: 10_000,
            session_timeout_ms: 30_000,
            max_post_bytes: 1024 * 1024,
            max_post_lines: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// Bearer token for `POST /api/publish`. Empty (the default) means one is generated at start
    /// and shown in the log only when that is a terminal (never in journald or a file).
    /// Environment: `PUSHGATE_PUBLISH_TOKEN`.
    pub token: String,
    /// Largest publish request body, in bytes; larger ones get 413. Default 1048576 (1 MiB).
    pub max_body_bytes: usize,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            token: String::new(),
            max_body_bytes: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Messages kept per topic for recovery (and as the buffer subscribers read from).
    /// Default 1000.
    pub size: usize,
    /// Seconds a message stays in history. Default 300.
    pub max_age_secs: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: 1000,
            max_age_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis URL (`redis://host:port/db`, `rediss://` for TLS, `redis+unix:///path`); empty
    /// (the default) uses the embedded in-process broker. Environment: `PUSHGATE_REDIS_URL`.
    pub url: String,
    /// Prefix of topic data: a topic's pub/sub channel is `<prefix><topic>`, its keys
    /// `<prefix>{<topic>}:m`, `:s` and `:p`. Default `pushgate:`.
    pub prefix: String,
    /// Prefix of node-internal keys and channels (node control channels for LongPoll routing,
    /// presence node liveness and node lists). It must differ from `prefix` before either
    /// ends (neither starts with the other), so that no topic name can reach it. Default
    /// empty: derived from `prefix`, without its trailing `:`, followed by `.internal:`
    /// (`pushgate.internal:`); see [`RedisConfig::internal_prefix`].
    pub internal_prefix: String,
    /// Redis Sentinel addresses (`host:port`), to follow a master across failovers. When set,
    /// the master is asked from the sentinels at every (re)connect and `redis.url` gives only
    /// how to talk to it (password, user, database, `rediss://` for TLS); its host and port are
    /// not used. In `PUSHGATE_REDIS_SENTINELS` separated by commas. Default empty: no Sentinel.
    #[serde(deserialize_with = "names_list")]
    pub sentinels: Vec<String>,
    /// The master's name in the sentinels' configuration (`sentinel monitor <name> ...`).
    /// Default `mymaster`. Used only with `redis.sentinels`.
    pub master_name: String,
    /// The sentinels' own password (`requirepass` in sentinel.conf), if they have one; the
    /// master's is in `redis.url`. Environment: `PUSHGATE_REDIS_SENTINEL_PASSWORD`. Default
    /// empty: none.
    pub sentinel_password: String,
    /// PEM file of the CA certificates trusted for a `rediss://` `redis.url`, instead of the
    /// system's (a Redis with a certificate from a private CA). Read at start. Not with
    /// `redis.sentinels` (there the system's roots are used). Default empty: the system's.
    pub tls_ca_file: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            prefix: "pushgate:".into(),
            internal_prefix: String::new(),
            sentinels: Vec::new(),
            master_name: "mymaster".into(),
            sentinel_password: String::new(),
            tls_ca_file: String::new(),
        }
    }
}

impl RedisConfig {
    /// The internal prefix in effect: `internal_prefix`, or when empty, `prefix` without one
    /// trailing `:` followed by `.internal:`.
    pub fn internal_prefix(&self) -> String {
        if !self.internal_prefix.is_empty() {
            return self.internal_prefix.clone();
        }
        let base = self.prefix.strip_suffix(':').unwrap_or(&self.prefix);
        format!("{base}.internal:")
    }

    fn validate(&self, bad: &mut dyn FnMut(&str, &str)) {
        if self.url.is_empty() {
            if !self.sentinels.is_empty() {
                bad(
                    "redis.sentinels",
                    "needs redis.url (say redis://:PASSWORD@sentinel/0: its password, user and \
                     database are the master's; host and port come from the sentinels)",
                );
            }
            return;
        }
        if let Err(e) = redis::Client::open(self.url.as_str()) {
            bad("redis.url", &format!("not a Redis URL: {e}"));
        }
        for s in &self.sentinels {
            let problem = match sentinel_url(s, &self.sentinel_password) {
                Err(e) => Some(e.to_string()),
                Ok(u) => redis::Client::open(u.as_str()).err().map(|e| e.to_string()),
            };
            if let Some(e) = problem {
                bad(
                    "redis.sentinels",
                    &format!("{s:?} is not a sentinel address: {e}"),
                );
            }
        }
        if !self.tls_ca_file.is_empty() {
            if !self.url.starts_with("rediss://") {
                bad("redis.tls_ca_file", "needs a rediss:// redis.url");
            } else if !self.sentinels.is_empty() {
                bad(
                    "redis.tls_ca_file",
                    "is not supported with redis.sentinels (the system's roots are used)",
                );
            } else if let Err(e) = std::fs::read(&self.tls_ca_file) {
                bad("redis.tls_ca_file", &format!("cannot be read: {e}"));
            }
        }
        if !self.sentinels.is_empty() && self.master_name.is_empty() {
            bad(
                "redis.master_name",
                "must not be empty with redis.sentinels",
            );
        }
        if self.prefix.is_empty() {
            bad(
                "redis.prefix",
                "must not be empty (every channel would be a topic's, leaving no room for \
                 the nodes' own)",
            );
            return;
        }
        let internal = self.internal_prefix();
        if internal.starts_with(&self.prefix) || self.prefix.starts_with(&internal) {
            let key = if self.internal_prefix.is_empty() {
                "redis.prefix"
            } else {
                "redis.internal_prefix"
            };
            bad(
                key,
                &format!(
                    "the internal prefix {internal:?} and redis.prefix {:?} must differ before \
                     either ends, or a topic name could reach the nodes' own keys and channels \
                     (end redis.prefix with ':' or set redis.internal_prefix)",
                    self.prefix
                ),
            );
        }
    }
}

/// A `redis.sentinels` entry that is not `host:port` (it holds a `/` or an `@`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected host:port")]
pub struct BadSentinelAddress;

/// A sentinel's URL from its `host:port` (a `redis.sentinels` entry) and the sentinels'
/// password (`redis.sentinel_password`, percent-encoded into the URL).
pub fn sentinel_url(address: &str, password: &str) -> Result<String, BadSentinelAddress> {
    if address.contains('/') || address.contains('@') {
        return Err(BadSentinelAddress);
    }
    let auth = if password.is_empty() {
        String::new()
    } else {
        let encoded: String = password
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!(":{encoded}@")
    };
    Ok(format!("redis://{auth}{address}/"))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM, WebSockets are closed with 1012 at random moments spread over this period so
    /// that clients do not all reconnect at once, in ms. Default 1000.
    pub drain_ms: u64,
    /// Hard limit from SIGTERM to exit, in ms. Default 10000.
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_ms: 1000,
            grace_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Serve the demo page at `/`. Default true.
    pub enabled: bool,
    /// Where the demo page loads the official phoenix client from. Default: the npm package
    /// on a public CDN; point it at your own copy for an offline install.
    pub phoenix_js_url: String,
}

/// The official client the demo page loads by default.
pub const DEFAULT_PHOENIX_JS_URL: &str =
    "https://cdn.jsdelivr.net/npm/phoenix@1.8.17/priv/static/phoenix.min.js";

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            enabled: true,
            phoenix_js_url: DEFAULT_PHOENIX_JS_URL.into(),
        }
    }
}

/// Let's Encrypt's production directory, the default `acme.directory_url`.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory, used with `acme.staging = true`.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Certificates from an ACME CA (Let's Encrypt), see [`crate::acme`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeConfig {
    /// Obtain and renew certificates. Default false.
    pub enabled: bool,
    /// Names the certificate is for (no wildcards, no IP addresses), at most 100. In TOML a
    /// list; in `PUSHGATE_ACME_DOMAINS` separated by commas. Default empty.
    #[serde(deserialize_with = "names_list")]
    pub domains: Vec<String>,
    /// E-mail address for the CA's expiry notices (without `mailto:`). Default empty (none).
    pub contact: String,
    /// The ACME directory. Default Let's Encrypt's production directory.
    pub directory_url: String,
    /// Use Let's Encrypt's staging directory instead (untrusted certificates, generous rate
    /// limits: for trying a setup). Default false.
    pub staging: bool,
    /// PEM file with the root certificate(s) of the ACME server's HTTPS, for a private or test
    /// CA. Empty (the default) trusts the usual public roots.
    pub root_ca_file: String,
    /// Where `fullchain.pem` and `privkey.pem` are written (the shipped nginx config reads
    /// them). Default `/var/lib/pushgate/tls`.
    pub cert_dir: String,
    /// Where the ACME account key and the issued certificates are cached, so that a restart
    /// reuses them without a new order. Default `/var/lib/pushgate/acme`.
    pub state_dir: String,
    /// Shell command run (`sh -c`) after each new certificate is written, for example
    /// `systemctl reload nginx`. Default empty (none).
    pub reload_command: String,
    /// How the CA checks control of the names: `http-01` (pushgate answers
    /// `/.well-known/acme-challenge/` on its HTTP listeners; behind nginx, nginx proxies it) or
    /// `tls-alpn-01` (answered in the TLS handshake on `tls.listen`, which the CA reaches on
    /// port 443). Default `http-01`.
    pub challenge: AcmeChallenge,
}

/// The ACME challenge type.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum AcmeChallenge {
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// Private topics and the connect tokens that open them, see [`crate::auth`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Secret that signs connect tokens (JWT, HS256), at least 32 bytes. Required when a topic
    /// is private. Environment: `PUSHGATE_AUTH_SECRET`. Default empty.
    pub secret: String,
    /// Topic patterns that need a connect token to join (`*` matches any run of characters):
    /// `["user:*", "private-*"]`, or `["*"]` for every topic. In `PUSHGATE_AUTH_PRIVATE_TOPICS`
    /// separated by commas. Default empty: every topic is public.
    #[serde(deserialize_with = "names_list")]
    pub private_topics: Vec<String>,
}

impl AuthConfig {
    fn validate(&self, bad: &mut dyn FnMut(&str, &str)) {
        if !self.secret.is_empty() && self.secret.len() < MIN_AUTH_SECRET_BYTES {
            bad(
                "auth.secret",
                &format!(
                    "must be at least {MIN_AUTH_SECRET_BYTES} bytes (HS256 wants a 256-bit key), \
                     e.g. `openssl rand -hex 32`"
                ),
            );
        }
        if !self.private_topics.is_empty() && self.secret.is_empty() {
            bad(
                "auth.secret",
                "required when auth.private_topics is set (it verifies the connect tokens)",
            );
        }
        check_patterns("auth.private_topics", &self.private_topics, bad);
    }
}

/// Topic patterns (`*` = any run of characters, see [`crate::auth::glob_match`]): each 1 to
/// [`MAX_FIELD_BYTES`](crate::protocol::MAX_FIELD_BYTES) bytes, like a topic.
fn check_patterns(key: &str, patterns: &[String], bad: &mut dyn FnMut(&str, &str)) {
    use crate::protocol::MAX_FIELD_BYTES;
    if patterns
        .iter()
        .any(|p| p.is_empty() || p.len() > MAX_FIELD_BYTES)
    {
        bad(
            key,
            &format!("each pattern must be 1 to {MAX_FIELD_BYTES} bytes"),
        );
    }
}

/// Client pushes forwarded to the application, see [`crate::forward`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardConfig {
    /// Where client pushes are POSTed: an `http://` or `https://` URL of your app. Plain
    /// `http://` only to a loopback host (`127.0.0.1`, `::1`, `localhost`) unless
    /// `allow_insecure_http`: the publish token travels with every push. Default empty: client
    /// pushes get an error reply.
    pub url: String,
    /// Allow a plain-`http://` `url` to a host other than loopback (a private network you
    /// trust), where the publish token and the pushes cross the network unencrypted. Default
    /// false.
    pub allow_insecure_http: bool,
    /// PEM root certificate(s) to trust for an `https://` `url` besides the public ones (a
    /// private CA). Default empty.
    pub root_ca_file: String,
    /// Topic patterns whose pushes are forwarded (`*` matches any run of characters). Required
    /// with `url`. In `PUSHGATE_FORWARD_TOPICS` separated by commas. Default empty.
    #[serde(deserialize_with = "names_list")]
    pub topics: Vec<String>,
    /// How long the app has to answer a push, waiting for a free slot included, in ms; then
    /// the push gets an error reply. Default 5000.
    pub timeout_ms: u64,
    /// Pushes one connection may have waiting for the app (they go one at a time, in order);
    /// more get an error reply. Default 16.
    pub max_queued: usize,
    /// Requests at the app at once, across every connection. Default 64.
    pub max_concurrent: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            url: String::new(),
            allow_insecure_http: false,
            root_ca_file: String::new(),
            topics: Vec::new(),
            timeout_ms: 5000,
            max_queued: 16,
            max_concurrent: 64,
        }
    }
}

/// Phoenix Presence on chosen topics, see [`crate::presence`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Topic patterns whose joins are tracked (`*` matches any run of characters): a joiner gets
    /// `presence_state`, and everyone `presence_diff`s as channels join and leave, as phoenix.js's
    /// `Presence` expects. In `PUSHGATE_PRESENCE_TOPICS` separated by commas. Default empty.
    #[serde(deserialize_with = "names_list")]
    pub topics: Vec<String>,
    /// Largest `presence` object a join may carry (it becomes the entry's meta), in bytes of
    /// JSON. Default 512.
    pub max_meta_bytes: usize,
    /// Redis only: how long a node's entries outlive it when it dies without leaving (other nodes
    /// then remove them and tell their clients), in ms. The node renews its claim every second (every
    /// third of this, if shorter). Default 15000.
    pub node_ttl_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            topics: Vec::new(),
            max_meta_bytes: 512,
            node_ttl_ms: 15_000,
        }
    }
}

impl PresenceConfig {
    fn validate(&self, bad: &mut dyn FnMut(&str, &str)) {
        check_patterns("presence.topics", &self.topics, bad);
        if !PRESENCE_META_BYTES.contains(&self.max_meta_bytes) {
            bad("presence.max_meta_bytes", &between(&PRESENCE_META_BYTES));
        }
        if !PRESENCE_NODE_TTL_MS.contains(&self.node_ttl_ms) {
            bad("presence.node_ttl_ms", &between(&PRESENCE_NODE_TTL_MS));
        }
    }
}

impl ForwardConfig {
    fn validate(&self, bad: &mut dyn FnMut(&str, &str)) {
        if !self.url.is_empty() {
            let ok = self.url.parse::<hyper::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                bad(
                    "forward.url",
                    "must be an http:// or https:// URL, like http://127.0.0.1:3000/pushgate/push",
                );
            } else if !self.allow_insecure_http
                && let Ok(u) = self.url.parse::<hyper::Uri>()
                && u.scheme_str() == Some("http")
                && !u.host().is_some_and(is_loopback_host)
            {
                bad(
                    "forward.url",
                    "plain http:// to a host other than loopback would send the publish token \
                     unencrypted: use https://, or set forward.allow_insecure_http = true \
                     (PUSHGATE_FORWARD_ALLOW_INSECURE_HTTP=true) for a private network you trust",
                );
            }
            if self.topics.is_empty() {
                bad(
                    "forward.topics",
                    "required with forward.url: the topic patterns whose pushes are forwarded",
                );
            }
        }
        check_patterns("forward.topics", &self.topics, bad);
        if !self.root_ca_file.is_empty()
            && let Err(e) =
                crate::client_tls::client_config("forward.root_ca_file", &self.root_ca_file)
        {
            bad("forward.root_ca_file", &e.problem.to_string());
        }
        if !FORWARD_TIMEOUT_MS.contains(&self.timeout_ms) {
            bad("forward.timeout_ms", &between(&FORWARD_TIMEOUT_MS));
        }
        if self.max_queued == 0 {
            bad("forward.max_queued", "must be at least 1");
        }
        if self.max_concurrent == 0 {
            bad("forward.max_concurrent", "must be at least 1");
        }
    }
}

/// `localhost` (and `*.localhost`), or a loopback IP address (IPv6 in brackets, as in a URL).
fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.to_ascii_lowercase().ends_with(".localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// pushgate terminating TLS itself, at the edge (no nginx in front), see [`crate::tls`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN), for example `0.0.0.0:443`.
    /// Its certificate comes from `tls.cert_file` and `tls.key_file`, or from `[acme]`. Empty
    /// (the default): no TLS listener. Environment: `PUSHGATE_TLS_LISTEN`.
    pub listen: String,
    /// The certificate `tls.listen` serves, from a file: PEM, the full chain (leaf first), as
    /// certbot's `fullchain.pem`. Set together with `tls.key_file`. With `acme.enabled` too,
    /// the edge serves these files, not the ACME resolver: point them at what ACME exports
    /// (`acme.cert_dir`, which nginx's site reads as well) and each renewal reaches the edge
    /// through them; the `tls-alpn-01` challenge (answered by the resolver at the edge) is
    /// then refused, use `http-01`. The files must exist at start. The two files are checked for
    /// changes every few seconds and loaded again when either changed (a renewal); a pair
    /// that does not load (half written, a key that does not match) is logged and counted, and
    /// the certificate in use stays. Empty (the default): the certificate comes from `[acme]`.
    /// Environment: `PUSHGATE_TLS_CERT_FILE`.
    pub cert_file: String,
    /// The private key of `tls.cert_file`: PEM (PKCS#8, PKCS#1 or SEC1), as certbot's
    /// `privkey.pem`. Empty (the default): none. Environment: `PUSHGATE_TLS_KEY_FILE`.
    pub key_file: String,
    /// Address of a plain-HTTP listener that redirects to HTTPS (and answers HTTP-01
    /// challenges), for example `0.0.0.0:80`. Empty (the default): none.
    pub redirect_listen: String,
    /// Time a client has to complete the TLS handshake, in ms (with `tls.proxy_protocol`, the
    /// PROXY header included). Default 10000.
    pub handshake_timeout_ms: u64,
    /// Every connection on `tls.listen` starts with a PROXY protocol header (version 1 or 2,
    /// as nginx's `stream` module sends with `proxy_protocol on`), and the client address in
    /// it is the connection's peer for everything (per-address limits, logs); a `LOCAL`
    /// header (a proxy's health check) keeps the socket's own address. A connection without a
    /// valid header is closed (`pushgate_refusals_total{cause="proxy_protocol"}`). Turn it on
    /// only when `tls.listen` is reachable by the proxy alone (loopback): anyone who can
    /// connect can claim any address. Default false. Environment:
    /// `PUSHGATE_TLS_PROXY_PROTOCOL`.
    pub proxy_protocol: bool,
    /// Also serve `/api/*` (publish, presence) and `/metrics` on `tls.listen`. Default false:
    /// the edge serves what the internet needs (`/socket/*`, health checks, ACME challenges,
    /// the demo page when enabled) and the rest answers 404 there; the plain listener
    /// (`server.listen`, loopback by default) serves everything. Turn it on only when the
    /// publish token and the metrics may face the internet.
    pub serve_api_and_metrics: bool,
    /// HTTP/2 at the edge: a PING is sent after this long without a frame from the client, and
    /// the connection is closed when the answer takes as long again, in ms. Default 30000, as
    /// often as phoenix.js's heartbeat: a vanished client is noticed within a minute.
    pub http2_ping_interval_ms: u64,
    /// HTTP/2 at the edge: most streams (requests and RFC 8441 WebSockets) open at once on one
    /// connection; more are refused by the protocol (`REFUSED_STREAM`). Default 128, nginx's
    /// `http2_max_concurrent_streams`. Each WebSocket also holds a `server.max_connections`
    /// slot.
    pub http2_max_concurrent_streams: u32,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            listen: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            redirect_listen: String::new(),
            handshake_timeout_ms: 10_000,
            proxy_protocol: false,
            serve_api_and_metrics: false,
            http2_ping_interval_ms: 30_000,
            http2_max_concurrent_streams: 128,
        }
    }
}

impl TlsConfig {
    /// Whether the edge's certificate comes from `tls.cert_file` and `tls.key_file`.
    pub fn has_cert_files(&self) -> bool {
        !self.cert_file.is_empty() || !self.key_file.is_empty()
    }

    fn validate_cert_files(&self, acme: &AcmeConfig, bad: &mut dyn FnMut(&str, &str)) {
        if !self.has_cert_files() {
            return;
        }
        if self.cert_file.is_empty() {
            bad("tls.cert_file", "must be set with tls.key_file");
            return;
        }
        if self.key_file.is_empty() {
            bad("tls.key_file", "must be set with tls.cert_file");
            return;
        }
        if acme.enabled && acme.challenge == AcmeChallenge::TlsAlpn01 {
            bad(
                "tls.cert_file",
                "cannot be combined with acme.challenge = \"tls-alpn-01\" (answered with the ACME certificate, which the edge does not serve when tls.cert_file is set); use http-01",
            );
        }
        if self.listen.is_empty() {
            bad(
                "tls.cert_file",
                "needs tls.listen (the edge that serves it)",
            );
        }
        let (cert, key) = (Path::new(&self.cert_file), Path::new(&self.key_file));
        if let Err(e) = crate::server_cert::load(cert, key) {
            bad("tls.cert_file", &e.to_string());
        }
    }

    fn validate(&self, acme: &AcmeConfig, bad: &mut dyn FnMut(&str, &str)) {
        if !self.listen.is_empty() {
            if self.listen.parse::<SocketAddr>().is_err() {
                bad(
                    "tls.listen",
                    "must be an IP address and port, like 0.0.0.0:443",
                );
            }
            if !acme.enabled && !self.has_cert_files() {
                bad(
                    "tls.listen",
                    "needs a certificate: tls.cert_file and tls.key_file, or acme.enabled = true",
                );
            }
        }
        self.validate_cert_files(acme, bad);
        if !self.redirect_listen.is_empty() {
            if self.redirect_listen.parse::<SocketAddr>().is_err() {
                bad(
                    "tls.redirect_listen",
                    "must be an IP address and port, like 0.0.0.0:80",
                );
            }
            if self.listen.is_empty() {
                bad(
                    "tls.redirect_listen",
                    "needs tls.listen (where it redirects to)",
                );
            }
        }
        if acme.enabled && acme.challenge == AcmeChallenge::TlsAlpn01 && self.listen.is_empty() {
            bad(
                "acme.challenge",
                "tls-alpn-01 is answered on tls.listen, which is not set",
            );
        }
        let at_least = format!("must be at least {MIN_TIMEOUT_MS}");
        if self.handshake_timeout_ms < MIN_TIMEOUT_MS {
            bad("tls.handshake_timeout_ms", &at_least);
        }
        if self.http2_ping_interval_ms < MIN_TIMEOUT_MS {
            bad("tls.http2_ping_interval_ms", &at_least);
        }
        if self.http2_max_concurrent_streams == 0 {
            bad("tls.http2_max_concurrent_streams", "must be at least 1");
        }
    }
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            enabled: false,
            domains: Vec::new(),
            contact: String::new(),
            directory_url: LETS_ENCRYPT_PRODUCTION.into(),
            staging: false,
            root_ca_file: String::new(),
            cert_dir: "/var/lib/pushgate/tls".into(),
            state_dir: "/var/lib/pushgate/acme".into(),
            reload_command: String::new(),
            challenge: AcmeChallenge::Http01,
        }
    }
}

impl AcmeConfig {
    /// The directory URL in effect (`staging` switches to Let's Encrypt's staging).
    pub fn directory(&self) -> &str {
        if self.staging {
            LETS_ENCRYPT_STAGING
        } else {
            &self.directory_url
        }
    }

    fn validate(&self, bad: &mut dyn FnMut(&str, &str)) {
        if !self.enabled {
            return;
        }
        if self.domains.is_empty() {
            bad(
                "acme.domains",
                "must name at least one domain when acme.enabled is true",
            );
        }
        if self.domains.len() > MAX_ACME_DOMAINS {
            bad(
                "acme.domains",
                &format!("at most {MAX_ACME_DOMAINS} names (the CA's limit)"),
            );
        }
        for (i, d) in self.domains.iter().enumerate() {
            if let Err(why) = check_domain(d) {
                bad("acme.domains", &format!("{d:?}: {why}"));
            } else if self.domains[..i].contains(d) {
                bad("acme.domains", &format!("{d:?} is listed twice"));
            }
        }
        let contact = self
            .contact
            .strip_prefix("mailto:")
            .unwrap_or(&self.contact);
        if !self.contact.is_empty()
            && (contact.split('@').count() != 2
                || contact.starts_with('@')
                || contact.ends_with('@')
                || contact.contains(|c: char| c.is_whitespace() || c == ','))
        {
            bad("acme.contact", "must be one e-mail address (or empty)");
        }
        if !self.directory_url.starts_with("https://") {
            bad("acme.directory_url", "must be an https:// URL");
        }
        if self.staging && self.directory_url != LETS_ENCRYPT_PRODUCTION {
            bad(
                "acme.staging",
                "cannot be combined with a custom acme.directory_url",
            );
        }
        if self.cert_dir.is_empty() {
            bad("acme.cert_dir", "must be a directory path");
        }
        if self.state_dir.is_empty() {
            bad("acme.state_dir", "must be a directory path");
        }
    }
}

/// Why an `acme.domains` entry cannot be a certificate name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum BadDomain {
    #[error("wildcards need the DNS-01 challenge, which pushgate does not do")]
    Wildcard,
    #[error("IP addresses are not supported, name a domain")]
    IpAddress,
    #[error("must be 1 to {MAX_DOMAIN_CHARS} characters")]
    Length,
    #[error("must be a fully qualified name like example.com")]
    NotQualified,
    #[error(
        "each dot-separated label must be 1 to {MAX_DOMAIN_LABEL_CHARS} lowercase letters, \
         digits or inner hyphens"
    )]
    Label,
}

/// Checks one certificate name: a DNS name of at least two labels, letters, digits and
/// hyphens, no wildcard (neither challenge type can prove one), no IP address.
fn check_domain(d: &str) -> Result<(), BadDomain> {
    if d.starts_with("*.") {
        return Err(BadDomain::Wildcard);
    }
    if d.parse::<std::net::IpAddr>().is_ok() {
        return Err(BadDomain::IpAddress);
    }
    if d.is_empty() || d.len() > MAX_DOMAIN_CHARS {
        return Err(BadDomain::Length);
    }
    if !d.contains('.') {
        return Err(BadDomain::NotQualified);
    }
    for label in d.split('.') {
        let ok = !label.is_empty()
            && label.len() <= MAX_DOMAIN_LABEL_CHARS
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(BadDomain::Label);
        }
    }
    Ok(())
}

/// A list of names from a TOML array, or from a string separated by commas (the environment).
fn names_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Names::deserialize(d)? {
        Names::List(l) => l,
        Names::Text(t) => t
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

/// A problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl Config {
    /// Reads the TOML file (if any), then applies `PUSHGATE_*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<Problem>> {
        let text = match file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                vec![Problem {
                    key: "--config".into(),
                    message: format!("cannot read {}: {e}", path.display()),
                }]
            })?),
            None => None,
        };
        let name = file.map(|p| p.display().to_string()).unwrap_or_default();
        Config::load_text(text.as_deref().map(|t| (name.as_str(), t)), env)
    }

    /// [`Config::load`] of a file's text already read: `file` is its name (for problems) and
    /// its contents.
    pub fn load_text(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, Vec<Problem>> {
        let mut table = match file {
            Some((name, text)) => text.parse::<toml::Table>().map_err(|e| {
                vec![Problem {
                    key: name.to_string(),
                    message: format!("not valid TOML: {}", e.message()),
                }]
            })?,
            None => toml::Table::new(),
        };
        let mut problems = Vec::new();
        let mut port = None;
        let mut pushgate_listen = false;
        for (name, value) in env {
            if name == PORT_ENV {
                port = Some(value);
                continue;
            }
            let Some(rest) = name.strip_prefix("PUSHGATE_") else {
                continue;
            };
            pushgate_listen |= rest == "LISTEN";
            if NON_CONFIG_ENV.contains(&name.as_str()) {
                continue;
            }
            let (section, key) = match rest {
                "LISTEN" => ("server".to_string(), "listen".to_string()),
                _ => match rest.split_once('_') {
                    Some((s, k)) => (s.to_ascii_lowercase(), k.to_ascii_lowercase()),
                    None => {
                        problems.push(Problem {
                            key: name.clone(),
                            message: "not a config variable (expected PUSHGATE_<SECTION>_<KEY>)"
                                .into(),
                        });
                        continue;
                    }
                },
            };
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => {
                    t.insert(key, env_value(&value));
                }
                _ => problems.push(Problem {
                    key: section,
                    message: "must be a section".into(),
                }),
            }
        }
        // The container platforms' convention (see `PORT_ENV`): below PUSHGATE_LISTEN, above the file.
        if let (Some(port), false) = (port, pushgate_listen) {
            match port.parse::<u16>() {
                Ok(port) => {
                    if let toml::Value::Table(server) = table
                        .entry("server")
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    {
                        server.insert(
                            "listen".into(),
                            toml::Value::String(format!("0.0.0.0:{port}")),
                        );
                    }
                }
                Err(_) => problems.push(Problem {
                    key: PORT_ENV.into(),
                    message: format!("{port:?} is not a TCP port number (0 to 65535)"),
                }),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let message = e.inner().message().to_string();
            let key = if key == "." || key.is_empty() {
                "config".to_string()
            } else {
                key
            };
            vec![Problem { key, message }]
        })
    }

    /// Checks values; returns every problem found, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: &str| {
            p.push(Problem {
                key: key.into(),
                message: message.into(),
            })
        };
        if self.server.listen.parse::<SocketAddr>().is_err() {
            bad(
                "server.listen",
                "must be an IP address and port, like 127.0.0.1:4000",
            );
        }
        for o in &self.server.allowed_origins {
            if let Err(e) = crate::origin::check_pattern(o) {
                bad("server.allowed_origins", &e.to_string());
            }
        }
        if self.server.max_connections == 0 {
            bad("server.max_connections", "must be at least 1");
        }
        for (key, ms) in [
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "server.keepalive_timeout_ms",
                self.server.keepalive_timeout_ms,
            ),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
        ] {
            if ms < MIN_TIMEOUT_MS {
                bad(key, &format!("must be at least {MIN_TIMEOUT_MS}"));
            }
        }
        if self.server.idle_timeout_ms < MIN_IDLE_TIMEOUT_MS {
            bad(
                "server.idle_timeout_ms",
                &format!(
                    "must be at least {MIN_IDLE_TIMEOUT_MS} (phoenix.js sends a heartbeat every 30 s)"
                ),
            );
        }
        if self.limits.max_frame_bytes < MIN_FRAME_BYTES {
            bad(
                "limits.max_frame_bytes",
                &format!("must be at least {MIN_FRAME_BYTES}"),
            );
        }
        if self.limits.max_topics_per_connection == 0 {
            bad("limits.max_topics_per_connection", "must be at least 1");
        }
        if self.limits.max_topics == 0 {
            bad("limits.max_topics", "must be at least 1");
        }
        if self.limits.max_pending_bytes < MIN_PENDING_BYTES {
            bad(
                "limits.max_pending_bytes",
                &format!("must be at least {MIN_PENDING_BYTES}"),
            );
        }
        if let Some(p) = self
            .server
            .trusted_proxies
            .iter()
            .find(|p| parse_net(p).is_none())
        {
            bad(
                "server.trusted_proxies",
                &format!("{p:?} is not an address or network (like 10.0.0.0/8 or ::1)"),
            );
        }
        if self.limits.connect_rate_per_address > 0 && self.limits.connect_burst_per_address == 0 {
            bad(
                "limits.connect_burst_per_address",
                "must be at least 1 when limits.connect_rate_per_address is set",
            );
        }
        if !LONGPOLL_WINDOW_MS.contains(&self.longpoll.window_ms) {
            bad(
                "longpoll.window_ms",
                &format!(
                    "{} (phoenix.js gives up on a poll after 20 s)",
                    between(&LONGPOLL_WINDOW_MS)
                ),
            );
        }
        if self.longpoll.session_timeout_ms < self.longpoll.window_ms + LONGPOLL_SESSION_SLACK_MS {
            bad(
                "longpoll.session_timeout_ms",
                &format!("must exceed longpoll.window_ms by at least {LONGPOLL_SESSION_SLACK_MS}"),
            );
        }
        if self.longpoll.max_post_bytes < MIN_BODY_BYTES {
            bad(
                "longpoll.max_post_bytes",
                &format!("must be at least {MIN_BODY_BYTES}"),
            );
        }
        if self.longpoll.max_post_lines == 0 {
            bad("longpoll.max_post_lines", "must be at least 1");
        }
        if self.demo.phoenix_js_url.is_empty() || self.demo.phoenix_js_url.contains('"') {
            bad("demo.phoenix_js_url", "must be a URL (without quotes)");
        }
        if self.publish.max_body_bytes < MIN_BODY_BYTES {
            bad(
                "publish.max_body_bytes",
                &format!("must be at least {MIN_BODY_BYTES}"),
            );
        }
        if !self.publish.token.is_empty() && self.publish.token.len() < MIN_PUBLISH_TOKEN_CHARS {
            bad(
                "publish.token",
                &format!(
                    "must be at least {MIN_PUBLISH_TOKEN_CHARS} characters (or empty to generate one)"
                ),
            );
        }
        if self.history.size == 0 {
            bad(
                "history.size",
                "must be at least 1 (the history is also the delivery buffer)",
            );
        }
        if self.history.max_age_secs == 0 {
            bad("history.max_age_secs", "must be at least 1");
        }
        self.redis.validate(&mut bad);
        if self.shutdown.grace_ms < self.shutdown.drain_ms {
            bad("shutdown.grace_ms", "must be at least shutdown.drain_ms");
        }
        self.acme.validate(&mut bad);
        self.tls.validate(&self.acme, &mut bad);
        self.auth.validate(&mut bad);
        self.forward.validate(&mut bad);
        self.presence.validate(&mut bad);
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 4000)))
    }
}

/// Environment values are typed by their look: integers and booleans as such, else strings.
fn env_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        toml::Value::Integer(i)
    } else if v == "true" || v == "false" {
        toml::Value::Boolean(v == "true")
    } else {
        toml::Value::String(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:4000");
    }

    #[test]
    fn environment_overlays_the_file() {
        let dir = std::env::temp_dir().join(format!("pushgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.toml");
        std::fs::write(&file, "[history]\nsize = 5\nmax_age_secs = 9\n").unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("PUSHGATE_LISTEN", "127.0.0.1:0"),
                ("PUSHGATE_PUBLISH_TOKEN", "0123456789abcdef"),
                ("PUSHGATE_HISTORY_MAX_AGE_SECS", "60"),
                ("PUSHGATE_LOG", "debug"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:0");
        assert_eq!(c.publish.token, "0123456789abcdef");
        assert_eq!(c.history.size, 5);
        assert_eq!(c.history.max_age_secs, 60);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn port_listens_on_every_interface_unless_pushgate_listen_is_set() {
        // Container platforms (App Runner, App Platform, Fly.io, Heroku-likes) say where to
        // listen with PORT, and route to the container's own address, not its loopback.
        let c = Config::load(None, env(&[("PORT", "8080")])).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8080");
        c.validate().unwrap();

        // PORT beats the file: a config baked into an image must not hide the platform's port.
        let dir = std::env::temp_dir().join(format!("pushgate-cfg-port-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.toml");
        std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:4001\"\n").unwrap();
        let c = Config::load(Some(&file), env(&[("PORT", "9000")])).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:9000");
        std::fs::remove_dir_all(&dir).unwrap();

        // PUSHGATE_LISTEN beats PORT, whatever their order in the environment.
        for pairs in [
            [("PORT", "8080"), ("PUSHGATE_LISTEN", "127.0.0.1:4002")],
            [("PUSHGATE_LISTEN", "127.0.0.1:4002"), ("PORT", "8080")],
        ] {
            let c = Config::load(None, env(&pairs)).unwrap();
            assert_eq!(c.server.listen, "127.0.0.1:4002");
        }

        // A PORT that is not a port is named.
        for bad in ["http", "70000", "-1", ""] {
            let e = Config::load(None, env(&[("PORT", bad)])).unwrap_err();
            assert_eq!(e[0].key, "PORT", "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = Config::load(None, env(&[("PUSHGATE_HISTORY_SIZEE", "1")])).unwrap_err();
        assert_eq!(e[0].key, "history.sizee", "{e:?}");
        let e = Config::load(None, env(&[("PUSHGATE_HISTORY_SIZE", "abc")])).unwrap_err();
        assert_eq!(e[0].key, "history.size", "{e:?}");
        let mut c = Config::default();
        c.server.listen = "nope".into();
        c.history.size = 0;
        let p = c.validate().unwrap_err();
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["server.listen", "history.size"]);
    }

    #[test]
    fn forward_from_the_environment_and_its_problems() {
        let c = Config::load(
            None,
            env(&[
                ("PUSHGATE_FORWARD_URL", "http://127.0.0.1:3000/pushgate"),
                ("PUSHGATE_FORWARD_TOPICS", "room:*,chat:*"),
            ]),
        )
        .unwrap();
        assert_eq!(c.forward.topics, ["room:*", "chat:*"]);
        c.validate().unwrap();

        let mut c = Config::default();
        c.forward.url = "ftp://example.com/x".into();
        c.forward.root_ca_file = "/nonexistent/ca.pem".into();
        c.forward.timeout_ms = 10;
        c.forward.max_queued = 0;
        let p = c.validate().unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "forward.url",
                "forward.topics",
                "forward.root_ca_file",
                "forward.timeout_ms",
                "forward.max_queued"
            ],
            "{p:?}"
        );
        assert!(
            p[2].message.starts_with("cannot read /nonexistent/ca.pem"),
            "{p:?}"
        );
    }

    #[test]
    fn the_internal_redis_prefix_cannot_be_reached_by_a_topic() {
        let mut c = Config::default();
        c.redis.url = "redis://127.0.0.1:6379/".into();
        assert_eq!(c.redis.internal_prefix(), "pushgate.internal:");
        c.validate().unwrap();
        c.redis.prefix = "app1:".into();
        assert_eq!(c.redis.internal_prefix(), "app1.internal:");
        c.validate().unwrap();
        let problem = |c: &Config| {
            let p = c.validate().unwrap_err();
            assert_eq!(p.len(), 1, "{p:?}");
            p[0].key.clone()
        };
        // No trailing ':': the derived prefix would start with the topic prefix.
        c.redis.prefix = "app".into();
        assert_eq!(problem(&c), "redis.prefix");
        c.redis.internal_prefix = "app-internal:".into();
        assert_eq!(problem(&c), "redis.internal_prefix");
        c.redis.internal_prefix = "internal:app:".into();
        c.validate().unwrap();
        // One may not start with the other, either way round.
        c.redis.prefix = "internal:app:x:".into();
        assert_eq!(problem(&c), "redis.internal_prefix");
        c.redis.prefix = String::new();
        assert_eq!(problem(&c), "redis.prefix");
        // Without Redis the prefixes are not used.
        c.redis.url = String::new();
        c.validate().unwrap();
    }

    #[test]
    fn sentinel_settings_are_checked() {
        let mut c = Config::default();
        let problem = |c: &Config| {
            let p = c.validate().unwrap_err();
            assert_eq!(p.len(), 1, "{p:?}");
            p[0].key.clone()
        };
        c.redis.sentinels = vec!["127.0.0.1:26379".into()];
        assert_eq!(problem(&c), "redis.sentinels", "needs redis.url");
        c.redis.url = "redis://:secret@sentinel/0".into();
        c.validate().unwrap();
        c.redis.sentinels = vec!["redis://127.0.0.1:26379/".into()];
        assert_eq!(problem(&c), "redis.sentinels");
        c.redis.sentinels = vec!["127.0.0.1:26379".into(), "127.0.0.2:26379".into()];
        c.redis.sentinel_password = "p@ss/word".into();
        c.validate().unwrap();
        c.redis.master_name = String::new();
        assert_eq!(problem(&c), "redis.master_name");
        c.redis.master_name = "mymaster".into();
        // A private CA only for TLS, only without Sentinel, and only a file that exists.
        c.redis.tls_ca_file = "Cargo.toml".into();
        assert_eq!(problem(&c), "redis.tls_ca_file");
        c.redis.sentinels.clear();
        assert_eq!(problem(&c), "redis.tls_ca_file", "redis:// is not TLS");
        c.redis.url = "rediss://:secret@127.0.0.1:6380/".into();
        c.validate().unwrap();
        c.redis.tls_ca_file = "/nonexistent/ca.pem".into();
        assert_eq!(problem(&c), "redis.tls_ca_file");
    }

    #[test]
    fn the_readme_documents_every_key() {
        let readme = include_str!("../README.md");
        let table = toml::Table::try_from(Config::default()).unwrap();
        let mut missing = Vec::new();
        for (section, keys) in &table {
            for key in keys.as_table().unwrap().keys() {
                if !readme.contains(&format!("| `{section}.{key}` |")) {
                    missing.push(format!("{section}.{key}"));
                }
            }
        }
        assert!(table.len() >= 13, "{table:?}");
        assert_eq!(
            missing,
            Vec::<String>::new(),
            "README.md's Configuration table lacks these"
        );
    }

    #[test]
    fn bounds_are_worded_as_before_they_were_constants() {
        // The texts operators saw when the bounds were literals in the messages.
        let mut c = Config::default();
        c.server.header_read_timeout_ms = 0;
        c.server.idle_timeout_ms = 0;
        c.limits.max_frame_bytes = 0;
        c.limits.max_pending_bytes = 0;
        c.longpoll.window_ms = 0;
        c.longpoll.session_timeout_ms = 0;
        c.longpoll.max_post_bytes = 0;
        c.publish.max_body_bytes = 0;
        c.publish.token = "short".into();
        c.tls.handshake_timeout_ms = 0;
        c.auth.secret = "short".into();
        c.auth.private_topics = vec![String::new()];
        c.forward.timeout_ms = 0;
        c.presence.max_meta_bytes = 0;
        c.presence.node_ttl_ms = 0;
        c.acme.enabled = true;
        c.acme.domains = (0..101).map(|i| format!("d{i}.example.com")).collect();
        c.acme.domains[0] = format!("{}.com", "a".repeat(250));
        c.acme.domains[1] = format!("{}.com", "a".repeat(64));
        let p: Vec<String> = c
            .validate()
            .unwrap_err()
            .iter()
            .map(|p| p.to_string())
            .collect();
        let long = format!("{}.com", "a".repeat(250));
        let label = format!("{}.com", "a".repeat(64));
        for want in [
            "server.header_read_timeout_ms: must be at least 100".to_string(),
            "server.idle_timeout_ms: must be at least 35000 (phoenix.js sends a heartbeat every 30 s)".into(),
            "limits.max_frame_bytes: must be at least 1024".into(),
            "limits.max_pending_bytes: must be at least 65536".into(),
            "longpoll.window_ms: must be between 100 and 15000 (phoenix.js gives up on a poll after 20 s)".into(),
            "longpoll.session_timeout_ms: must exceed longpoll.window_ms by at least 1000".into(),
            "longpoll.max_post_bytes: must be at least 1024".into(),
            "publish.max_body_bytes: must be at least 1024".into(),
            "publish.token: must be at least 16 characters (or empty to generate one)".into(),
            "acme.domains: at most 100 names (the CA's limit)".into(),
            format!("acme.domains: {long:?}: must be 1 to 253 characters"),
            format!("acme.domains: {label:?}: each dot-separated label must be 1 to 63 lowercase letters, digits or inner hyphens"),
            "tls.handshake_timeout_ms: must be at least 100".into(),
            "auth.secret: must be at least 32 bytes (HS256 wants a 256-bit key), e.g. `openssl rand -hex 32`".into(),
            "auth.private_topics: each pattern must be 1 to 255 bytes".into(),
            "forward.timeout_ms: must be between 100 and 60000".into(),
            "presence.max_meta_bytes: must be between 2 and 65536".into(),
            "presence.node_ttl_ms: must be between 300 and 3600000".into(),
        ] {
            assert!(p.contains(&want), "{want}\nnot in {p:#?}");
        }
    }

    #[test]
    fn deadlines_are_named_when_too_short() {
        let c = Config::load(
            None,
            env(&[
                ("PUSHGATE_SERVER_KEEPALIVE_TIMEOUT_MS", "60000"),
                ("PUSHGATE_SERVER_BODY_TIMEOUT_MS", "15000"),
                ("PUSHGATE_TLS_SERVE_API_AND_METRICS", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.keepalive_timeout_ms, 60_000);
        assert_eq!(c.server.body_timeout_ms, 15_000);
        assert!(c.tls.serve_api_and_metrics);
        c.validate().unwrap();

        let mut c = Config::default();
        c.server.header_read_timeout_ms = 0;
        c.server.keepalive_timeout_ms = 0;
        c.server.body_timeout_ms = 99;
        c.tls.http2_ping_interval_ms = 0;
        c.tls.http2_max_concurrent_streams = 0;
        let keys: Vec<_> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "server.header_read_timeout_ms",
                "server.keepalive_timeout_ms",
                "server.body_timeout_ms",
                "tls.http2_ping_interval_ms",
                "tls.http2_max_concurrent_streams"
            ]
        );
    }

    #[test]
    fn auth_from_the_environment_and_its_problems() {
        let c = Config::load(
            None,
            env(&[
                ("PUSHGATE_AUTH_SECRET", "0123456789abcdef0123456789abcdef"),
                ("PUSHGATE_AUTH_PRIVATE_TOPICS", "user:*, private-*"),
            ]),
        )
        .unwrap();
        assert_eq!(c.auth.private_topics, ["user:*", "private-*"]);
        c.validate().unwrap();

        let mut c = Config::default();
        c.auth.private_topics = vec!["user:*".into(), String::new()];
        let p = c.validate().unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["auth.secret", "auth.private_topics"], "{p:?}");
        assert!(p[0].message.contains("required"), "{p:?}");
        c.auth.private_topics.pop();
        c.auth.secret = "short".into();
        let p = c.validate().unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].message.contains("at least 32 bytes"), "{p:?}");
    }

    #[test]
    fn acme_domains_from_the_environment_and_their_problems() {
        let c = Config::load(
            None,
            env(&[
                ("PUSHGATE_ACME_ENABLED", "true"),
                ("PUSHGATE_ACME_DOMAINS", "example.com, www.example.com"),
            ]),
        )
        .unwrap();
        assert_eq!(c.acme.domains, ["example.com", "www.example.com"]);
        c.validate().unwrap();
        assert_eq!(c.acme.directory(), LETS_ENCRYPT_PRODUCTION);

        let mut c = Config::default();
        c.acme.enabled = true;
        let p = c.validate().unwrap_err();
        assert_eq!(p[0].key, "acme.domains", "{p:?}");
        c.acme.domains = [
            "*.example.com",
            "localhost",
            "Example.com",
            "10.0.0.1",
            "a..b",
            "ok.example",
            "ok.example",
        ]
        .map(String::from)
        .to_vec();
        c.acme.contact = "not an address".into();
        c.acme.directory_url = "http://ca.test/dir".into();
        c.acme.staging = true;
        let p = c.validate().unwrap_err();
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "acme.domains",
                "acme.domains",
                "acme.domains",
                "acme.domains",
                "acme.domains",
                "acme.domains",
                "acme.contact",
                "acme.directory_url",
                "acme.staging"
            ],
            "{p:?}"
        );
        assert!(p[0].message.contains("DNS-01"), "{p:?}");
        assert!(p[5].message.contains("twice"), "{p:?}");

        c.acme.domains = vec!["example.com".into()];
        c.acme.contact = "mailto:admin@example.com".into();
        c.acme.directory_url = LETS_ENCRYPT_PRODUCTION.into();
        c.validate().unwrap();
        assert_eq!(c.acme.directory(), LETS_ENCRYPT_STAGING);
    }

    #[test]
    fn tls_listeners_need_acme_and_tls_alpn_needs_a_listener() {
        let c = Config::load(
            None,
            env(&[
                ("PUSHGATE_TLS_LISTEN", "0.0.0.0:443"),
                ("PUSHGATE_TLS_REDIRECT_LISTEN", "0.0.0.0:80"),
            ]),
        )
        .unwrap();
        assert_eq!(c.tls.listen, "0.0.0.0:443");
        assert_eq!(c.tls.redirect_listen, "0.0.0.0:80");
        let keys: Vec<_> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["tls.listen"]);

        let mut c = Config::default();
        c.acme.enabled = true;
        c.acme.domains = vec!["example.com".into()];
        c.acme.challenge = AcmeChallenge::TlsAlpn01;
        c.tls.redirect_listen = "nope".into();
        let keys: Vec<_> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "tls.redirect_listen",
                "tls.redirect_listen",
                "acme.challenge"
            ]
        );
        c.tls.listen = "127.0.0.1:8443".into();
        c.tls.redirect_listen = "127.0.0.1:8080".into();
        c.validate().unwrap();
    }

    #[test]
    fn certificate_files_go_together_load_and_exclude_acme() {
        let dir =
            std::env::temp_dir().join(format!("pushgate-config-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let keys = |c: &Config| -> Vec<(String, String)> {
            c.validate()
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|p| (p.key, p.message))
                .collect()
        };
        let c = Config::load(
            None,
            env(&[
                ("PUSHGATE_TLS_LISTEN", "127.0.0.1:8443"),
                ("PUSHGATE_TLS_CERT_FILE", cert_file.to_str().unwrap()),
                ("PUSHGATE_TLS_KEY_FILE", key_file.to_str().unwrap()),
                ("PUSHGATE_TLS_PROXY_PROTOCOL", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(keys(&c), []);
        assert!(c.tls.proxy_protocol);
        assert!(!Config::default().tls.proxy_protocol);

        let mut alone = c.clone();
        alone.tls.key_file.clear();
        assert_eq!(keys(&alone)[0].0, "tls.key_file");
        let mut alone = c.clone();
        alone.tls.cert_file.clear();
        assert_eq!(keys(&alone)[0].0, "tls.cert_file");
        let mut no_listener = c.clone();
        no_listener.tls.listen.clear();
        assert_eq!(keys(&no_listener)[0].0, "tls.cert_file");

        // With ACME (HTTP-01, whose export the files may be), the files are what the edge
        // serves; TLS-ALPN-01 would need the ACME certificate at the edge.
        let mut both = c.clone();
        both.acme.enabled = true;
        both.acme.domains = vec!["example.com".into()];
        assert_eq!(keys(&both), []);
        both.acme.challenge = AcmeChallenge::TlsAlpn01;
        let p = keys(&both);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].1.contains("cannot be combined with acme.challenge"),
            "{p:?}"
        );

        // A key that is not the certificate's: named, with both files.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key_file, other.serialize_pem()).unwrap();
        let p = keys(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "tls.cert_file");
        assert!(p[0].1.contains("does not go with"), "{p:?}");
        std::fs::remove_file(&key_file).unwrap();
        let p = keys(&c);
        assert!(p[0].1.contains("cannot read"), "{p:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
