//! `pushgate-bench`: measures pushgate (or Nchan, side by side) on this machine.
//!
//! The coordinator (this process) optionally starts the server pinned to one core, pins itself
//! and its worker processes to another, spreads subscribers over workers that each connect from
//! their own 127.0.0.x address (one process may hold at most ~19k sockets here), publishes, and
//! reads the server's CPU time and memory from /proc. Every run stops by itself (`--timeout`).
//! Output: a readable table on stderr and one JSON line on stdout.
#![forbid(unsafe_code)]

mod client;
mod floor;
mod procstat;
mod worker;

use base64::Engine;
use clap::{Parser, Subcommand, ValueEnum};
use client::{Adapter, Http};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use worker::Transport;

#[derive(Parser)]
#[command(
    name = "pushgate-bench",
    about = "Measure a push server: memory, fanout CPU, latency"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario.
    Run(RunArgs),
    /// Internal: a load-generating worker process.
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
    /// A reference server doing the least work possible for a WebSocket fanout (use with
    /// `--adapter nchan`): the floor under any server's CPU per delivery here (see BENCHMARKS.md).
    Floor(floor::FloorArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    /// N WebSocket subscribers held idle: memory per connection and idle CPU.
    Idle,
    /// N WebSocket subscribers on one topic, M messages at --rate (0 = flat out).
    Fanout,
    /// The same with LongPoll subscribers.
    Longpoll,
    /// Publish API throughput (no subscribers).
    Publish,
    /// Connection storm: accepts per second and failures.
    Connect,
    /// N subscribers, each on its own topic, one message per topic.
    ManyTopics,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    #[arg(value_enum)]
    scenario: Scenario,
    #[arg(long, value_enum, default_value = "phoenix")]
    adapter: Adapter,
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:4000")]
    server: SocketAddr,
    /// Measure this already running server process (and its children).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Start the server with this shell command (pinned to --server-cpu), measure it, stop it.
    #[arg(long)]
    spawn: Option<String>,
    #[arg(long, default_value_t = 0)]
    server_cpu: usize,
    /// Core for this process and its workers; -1 leaves them unpinned.
    #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
    load_cpu: i64,
    /// Publish token (Phoenix adapter). Default: $PUSHGATE_PUBLISH_TOKEN.
    #[arg(long)]
    token: Option<String>,
    /// Subscribers (or connections).
    #[arg(short = 'n', long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages to publish (per topic).
    #[arg(short = 'm', long, default_value_t = 100)]
    messages: u64,
    /// Messages per second; 0 publishes flat out.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Worker processes (default: one per 5000 subscribers).
    #[arg(long)]
    workers: Option<usize>,
    /// Seconds to hold (idle) or to publish (publish).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Concurrent publisher connections (publish, many-topics).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Upper bound on the whole run, in seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Connects in flight per worker.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// A label for the run (e.g. "before", "after").
    #[arg(long, default_value = "")]
    label: String,
    /// Subscribers speak TLS to --server (wss://, LongPoll over https://, HTTP/1.1; HTTP/2 with
    /// --http2) trusting
    /// this CA (PEM): the stack as deployed, nginx in front (`bench/peers/stack.sh`).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// The name TLS asks for (SNI, and the name the certificate must carry).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// LongPoll over HTTP/2 (longpoll with --tls-ca only), as browsers speak it to the shipped
    /// nginx site: each subscriber holds one TLS connection (ALPN h2) and sends every poll and
    /// POST on it as a stream. The JSON line says "http2": true and "transport": "lp-h2";
    /// bench/summarize.py shows these runs as scenario "longpoll-h2".
    #[arg(long)]
    http2: bool,
    /// Where publishes (and readiness checks) go, on plain HTTP: pushgate's own listener
    /// behind nginx, or Nchan's publisher location. Default: --server.
    #[arg(long)]
    publish_server: Option<SocketAddr>,
    /// Subscribers per source address (0: one address per worker). A stack with per-address
    /// limits in front (the shipped nginx site allows 512 connections and bursts of 150
    /// upgrades per address) needs them spread: 100 fits both.
    #[arg(long, default_value_t = 0)]
    per_address: usize,
}

impl RunArgs {
    /// Where publishes go.
    fn publisher(&self) -> SocketAddr {
        self.publish_server.unwrap_or(self.server)
    }

    /// Combinations of flags that cannot run.
    fn validate(&self) -> Result<(), String> {
        if self.http2 && self.scenario != Scenario::Longpoll {
            return Err(
                "--http2 is for the longpoll scenario only (WebSockets need HTTP/1.1 here)".into(),
            );
        }
        if self.http2 && self.tls_ca.is_none() {
            return Err("--http2 needs --tls-ca: HTTP/2 is spoken over TLS (ALPN h2)".into());
        }
        Ok(())
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Worker(a) => worker::run(a),
        Cmd::Floor(a) => floor::run(a),
        Cmd::Run(a) => {
            if a.load_cpu >= 0 && std::env::var_os("PGBENCH_PINNED").is_none() {
                // Re-run ourselves pinned to the load core; workers inherit the affinity.
                let exe = std::env::current_exe().expect("current exe");
                let status = std::process::Command::new("taskset")
                    .arg("-c")
                    .arg(a.load_cpu.to_string())
                    .arg(exe)
                    .args(std::env::args_os().skip(1))
                    .env("PGBENCH_PINNED", "1")
                    .status();
                match status {
                    Ok(s) => std::process::exit(s.code().unwrap_or(1)),
                    Err(e) => {
                        eprintln!("taskset failed ({e}); running unpinned");
                    }
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let code = rt.block_on(run(a));
            std::process::exit(code);
        }
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn event(&mut self, name: &str, deadline: Instant) -> Result<Value, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.next_line())
                .await
                .map_err(|_| format!("worker: no {name} event before the deadline"))?
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("worker exited before {name}"))?;
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
            if v["event"] == "error" {
                return Err(format!("worker: {}", v["error"]));
            }
            if v["event"] == name {
                return Ok(v);
            }
        }
    }

    async fn say(&mut self, what: &str) {
        let _ = self.stdin.write_all(format!("{what}\n").as_bytes()).await;
        let _ = self.stdin.flush().await;
    }
}

/// Source address of worker `w`: 127.R.0.10, 127.R.0.11, ... where R is picked once per run,
/// so that one run's sockets in TIME_WAIT never hold the ports the next run needs.
fn source(w: usize) -> IpAddr {
    static RUN: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let run = *RUN.get_or_init(|| {
        (std::process::id() as u64 ^ client::now_micros()).wrapping_mul(0x9E37_79B9) as u8 % 250 + 1
    });
    IpAddr::V4(Ipv4Addr::new(
        127,
        run,
        (w / 200) as u8,
        10 + (w % 200) as u8,
    ))
}

/// Source addresses a worker may spread its subscribers over (`--per-address`).
const SPREAD_ADDRESSES: usize = 4000;

/// The first source address of worker `w` when subscribers are spread over addresses: blocks
/// of [`SPREAD_ADDRESSES`] from 127.R.64.0 up, clear of [`source`]'s (the publishers').
fn spread_source(w: usize) -> IpAddr {
    let IpAddr::V4(first) = source(0) else {
        unreachable!("source() is IPv4")
    };
    let [_, run, _, _] = first.octets();
    let base = u32::from(Ipv4Addr::new(127, run, 64, 1));
    IpAddr::V4(Ipv4Addr::from(base + (w * 4096) as u32))
}

async fn spawn_workers(
    a: &RunArgs,
    transport: Transport,
    expect: u64,
) -> Result<Vec<Worker>, String> {
    let n = a.subscribers;
    let count = a
        .workers
        .unwrap_or_else(|| n.div_ceil(5000))
        .max(1)
        .min(n.max(1));
    if n.div_ceil(count) > 19_000 {
        return Err("more than 19000 sockets per worker: raise --workers".into());
    }
    if a.per_address > 0 && n.div_ceil(count).div_ceil(a.per_address) > SPREAD_ADDRESSES {
        return Err(format!(
            "more than {SPREAD_ADDRESSES} source addresses per worker: raise --per-address or --workers"
        ));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    let mut first = 0;
    for w in 0..count {
        let share = n / count + usize::from(w < n % count);
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .arg("--adapter")
            .arg(format!("{:?}", a.adapter).to_lowercase())
            .arg("--transport")
            .arg(
                transport
                    .to_possible_value()
                    .map_or_else(String::new, |v| v.get_name().to_string()),
            )
            .arg("--server")
            .arg(a.server.to_string())
            .arg("--source")
            .arg(if a.per_address > 0 {
                spread_source(w).to_string()
            } else {
                source(w).to_string()
            })
            .arg("--per-address")
            .arg(a.per_address.to_string())
            .arg("--tls-name")
            .arg(&a.tls_name)
            .arg("--topic")
            .arg(if a.scenario == Scenario::ManyTopics {
                "bench:t"
            } else {
                "bench:fan"
            })
            .arg("--first")
            .arg(first.to_string())
            .arg("--count")
            .arg(share.to_string())
            .arg("--expect")
            .arg(expect.to_string())
            .arg("--concurrency")
            .arg(a.concurrency.to_string());
        if a.scenario == Scenario::ManyTopics {
            cmd.arg("--distinct-topics");
        }
        if let Some(ca) = &a.tls_ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        if a.scenario == Scenario::Connect {
            cmd.arg("--connect-only");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| format!("spawning a worker: {e}"))?;
        let stdin = child.stdin.take().ok_or("no worker stdin")?;
        let stdout = child.stdout.take().ok_or("no worker stdout")?;
        workers.push(Worker {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
        first += share;
    }
    Ok(workers)
}

fn worker_pids(workers: &[Worker]) -> Vec<u32> {
    let mut pids: Vec<u32> = workers.iter().filter_map(|w| w.child.id()).collect();
    pids.push(std::process::id());
    pids
}

/// Waits until the server answers: its publisher endpoint, then (over TLS, when subscribers
/// use it) the subscriber address with any answer at all.
async fn wait_ready(a: &RunArgs, deadline: Instant) -> Result<(), String> {
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    loop {
        if let Ok(mut h) = Http::connect(local, a.publisher()).await {
            let path = match a.adapter {
                Adapter::Phoenix => "/readyz",
                Adapter::Nchan => "/pub/bench:ready",
            };
            if let Ok(reply) = h.request("GET", path, "", b"").await
                && reply.status < 500
            {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err("server not ready before the deadline".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if a.tls_ca.is_none() {
        return Ok(());
    }
    loop {
        let last = match Http::connect_secure(local, a.server).await {
            Ok(mut h) => match h.request("GET", "/", "", b"").await {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "no TLS answer from {} before the deadline: {last}",
                a.server
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Once the server answers over TLS: one request over HTTP/2, so that a server that does not
/// speak it (ALPN refused, no answer) stops the run with a clear error before any subscriber.
async fn probe_h2(server: SocketAddr) -> Result<(), String> {
    use client::Exchange;
    let probe = async {
        let mut h = client::H2::connect(IpAddr::V4(Ipv4Addr::LOCALHOST), server).await?;
        h.request("GET", "/", "", b"").await.map(|r| r.status)
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("--http2: {server}: {e}")),
        Err(_) => Err(format!(
            "--http2: {server} gave no HTTP/2 answer within 5 s"
        )),
    }
}

/// Nchan: subscribers registered on a channel, from its publisher endpoint's channel info.
async fn nchan_subscribers(addr: SocketAddr, topic: &str) -> Option<u64> {
    let mut h = Http::connect(IpAddr::V4(Ipv4Addr::LOCALHOST), addr)
        .await
        .ok()?;
    let reply = h
        .request(
            "GET",
            &format!("/pub/{topic}"),
            "Accept: text/json\r\n",
            b"",
        )
        .await
        .ok()?;
    let v: Value = serde_json::from_slice(reply.body).ok()?;
    v["subscribers"].as_u64()
}

struct Outcome {
    fields: serde_json::Map<String, Value>,
}

impl Outcome {
    fn set(&mut self, k: &str, v: impl Into<Value>) {
        self.fields.insert(k.into(), v.into());
    }
}

async fn run(a: RunArgs) -> i32 {
    match run_inner(a).await {
        Ok(ok) => {
            if ok {
                0
            } else {
                2
            }
        }
        Err(e) => {
            eprintln!("pushgate-bench: {e}");
            1
        }
    }
}

async fn run_inner(a: RunArgs) -> Result<bool, String> {
    a.validate()?;
    if let Some(ca) = &a.tls_ca {
        client::use_tls(ca, &a.tls_name)?;
    }
    let deadline = Instant::now() + Duration::from_secs_f64(a.timeout);
    // A server we start gets the token we publish with.
    let token = a
        .token
        .clone()
        .or_else(|| std::env::var("PUSHGATE_PUBLISH_TOKEN").ok())
        .unwrap_or_else(|| "pushgate-bench-token-0123456789".to_string());
    let mut out = Outcome {
        fields: serde_json::Map::new(),
    };
    out.set(
        "scenario",
        serde_json::to_value(a.scenario).unwrap_or_default(),
    );
    out.set(
        "adapter",
        serde_json::to_value(a.adapter).unwrap_or_default(),
    );
    out.set("label", a.label.clone());
    out.set("tls", a.tls_ca.is_some());
    out.set("http2", a.http2);
    out.set("subscribers", a.subscribers);
    out.set("server_cpu_core", a.server_cpu);
    out.set("load_cpu_core", a.load_cpu);

    // The server: ours to start, or given by pid.
    let mut spawned: Option<Child> = None;
    let server_pid = match (&a.spawn, a.server_pid) {
        (Some(cmd), _) => {
            let t0 = Instant::now();
            let child = Command::new("taskset")
                .arg("-c")
                .arg(a.server_cpu.to_string())
                .arg("sh")
                .arg("-c")
                .arg(format!("exec {cmd}"))
                .env("PUSHGATE_PUBLISH_TOKEN", &token)
                // One load generator is one client address opening thousands of connections:
                // pushgate's per-address limits (issue 16) would refuse it. Other servers
                // ignore these.
                .env("PUSHGATE_LIMITS_MAX_CONNECTIONS_PER_ADDRESS", "0")
                .env("PUSHGATE_LIMITS_CONNECT_RATE_PER_ADDRESS", "0")
                .env("PUSHGATE_LIMITS_JOIN_RATE_PER_CONNECTION", "0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("starting the server: {e}"))?;
            let pid = child.id();
            spawned = Some(child);
            wait_ready(&a, deadline).await?;
            out.set("cold_start_ms", t0.elapsed().as_secs_f64() * 1000.0);
            pid
        }
        (None, pid) => pid,
    };
    if a.http2 {
        probe_h2(a.server).await?;
    }
    let server_tree = || server_pid.map(procstat::tree).unwrap_or_default();
    let pss_before = procstat::pss_kib(&server_tree());
    out.set("server_pss_before_kib", pss_before);
    let anon_before = procstat::pss_anon_kib(&server_tree());

    let ok = match a.scenario {
        Scenario::Publish => publish_scenario(&a, &token, &mut out, &server_tree, deadline).await?,
        _ => {
            let before = (pss_before, anon_before);
            subscriber_scenario(&a, &token, &mut out, &server_tree, before, deadline).await?
        }
    };

    if let Some(mut child) = spawned {
        // SIGTERM first: nginx's master then stops its workers (a SIGKILL would orphan them,
        // still listening).
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    report(&out);
    Ok(ok)
}

async fn publish_scenario(
    a: &RunArgs,
    token: &str,
    out: &mut Outcome,
    server_tree: &dyn Fn() -> Vec<u32>,
    deadline: Instant,
) -> Result<bool, String> {
    let tree = server_tree();
    let cpu0 = procstat::cpu_seconds(&tree);
    let cli0 = procstat::cpu_seconds(&[std::process::id()]);
    let t0 = Instant::now();
    let until = (t0 + Duration::from_secs_f64(a.duration)).min(deadline);
    let mut tasks = Vec::new();
    for p in 0..a.publishers {
        let (adapter, server, token, size) =
            (a.adapter, a.publisher(), token.to_string(), a.payload);
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(source(p), server).await?;
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut seq = 0;
            while Instant::now() < until {
                let body = client::payload(seq, client::now_micros(), size);
                seq += 1;
                if client::publish(&mut http, adapter, &token, "bench:pub", &body).await? {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            Ok::<_, std::io::Error>((ok, failed))
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok((o, f))) => {
                ok += o;
                failed += f;
            }
            Ok(Err(e)) => return Err(format!("publisher: {e}")),
            Err(e) => return Err(e.to_string()),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = procstat::cpu_seconds(&tree) - cpu0;
    let cli = procstat::cpu_seconds(&[std::process::id()]) - cli0;
    out.set("publishers", a.publishers);
    out.set("payload_bytes", a.payload);
    out.set("published", ok);
    out.set("publish_failures", failed);
    out.set("duration_s", secs);
    out.set("publish_per_s", ok as f64 / secs);
    out.set("server_cpu_s", cpu);
    out.set("server_cpu_per_publish_us", cpu * 1e6 / ok.max(1) as f64);
    out.set("client_cpu_s", cli);
    Ok(failed == 0)
}

async fn subscriber_scenario(
    a: &RunArgs,
    token: &str,
    out: &mut Outcome,
    server_tree: &dyn Fn() -> Vec<u32>,
    (pss_before, anon_before): (u64, u64),
    deadline: Instant,
) -> Result<bool, String> {
    let transport = if a.scenario == Scenario::Longpoll && a.http2 {
        Transport::LpH2
    } else if a.scenario == Scenario::Longpoll {
        Transport::Lp
    } else {
        Transport::Ws
    };
    let expect = match a.scenario {
        Scenario::Fanout | Scenario::Longpoll => a.messages,
        Scenario::ManyTopics => 1,
        _ => 0,
    };
    let mut workers = spawn_workers(a, transport, expect).await?;
    out.set("workers", workers.len());
    out.set(
        "transport",
        serde_json::to_value(transport).unwrap_or_default(),
    );
    for w in &mut workers {
        w.event("spawned", deadline).await?;
    }
    let t_connect = Instant::now();
    for w in &mut workers {
        w.say("go").await;
    }
    let (mut connected, mut failed) = (0u64, 0u64);
    let mut errors = Vec::new();
    for w in &mut workers {
        let v = w.event("ready", deadline).await?;
        connected += v["connected"].as_u64().unwrap_or(0);
        failed += v["failed"].as_u64().unwrap_or(0);
        if let Some(e) = v["errors"].as_array() {
            errors.extend(e.iter().cloned());
        }
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    out.set("connected", connected);
    out.set("connect_failures", failed);
    if !errors.is_empty() {
        out.set("errors", Value::Array(errors.into_iter().take(5).collect()));
    }
    out.set("connect_s", connect_secs);
    out.set("connects_per_s", connected as f64 / connect_secs);

    if a.adapter == Adapter::Nchan && transport == Transport::Lp {
        // Wait until Nchan has registered every long-poll subscriber.
        loop {
            if nchan_subscribers(a.publisher(), "bench:fan").await >= Some(connected) {
                break;
            }
            if Instant::now() > deadline {
                return Err("nchan never saw every subscriber".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let tree = server_tree();
    let mut ok = failed == 0;
    match a.scenario {
        Scenario::Idle | Scenario::Connect => {
            // Let the server settle, then measure memory and CPU while nothing happens.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cpu0 = procstat::cpu_seconds(&tree);
            let hold = Duration::from_secs_f64(a.duration).min(deadline - Instant::now());
            tokio::time::sleep(hold).await;
            let cpu = procstat::cpu_seconds(&tree) - cpu0;
            let pss = procstat::pss_kib(&server_tree());
            out.set("server_pss_kib", pss);
            out.set(
                "server_kib_per_connection",
                (pss.saturating_sub(pss_before)) as f64 / connected.max(1) as f64,
            );
            let anon = procstat::pss_anon_kib(&server_tree());
            out.set(
                "server_anon_kib_per_connection",
                (anon.saturating_sub(anon_before)) as f64 / connected.max(1) as f64,
            );
            out.set("idle_cpu_percent", cpu * 100.0 / hold.as_secs_f64());
            for w in &mut workers {
                w.say("stop").await;
            }
            for w in &mut workers {
                let _ = w.event("done", deadline).await;
            }
        }
        _ => {
            let cpu0 = procstat::cpu_seconds(&tree);
            let pids = worker_pids(&workers);
            let cli0 = procstat::cpu_seconds(&pids);
            let t0 = Instant::now();
            let topics: Vec<String> = if a.scenario == Scenario::ManyTopics {
                (0..a.subscribers).map(|i| format!("bench:t{i}")).collect()
            } else {
                vec!["bench:fan".to_string()]
            };
            let behind = publish_messages(a, token, &topics, deadline).await?;
            let publish_secs = t0.elapsed().as_secs_f64();
            // Give deliveries time to finish, then ask stragglers to report.
            let drain = (Instant::now() + Duration::from_secs(10)).min(deadline);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
            let (mut received, mut missing, mut dups, mut ooo) = (0u64, 0u64, 0u64, 0u64);
            let mut last_done = Instant::now();
            for w in &mut workers {
                let v = match w.event("done", drain).await {
                    Ok(v) => v,
                    Err(_) => {
                        w.say("stop").await;
                        w.event("done", deadline + Duration::from_secs(5)).await?
                    }
                };
                last_done = Instant::now().max(last_done);
                received += v["received"].as_u64().unwrap_or(0);
                missing += v["missing"].as_u64().unwrap_or(0);
                dups += v["duplicates"].as_u64().unwrap_or(0);
                ooo += v["out_of_order"].as_u64().unwrap_or(0);
                if let Some(b) = v["hist"].as_str()
                    && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b)
                {
                    let mut d = Deserializer::new();
                    if let Ok(h) = d.deserialize::<u64, _>(&mut &bytes[..]) {
                        let _ = hist.add(h);
                    }
                }
            }
            let secs = last_done.duration_since(t0).as_secs_f64();
            let cpu = procstat::cpu_seconds(&tree) - cpu0;
            let cli = procstat::cpu_seconds(&pids) - cli0;
            let expected = connected * expect;
            out.set("messages", a.messages);
            out.set("rate", a.rate);
            out.set("payload_bytes", a.payload);
            out.set("publish_s", publish_secs);
            // How late the publisher got behind its schedule (a server that answers publishes
            // slowly holds the next one back); latency counts from each message's due time.
            out.set("publish_behind_max_ms", behind.as_secs_f64() * 1000.0);
            out.set("deliveries", received);
            out.set("expected_deliveries", expected);
            out.set("missing", missing);
            out.set("duplicates", dups);
            out.set("out_of_order", ooo);
            out.set("duration_s", secs);
            out.set("deliveries_per_s", received as f64 / secs);
            out.set("server_cpu_s", cpu);
            out.set(
                "server_cpu_per_delivery_us",
                cpu * 1e6 / received.max(1) as f64,
            );
            out.set("client_cpu_s", cli);
            out.set(
                "client_cpu_per_delivery_us",
                cli * 1e6 / received.max(1) as f64,
            );
            for (k, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
                out.set(&format!("latency_{k}_us"), hist.value_at_quantile(q));
            }
            out.set("latency_max_us", hist.max());
            out.set("server_pss_kib", procstat::pss_kib(&server_tree()));
            ok = ok && missing == 0 && dups == 0 && ooo == 0 && received == expected;
        }
    }
    for w in &mut workers {
        let _ = w.child.start_kill();
    }
    out.set("ok", ok);
    Ok(ok)
}

/// Publishes the run's messages; returns how far the publishers fell behind their schedule.
async fn publish_messages(
    a: &RunArgs,
    token: &str,
    topics: &[String],
    deadline: Instant,
) -> Result<Duration, String> {
    let conns = if topics.len() > 1 {
        a.publishers.max(1)
    } else {
        1
    };
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mine: Vec<String> = topics.iter().skip(c).step_by(conns).cloned().collect();
        let (adapter, server, token, size) =
            (a.adapter, a.publisher(), token.to_string(), a.payload);
        let (messages, rate) = (if topics.len() > 1 { 1 } else { a.messages }, a.rate);
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(source(200 + c), server).await?;
            let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
            let (start, start_wall) = (Instant::now(), client::now_micros());
            let mut behind = Duration::ZERO;
            for seq in 0..messages {
                // At a fixed rate, each message carries the time it was due, not the time it
                // went out: a server that answers a publish late delays the next one, and that
                // wait is part of the next message's latency (no coordinated omission).
                let mut due_ts = None;
                if let Some(iv) = interval {
                    let due = iv.mul_f64(seq as f64);
                    let now = Instant::now();
                    if start + due > now {
                        tokio::time::sleep(start + due - now).await;
                    } else {
                        behind = behind.max(now - (start + due));
                    }
                    due_ts = Some(start_wall + due.as_micros() as u64);
                }
                if Instant::now() > deadline {
                    break;
                }
                for topic in &mine {
                    let ts = due_ts.unwrap_or_else(client::now_micros);
                    let body = client::payload(seq, ts, size);
                    if !client::publish(&mut http, adapter, &token, topic, &body).await? {
                        return Err(std::io::Error::other(format!("publish to {topic} refused")));
                    }
                }
            }
            Ok::<_, std::io::Error>(behind)
        }));
    }
    let mut behind = Duration::ZERO;
    for t in tasks {
        let b = t
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("publisher: {e}"))?;
        behind = behind.max(b);
    }
    Ok(behind)
}

fn report(out: &Outcome) {
    let mut table = String::new();
    for (k, v) in &out.fields {
        let shown = match v {
            Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap_or(0.0)),
            other => other.to_string(),
        };
        table.push_str(&format!("  {k:<30} {shown}\n"));
    }
    eprintln!("{table}");
    println!("{}", Value::Object(out.fields.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_sequence_and_timestamp_from_frames_and_escaped_bodies() {
        let mut got = Vec::new();
        let frame = br#"[null,"a:1","t","m",{"pgseq":7,"pgts":123,"pad":"x"}]"#;
        client::scan_messages(frame, |s, t| got.push((s, t)));
        let body = br#"{"messages":["[null,\"a:1\",\"t\",\"m\",{\"pgseq\":8,\"pgts\":5}]","[null,\"a:2\",\"t\",\"m\",{\"pgseq\":9,\"pgts\":6}]"]}"#;
        client::scan_messages(body, |s, t| got.push((s, t)));
        assert_eq!(got, [(7, 123), (8, 5), (9, 6)]);
    }

    #[test]
    fn payload_has_the_requested_size() {
        let p = client::payload(3, 1_700_000_000_000_000, 200);
        assert_eq!(p.len(), 200);
        assert!(serde_json::from_str::<Value>(&p).is_ok());
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["pushgate-bench", "run"].iter().chain(args)).unwrap();
        match cli.command {
            Cmd::Run(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn http2_is_for_longpoll_over_tls_only() {
        let ok = run_args(&["longpoll", "--http2", "--tls-ca", "ca.pem"]);
        assert!(ok.http2);
        assert_eq!(ok.validate(), Ok(()));
        let ok = run_args(&[
            "longpoll",
            "--adapter",
            "nchan",
            "--http2",
            "--tls-ca",
            "ca.pem",
        ]);
        assert_eq!(ok.validate(), Ok(()));
        let no_tls = run_args(&["longpoll", "--http2"]).validate().unwrap_err();
        assert!(no_tls.contains("--tls-ca"), "{no_tls}");
        for scenario in ["fanout", "idle", "connect", "publish", "many-topics"] {
            let e = run_args(&[scenario, "--http2", "--tls-ca", "ca.pem"])
                .validate()
                .unwrap_err();
            assert!(e.contains("longpoll"), "{scenario}: {e}");
        }
        // Without the flag nothing changes.
        assert!(!run_args(&["longpoll"]).http2);
        assert_eq!(
            run_args(&["fanout", "--tls-ca", "ca.pem"]).validate(),
            Ok(())
        );
    }

    #[test]
    fn workers_get_a_transport_they_parse() {
        for t in [Transport::Ws, Transport::Lp, Transport::LpH2] {
            let name = t.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(Transport::from_str(&name, false), Ok(t));
        }
        assert_eq!(
            Transport::LpH2.to_possible_value().unwrap().get_name(),
            "lp-h2"
        );
        assert_eq!(serde_json::to_value(Transport::LpH2).unwrap(), "lp-h2");
        assert_eq!(serde_json::to_value(Transport::Lp).unwrap(), "lp");
    }

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        assert!(source(0).to_string().ends_with(".0.10"));
        assert!(source(0).is_loopback());
        assert_ne!(source(1), source(201));
    }
}
