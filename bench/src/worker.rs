//! A load-generating worker process: holds its share of subscribers from one source address,
//! checks every message's sequence number and records its latency, and reports to the
//! coordinator as JSON lines on stdout. Commands arrive on stdin: `go`, then `stop`.

use crate::client::{self, Adapter, Exchange, H2, Http, WsClient};
use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Notify, Semaphore};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Ws,
    Lp,
    /// LongPoll over HTTP/2 (TLS, ALPN h2): one connection per subscriber, each request a
    /// stream on it.
    #[value(name = "lp-h2")]
    #[serde(rename = "lp-h2")]
    LpH2,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    pub adapter: Adapter,
    #[arg(long, value_enum)]
    pub transport: Transport,
    #[arg(long)]
    pub server: SocketAddr,
    #[arg(long)]
    pub source: IpAddr,
    /// Topic name; with --distinct-topics, subscriber i uses `<topic><i>`.
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub distinct_topics: bool,
    /// Global index of this worker's first subscriber.
    #[arg(long, default_value_t = 0)]
    pub first: usize,
    #[arg(long)]
    pub count: usize,
    /// Messages each subscriber expects.
    #[arg(long, default_value_t = 0)]
    pub expect: u64,
    /// Only open connections (the connect storm); no join, no messages.
    #[arg(long)]
    pub connect_only: bool,
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Subscribers connect over TLS trusting this CA (PEM).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The server name TLS asks for.
    #[arg(long, default_value = "localhost")]
    pub tls_name: String,
    /// Subscribers per source address (0: all from --source); the addresses count up from
    /// --source.
    #[arg(long, default_value_t = 0)]
    pub per_address: usize,
}

impl WorkerArgs {
    /// The source address of this worker's subscriber `i`.
    fn source_of(&self, i: usize) -> IpAddr {
        match (self.source, self.per_address) {
            (IpAddr::V4(base), n) if n > 0 => {
                IpAddr::V4(std::net::Ipv4Addr::from(u32::from(base) + (i / n) as u32))
            }
            (source, _) => source,
        }
    }
}

#[derive(Default)]
struct Stats {
    connected: usize,
    failed: usize,
    setup_done: usize,
    received: u64,
    duplicates_or_reordered: u64,
    skipped_ahead: u64,
    complete: usize,
    distinct: Vec<u64>,
    errors: Vec<String>,
}

struct Shared {
    stats: RefCell<Stats>,
    hist: RefCell<Histogram<u64>>,
    all_done: Notify,
    expect: u64,
}

impl Shared {
    fn on_message(&self, sub: usize, expected: &mut u64, seq: u64, ts: u64) {
        let lat = client::now_micros().saturating_sub(ts).max(1);
        let _ = self.hist.borrow_mut().record(lat);
        let mut st = self.stats.borrow_mut();
        st.received += 1;
        if seq < *expected {
            st.duplicates_or_reordered += 1;
            return;
        }
        if seq > *expected {
            st.skipped_ahead += 1;
        }
        *expected = seq + 1;
        st.distinct[sub] += 1;
        if st.distinct[sub] == self.expect {
            st.complete += 1;
            if st.complete == st.connected {
                self.all_done.notify_one();
            }
        }
    }

    fn fail(&self, err: String) {
        let mut st = self.stats.borrow_mut();
        st.failed += 1;
        if st.errors.len() < 5 {
            st.errors.push(err);
        }
    }
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

pub fn run(args: WorkerArgs) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, worker(args));
}

async fn worker(args: WorkerArgs) {
    if let Some(ca) = &args.tls_ca
        && let Err(e) = client::use_tls(ca, &args.tls_name)
    {
        emit(serde_json::json!({"event": "error", "error": e}));
        return;
    }
    let shared = Rc::new(Shared {
        stats: RefCell::new(Stats {
            distinct: vec![0; args.count],
            ..Default::default()
        }),
        hist: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")),
        all_done: Notify::new(),
        expect: args.expect,
    });
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    emit(serde_json::json!({"event": "spawned"}));
    // Wait for "go".
    loop {
        match stdin.next_line().await {
            Ok(Some(l)) if l.trim() == "go" => break,
            Ok(Some(_)) => continue,
            _ => return,
        }
    }
    let started = Instant::now();
    let setup_done = Rc::new(Notify::new());
    let slots = Rc::new(Semaphore::new(args.concurrency));
    for i in 0..args.count {
        let a = args.clone();
        let sh = shared.clone();
        let sd = setup_done.clone();
        let slots = slots.clone();
        tokio::task::spawn_local(async move {
            let topic = if a.distinct_topics {
                format!("{}{}", a.topic, a.first + i)
            } else {
                a.topic.clone()
            };
            let permit = slots.acquire().await.ok();
            let r = match a.transport {
                Transport::Ws => ws_subscriber(&a, &sh, i, &topic, permit, &sd).await,
                Transport::Lp => {
                    let http = Http::connect_secure(a.source_of(i), a.server);
                    lp_subscriber(&a, &sh, i, &topic, permit, &sd, http).await
                }
                Transport::LpH2 => {
                    let h2 = H2::connect(a.source_of(i), a.server);
                    lp_subscriber(&a, &sh, i, &topic, permit, &sd, h2).await
                }
            };
            if let Err(e) = r {
                let mut st = sh.stats.borrow_mut();
                let was_setup = st.setup_done;
                drop(st);
                sh.fail(e.to_string());
                st = sh.stats.borrow_mut();
                if st.setup_done == was_setup {
                    // Failed during setup: count it as set up so "ready" is not held forever.
                    st.setup_done += 1;
                    if st.setup_done == a.count {
                        sd.notify_one();
                    }
                }
            }
        });
    }
    if args.count > 0 {
        setup_done.notified().await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    {
        let st = shared.stats.borrow();
        emit(serde_json::json!({
            "event": "ready",
            "connected": st.connected,
            "failed": st.failed,
            "connect_secs": connect_secs,
            "errors": st.errors,
        }));
    }
    // Run until every subscriber has all its messages, or the coordinator says stop.
    let done_early = {
        let st = shared.stats.borrow();
        args.expect == 0 || st.connected == 0 || st.complete == st.connected
    };
    if !done_early || args.expect == 0 {
        tokio::select! {
            _ = shared.all_done.notified(), if args.expect > 0 => {}
            _ = async {
                loop {
                    match stdin.next_line().await {
                        Ok(Some(l)) if l.trim() == "stop" => break,
                        Ok(Some(_)) => continue,
                        _ => break,
                    }
                }
            } => {}
        }
    }
    let st = shared.stats.borrow();
    let missing: u64 = st
        .distinct
        .iter()
        .map(|d| args.expect.saturating_sub(*d))
        .sum::<u64>()
        .saturating_sub(args.expect * st.failed as u64);
    let mut ser = Vec::new();
    let _ = V2Serializer::new().serialize(&shared.hist.borrow(), &mut ser);
    emit(serde_json::json!({
        "event": "done",
        "connected": st.connected,
        "failed": st.failed,
        "received": st.received,
        "missing": missing,
        "duplicates": st.duplicates_or_reordered,
        "out_of_order": st.skipped_ahead,
        "complete": st.complete,
        "errors": st.errors,
        "hist": base64::engine::general_purpose::STANDARD.encode(ser),
    }));
}

fn mark_setup(a: &WorkerArgs, sh: &Shared, sd: &Notify, connected: bool) {
    let mut st = sh.stats.borrow_mut();
    if connected {
        st.connected += 1;
    }
    st.setup_done += 1;
    if st.setup_done == a.count {
        sd.notify_one();
    }
}

async fn ws_subscriber(
    a: &WorkerArgs,
    sh: &Rc<Shared>,
    i: usize,
    topic: &str,
    permit: Option<tokio::sync::SemaphorePermit<'_>>,
    sd: &Notify,
) -> std::io::Result<()> {
    let path = match a.adapter {
        Adapter::Phoenix => "/socket/websocket?vsn=2.0.0".to_string(),
        Adapter::Nchan => format!("/sub/{topic}"),
    };
    let mut ws = WsClient::connect(a.source_of(i), a.server, &path).await?;
    if a.adapter == Adapter::Phoenix && !a.connect_only {
        ws.send_text(format!(r#"["1","1","{topic}","phx_join",{{}}]"#).as_bytes())
            .await?;
        loop {
            let Some(r) = ws.next_frame().await? else {
                return Err(std::io::Error::other("closed before the join reply"));
            };
            let f = ws.slice(r);
            if f.windows(9).any(|w| w == b"phx_reply") {
                if !f.windows(4).any(|w| w == b"\"ok\"") {
                    return Err(std::io::Error::other(
                        String::from_utf8_lossy(f).to_string(),
                    ));
                }
                break;
            }
        }
    }
    drop(permit);
    mark_setup(a, sh, sd, true);
    let mut expected = 0u64;
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(25),
        Duration::from_secs(25),
    );
    let mut hb_ref = 100u64;
    loop {
        tokio::select! {
            r = ws.next_frame() => {
                let Some(r) = r? else { return Ok(()) };
                let f = ws.slice(r);
                client::scan_messages(f, |seq, ts| sh.on_message(i, &mut expected, seq, ts));
            }
            _ = heartbeat.tick(), if a.adapter == Adapter::Phoenix => {
                hb_ref += 1;
                ws.send_text(format!(r#"[null,"{hb_ref}","phoenix","heartbeat",{{}}]"#).as_bytes()).await?;
            }
        }
    }
}

/// A LongPoll subscriber on the connection `connect` opens: HTTP/1.1 ([`Http`]) or HTTP/2
/// ([`H2`]), the same requests and checks on either.
async fn lp_subscriber<C: Exchange>(
    a: &WorkerArgs,
    sh: &Rc<Shared>,
    i: usize,
    topic: &str,
    permit: Option<tokio::sync::SemaphorePermit<'_>>,
    sd: &Notify,
    connect: impl std::future::Future<Output = std::io::Result<C>>,
) -> std::io::Result<()> {
    let mut http = connect.await?;
    let mut expected = 0u64;
    match a.adapter {
        Adapter::Phoenix => {
            let base = "/socket/longpoll?vsn=2.0.0";
            let first = http.request("GET", &format!("{base}&"), "", b"").await?;
            let v: serde_json::Value = serde_json::from_slice(first.body)
                .map_err(|e| std::io::Error::other(format!("bad first poll: {e}")))?;
            let token = v["token"]
                .as_str()
                .ok_or_else(|| std::io::Error::other("no session token"))?
                .to_string();
            let mut url = format!("{base}&token={token}");
            // Where the token starts in `url`: each poll sends the token of the last answer,
            // as phoenix.js does (it acknowledges the frames that answer carried).
            let token_at = url.len() - token.len();
            let join = format!(r#"["1","1","{topic}","phx_join",{{}}]"#);
            let reply = http
                .request(
                    "POST",
                    &url,
                    "Content-Type: application/x-ndjson\r\n",
                    join.as_bytes(),
                )
                .await?;
            if client::lp_status(reply.body) != Some(200) {
                return Err(std::io::Error::other("join post refused"));
            }
            let mut joined = false;
            let mut permit = permit;
            loop {
                let body = http.request("GET", &url, "", b"").await?.body;
                if matches!(client::lp_status(body), Some(500 | 410)) {
                    return Err(std::io::Error::other("longpoll session lost"));
                }
                if !joined && client::find(body, b"phx_reply").is_some() {
                    joined = true;
                    permit.take();
                    mark_setup(a, sh, sd, true);
                }
                client::scan_messages(body, |seq, ts| sh.on_message(i, &mut expected, seq, ts));
                if let Some(t) = client::lp_token(body)
                    && *t != url.as_bytes()[token_at..]
                {
                    url.truncate(token_at);
                    url.push_str(std::str::from_utf8(t).unwrap_or_default());
                }
            }
        }
        Adapter::Nchan => {
            // Nchan long-poll: each response carries one message and the headers that name the
            // next one; a subscriber is registered once its first request is waiting.
            let path = format!("/sub/{topic}");
            // The next request's conditional headers; two buffers swapped, none allocated.
            let (mut cond, mut headers) = (String::new(), String::new());
            let mut first = true;
            let mut permit = permit;
            loop {
                std::mem::swap(&mut headers, &mut cond);
                cond.clear();
                let fut = http.request("GET", &path, &headers, b"");
                tokio::pin!(fut);
                let client::Reply { status, head, body } = if first {
                    // Give the request a moment to arrive, then report ready; the coordinator
                    // also checks Nchan's own subscriber count before publishing.
                    first = false;
                    let early = tokio::select! {
                        r = &mut fut => Some(r),
                        _ = tokio::time::sleep(Duration::from_millis(20)) => None,
                    };
                    permit.take();
                    mark_setup(a, sh, sd, true);
                    match early {
                        Some(r) => r?,
                        None => fut.await?,
                    }
                } else {
                    fut.await?
                };
                if status == 200 {
                    client::scan_messages(body, |seq, ts| sh.on_message(i, &mut expected, seq, ts));
                }
                // Writing into a String cannot fail.
                if let Some(lm) = client::header_value(head, "last-modified") {
                    let _ = write!(cond, "If-Modified-Since: {lm}\r\n");
                }
                if let Some(et) = client::header_value(head, "etag") {
                    let _ = write!(cond, "If-None-Match: {et}\r\n");
                }
            }
        }
    }
}
