//! Per-client admission: who a client is, how many connections it holds, how fast it opens new
//! ones, and how fast one connection joins topics.
//!
//! - **The client address** is the TCP peer, or, when the peer is a trusted proxy
//!   (`server.trusted_proxies`, loopback by default since nginx sits in front), the first
//!   untrusted address walking `X-Forwarded-For` from the right: nginx appends the address it
//!   saw, so whatever a client wrote further left is never believed. IPv4-mapped IPv6 counts as
//!   IPv4; other IPv6 addresses count per /64, the block one subscriber usually holds.
//! - **Connections per address**: each WebSocket and each LongPoll session holds an [`Admitted`]
//!   for its life, counted against `limits.max_connections_per_address`.
//! - **New connections per address**: a token bucket per address (`limits.connect_rate_per_address`
//!   per second, bursts of `limits.connect_burst_per_address`).
//! - **Joins per connection**: a [`JoinBucket`] in each session (`limits.join_rate_per_connection`
//!   per second, bursts of `limits.max_topics_per_connection`, so a client may join every topic
//!   it is allowed at once).
//!
//! The table holds an entry only while its address holds a connection or its bucket is
//! refilling; [`Admission::sweep`] forgets the rest, so its size is bounded by
//! `server.max_connections` plus the addresses seen in the last few seconds.

use crate::config::{Config, parse_net};
use crate::metrics::Refusal;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A token bucket in 8 bytes: tokens and the time of the last refill, in ms since an epoch the
/// owner keeps (wrapping after 49 days, which reads as a long pause: a full bucket).
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    last_ms: u32,
}

impl Bucket {
    pub fn full(burst: f32, now_ms: u32) -> Bucket {
        Bucket {
            tokens: burst,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u32, rate: f32, burst: f32) {
        let elapsed = now_ms.wrapping_sub(self.last_ms) as f32 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last_ms = now_ms;
    }

    /// Takes one token if there is one. A `rate` of 0 means no limit.
    pub fn take(&mut self, now_ms: u32, rate: f32, burst: f32) -> bool {
        if rate <= 0.0 {
            return true;
        }
        self.refill(now_ms, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full now (so forgetting it changes nothing).
    fn is_full(&self, now_ms: u32, rate: f32, burst: f32) -> bool {
        let mut b = *self;
        b.refill(now_ms, rate, burst);
        rate <= 0.0 || b.tokens >= burst
    }
}

/// A connection's join budget (`limits.join_rate_per_connection`).
#[derive(Debug, Clone, Copy)]
pub struct JoinBucket(Bucket);

#[derive(Debug)]
struct Entry {
    held: u32,
    bucket: Bucket,
}

/// The node's per-address table and the settings it applies.
#[derive(Debug)]
pub struct Admission {
    trusted: Vec<IpNet>,
    max_per_address: u32,
    connect_rate: f32,
    connect_burst: f32,
    join_rate: f32,
    join_burst: f32,
    epoch: Instant,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

/// One connection's (or LongPoll session's) hold on its address's count, given back on drop.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    key: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let a = &self.admission;
        let now = a.now_ms();
        let mut table = a.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.get_mut(&self.key) {
            e.held = e.held.saturating_sub(1);
            if e.held == 0 && e.bucket.is_full(now, a.connect_rate, a.connect_burst) {
                table.remove(&self.key);
            }
        }
    }
}

impl Admission {
    pub fn new(config: &Config) -> Arc<Admission> {
        let l = &config.limits;
        Arc::new(Admission {
            trusted: config
                .server
                .trusted_proxies
                .iter()
                .filter_map(|p| parse_net(p))
                .collect(),
            max_per_address: l.max_connections_per_address,
            connect_rate: l.connect_rate_per_address as f32,
            connect_burst: l.connect_burst_per_address.max(1) as f32,
            join_rate: l.join_rate_per_connection as f32,
            join_burst: (l.max_topics_per_connection.max(1) as f32)
                .max(l.join_rate_per_connection as f32),
            epoch: Instant::now(),
            table: Mutex::new(HashMap::new()),
        })
    }

    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: `peer`, or, when `peer` is a trusted proxy, the first untrusted
    /// address of the `X-Forwarded-For` values (in header order) walking from the right. An
    /// entry that is not an address stops the walk at the last trusted hop.
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a [u8]>,
    ) -> IpAddr {
        let mut current = canonical(peer);
        if !self.trusts(current) {
            return current;
        }
        let values: Vec<&[u8]> = forwarded_for.collect();
        for value in values.iter().rev() {
            let Ok(text) = std::str::from_utf8(value) else {
                return current;
            };
            for hop in text.rsplit(',') {
                let Some(ip) = parse_hop(hop.trim()) else {
                    return current;
                };
                current = canonical(ip);
                if !self.trusts(current) {
                    return current;
                }
            }
        }
        current
    }

    /// Admits one more connection or LongPoll session from `client` (an address from
    /// [`Admission::client_ip`]), or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, Refusal> {
        let key = address_key(client);
        let now = self.now_ms();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let entry = table.entry(key).or_insert_with(|| Entry {
            held: 0,
            bucket: Bucket::full(self.connect_burst, now),
        });
        if self.max_per_address > 0 && entry.held >= self.max_per_address {
            return Err(Refusal::PerAddress);
        }
        if !entry
            .bucket
            .take(now, self.connect_rate, self.connect_burst)
        {
            return Err(Refusal::RateLimit);
        }
        entry.held += 1;
        Ok(Admitted {
            admission: self.clone(),
            key,
        })
    }

    /// Forgets addresses that hold nothing and whose bucket has refilled.
    pub fn sweep(&self) {
        let now = self.now_ms();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.retain(|_, e| {
            e.held > 0 || !e.bucket.is_full(now, self.connect_rate, self.connect_burst)
        });
    }

    /// Addresses in the table (for tests and the metrics).
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A new connection's full join budget.
    pub fn join_bucket(&self) -> JoinBucket {
        JoinBucket(Bucket::full(self.join_burst, self.now_ms()))
    }

    /// Takes one join from `bucket`; false when the connection joins too fast.
    pub fn may_join(&self, bucket: &mut JoinBucket) -> bool {
        bucket
            .0
            .take(self.now_ms(), self.join_rate, self.join_burst)
    }
}

/// The TCP peer of the connection a request arrived on: a request extension the server sets,
/// so handlers behind hyper know who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

impl Admission {
    /// The client address of a request served by hyper: its [`Peer`] and `X-Forwarded-For`.
    /// `None` when the server did not say who the peer is.
    pub fn client_of<B>(&self, req: &hyper::Request<B>) -> Option<IpAddr> {
        let peer = req.extensions().get::<Peer>()?.0.ip();
        let xff = req.headers().get_all("x-forwarded-for");
        Some(self.client_ip(peer, xff.iter().map(|v| v.as_bytes())))
    }

    /// [`Admission::admit`] for a client whose address may be unknown (then it is admitted
    /// uncounted); a refusal is counted in the metrics.
    pub fn admit_or_count(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Option<Admitted>, Refusal> {
        let Some(ip) = client else { return Ok(None) };
        match self.admit(ip) {
            Ok(a) => Ok(Some(a)),
            Err(cause) => {
                metrics.refused(cause);
                tracing::debug!(client = %ip, cause = cause.label(), "connection refused");
                Err(cause)
            }
        }
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What the table counts by: IPv4 addresses as they are, IPv6 per /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(edit: impl FnOnce(&mut Config)) -> Arc<Admission> {
        let mut c = Config::default();
        edit(&mut c);
        Admission::new(&c)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let a = admission(|_| {});
        let xff = |v: &'static str| std::iter::once(v.as_bytes());
        // A direct client: its header is ignored.
        assert_eq!(
            a.client_ip(ip("203.0.113.9"), xff("198.51.100.1")),
            ip("203.0.113.9")
        );
        // nginx on loopback appended the client's address: that is the client.
        assert_eq!(
            a.client_ip(ip("127.0.0.1"), xff("198.51.100.1")),
            ip("198.51.100.1")
        );
        // What the client wrote itself (left of nginx's entry) is not believed.
        assert_eq!(
            a.client_ip(ip("127.0.0.1"), xff("10.9.9.9, 198.51.100.1")),
            ip("198.51.100.1")
        );
        // No header, or garbage: the proxy itself.
        assert_eq!(
            a.client_ip(ip("127.0.0.1"), std::iter::empty()),
            ip("127.0.0.1")
        );
        assert_eq!(
            a.client_ip(ip("127.0.0.1"), xff("nonsense")),
            ip("127.0.0.1")
        );
        // Ports and brackets, several headers in order, mapped addresses.
        assert_eq!(
            a.client_ip(ip("::1"), xff("[2001:db8::1]:443")),
            ip("2001:db8::1")
        );
        let two = [b"198.51.100.7".as_slice(), b"127.0.0.5".as_slice()];
        assert_eq!(
            a.client_ip(ip("127.0.0.1"), two.into_iter()),
            ip("198.51.100.7")
        );
        assert_eq!(
            a.client_ip(ip("::ffff:127.0.0.1"), xff("198.51.100.2")),
            ip("198.51.100.2")
        );
        // A chain of trusted proxies.
        let b =
            admission(|c| c.server.trusted_proxies = vec!["127.0.0.1".into(), "10.0.0.0/8".into()]);
        assert_eq!(
            b.client_ip(ip("127.0.0.1"), xff("198.51.100.3, 10.1.2.3")),
            ip("198.51.100.3")
        );
    }

    #[test]
    fn connections_are_counted_per_address_and_ipv6_per_64() {
        let a = admission(|c| {
            c.limits.max_connections_per_address = 2;
            c.limits.connect_rate_per_address = 0;
        });
        let one = a.admit(ip("2001:db8:0:1::1")).unwrap();
        let _two = a.admit(ip("2001:db8:0:1::2")).unwrap();
        assert_eq!(
            a.admit(ip("2001:db8:0:1:ffff::3")).unwrap_err(),
            Refusal::PerAddress
        );
        // Another /64, another IPv4 address: their own counts.
        let _other = a.admit(ip("2001:db8:0:2::1")).unwrap();
        let _v4 = a.admit(ip("198.51.100.1")).unwrap();
        drop(one);
        let _three = a.admit(ip("2001:db8:0:1::3")).unwrap();
        assert_eq!(a.tracked(), 3);
    }

    #[test]
    fn new_connections_are_rate_limited_and_the_table_forgets() {
        let a = admission(|c| {
            c.limits.connect_rate_per_address = 1;
            c.limits.connect_burst_per_address = 3;
        });
        let held: Vec<_> = (0..3)
            .map(|_| a.admit(ip("198.51.100.1")).unwrap())
            .collect();
        assert_eq!(a.admit(ip("198.51.100.1")).unwrap_err(), Refusal::RateLimit);
        assert!(a.admit(ip("198.51.100.2")).is_ok());
        drop(held);
        // Buckets still refilling are kept (both addresses); full ones are forgotten by the sweep.
        assert_eq!(a.tracked(), 2);
        a.table
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|e| e.bucket.tokens = 3.0);
        a.sweep();
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn joins_have_a_burst_of_the_topic_limit_then_the_rate() {
        let a = admission(|c| {
            c.limits.join_rate_per_connection = 1;
            c.limits.max_topics_per_connection = 5;
        });
        let mut b = a.join_bucket();
        assert!((0..5).all(|_| a.may_join(&mut b)));
        assert!(!a.may_join(&mut b));
        let off = admission(|c| c.limits.join_rate_per_connection = 0);
        let mut b = off.join_bucket();
        assert!((0..10_000).all(|_| off.may_join(&mut b)));
    }
}
