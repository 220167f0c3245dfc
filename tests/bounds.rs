//! Bounds on what a node keeps (issue 16): `limits.max_topics` caps the topics it holds, a topic
//! that only ever carried presence diffs does not outlive its last subscriber by minutes, and
//! what a client presents at connect (query string, auth token) is refused past its bound.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::*;
use tokio::time::Instant;

/// Waits until the `/metrics` sample equals `want`, for at most `within`.
async fn wait_metric_within(addr: std::net::SocketAddr, sample: &str, want: f64, within: Duration) {
    let end = Instant::now() + within;
    loop {
        let v = metric(addr, sample).await;
        if v == Some(want) {
            return;
        }
        assert!(Instant::now() < end, "{sample} is {v:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Frames until the `phx_close` of `topic` (other frames, such as presence, are skipped).
async fn until_close(ws: &mut Ws, topic: &str) {
    loop {
        let m = recv(ws).await;
        if m[2] == topic && m[3] == "phx_close" {
            return;
        }
    }
}

#[tokio::test]
async fn a_join_that_would_create_a_topic_past_max_topics_is_refused_and_the_connection_lives_on() {
    let mut c = test_config();
    c.limits.max_topics = 5;
    let s = start_with(c).await;
    let mut a = connect(s.addr).await;
    let mut b = connect(s.addr).await;
    for i in 1..=5 {
        join(&mut a, &i.to_string(), &format!("room:{i}"), "{}").await;
    }
    send(&mut a, r#"["6","6","room:6","phx_join",{}]"#).await;
    let r = recv(&mut a).await;
    assert_eq!(
        (&r[0], &r[1], &r[2], &r[3]),
        (
            &"6".into(),
            &"6".into(),
            &"room:6".into(),
            &"phx_reply".into()
        ),
        "{r}"
    );
    assert_eq!(r[4]["status"], "error", "{r}");
    let reason = r[4]["response"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("limits.max_topics"), "{r}");
    assert_eq!(s.app.hub.subscriber_count("room:6"), 0);
    assert_eq!(metric(s.addr, "pushgate_topics").await, Some(5.0));
    assert_eq!(
        metric(s.addr, r#"pushgate_refusals_total{cause="topic_cap"}"#).await,
        Some(1.0)
    );

    // Existing topics may still be joined, by anyone, and keep delivering.
    join(&mut b, "1", "room:1", "{}").await;
    let pos = publish(s.addr, "room:1", "still_here", "{}").await;
    for ws in [&mut a, &mut b] {
        let m = recv(ws).await;
        assert_eq!(
            (&m[1], &m[3]),
            (&Value::from(pos.as_str()), &"still_here".into()),
            "{m}"
        );
    }
    send(&mut a, r#"[null,"9","phoenix","heartbeat",{}]"#).await;
    assert_eq!(recv(&mut a).await[4]["status"], "ok");
}

/// 500 joins and leaves on distinct presence topics (each leaves a `presence_diff` in its
/// topic's history) leave no topics behind soon after; a topic that carried an app message
/// keeps its history.
#[tokio::test]
async fn a_presence_topic_flood_leaves_no_topics_behind() {
    let mut c = test_config();
    c.presence.topics = vec!["room:*".into()];
    // The flood is one connection's 500 joins: the join rate (tests/admission.rs) would refuse
    // most of them; what is under test is what the accepted ones leave behind.
    c.limits.join_rate_per_connection = 0;
    let s = start_with(c).await;
    assert_eq!(s.app.config.history.max_age_secs, 300);
    let mut ws = connect(s.addr).await;
    let pos = publish(s.addr, "room:keep", "news", "{}").await;
    for i in 0..500 {
        let topic = format!("room:{i}");
        let r = i.to_string();
        send(
            &mut ws,
            &format!(r#"["{r}","{r}","{topic}","phx_join",{{"presence":{{"n":{i}}}}}]"#),
        )
        .await;
        send(
            &mut ws,
            &format!(r#"["{r}","x{r}","{topic}","phx_leave",{{}}]"#),
        )
        .await;
        until_close(&mut ws, &topic).await;
    }
    // Only the topic with an app message remains, well before history.max_age_secs.
    wait_metric_within(s.addr, "pushgate_topics", 1.0, Duration::from_secs(25)).await;
    // (A fresh connection: the first may still carry presence frames of the flood.)
    let mut ws = connect(s.addr).await;
    let reply = join(
        &mut ws,
        "k",
        "room:keep",
        &format!(r#"{{"since":"{}"}}"#, pos_before(&pos)),
    )
    .await;
    assert_eq!(reply["recovered"], true, "{reply}");
}

/// The position just before `pos` (`epoch:offset`).
fn pos_before(pos: &str) -> String {
    let (epoch, offset) = split_position(pos);
    format!("{epoch}:{}", offset - 1)
}

/// A WebSocket upgrade request (raw HTTP, so the status of a refusal can be read).
fn upgrade_request(addr: std::net::SocketAddr, query: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "GET /socket/websocket?{query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    if let Some(p) = protocol {
        r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// Read the status line and headers of a response that does not end (a 101).
async fn response_head(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut chunk))
            .await
            .expect("response timed out")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).to_string()
}

/// The query string and the auth token are kept for the life of a connection or LongPoll
/// session (joins check them), so each is bounded: past it, the connect is refused with a clear
/// status (WebSocket: HTTP 414 or 431 before the upgrade; LongPoll: `{"status":403}` with a
/// reason) and nothing is kept. At the bound, both transports connect.
#[tokio::test]
async fn an_oversized_query_string_or_auth_token_is_refused_at_connect() {
    let s = start().await;
    let max_query = pushgate::auth::MAX_CONNECT_QUERY_BYTES;
    let max_token = pushgate::auth::MAX_AUTH_TOKEN_BYTES;
    let query = |len: usize| {
        let head = "vsn=2.0.0&pad=";
        format!("{head}{}", "q".repeat(len - head.len()))
    };

    // WebSocket.
    let head = response_head(
        s.addr,
        &upgrade_request(s.addr, &query(max_query + 1), None),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 414"), "{head}");
    let token = base64_no_pad(&"t".repeat(max_token + 1));
    let protocol = format!("phoenix, base64url.bearer.phx.{token}");
    let head = response_head(
        s.addr,
        &upgrade_request(s.addr, "vsn=2.0.0", Some(&protocol)),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    let head = response_head(s.addr, &upgrade_request(s.addr, &query(max_query), None)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    // LongPoll: the session-creating GET.
    let lp = |path: String, headers: Vec<(&'static str, String)>| async move {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, head, body) = try_http(s.addr, "GET", &path, &headers, b"").await.unwrap();
        assert_eq!(status, 200, "{head}");
        body_json(&body)
    };
    let r = lp(format!("/socket/longpoll?{}", query(max_query + 1)), vec![]).await;
    assert_eq!(r["status"], 403, "{r}");
    assert!(
        r["reason"].as_str().unwrap_or_default().contains("query"),
        "{r}"
    );
    let r = lp(
        "/socket/longpoll?vsn=2.0.0".into(),
        vec![("X-Phoenix-AuthToken", "t".repeat(max_token + 1))],
    )
    .await;
    assert_eq!(r["status"], 403, "{r}");
    assert!(
        r["reason"].as_str().unwrap_or_default().contains("token"),
        "{r}"
    );
    assert_eq!(
        metric(s.addr, r#"pushgate_connections{transport="longpoll"}"#).await,
        Some(0.0),
        "nothing is kept for a refused session"
    );
    let r = lp(
        format!("/socket/longpoll?{}", query(max_query)),
        vec![("X-Phoenix-AuthToken", "t".repeat(max_token))],
    )
    .await;
    assert_eq!(r["status"], 410, "at the bounds a session is created: {r}");
}

/// Standard base64 without padding (what phoenix.js puts in the subprotocol).
fn base64_no_pad(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(s)
}

/// A LongPoll request; returns the JSON answer (always HTTP 200).
async fn longpoll(s: &TestServer, method: &str, token: &str, body: &str) -> Value {
    let path = format!("/socket/longpoll?vsn=2.0.0&token={token}");
    let (status, head, body) = try_http(s.addr, method, &path, &[], body.as_bytes())
        .await
        .unwrap();
    assert_eq!(status, 200, "{head}");
    body_json(&body)
}

/// The issue's case over LongPoll: a session posting 100 joins with 9 KB refs (200 such
/// sessions held 381 MB). Every join is refused with an error reply that does not echo the
/// ref, nothing is joined, and the session goes on working.
#[tokio::test]
async fn longpoll_joins_with_oversized_refs_keep_nothing() {
    let s = start().await;
    let token = longpoll(&s, "GET", "", "").await["token"]
        .as_str()
        .expect("a session")
        .to_string();
    let long = "9".repeat(9 * 1024);
    let lines: Vec<String> = (0..100)
        .map(|i| format!(r#"["{long}","{long}","room:{i}","phx_join",{{}}]"#))
        .collect();
    // Two POSTs of 50 (both refs of a line are 9 KB: 50 lines are 0.9 MB, under
    // longpoll.max_post_bytes).
    for half in lines.chunks(50) {
        assert_eq!(
            longpoll(&s, "POST", &token, &half.join("\n")).await["status"],
            200
        );
    }
    let mut replies = Vec::new();
    while replies.len() < 100 {
        let answer = longpoll(&s, "GET", &token, "").await;
        assert_eq!(answer["status"], 200, "{answer}");
        for m in answer["messages"].as_array().unwrap() {
            replies.push(serde_json::from_str::<Value>(m.as_str().unwrap()).unwrap());
        }
    }
    for (i, r) in replies.iter().enumerate() {
        assert_eq!((&r[0], &r[1]), (&Value::Null, &Value::Null), "{r}");
        assert_eq!(r[2], format!("room:{i}"), "{r}");
        assert_eq!(r[4]["status"], "error", "{r}");
        assert_eq!(s.app.hub.subscriber_count(&format!("room:{i}")), 0);
    }
    let join = r#"["1","1","room:ok","phx_join",{}]"#;
    assert_eq!(longpoll(&s, "POST", &token, join).await["status"], 200);
    let answer = longpoll(&s, "GET", &token, "").await;
    let reply: Value = serde_json::from_str(answer["messages"][0].as_str().unwrap()).unwrap();
    assert_eq!(reply[4]["status"], "ok", "{answer}");
    assert_eq!(s.app.hub.subscriber_count("room:ok"), 1);
}

/// The real binary, `serve` on a port of its choosing (`--listen 127.0.0.1:0`, read from its
/// log) with `env`; killed on drop. For a test that measures the server process itself.
struct Binary {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Binary {
    fn start(env: &[(&str, &str)]) -> Binary {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PUSHGATE_") || k == "PORT" {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("PUSHGATE_PUBLISH_TOKEN", TOKEN)
            .env("PUSHGATE_LOG_FORMAT", "plain")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn pushgate serve");
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .filter(|_| line.contains("listening"))
                {
                    let _ = tx.send(addr.trim_matches('"').to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(DEADLINE)
            .expect("pushgate serve logged no listening address")
            .parse()
            .unwrap();
        Binary { child, addr }
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`: resident now, at its peak).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Memory stays bounded while a consumer stalls (README: pending broadcasts live in the shared
/// topic buffer; a subscriber that falls behind is closed with 1013). A WebSocket client joins
/// and then never reads while a publisher pushes 60 MB through its topic (6000 messages of
/// 10 KB, history.size 64): the client is closed with 1013, and the server process (the real
/// binary, so that its memory is its own) peaks (VmHWM) within 32 MiB of its resident memory
/// before the publishing, though what went through is twice that: nothing per message is kept
/// for the stalled client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_a_websocket_consumer_stalls() {
    const BOUND_KIB: u64 = 32 * 1024;
    let server = Binary::start(&[
        ("PUSHGATE_HISTORY_SIZE", "64"),
        ("PUSHGATE_PUBLISH_MAX_BODY_BYTES", "4194304"),
    ]);
    let addr = server.addr;
    let mut stalled = connect(addr).await;
    join(&mut stalled, "1", "room:stall", "{}").await;
    // One publish first, so that the topic, its buffer and the publish path are warm.
    publish(addr, "room:stall", "warm", "{}").await;
    let before = server.status_kib("VmRSS");

    let (batches, per_batch) = (120, 50);
    let blob = "x".repeat(10_000);
    let auth = format!("Bearer {TOKEN}");
    for b in 0..batches {
        let items: Vec<String> = (0..per_batch)
            .map(|i| {
                format!(
                    r#"{{"topic":"room:stall","event":"e","payload":{{"n":{},"blob":"{blob}"}}}}"#,
                    b * per_batch + i
                )
            })
            .collect();
        let body = format!("[{}]", items.join(","));
        let (status, _, reply) = post_publish(addr, Some(&auth), body.as_bytes()).await;
        assert_eq!(status, 200, "{reply}");
    }
    let peak = server.status_kib("VmHWM");
    let after = server.status_kib("VmRSS");
    let sent_kib = (batches * per_batch) as u64 * 10_000 / 1024;
    eprintln!(
        "VmRSS {before} KiB before, VmHWM {peak} KiB, VmRSS {after} KiB after {sent_kib} KiB"
    );
    assert!(
        peak < before + BOUND_KIB,
        "resident memory peaked at {peak} KiB, {} KiB over the {before} KiB before \
         {sent_kib} KiB went to a stalled consumer (bound: {BOUND_KIB} KiB); now {after} KiB",
        peak - before
    );
    assert_eq!(
        metric(
            addr,
            r#"pushgate_slow_consumer_closes_total{transport="websocket"}"#
        )
        .await,
        Some(1.0)
    );
    // Its close frame comes after what was written before it fell behind.
    assert_eq!(recv_close(&mut stalled).await, 1013);
}
