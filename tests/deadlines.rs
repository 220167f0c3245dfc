//! Every read has a deadline (issue 16, item 3): a socket that sends nothing, an idle
//! keep-alive connection, a request body that stalls (in the lean HTTP/1.1 loop and under
//! hyper) are closed once their deadline passes, so they cannot hold connection slots forever.
//! Each forced close is counted in `pushgate_refusals_total{cause="timeout"}`.
//!
//! Deadlines are configured short here; each assertion allows the deadline plus [`SLACK`].

mod support;

use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How late after its deadline a connection may be closed.
const SLACK: Duration = Duration::from_millis(2000);

/// Reads until the server ends the connection; returns what arrived and when it ended.
/// Fails if the connection is still open at `by`.
async fn read_until_closed(s: &mut TcpStream, by: Instant) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(by, s.read(&mut chunk)).await {
            Err(_) => panic!(
                "the connection is still open at its deadline; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Instant::now()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn timeouts(addr: std::net::SocketAddr) -> f64 {
    metric(addr, r#"pushgate_refusals_total{cause="timeout"}"#)
        .await
        .expect("pushgate_refusals_total{cause=\"timeout\"} is exported")
}

fn publish_head(len: usize, extra: &str) -> String {
    format!(
        "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\n{extra}Content-Length: {len}\r\n\r\n"
    )
}

/// With every slot held by a socket that never sends a byte (the issue's 100 of 100), each of
/// them is closed at the header deadline, and a new client's `/healthz` then succeeds.
#[tokio::test]
async fn silent_sockets_are_closed_and_free_their_slots() {
    install_panic_counter();
    const N: usize = 100;
    let mut config = test_config();
    config.server.max_connections = N;
    config.server.header_read_timeout_ms = 500;
    let deadline = Duration::from_millis(500);
    let s = start_with(config).await;

    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..N {
        silent.push(TcpStream::connect(s.addr).await.unwrap());
    }
    for mut c in silent {
        let (got, at) = read_until_closed(&mut c, opened + deadline + SLACK).await;
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        assert!(at >= opened + deadline, "closed before its deadline");
    }
    // A legitimate client gets its answer (the slots are free again).
    let (status, _, _) = http(s.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    assert!(timeouts(s.addr).await >= N as f64);
    assert_eq!(server_panics(), 0);
}

/// A publish connection of the lean loop that stays idle after its answer is closed after
/// `server.keepalive_timeout_ms`; a busy one is not.
#[tokio::test]
async fn an_idle_keep_alive_connection_of_the_lean_loop_is_closed() {
    install_panic_counter();
    let mut config = test_config();
    config.server.keepalive_timeout_ms = 700;
    let deadline = Duration::from_millis(700);
    let s = start_with(config).await;
    let body = r#"{"topic":"deadline:ka","event":"m","payload":{}}"#;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    // Requests closer together than the deadline keep the connection.
    for _ in 0..3 {
        c.write_all(format!("{}{body}", publish_head(body.len(), "")).as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.ends_with(b"}") {
            let n = tokio::time::timeout(DEADLINE, c.read(&mut chunk))
                .await
                .expect("answer in time")
                .unwrap();
            assert!(n > 0, "closed while busy");
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
        tokio::time::sleep(deadline / 3).await; // client think time, shorter than the deadline
    }
    let idle_from = Instant::now();
    let (got, at) = read_until_closed(&mut c, idle_from + deadline + SLACK).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(at + Duration::from_millis(50) >= idle_from + deadline - deadline / 3);
    assert!(timeouts(s.addr).await >= 1.0);
    assert_eq!(server_panics(), 0);
}

/// A `Content-Length` body that stops arriving, in the lean loop: 408, then the close, at
/// `server.body_timeout_ms`.
#[tokio::test]
async fn a_stalled_body_in_the_lean_loop_gets_408() {
    install_panic_counter();
    let mut config = test_config();
    config.server.body_timeout_ms = 600;
    let deadline = Duration::from_millis(600);
    let s = start_with(config).await;
    let body = r#"{"topic":"deadline:body","event":"m","payload":{}}"#;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(format!("{}{}", publish_head(body.len(), ""), &body[..10]).as_bytes())
        .await
        .unwrap();
    let sent = Instant::now();
    let (got, at) = read_until_closed(&mut c, sent + deadline + SLACK).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(at >= sent + deadline);
    assert!(timeouts(s.addr).await >= 1.0);
    assert_eq!(server_panics(), 0);
}

/// A chunked body (served by hyper) that stops arriving: 408 and the close, at
/// `server.body_timeout_ms`.
#[tokio::test]
async fn a_stalled_chunked_body_under_hyper_gets_408() {
    install_panic_counter();
    let mut config = test_config();
    config.server.body_timeout_ms = 600;
    let deadline = Duration::from_millis(600);
    let s = start_with(config).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"top\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let (got, at) = read_until_closed(&mut c, sent + deadline + SLACK).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(at >= sent + deadline);
    assert!(timeouts(s.addr).await >= 1.0);

    // The same for a LongPoll POST (hyper: chunked), which must not hold its session's slot.
    let (_, _, open) = http(s.addr, "GET", "/socket/longpoll?vsn=2.0.0", &[], b"").await;
    let token = body_json(&open)["token"]
        .as_str()
        .expect("a LongPoll session token")
        .to_string();
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /socket/longpoll?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: t\r\n\
         Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[\"1\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let (got, _) = read_until_closed(&mut c, sent + deadline + SLACK).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(server_panics(), 0);
}

/// A Content-Length body under hyper (HTTP/1.0 goes there) that stalls: 408 too.
#[tokio::test]
async fn a_stalled_body_under_hyper_gets_408() {
    install_panic_counter();
    let mut config = test_config();
    config.server.body_timeout_ms = 600;
    let deadline = Duration::from_millis(600);
    let s = start_with(config).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 50\r\n\r\n{{\"topic\""
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let (got, at) = read_until_closed(&mut c, sent + deadline + SLACK).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408") || text.starts_with("HTTP/1.0 408"),
        "{text}"
    );
    assert!(at >= sent + deadline);
    assert_eq!(server_panics(), 0);
}

/// A request head that stops half way in the lean loop is answered 408 and closed at
/// `server.header_read_timeout_ms`, and counted.
#[tokio::test]
async fn a_stalled_head_in_the_lean_loop_gets_408() {
    install_panic_counter();
    let mut config = test_config();
    config.server.header_read_timeout_ms = 500;
    let deadline = Duration::from_millis(500);
    let s = start_with(config).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Le")
        .await
        .unwrap();
    let sent = Instant::now();
    let (got, at) = read_until_closed(&mut c, sent + deadline + SLACK).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(at >= sent + deadline - Duration::from_millis(50));
    assert!(timeouts(s.addr).await >= 1.0);
    assert_eq!(server_panics(), 0);
}

/// hyper's connections (here after a `/healthz`) are closed when idle, and counted.
#[tokio::test]
async fn an_idle_keep_alive_connection_under_hyper_is_closed_and_counted() {
    install_panic_counter();
    let mut config = test_config();
    config.server.header_read_timeout_ms = 500;
    let deadline = Duration::from_millis(500);
    let s = start_with(config).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let sent = Instant::now();
    let (got, _) = read_until_closed(&mut c, sent + deadline + SLACK).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    assert!(timeouts(s.addr).await >= 1.0);
    assert_eq!(server_panics(), 0);
}

/// A WebSocket handshake whose head stops half way (served by hyper) is closed at
/// `server.header_read_timeout_ms` (the first bytes came at once), and counted.
#[tokio::test]
async fn a_stalled_websocket_handshake_is_closed_and_counted() {
    install_panic_counter();
    let mut config = test_config();
    config.server.header_read_timeout_ms = 500;
    let deadline = Duration::from_millis(500);
    let s = start_with(config).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let sent = Instant::now();
    let (got, at) = read_until_closed(&mut c, sent + deadline + SLACK).await;
    assert!(!got.starts_with(b"HTTP/1.1 101"), "{got:?}");
    assert!(at >= sent + deadline - Duration::from_millis(50));
    assert!(timeouts(s.addr).await >= 1.0);
    // A complete handshake is unaffected.
    let mut ws = connect(s.addr).await;
    join(&mut ws, "1", "room:deadline", "{}").await;
    assert_eq!(server_panics(), 0);
}

/// A connection keeps its slot through a refused WebSocket upgrade (here: no `Upgrade`
/// header, 400): with `max_connections` connections open, one more is not served until one of
/// them closes.
#[tokio::test]
async fn a_refused_websocket_upgrade_keeps_its_connections_slot() {
    install_panic_counter();
    let mut config = test_config();
    config.server.max_connections = 2;
    let s = start_with(config).await;
    // A: a refused upgrade, then the connection stays open (keep-alive).
    let mut a = TcpStream::connect(s.addr).await.unwrap();
    a.write_all(b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, a.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // B: a second connection, served (its slot was waiting in the accept loop).
    let mut b = TcpStream::connect(s.addr).await.unwrap();
    b.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(DEADLINE, b.read(&mut chunk))
        .await
        .expect("B answered")
        .unwrap();
    assert!(chunk[..n].starts_with(b"HTTP/1.1 200"));
    // C: over the limit, it waits (in the kernel's queue) while A and B are open...
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), c.read(&mut chunk)).await;
    assert!(
        early.is_err(),
        "a third connection was served past max_connections = 2"
    );
    // ...and is served once A closes.
    drop(a);
    let (got, _) = read_until_closed(&mut c, Instant::now() + DEADLINE).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    drop(b);
    assert_eq!(server_panics(), 0);
}
