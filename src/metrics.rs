//! Process-wide counters and gauges, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain atomics: the hot path (deliveries) adds once per socket write, not once per message.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_websocket: AtomicI64,
    pub connections_longpoll: AtomicI64,
    pub connections_accepted: AtomicU64,
    /// WebSocket handshakes answered: HTTP/1.1 upgrades, HTTP/2 extended CONNECTs (RFC 8441).
    pub websocket_upgrades_http1: AtomicU64,
    pub websocket_upgrades_http2: AtomicU64,
    pub joins: AtomicU64,
    pub join_errors: AtomicU64,
    pub messages_published: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub messages_delivered_longpoll: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub slow_consumer_closes_longpoll: AtomicU64,
    pub longpoll_sessions_expired: AtomicU64,
    pub longpoll_frames_resent: AtomicU64,
    pub bad_messages: AtomicU64,
    pub topics: AtomicI64,
    pub recoveries: AtomicU64,
    pub recovery_failures: AtomicU64,
    pub redis_connected: AtomicI64,
    pub redis_reconnects: AtomicU64,
    pub redis_resubscriptions: AtomicU64,
    pub redis_subscribed_topics: AtomicI64,
    pub redis_gaps: AtomicU64,
    /// Topics this node had a position in that moved to a new epoch (history lost or
    /// recreated in Redis: a restart, a failover, an expiry).
    pub redis_epoch_changes: AtomicU64,
    pub redis_bad_messages: AtomicU64,
    /// 1 when `acme.enabled`; the ACME metrics are rendered only then.
    pub acme_enabled: AtomicI64,
    /// Unix time (s) the exported certificate expires; 0 before there is one.
    pub acme_certificate_not_after: AtomicI64,
    /// 1 while the exported certificate is the self-signed placeholder.
    pub acme_placeholder: AtomicI64,
    /// 1 when the last certificate order succeeded, 0 when it failed.
    pub acme_last_order_success: AtomicI64,
    /// Unix time (s) of the last certificate order's outcome; 0 before the first.
    pub acme_last_order_time: AtomicI64,
    pub acme_orders_ok: AtomicU64,
    pub acme_orders_failed: AtomicU64,
    pub acme_export_errors: AtomicU64,
    pub acme_reload_failures: AtomicU64,
    /// 1 when the edge's certificate comes from files (`tls.cert_file`); the metrics below are
    /// rendered only then.
    pub tls_cert_files: AtomicI64,
    /// Unix time (s) the certificate from files expires.
    pub tls_cert_not_after: AtomicI64,
    pub tls_cert_reloads_ok: AtomicU64,
    pub tls_cert_reloads_failed: AtomicU64,
    /// Client pushes forwarded to the app (`[forward]`): answered 2xx, 4xx, or not at all.
    pub forward_ok: AtomicU64,
    pub forward_refused: AtomicU64,
    pub forward_failed: AtomicU64,
    /// The `forward_failed` ones by [`ForwardFailure`] (the client is told only "forward failed").
    pub forward_failures: [AtomicU64; ForwardFailure::ALL.len()],
    /// This node's presence entries (`[presence]`), and those it removed for dead nodes.
    pub presence_entries: AtomicU64,
    pub presence_reaped: AtomicU64,
    /// Unix time (s) the process started serving (`App::new`).
    pub start_time: AtomicI64,
    /// Refused connections, sessions and joins, and forced closes, by [`Refusal`] cause.
    pub refusals: [AtomicU64; Refusal::ALL.len()],
    /// `pushgate_delivery_seconds{from="publish"}`: from a message entering this node's topic
    /// (the embedded broker: the publish accepted) to the end of the sweep that wrote it to
    /// every parked subscriber and woke the rest.
    pub delivery_after_publish: Histogram,
    /// The same from the message's receipt from Redis (Redis broker).
    pub delivery_after_redis: Histogram,
}

/// Upper bounds (seconds) of [`Histogram`]'s buckets: from half a millisecond, where a lone
/// message to a small topic lands, to ten seconds, where nothing should.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus histogram of durations over [`LATENCY_BUCKETS`]: an observation is three
/// relaxed atomic adds (its bucket, the sum, the count); buckets are kept apart and summed
/// when rendered.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records `n` observations of `d` (a sweep that delivered `n` messages, timed from the
    /// oldest: an upper bound for each).
    pub fn observe(&self, d: Duration, n: u64) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(n, Relaxed);
        }
        self.sum_micros.fetch_add(d.as_micros() as u64 * n, Relaxed);
        self.count.fetch_add(n, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name` with `label` (`key="value"`).
    fn render(&self, out: &mut String, name: &str, label: &str) {
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{label},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{label}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{label}}} {count}");
    }
}

/// Why a client was refused or its connection forcibly closed: the `cause` label of
/// `pushgate_refusals_total`. One variant per protection, so an operator sees which one fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A read deadline passed: first bytes, request head, idle keep-alive, body, handshake.
    Timeout,
    /// The client address holds `limits.max_connections_per_address` connections already.
    PerAddress,
    /// New connections, sessions or joins over their per-address or per-connection rate.
    RateLimit,
    /// An `Origin` outside `server.allowed_origins`.
    Origin,
    /// A join that would create a topic past `limits.max_topics`.
    TopicCap,
    /// A connection or LongPoll session past `server.max_connections`.
    SessionCap,
    /// A connection to the edge without a valid PROXY protocol header (`tls.proxy_protocol`).
    ProxyProtocol,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Timeout,
        Refusal::PerAddress,
        Refusal::RateLimit,
        Refusal::Origin,
        Refusal::TopicCap,
        Refusal::SessionCap,
        Refusal::ProxyProtocol,
    ];

    /// The `cause` label value.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Timeout => "timeout",
            Refusal::PerAddress => "per_address",
            Refusal::RateLimit => "rate_limit",
            Refusal::Origin => "origin",
            Refusal::TopicCap => "topic_cap",
            Refusal::SessionCap => "session_cap",
            Refusal::ProxyProtocol => "proxy_protocol",
        }
    }
}

/// Why a forwarded push failed: the `reason` label of `pushgate_forward_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardFailure {
    /// No answer within `forward.timeout_ms` (waiting for a free slot included).
    Timeout,
    /// The app could not be reached: connection refused, name resolution, TLS (certificate).
    Connect,
    /// The app answered with a status other than 2xx or 4xx.
    Status,
    /// A 2xx/4xx answer that is not JSON, is larger than `limits.max_frame_bytes`, or broke off.
    BadAnswer,
    /// Anything else (shutting down).
    Other,
}

impl ForwardFailure {
    pub const ALL: [ForwardFailure; 5] = [
        ForwardFailure::Timeout,
        ForwardFailure::Connect,
        ForwardFailure::Status,
        ForwardFailure::BadAnswer,
        ForwardFailure::Other,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            ForwardFailure::Timeout => "timeout",
            ForwardFailure::Connect => "connect",
            ForwardFailure::Status => "status",
            ForwardFailure::BadAnswer => "bad_answer",
            ForwardFailure::Other => "other",
        }
    }
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts one refusal or forced close of `cause`.
    pub fn refused(&self, cause: Refusal) {
        self.refusals[cause as usize].fetch_add(1, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut one = |name: &str, kind: &str, help: &str, samples: &[(&str, i64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let g = |a: &AtomicI64| a.load(Relaxed);
        let c = |a: &AtomicU64| a.load(Relaxed) as i64;
        one(
            "pushgate_connections",
            "gauge",
            "Open client connections by transport.",
            &[
                ("{transport=\"websocket\"}", g(&self.connections_websocket)),
                ("{transport=\"longpoll\"}", g(&self.connections_longpoll)),
            ],
        );
        one(
            "pushgate_connections_accepted_total",
            "counter",
            "TCP connections accepted.",
            &[("", c(&self.connections_accepted))],
        );
        one(
            "pushgate_websocket_upgrades_total",
            "counter",
            "WebSocket handshakes answered, by HTTP version (2: RFC 8441 extended CONNECT).",
            &[
                ("{http=\"1.1\"}", c(&self.websocket_upgrades_http1)),
                ("{http=\"2\"}", c(&self.websocket_upgrades_http2)),
            ],
        );
        one(
            "pushgate_joins_total",
            "counter",
            "Successful channel joins.",
            &[("", c(&self.joins))],
        );
        one(
            "pushgate_join_errors_total",
            "counter",
            "Refused channel joins.",
            &[("", c(&self.join_errors))],
        );
        one(
            "pushgate_messages_published_total",
            "counter",
            "Messages published to topics.",
            &[("", c(&self.messages_published))],
        );
        one(
            "pushgate_messages_delivered_total",
            "counter",
            "Broadcast messages handed to subscribers, by transport.",
            &[
                ("{transport=\"websocket\"}", c(&self.messages_delivered)),
                (
                    "{transport=\"longpoll\"}",
                    c(&self.messages_delivered_longpoll),
                ),
            ],
        );
        one(
            "pushgate_slow_consumer_closes_total",
            "counter",
            "Subscribers closed because they fell behind (WebSocket close 1013; LongPoll session ended).",
            &[
                ("{transport=\"websocket\"}", c(&self.slow_consumer_closes)),
                (
                    "{transport=\"longpoll\"}",
                    c(&self.slow_consumer_closes_longpoll),
                ),
            ],
        );
        one(
            "pushgate_longpoll_sessions_expired_total",
            "counter",
            "LongPoll sessions dropped after longpoll.session_timeout_ms without a poll (5 s for one never polled after the GET that created it).",
            &[("", c(&self.longpoll_sessions_expired))],
        );
        one(
            "pushgate_longpoll_frames_resent_total",
            "counter",
            "Frames a LongPoll client had not acknowledged, sent again: its poll came back with the token of an earlier answer (the answer was lost on the way, e.g. through a node that drained or died).",
            &[("", c(&self.longpoll_frames_resent))],
        );
        one(
            "pushgate_bad_messages_total",
            "counter",
            "Client messages that could not be understood.",
            &[("", c(&self.bad_messages))],
        );
        one(
            "pushgate_topics",
            "gauge",
            "Topics held in memory (with subscribers or history).",
            &[("", g(&self.topics))],
        );
        one(
            "pushgate_recoveries_total",
            "counter",
            "Joins with `since` by outcome.",
            &[
                ("{recovered=\"true\"}", c(&self.recoveries)),
                ("{recovered=\"false\"}", c(&self.recovery_failures)),
            ],
        );
        one(
            "pushgate_forward_requests_total",
            "counter",
            "Client pushes forwarded to the app (forward.url), by outcome: ok (2xx), error (4xx), failed (anything else).",
            &[
                ("{result=\"ok\"}", c(&self.forward_ok)),
                ("{result=\"error\"}", c(&self.forward_refused)),
                ("{result=\"failed\"}", c(&self.forward_failed)),
            ],
        );
        let failures: Vec<(String, i64)> = ForwardFailure::ALL
            .iter()
            .map(|f| {
                let n = self.forward_failures[*f as usize].load(Relaxed) as i64;
                (format!("{{reason=\"{}\"}}", f.label()), n)
            })
            .collect();
        let failures: Vec<(&str, i64)> = failures.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        one(
            "pushgate_forward_failures_total",
            "counter",
            "Forwarded pushes that failed (result=\"failed\" above), by reason: timeout, connect, status (not 2xx/4xx), bad_answer, other.",
            &failures,
        );
        one(
            "pushgate_presence_entries",
            "gauge",
            "Channels this node tracks for presence (presence.topics).",
            &[("", c(&self.presence_entries))],
        );
        one(
            "pushgate_presence_reaped_total",
            "counter",
            "Presence entries of dead nodes this node removed (Redis broker only).",
            &[("", c(&self.presence_reaped))],
        );
        let refusals: Vec<(String, i64)> = Refusal::ALL
            .iter()
            .map(|r| {
                let n = self.refusals[*r as usize].load(Relaxed) as i64;
                (format!("{{cause=\"{}\"}}", r.label()), n)
            })
            .collect();
        let refusals: Vec<(&str, i64)> = refusals.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        one(
            "pushgate_refusals_total",
            "counter",
            "Clients refused or forcibly closed by a protection, by cause.",
            &refusals,
        );
        one(
            "pushgate_redis_connected",
            "gauge",
            "1 while the Redis subscriber connection is up (Redis broker only).",
            &[("", g(&self.redis_connected))],
        );
        one(
            "pushgate_redis_reconnects_total",
            "counter",
            "Times the Redis subscriber connection was lost and re-established.",
            &[("", c(&self.redis_reconnects))],
        );
        one(
            "pushgate_redis_resubscriptions_total",
            "counter",
            "Topics resubscribed after a Redis reconnect.",
            &[("", c(&self.redis_resubscriptions))],
        );
        one(
            "pushgate_redis_subscribed_topics",
            "gauge",
            "Topics this node is subscribed to in Redis.",
            &[("", g(&self.redis_subscribed_topics))],
        );
        one(
            "pushgate_redis_gaps_total",
            "counter",
            "Messages the Redis history no longer had when a gap was filled.",
            &[("", c(&self.redis_gaps))],
        );
        one(
            "pushgate_redis_epoch_changes_total",
            "counter",
            "Topics this node held a position in that moved to a new epoch (Redis restarted, failed over or lost the topic's history); clients holding an older position get recovered: false.",
            &[("", c(&self.redis_epoch_changes))],
        );
        one(
            "pushgate_redis_bad_messages_total",
            "counter",
            "Messages on a topic channel that were not pushgate envelopes.",
            &[("", c(&self.redis_bad_messages))],
        );
        if g(&self.acme_enabled) == 1 {
            let not_after = g(&self.acme_certificate_not_after);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            one(
                "pushgate_acme_certificate_expiry_timestamp_seconds",
                "gauge",
                "Unix time the exported certificate expires (0 before there is one).",
                &[("", not_after)],
            );
            one(
                "pushgate_acme_certificate_expiry_seconds",
                "gauge",
                "Seconds until the exported certificate expires (negative once expired; 0 before there is one).",
                &[("", if not_after == 0 { 0 } else { not_after - now })],
            );
            one(
                "pushgate_acme_certificate_placeholder",
                "gauge",
                "1 while the exported certificate is the self-signed placeholder.",
                &[("", g(&self.acme_placeholder))],
            );
            one(
                "pushgate_acme_last_renewal_success",
                "gauge",
                "1 when the last certificate order succeeded, 0 when it failed or none finished yet.",
                &[("", g(&self.acme_last_order_success))],
            );
            one(
                "pushgate_acme_last_renewal_timestamp_seconds",
                "gauge",
                "Unix time the last certificate order succeeded or failed (0 before the first).",
                &[("", g(&self.acme_last_order_time))],
            );
            one(
                "pushgate_acme_renewals_total",
                "counter",
                "Certificate orders by result.",
                &[
                    ("{result=\"ok\"}", c(&self.acme_orders_ok)),
                    ("{result=\"error\"}", c(&self.acme_orders_failed)),
                ],
            );
            one(
                "pushgate_acme_export_errors_total",
                "counter",
                "Failed writes of fullchain.pem/privkey.pem to acme.cert_dir.",
                &[("", c(&self.acme_export_errors))],
            );
            one(
                "pushgate_acme_reload_command_failures_total",
                "counter",
                "Runs of acme.reload_command that failed or timed out.",
                &[("", c(&self.acme_reload_failures))],
            );
        }
        if g(&self.tls_cert_files) == 1 {
            one(
                "pushgate_tls_certificate_expiry_timestamp_seconds",
                "gauge",
                "Unix time the certificate the edge serves from tls.cert_file expires.",
                &[("", g(&self.tls_cert_not_after))],
            );
            one(
                "pushgate_tls_certificate_reloads_total",
                "counter",
                "Loads of changed tls.cert_file/tls.key_file by result (on error the certificate in use stays).",
                &[
                    ("{result=\"ok\"}", c(&self.tls_cert_reloads_ok)),
                    ("{result=\"error\"}", c(&self.tls_cert_reloads_failed)),
                ],
            );
        }
        let name = "pushgate_delivery_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From a message entering this node (publish accepted, embedded broker; \
             received from Redis, Redis broker) to the end of the sweep that wrote it to every \
             parked subscriber and woke the rest.\n# TYPE {name} histogram"
        );
        self.delivery_after_publish
            .render(&mut out, name, "from=\"publish\"");
        self.delivery_after_redis
            .render(&mut out, name, "from=\"redis\"");
        render_process(&mut out, g(&self.start_time));
        out
    }
}

/// The standard `process_*` metrics of Prometheus client libraries, from /proc/self (Linux).
/// A file that cannot be read leaves its metric out rather than reporting a wrong zero.
fn render_process(out: &mut String, start_time: i64) {
    let mut one = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    // utime and stime, fields 14 and 15, in USER_HZ (100 on Linux); the command name (field 2)
    // may hold spaces, so count from its closing parenthesis.
    if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let mut f = s.rsplit_once(')')?.1.split_whitespace().skip(11);
            Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
        })
    {
        one(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            ticks as f64 / 100.0,
        );
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        if let Some(v) = kib("VmRSS:") {
            one(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                (v * 1024) as f64,
            );
        }
        if let Some(v) = kib("VmSize:") {
            one(
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                (v * 1024) as f64,
            );
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        one(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count() as f64,
        );
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            let line = l.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse::<u64>().ok()
        })
    {
        one(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors (the soft limit).",
            max as f64,
        );
    }
    if start_time > 0 {
        one(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            start_time as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_rendered_by_cause() {
        let m = Metrics::default();
        m.refused(Refusal::Origin);
        m.refused(Refusal::Origin);
        let text = m.render();
        assert!(
            text.contains("pushgate_refusals_total{cause=\"origin\"} 2"),
            "{text}"
        );
        for r in Refusal::ALL {
            assert!(text.contains(&format!("cause=\"{}\"", r.label())), "{text}");
        }
    }

    #[test]
    fn delivery_histogram_is_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        m.delivery_after_publish
            .observe(Duration::from_micros(300), 2);
        m.delivery_after_publish
            .observe(Duration::from_millis(30), 1);
        m.delivery_after_publish.observe(Duration::from_secs(60), 1);
        let text = m.render();
        for line in [
            "# TYPE pushgate_delivery_seconds histogram",
            "pushgate_delivery_seconds_bucket{from=\"publish\",le=\"0.0005\"} 2",
            "pushgate_delivery_seconds_bucket{from=\"publish\",le=\"0.025\"} 2",
            "pushgate_delivery_seconds_bucket{from=\"publish\",le=\"0.05\"} 3",
            "pushgate_delivery_seconds_bucket{from=\"publish\",le=\"10\"} 3",
            "pushgate_delivery_seconds_bucket{from=\"publish\",le=\"+Inf\"} 4",
            "pushgate_delivery_seconds_sum{from=\"publish\"} 60.0306",
            "pushgate_delivery_seconds_count{from=\"publish\"} 4",
            "pushgate_delivery_seconds_count{from=\"redis\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
